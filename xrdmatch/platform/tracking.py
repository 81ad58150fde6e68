"""MLflow tracking: one place that decides where runs go and what lineage they carry.

Default store is embedded: SQLite + a local artifact folder in the run directory.
``MLFLOW_TRACKING_URI`` (the standard variable) wins over the default; ``tracking.tracking_uri``
in the config wins over both.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import xrdmatch
from xrdmatch.config import Config, config_to_flat_params
from xrdmatch.platform.paths import RunPaths
from xrdmatch.training.metrics import calls

if TYPE_CHECKING:
    from xrdmatch.platform.data import LabelledSet


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    paths = RunPaths.of(cfg.run_dir)
    paths.mlflow_dir.mkdir(parents=True, exist_ok=True)
    return paths.mlflow_tracking_uri


_PROBED: set[str] = set()


def probe_database(uri: str) -> None:
    """Connect once, with a short timeout, to a database tracking store not yet probed by this
    process: MLflow's own engine retries an unreachable server for about 100 s, with a warning a
    try, before the one line the CLI prints. Later calls (a campaign's rounds) keep its retries."""
    if uri in _PROBED or "://" not in uri or uri.split(":", 1)[0].split("+")[0] in ("file", "sqlite", "http",
                                                                                  "https", "databricks"):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from xrdmatch.platform.db import server_engine

    timeout = make_url(uri).drivername in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2", "mysql",
                                           "mysql+mysqldb", "mysql+pymysql")  # these take connect_timeout
    eng = server_engine(uri, poolclass=NullPool, connect_args={"connect_timeout": 10} if timeout else {})
    try:
        with eng.connect():
            pass
    finally:
        eng.dispose()
    _PROBED.add(uri)


def configure(cfg: Config) -> str:
    """Point MLflow at the config's store and make sure the experiment exists."""
    import mlflow

    uri = tracking_uri(cfg)
    probe_database(uri)  # an unreachable server: one SQLAlchemyError now, not MLflow's 100 s of retries
    # MLflow 3 also writes these into os.environ, which would make the *next* config in this
    # process (another run directory) inherit this store: keep the user's environment as it was.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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
               log_config: bool = True, parent_run_id: str | None = None,
               resume_run_id: str | None = None) -> Iterator[object]:
    """Start an MLflow run with the config as params and the package/git tags.

    ``nested=True`` makes it a child of the active run; ``parent_run_id`` a child of that run
    even when it is not active in this process (campaign rounds after a resume).
    ``resume_run_id`` reopens that run (a killed stage's) instead of starting another; its
    params were logged when it started, so they are not logged again.
    """
    import mlflow

    configure(cfg)
    all_tags = base_tags() | {k: str(v) for k, v in (tags or {}).items()}
    if resume_run_id:
        with mlflow.start_run(run_id=resume_run_id) as run:
            mlflow.set_tags(all_tags)
            yield run
        return
    with mlflow.start_run(run_name=run_name, nested=nested or parent_run_id is not None,
                          parent_run_id=parent_run_id, tags=all_tags) as run:
        if log_config:
            log_params_flat(cfg)
        yield run


