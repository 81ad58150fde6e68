"""MLflow tracking: one place that decides where runs go and what lineage they carry.

Default store is embedded: SQLite + a local artifact folder in the run directory.
``MLFLOW_TRACKING_URI`` (the standard variable) wins over the default; ``tracking.tracking_uri``
in the config wins over both.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import xrdmatch
from xrdmatch.config import Config, config_to_flat_params
from xrdmatch.platform.paths import RunPaths


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    paths = RunPaths.of(cfg.run_dir)
    paths.mlflow_dir.mkdir(parents=True, exist_ok=True)
    return paths.mlflow_tracking_uri


def configure(cfg: Config) -> str:
    """Point MLflow at the config's store and make sure the experiment exists."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        artifact_location = None
        if uri.startswith("sqlite:"):
            artifact_location = RunPaths.of(cfg.run_dir).mlflow_artifacts.as_uri()
        try:
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location)
        except Exception:  # created concurrently by another process
            pass
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def base_tags() -> dict[str, str]:
    return {"xrdmatch.version": xrdmatch.__version__, "git_commit": git_commit()}


def log_params_flat(cfg: Config) -> None:
    """The full resolved config as params (MLflow caps values at 6000 chars)."""
    import mlflow

    params = {k: v[:6000] for k, v in config_to_flat_params(cfg).items()}
    items = list(params.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


@contextlib.contextmanager
def mlflow_run(cfg: Config, run_name: str, *, nested: bool = False, tags: dict[str, str] | None = None,
               log_config: bool = True) -> Iterator[object]:
    """Start an MLflow run with the config as params and the package/git tags."""
    import mlflow

    configure(cfg)
    all_tags = base_tags() | (tags or {})
    with mlflow.start_run(run_name=run_name, nested=nested, tags=all_tags) as run:
        if log_config:
            log_params_flat(cfg)
        yield run
