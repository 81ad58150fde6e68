"""`xrdmatch train` (owner: training): labelled set + unlabelled XRD patterns -> saved Ensemble."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import typer

if TYPE_CHECKING:
    from xrdmatch.config import Config
    from xrdmatch.platform.data import LabelledSet


@dataclass
class TrainingInputs:
    """What a training run reads, loaded once: the labelled set with its sample weights and the
    unlabelled pool (the database's patterns minus the labelled structures)."""

    labelled: "LabelledSet"
    weights: Any
    unlabelled: Any


def training_inputs(cfg: "Config") -> TrainingInputs:
    from xrdmatch.platform.patterns import ensure_patterns
    from xrdmatch.training.dataset import build_training_set, unlabelled_pool

    patterns = ensure_patterns(cfg)
    ls, weights = build_training_set(cfg, patterns)
    return TrainingInputs(ls, weights, unlabelled_pool(patterns, ls))


def train_run(cfg: "Config", *, use_ray: bool = True, log_fn: Callable[[int, dict], None] | None = None,
              run_id: str | None = None, inputs: TrainingInputs | None = None) -> Path:
    """Train the ensemble of ``cfg`` and save it under ``RunPaths.models_dir/<run id>``; returns the folder.

    The MLflow layer wraps this (``log_fn`` gets every member's per-step metrics) and passes
    the ``inputs`` it has already loaded.
    """
    import time
    import warnings

    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.training.ensemble import train_ensemble

    paths = RunPaths.of(cfg.run_dir)
    run_id = run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    inputs = inputs or training_inputs(cfg)
    ls, weights, X_unlab = inputs.labelled, inputs.weights, inputs.unlabelled
    if len(X_unlab) == 0 and cfg.training.algorithm != "supervised":
        warnings.warn("no unlabelled patterns: training supervised only", stacklevel=1)
    tcfg = cfg.training if len(X_unlab) else cfg.training.model_copy(update={"algorithm": "supervised"})
    ens = train_ensemble(ls.X, ls.y, X_unlab, tcfg, sample_weight=weights, use_ray=use_ray, log_fn=log_fn,
                         run_dir=paths.root / "train" / run_id, run_name=run_id, ray_cfg=cfg.ray)
    ens.info = {"run_id": run_id, "labelled_hash": ls.hash(), "n_labelled": len(ls),
                "n_unlabelled": int(min(len(X_unlab), tcfg.unlabelled_limit or len(X_unlab))),
                "training": tcfg.model_dump(mode="json")}
    return ens.save(paths.models_dir / run_id)


def tracked_train(cfg: "Config", *, use_ray: bool = True, register: bool = True, echo=print) -> dict:
    """``train_run`` inside an MLflow run: config as params, per-step curves of every member and a
    learning-curves PNG, lineage tags, the promotion metric (``xrdmatch.platform.champion``),
    then registration as one pyfunc model with the champion/challenger rule.

    Resumable and idempotent: the run is named by the training key (code, data, settings; as a
    campaign round's), so a rerun after a kill reopens the same MLflow run, resumes the members
    from their Ray Train checkpoints and reuses a saved ensemble and cached champion members; a
    rerun after it finished registers nothing twice (it settles the version a crash may have
    left bare)."""
    import time

    import mlflow
    import numpy as np

    from xrdmatch.platform.campaign import training_key
    from xrdmatch.platform.champion import UnscorableVersion, champion_metrics
    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.platform.registry import register_ensemble, settle_version, version_of_run
    from xrdmatch.platform.tracking import configure, lineage_tags, log_training, mlflow_run, runs_tagged
    from xrdmatch.training.ensemble import Ensemble, unlabelled_subset

    inputs = training_inputs(cfg)
    ls, weights, pool = inputs.labelled, inputs.weights, inputs.unlabelled
    lineage = lineage_tags(ls, unlabelled_subset(pool, cfg.training))  # what the members see
    key = training_key(cfg, lineage)
    run_id = f"train-{key}"
    configure(cfg)
    earlier = runs_tagged(cfg, {"xrdmatch.train_key": key})
    for r in earlier:
        mv = version_of_run(cfg, r.info.run_id)
        if mv is not None:  # trained and registered before: settle (a crash may have left it bare)
            metrics = {k: v for k, v in r.data.metrics.items() if k.startswith("grouped_cv_")}
            rv = settle_version(cfg, str(mv.version), metrics, lineage, r.info.run_id)
            echo(f"already trained with these labels, data, settings and code: MLflow run {r.info.run_id}")
            return {"model_dir": r.data.tags.get("xrdmatch.model_dir", ""), "run_id": r.info.run_id,
                    "metrics": metrics, "version": rv.version, "aliases": rv.aliases, "promoted": rv.promoted,
                    "name": rv.name, "resumed": True}
    resume = earlier[0] if earlier else None
    if resume is not None:
        echo(f"resuming MLflow run {resume.info.run_id} ({resume.info.status.lower()}) of training {key}")
    out = RunPaths.of(cfg.run_dir).models_dir / run_id
    with mlflow_run(cfg, run_id, tags={"xrdmatch.kind": "train", "xrdmatch.train_key": key,
                                       "xrdmatch.model_dir": str(out), **lineage},
                    resume_run_id=resume.info.run_id if resume else None) as run:
        done = (resume.data.metrics if resume else {})
        t0 = time.perf_counter()
        if (out / "ensemble.json").is_file():
            echo(f"ensemble of training {key} already saved: {out}")
            train_s = done.get("train_s")  # trained by the killed run: its time, when it got to log it
            if train_s is None:
                mlflow.set_tag("xrdmatch.train_s", "unknown (trained by an interrupted run)")
        else:
            train_run(cfg, use_ray=use_ray, run_id=run_id, inputs=inputs)
            train_s = time.perf_counter() - t0
            mlflow.log_metric("train_s", train_s)
        ens = Ensemble.load(out)
        if "xrdmatch.curves_logged" not in (resume.data.tags if resume else {}):
            log_training({"members": [m.history for m in ens.members]}, resumed=resume is not None)
            mlflow.set_tag("xrdmatch.curves_logged", "1")
        took = "by an interrupted run" if train_s is None else f"in {train_s:.0f} s"
        echo(f"trained {len(ens.members)} members {took}; scoring the promotion metric "
             f"({cfg.campaign.eval_folds}-fold grouped CV)")
        t1 = time.perf_counter()
        try:
            metrics = champion_metrics(cfg, ls, np.asarray(weights, np.float32), pool, log=echo)
        except UnscorableVersion as e:
            metrics = {}
            echo(f"warning: {e}")
            mlflow.set_tag("xrdmatch.champion_metric", str(e))
        mlflow.log_metrics({**metrics, "n_labelled": len(ls), "n_superionic": int(np.sum(ls.y)),
                            "champion_eval_s": time.perf_counter() - t1})
        mlflow.log_dict(ens.info, "ensemble_info.json")
        algorithm = ens.info.get("training", {}).get("algorithm", cfg.training.algorithm)
        if algorithm != cfg.training.algorithm:  # no unlabelled pattern: trained supervised (a warning said so)
            mlflow.set_tag("xrdmatch.algorithm_used", algorithm)
        result = {"model_dir": str(out), "run_id": run.info.run_id, "metrics": metrics, "algorithm": algorithm}
        if register:
            rv = register_ensemble(cfg, out, metrics, lineage, run_id=run.info.run_id)  # once per run
            result |= {"version": rv.version, "aliases": rv.aliases, "promoted": rv.promoted, "name": rv.name}
    return result


def train(
    config: Path = typer.Option(Path("configs/default.yaml"), "--config", "-c", help="YAML config"),
    run_dir: Path | None = typer.Option(None, "--dir", "-d", help="run directory (overrides run_dir)"),
    no_ray: bool = typer.Option(False, "--no-ray", help="train members in this process, not as Ray Train jobs"),
    register: bool = typer.Option(True, "--register/--no-register", help="register the ensemble in MLflow"),
) -> None:
    """Train the XRDMatch ensemble (Ray Train), log it to MLflow and register it."""
    from xrdmatch.config import ConfigError, load_config
    from xrdmatch.platform.cli_common import check_data_paths, check_run_dir, input_errors
    from xrdmatch.platform.registry_lock import RegistryBusy

    try:
        cfg = load_config(config, {"run_dir": str(run_dir)} if run_dir else None)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    check_run_dir(cfg.run_dir)
    check_data_paths(cfg)
    try:
        res = tracked_train(cfg, use_ray=not no_ray, register=register, echo=typer.echo)
    except input_errors() as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except RegistryBusy as e:
        typer.echo(f"error: {e}; the ensemble is saved and logged: the same command again registers it "
                   "without training", err=True)
        raise typer.Exit(1) from None
    metric = cfg.tracking.promotion_metric
    typer.echo(f"saved ensemble ({cfg.training.ensemble_size} x {cfg.training.network}, "
               f"{res.get('algorithm', cfg.training.algorithm)}) to {res['model_dir']}; {metric} = "
               f"{res['metrics'].get(metric, float('nan')):.3f}; MLflow run {res['run_id']}")
    if register:
        typer.echo(f"registered {res['name']} v{res['version']} "
                   f"({', '.join(res['aliases'])}{'; promoted to champion' if res['promoted'] else ''})")
