"""What the registered model's signature costs: one (-1, 4501) tensor against 4501 named columns.

Registers the same tiny ensemble into a fresh SQLite store with each signature (the registry's
own ``log_version``; the column one is the schema xrdmatch used before, measured in the same
run as the reference), then times ``mlflow.pyfunc.load_model`` and ``predict`` of 50 patterns,
and prints the MLmodel size and the ratios. The first registration into a store also creates
its tables (the tensor's, measured first, also pays for MLflow's imports), so it is reported
apart from the later ones.

    python benchmarks/registry_signature.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np


def column_signature(tensor_signature):
    """The reference: 4501 named double columns (``v1`` .. ``v4501``) in, the same outputs."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from xrdmatch.platform.pyfunc_model import COLUMNS

    return ModelSignature(inputs=Schema([ColSpec("double", c) for c in COLUMNS]), outputs=tensor_signature().outputs)


def measure(kind: str, root: Path, ens: Path, X: np.ndarray, repeats: int) -> dict[str, float]:
    import mlflow

    from xrdmatch.config import load_config
    from xrdmatch.platform import registry
    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.platform.pyfunc_model import patterns_frame

    cfg = load_config(None, {"run_dir": str(root / kind)})
    cfg.tracking.tracking_uri = RunPaths.of(cfg.run_dir).mlflow_tracking_uri
    cfg.tracking.registry_name = f"bench-{kind}"
    columns = column_signature(registry._signature)
    log_model = mlflow.pyfunc.log_model

    def log_with_columns(**kw):  # the reference: the same call with the column schema and a frame example
        return log_model(**{**kw, "signature": columns, "input_example": patterns_frame(kw["input_example"])})

    patch = mock.patch.object(mlflow.pyfunc, "log_model", log_with_columns) if kind == "columns" else contextlib.nullcontext()
    times = []
    with patch:
        for _ in range(repeats + 1):
            t = time.perf_counter()
            version, _run = registry.log_version(cfg, ens, {})
            times.append(time.perf_counter() - t)
    uri = f"models:/{cfg.tracking.registry_name}/{version}"
    t = time.perf_counter()
    model = mlflow.pyfunc.load_model(uri)
    load = time.perf_counter() - t
    frame = patterns_frame(X)
    t = time.perf_counter()
    model.predict(frame)
    predict = time.perf_counter() - t
    mlmodel = Path(mlflow.artifacts.download_artifacts(uri)) / "MLmodel"
    return {"first": times[0], "register": float(np.median(times[1:])), "load": load, "predict": predict,
            "mlmodel_kb": mlmodel.stat().st_size / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="registrations timed after the first (median)")
    args = ap.parse_args()

    from xrdmatch.config import TrainingConfig
    from xrdmatch.platform.data import DEFAULT_LABELLED, load_labelled
    from xrdmatch.training.ensemble import train_ensemble

    lab = load_labelled(DEFAULT_LABELLED)
    root = Path(tempfile.mkdtemp(prefix="xrdmatch-sig-"))
    ens = root / "ensemble"
    tcfg = TrainingConfig(network="fast", algorithm="supervised", iterations=5, ensemble_size=2, batch_labelled=16, seed=0)
    train_ensemble(lab.X, lab.y, None, tcfg, use_ray=False).save(ens)
    X = lab.X[:50]
    # the tensor first: it pays for the process's MLflow imports, which favours the reference
    res = {kind: measure(kind, root, ens, X, args.repeats) for kind in ("tensor", "columns")}
    print(f"{'signature':<10} {'1st register s':>14} {'register s':>10} {'load s':>8} {'predict(50) s':>13} {'MLmodel KB':>10}")
    for kind, r in res.items():
        print(f"{kind:<10} {r['first']:>14.2f} {r['register']:>10.2f} {r['load']:>8.2f} {r['predict']:>13.3f} {r['mlmodel_kb']:>10.1f}")
    t, c = res["tensor"], res["columns"]
    print(f"speed-up (columns / tensor): register x{c['register'] / t['register']:.1f}, load x{c['load'] / t['load']:.1f}, "
          f"predict x{c['predict'] / t['predict']:.1f}; MLmodel x{c['mlmodel_kb'] / t['mlmodel_kb']:.0f} smaller")


if __name__ == "__main__":
    main()
