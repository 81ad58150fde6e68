"""`xrdmatch screen`: score the whole configured database with a registered model.

The campaign screens inside its rounds; this command does the same outside a campaign, e.g.
with the champion of the registry, and logs an MLflow run (model URI and version, counts,
a score histogram, the top candidates) so that every screening is on record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import typer

from xrdmatch.config import redact
from xrdmatch.platform.cli_common import (ConfigOpt, DirOpt, check_data_paths, check_out_file, check_out_not_input,
                                          input_errors, load_cfg, store_errors)


def screen(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model URI [models:/<registry_name>@champion]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="scores Parquet [RUN_DIR/scores/screen-<version>.parquet]"),
    top: int = typer.Option(20, "--top", min=0, help="print (and log) this many best-scored structures"),
    config: str = ConfigOpt,
    run_dir: Optional[str] = DirOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Score every structure of the configured database (Ray actors); log an MLflow run."""
    import tempfile

    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from xrdmatch.actors.screening import blocks_of, pool_size, screen as run_screen, write_scores
    from xrdmatch.platform.cli_models import _quiet_mlflow
    from xrdmatch.platform.patterns import ensure_patterns
    from xrdmatch.platform.plots import score_histogram_png
    from xrdmatch.platform.progress import progress_bar
    from xrdmatch.platform.ray_utils import init_ray
    from xrdmatch.platform.registry import decision_rule, default_model_uri, ensemble_dir_of
    from xrdmatch.platform.tracking import array_hash, configure, mlflow_run, tracking_uri
    from xrdmatch.training.ensemble import Ensemble
    from xrdmatch.training.metrics import vote_threshold

    _quiet_mlflow()
    cfg = load_cfg(config, run_dir)
    check_out_not_input(out, cfg, config)  # e.g. the database: it would be replaced by the scores
    check_out_file(out, "--out", example="scores.parquet")  # now, not after scoring everything
    check_data_paths(cfg, labels=False)  # a model screens a database without the labels file
    with store_errors(tracking_uri(cfg), tracking=True):
        configure(cfg)
    uri = model or default_model_uri(cfg)
    version = "local"
    try:
        if uri.startswith("models:/"):
            name, _, ref = uri.removeprefix("models:/").partition("@")
            client = MlflowClient()
            mv = client.get_model_version_by_alias(name, ref) if ref else None
            version = str(mv.version) if mv is not None else uri.rsplit("/", 1)[-1]
        ens_dir = ensemble_dir_of(uri)
        ens = Ensemble.load(ens_dir)
        thr, vote_fraction, rule_from = decision_rule(ens_dir, cfg)
    except Exception as e:
        typer.echo(redact(f"error: cannot load model {uri}: {type(e).__name__}: {e}"), err=True)
        raise typer.Exit(2) from None
    try:
        pt = ensure_patterns(cfg, progress=progress)
    except input_errors() as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    n = len(pt.ids)
    c = cfg.campaign
    actors = pool_size(n, c.screen_batch_size, c.screen_actors, c.screen_gpus_per_actor)
    path = out or Path(cfg.run_dir) / "scores" / f"screen-{version}.parquet"
    patterns_hash = array_hash(pt.X)
    key = hashlib.sha256(json.dumps([uri, version, str(Path(ens_dir).resolve()), patterns_hash, thr, vote_fraction,
                                     str(path.resolve())]).encode()).hexdigest()[:16]
    killed = _unfinished_screen_run(cfg, key)  # a killed screen of this model and these patterns: reopen its run
    if killed:
        typer.echo(f"resuming MLflow run {killed} of an interrupted screen", err=True)
    with mlflow_run(cfg, f"screen-v{version}", tags={"xrdmatch.kind": "screen", "model.uri": redact(uri),
                                                      "model.version": version, "xrdmatch.screen_key": key},
                    resume_run_id=killed) as run:
        with progress_bar(total=n, desc="screen", unit="pattern", disable=not progress) as bar:
            res = run_screen(ens, blocks_of(pt.X, c.screen_batch_size), n, actors=actors,
                             gpus_per_actor=c.screen_gpus_per_actor, progress=bar.update, threshold=thr)
        sha = write_scores(path, list(pt.ids), list(pt.formulas), res)
        # the served model's call (pyfunc_model.decide): >= ceil(vote_fraction x members) members with p > thr
        need = vote_threshold(len(ens.members), vote_fraction)
        positive = res.votes >= need
        mlflow.set_tags({"lineage.unlabelled_hash": patterns_hash, "lineage.unlabelled_count": str(n),
                         "scores.path": str(path), "scores.sha256": sha,
                         "screen.decision_threshold": f"{thr:g}", "screen.vote_fraction": f"{vote_fraction:g}",
                         "screen.votes_needed": str(need), "screen.rule_from": rule_from})
        mlflow.log_metrics({"n_structures": n, "n_positive": int(positive.sum()),
                            "fraction_positive": float(positive.mean()),
                            "mean_p": float(res.p_mean.mean()), "mean_spread": float(res.p_std.mean())})
        order = np.argsort(-res.p_mean, kind="stable")[:top]
        rows = [(str(pt.ids[i]), str(pt.formulas[i]), float(res.p_mean[i]), float(res.p_std[i])) for i in order]
        with tempfile.TemporaryDirectory() as tmp:
            score_histogram_png(res.p_mean, Path(tmp) / "score_histogram.png", thr)
            (Path(tmp) / "top.csv").write_text("id,formula,p_superionic,p_std\n"
                                               + "".join(f"{a},{b},{p:.4f},{s:.4f}\n" for a, b, p, s in rows))
            mlflow.log_artifacts(tmp, "screen")
    typer.echo(f"screened {n} structures with {redact(uri)} (v{version}): {int(positive.sum())} called superionic "
               f"(>= {need} of {len(ens.members)} members with p > {thr:g}) -> {path}; MLflow run {run.info.run_id}")
    for sid, formula, p, s in rows:
        typer.echo(f"  {sid:>14s}  {formula:<24s} p = {p:.3f} +- {s:.3f}")


def _unfinished_screen_run(cfg, key: str) -> str | None:
    """The newest screen run of ``key`` if it did not finish (killed: RUNNING; crashed: FAILED)."""
    from xrdmatch.platform.tracking import runs_tagged

    runs = runs_tagged(cfg, {"xrdmatch.screen_key": key}, max_results=1)
    return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None
