"""`xrdmatch train` (owner: training): labelled set + unlabelled XRD patterns -> saved Ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import typer

if TYPE_CHECKING:
    from xrdmatch.config import Config


def train_run(cfg: "Config", *, use_ray: bool = True, log_fn: Callable[[int, dict], None] | None = None,
              run_id: str | None = None) -> Path:
    """Train the ensemble of ``cfg`` and save it under ``RunPaths.models_dir/<run id>``; returns the folder.

    The MLflow layer wraps this (``log_fn`` gets every member's per-step metrics).
    """
    import time
    import warnings

    import numpy as np

    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.platform.patterns import ensure_patterns
    from xrdmatch.training.dataset import build_training_set
    from xrdmatch.training.ensemble import train_ensemble

    paths = RunPaths.of(cfg.run_dir)
    run_id = run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    patterns = ensure_patterns(cfg)
    ls, weights = build_training_set(cfg, patterns)
    labelled = set(ls.ids)
    unl = np.flatnonzero([i not in labelled for i in patterns.ids])
    X_unlab = patterns.X[unl]
    if len(X_unlab) == 0 and cfg.training.algorithm != "supervised":
        warnings.warn("no unlabelled patterns: training supervised only", stacklevel=1)
    tcfg = cfg.training if len(X_unlab) else cfg.training.model_copy(update={"algorithm": "supervised"})
    ens = train_ensemble(ls.X, ls.y, X_unlab, tcfg, sample_weight=weights, use_ray=use_ray, log_fn=log_fn,
                         run_dir=paths.root / "train" / run_id, run_name=run_id)
    ens.info = {"run_id": run_id, "labelled_hash": ls.hash(), "n_labelled": len(ls),
                "n_unlabelled": int(min(len(X_unlab), tcfg.unlabelled_limit or len(X_unlab))),
                "training": tcfg.model_dump(mode="json")}
    return ens.save(paths.models_dir / run_id)


def train(
    config: Path = typer.Option(Path("configs/default.yaml"), "--config", "-c", help="YAML config"),
    run_dir: Path | None = typer.Option(None, "--dir", "-d", help="run directory (overrides run_dir)"),
    no_ray: bool = typer.Option(False, "--no-ray", help="train members in this process, not as Ray Train jobs"),
) -> None:
    """Train the XRDMatch ensemble (Ray Train) and save it in the run directory."""
    from xrdmatch.config import ConfigError, load_config

    try:
        cfg = load_config(config, {"run_dir": str(run_dir)} if run_dir else None)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    out = train_run(cfg, use_ray=not no_ray)
    typer.echo(f"saved ensemble ({cfg.training.ensemble_size} x {cfg.training.network}, "
               f"{cfg.training.algorithm}) to {out}")
