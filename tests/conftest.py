"""Shared fixtures. Tests use the real shipped data, real pymatgen, real Ray (local)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
# Ray Train's controller takes a worker's report (and sees a run end) once per health check,
# every 2 s by default, and a worker's next report waits for it. Tests checkpoint every few steps
# of tiny networks, so at the default most of their training time was that wait (a 30-step
# member reporting every 5 steps: 24 s, 14 s at 0.25 s). Real runs report every 50-250 steps.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train starts a preemption-watcher actor (one more worker process) with every run; nothing
# here is preempted, and on 2 cores that start cost 1-3 s of each of the suite's many tiny runs.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")


@pytest.fixture(autouse=True)
def _isolate_mlflow_globals():
    """Each test starts from the process's MLflow state: ``mlflow.set_tracking_uri`` also writes
    ``MLFLOW_TRACKING_URI`` into os.environ (MLflow 3), so one test pointing at a server that it
    then stops would send every later test (and the workers they spawn) to a dead port."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    from mlflow.tracking import fluent

    uri, registry_uri = tracking_utils._tracking_uri, registry_utils._registry_uri
    experiment_id = fluent._active_experiment_id
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    tracking_utils._tracking_uri, registry_utils._registry_uri = uri, registry_uri
    fluent._active_experiment_id = experiment_id


@pytest.fixture(scope="module", autouse=True)
def _isolate_ray():
    """Every test module gets a process without a Ray connection and leaves none behind: a module
    that calls a CLI in-process (which connects with ``init_ray``) must not make the next
    module's ``ray.init`` fail with "called ray.init twice"."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def labelled_csv() -> Path:
    return DATA / "xrdmatch_lbs.csv"


@pytest.fixture(scope="session")
def database_path() -> Path:
    return DATA / "mp_li_structures.jsonl.xz"


@pytest.fixture(scope="session")
def labelled(labelled_csv):
    from xrdmatch.platform.data import load_labelled

    return load_labelled(labelled_csv)


# ---- Ray Train ---------------------------------------------------------------------------------


def registered_checkpoints(root: Path, runs: str) -> int:
    """Checkpoints Ray Train has recorded in the runs under ``root`` matching ``runs``. Only these
    are resumed after a kill -9: a checkpoint folder appears on disk before the controller takes
    its report (one per health-check poll), so counting folders can kill a run with none."""
    n = 0
    for snapshot in root.glob(f"{runs}/checkpoint_manager_snapshot.json"):
        try:
            n += len(json.loads(snapshot.read_text()).get("checkpoint_results") or [])
        except (OSError, ValueError):  # being written: not yet
            pass
    return n


# ---- MLflow tracking / registry (owner: MLflow registry) --------------------------------------


def _tiny_ensemble(labelled, seed: int, path: Path) -> Path:
    from xrdmatch.config import TrainingConfig
    from xrdmatch.training.ensemble import train_ensemble

    tcfg = TrainingConfig(network="fast", algorithm="supervised", iterations=5, ensemble_size=2,
                          batch_labelled=16, seed=seed)
    train_ensemble(labelled.X, labelled.y, None, tcfg, use_ray=False).save(path)
    return path


@pytest.fixture(scope="session")
def mlflow_registry(tmp_path_factory, labelled):
    """A run dir whose MLflow registry holds three versions of two real tiny ensembles (A, A, B):
    v1 (macro-F1 0.50) champion at first, v2 (0.40) stays challenger, v3 (0.60, ensemble B) becomes champion."""
    from types import SimpleNamespace

    from xrdmatch.config import load_config
    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.platform.registry import register_ensemble
    from xrdmatch.platform.tracking import lineage_tags

    root = tmp_path_factory.mktemp("mlflow_registry")
    ens_a = _tiny_ensemble(labelled, 0, root / "ens_a")
    ens_b = _tiny_ensemble(labelled, 1, root / "ens_b")
    cfg = load_config(None, {"run_dir": str(root / "run")})
    # the run dir's default store, spelled out so that an MLFLOW_TRACKING_URI in the environment cannot win
    cfg.tracking.tracking_uri = RunPaths.of(cfg.run_dir).mlflow_tracking_uri
    lineage = lineage_tags(labelled, labelled.X[:7])
    steps = []
    for ens, f1 in ((ens_a, 0.50), (ens_a, 0.40), (ens_b, 0.60)):
        rv = register_ensemble(cfg, ens, {"grouped_cv_macro_f1": f1, "grouped_cv_pr_auc": f1 / 2}, lineage)
        steps.append(rv)
    return SimpleNamespace(cfg=cfg, run_dir=root / "run", ens_a=ens_a, ens_b=ens_b, versions=steps, lineage=lineage)