def runs_tagged(cfg: Config, tags: Mapping[str, str], max_results: int | None = None) -> list:
    """Runs of the config's experiment carrying these tags, newest first: how a rerun finds the
    run a killed process started (train, evaluate, screen, a campaign and its rounds)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return []
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    kw = {"max_results": max_results} if max_results else {}
    return mlflow.search_runs([exp.experiment_id], flt, order_by=["attributes.start_time DESC"],
                              output_format="list", **kw)


# ---------------------------------------------------------------- lineage

#: Label sources a labelled set may mix (``LabelledSet.sources``).
LABEL_SOURCES = ("paper", "mlip-md", "aimd", "experiment", "imported")


def array_hash(X: np.ndarray) -> str:
    """Content hash of a pattern matrix (float32 bytes + shape), streamed without a copy."""
    import hashlib

    arr = np.ascontiguousarray(X, dtype=np.float32)
    h = hashlib.sha256(f"{arr.shape}".encode())
    flat = arr.reshape(-1).view(np.uint8)
    chunk = 64 << 20
    for i in range(0, flat.size, chunk):
        h.update(memoryview(flat[i : i + chunk]))
    return h.hexdigest()[:16]


def lineage_tags(labelled: LabelledSet, X_unlab: np.ndarray | None) -> dict[str, str]:
    """Tags that say which data a model saw: hashes and counts of both sets, label sources.

    Keys: ``lineage.labelled_hash``, ``lineage.labelled_count``, ``lineage.labelled_positive``,
    ``lineage.unlabelled_hash``, ``lineage.unlabelled_count``, ``lineage.label_sources``
    ("paper=112,aimd=3") and ``lineage.source.<name>`` (a count per known source, 0 included,
    so that ``tags.`lineage.source.aimd` != '0'`` finds models that saw AIMD labels), plus the
    package version and git commit.
    """
    from collections import Counter

    counts = Counter(labelled.sources or ["paper"] * len(labelled))
    tags = {
        "lineage.labelled_hash": labelled.hash(),
        "lineage.labelled_count": str(len(labelled)),
        "lineage.labelled_positive": str(int(np.asarray(labelled.y).sum())),
        "lineage.unlabelled_hash": array_hash(X_unlab) if X_unlab is not None else "none",
        "lineage.unlabelled_count": str(0 if X_unlab is None else int(len(X_unlab))),
        "lineage.label_sources": ",".join(f"{k}={v}" for k, v in sorted(counts.items())),
    }
    for src in sorted(set(LABEL_SOURCES) | set(counts)):
        tags[f"lineage.source.{src}"] = str(counts.get(src, 0))
    return base_tags() | tags


# ---------------------------------------------------------------- metrics and artifacts

_METRIC_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")


def _metric_key(name: str) -> str:
    return _METRIC_KEY.sub("_", name)[:250]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)


def _curves(history: Any, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """Per-step series from the shapes a training history comes in.

    Accepted: {name: [v0, v1, ...]}, [{"step": s, name: v, ...}, ...] (or without "step":
    the index), {"members": [history, ...]} / [history, ...] (one prefix per member), and
    nesting of these; scalars are ignored here.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    if isinstance(history, Mapping):
        for k, v in history.items():
            key = f"{prefix}{k}"
            if k == "members" and isinstance(v, Sequence) and not isinstance(v, str):
                for i, member in enumerate(v):
                    out |= _curves(member, f"{prefix}member{i}.")
            elif isinstance(v, (Mapping,)):
                out |= _curves(v, f"{key}.")
            elif isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, str):
                vals = list(v)
                if vals and all(_is_number(x) for x in vals):
                    out[key] = [(i, float(x)) for i, x in enumerate(vals)]
                elif vals and all(isinstance(x, Mapping) for x in vals):
                    out |= _curves(vals, f"{key}.")
    elif isinstance(history, Sequence) and not isinstance(history, str):
        items = list(history)
        if items and all(isinstance(x, Mapping) and not any(isinstance(v, (Mapping, list)) for v in x.values())
                         for x in items):
            for i, row in enumerate(items):
                step = int(row.get("step", row.get("iteration", i)))
                for k, v in row.items():
                    if k in ("step", "iteration") or not _is_number(v):
                        continue
                    out.setdefault(f"{prefix}{k}", []).append((step, float(v)))
        else:
            for i, member in enumerate(items):
                out |= _curves(member, f"{prefix}member{i}.")
    return out


def _log_series(curves: Mapping[str, Sequence[tuple[int, float]]], resumed: bool = False) -> int:
    """Log every (step, value) with batched calls (MLflow takes 1000 metrics per batch).

    ``resumed``: the run may hold some of them already (a kill mid-way): those steps are skipped,
    never logged twice."""
    import time

    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: call inside tracking.mlflow_run(...)")
    now = int(time.time() * 1000)
    client = MlflowClient()
    logged: dict[str, set[int]] = {}
    if resumed:
        logged = {_metric_key(k): {m.step for m in client.get_metric_history(run.info.run_id, _metric_key(k))}
                  for k in curves}
    metrics = [Metric(_metric_key(k), float(v), now, int(s)) for k, pts in curves.items() for s, v in pts
               if int(s) not in logged.get(_metric_key(k), ())]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000], synchronous=True)
    return len(metrics)


def log_training(history: Any, artifact_dir: str = "plots", resumed: bool = False) -> dict[str, list[tuple[int, float]]]:
    """Log a training history's per-step metrics and a learning-curves PNG to the active run
    (``resumed``: steps the run already holds are not logged again)."""
    import tempfile

    import mlflow

    from xrdmatch.platform.plots import learning_curves_png

    curves = _curves(history)
    _log_series(curves, resumed=resumed)
    with tempfile.TemporaryDirectory() as tmp:
        png = learning_curves_png(curves, Path(tmp) / "learning_curves.png")
        mlflow.log_artifact(str(png), artifact_dir)
    return curves


def flat_metrics(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numeric scalars of a (nested) result dict as dotted metric names.

    A list of rows that name their ``method`` (evaluation's ``results``) becomes
    ``<method>.<metric>``; other lists (per-fold rows, folds) are left to the JSON artifact.
    """
    out: dict[str, float] = {}
    for k, v in result.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= flat_metrics(v, f"{key}.")
        elif _is_number(v):
            out[_metric_key(key)] = float(v)
        elif (k == "results" and isinstance(v, Sequence) and v
              and all(isinstance(r, Mapping) and "method" in r for r in v)):
            for r in v:
                out |= flat_metrics({m: x for m, x in r.items() if m != "method"}, f"{prefix}{r['method']}.")
    return out


def registry_metrics(result: Mapping[str, Any], method: str = "flexmatch-ensemble") -> dict[str, float]:
    """One method's evaluation metrics named for the registry: ``<protocol>_<metric>``.

    ``evaluate_grouped_cv`` -> ``grouped_cv_macro_f1`` (the default promotion metric), ...
    """
    proto = str(result.get("protocol", "eval")).replace("-", "_")
    for r in result.get("results", []):
        if isinstance(r, Mapping) and r.get("method") == method:
            return {f"{proto}_{k}": float(v) for k, v in r.items() if k != "method" and _is_number(v)}
    raise KeyError(f"method {method!r} not in the evaluation result")


_Y_KEYS = ("y_true", "y", "label", "labels", "target")
_P_KEYS = ("p_superionic", "p_mean", "p", "proba", "prob", "probability", "y_prob", "y_score")


def _pick(d: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    return None


def prediction_sets(result: Mapping[str, Any],
                    threshold: float = 0.5) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(y_true, p, y_pred) arrays found in an evaluation result, by name ("" for the top level).

    Looks at ``predictions`` (a dict of columns, a list of row dicts, or a dict of those per
    method, as ``evaluate_grouped_cv`` writes) and at the top level itself. ``y_pred`` is the
    result's own ``pred`` (e.g. the ensemble vote) when present, else ``p > threshold``.
    """
    found: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def finish(y, p, pred):
        y, p = np.asarray(y, int), np.asarray(p, float)
        pred = calls(p, threshold) if pred is None else np.asarray(pred, int)
        ok = np.isfinite(p)
        return y[ok], p[ok], pred[ok]

    def columns(obj: Any):
        if isinstance(obj, Sequence) and obj and all(isinstance(r, Mapping) for r in obj):
            ys = [_pick(r, _Y_KEYS) for r in obj]
            ps = [_pick(r, _P_KEYS) for r in obj]
            preds = [r.get("pred") for r in obj]
            if all(v is not None for v in ys) and all(v is not None for v in ps):
                return finish(ys, ps, preds if all(v is not None for v in preds) else None)
            return None
        if isinstance(obj, Mapping):
            y, p = _pick(obj, _Y_KEYS), _pick(obj, _P_KEYS)
            if y is not None and p is not None and not isinstance(y, (Mapping, str)) and np.ndim(y) == 1:
                pred = obj.get("pred")
                if len(y) == len(p) and len(y) > 0:
                    return finish(y, p, pred if pred is not None and len(pred) == len(y) else None)
        return None

    preds = result.get("predictions")
    if preds is not None:
        got = columns(preds)
        if got is not None:
            found[""] = got
        elif isinstance(preds, Mapping):
            for name, sub in preds.items():
                got = columns(sub)
                if got is not None:
                    found[str(name)] = got
    if not found:
        got = columns(result)
        if got is not None:
            found[""] = got
    return found


def log_evaluation(result: Mapping[str, Any], out_json: str | os.PathLike[str] | None = None,
                   threshold: float = 0.5, artifact_dir: str = "evaluation") -> dict[str, float]:
    """Log an evaluation result to the active run: scalar metrics, the JSON, and PNG plots.

    Plots (confusion matrix of the result's ``pred`` or ``p > threshold``, PR curve,
    calibration) come from the per-sample predictions (see :func:`prediction_sets`); per-step series in the result (e.g.
    ``history``) become metrics with steps and a learning-curves PNG.
    """
    import tempfile

    import mlflow

    from xrdmatch.platform import plots
    from xrdmatch.training.evaluation import write_json

    metrics = flat_metrics({k: v for k, v in result.items() if k not in ("predictions", "history")})
    if metrics:
        items = list(metrics.items())
        for i in range(0, len(items), 500):
            mlflow.log_metrics(dict(items[i : i + 500]))
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        json_path = Path(out_json) if out_json is not None else tmpd / "evaluation.json"
        write_json(dict(result), json_path)  # atomic; NaN -> null, so every JSON reader takes it
        mlflow.log_artifact(str(json_path), artifact_dir)
        for name, (y, p, pred) in prediction_sets(result, threshold).items():
            if len(y) == 0:
                continue
            tag = f"_{re.sub(r'[^0-9A-Za-z_-]', '_', name)}" if name else ""
            label = f" ({name})" if name else ""
            plots.confusion_matrix_png(y, pred, tmpd / f"confusion_matrix{tag}.png",
                                       title=f"Confusion matrix{label}")
            plots.pr_curve_png(y, p, tmpd / f"pr_curve{tag}.png", title=f"Precision-recall{label}")
            plots.calibration_png(y, p, tmpd / f"calibration{tag}.png", title=f"Calibration{label}")
        if "history" in result:
            curves = _curves(result["history"])
            if curves:
                _log_series(curves)
                plots.learning_curves_png(curves, tmpd / "learning_curves.png")
        for png in sorted(tmpd.glob("*.png")):
            mlflow.log_artifact(str(png), artifact_dir)
    return metrics
