"""Ray actors of the XRD stage (thin): parse a batch of raw database items, compute patterns.

The work itself is the plain function :func:`compute_batch` (testable without Ray). A
worker returns the batch as ready-to-write Parquet bytes, so the driver only writes files
and no shared file system is needed on a cluster.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from xrdmatch import N_BINS
from xrdmatch.platform.databases import BadEntry, RawItem, parse_raw
from xrdmatch.platform.patterns import encode_errors, encode_shard
from xrdmatch.platform.ray_utils import WORKER_ENV


@dataclass
class BatchResult:
    """One finished batch: counts and the Parquet bytes of its shard (+ errors part)."""

    index: int
    n_entries: int
    n_ok: int
    n_errors: int
    shard: bytes
    errors: bytes | None
    seconds: float
    worker: str = ""


def compute_batch(index: int, items: list[RawItem], meta: dict[str, Any] | None = None) -> BatchResult:
    """Parse every raw item and compute its pattern; a bad entry becomes an error row."""
    from xrdmatch.simulation.xrd import xrd_pattern_arrays

    t0 = time.perf_counter()
    ids: list[str] = []
    formulas: list[str] = []
    X = np.empty((len(items), N_BINS), dtype=np.float32)
    err_ids: list[str] = []
    reasons: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's CIF warnings would flood the driver's log
        for item in items:
            entry = parse_raw(item)
            if isinstance(entry, BadEntry):
                err_ids.append(entry.id)
                reasons.append(entry.reason)
                continue
            try:
                X[len(ids)] = xrd_pattern_arrays(entry.lattice, entry.species, entry.frac_coords)
            except Exception as e:  # noqa: BLE001 - a structure the engine rejects is an error row
                err_ids.append(entry.id)
                reasons.append(f"XRD failed: {type(e).__name__}: {e}")
                continue
            ids.append(entry.id)
            formulas.append(entry.formula)
    meta = dict(meta or {})
    meta.update(batch=index, entries=len(items), ok=len(ids), errors=len(err_ids))
    shard = encode_shard(ids, formulas, X[: len(ids)], meta)
    errors = encode_errors(err_ids, reasons, index) if err_ids else None
    return BatchResult(index, len(items), len(ids), len(err_ids), shard, errors, time.perf_counter() - t0)


class XRDWorker:
    """A pool member: single-threaded BLAS, engine imported once, batches on demand."""

    def __init__(self) -> None:
        for k, v in WORKER_ENV.items():
            os.environ.setdefault(k, v)
        try:
            from threadpoolctl import threadpool_limits

            self._limits = threadpool_limits(1)  # in case numpy was imported before the env was set
        except ImportError:  # pragma: no cover
            self._limits = None
        import xrdmatch.simulation.xrd  # noqa: F401 - warm the engine's imports before timing starts

        import socket

        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, index: int, items: list[RawItem], meta: dict[str, Any] | None = None) -> BatchResult:
        res = compute_batch(index, items, meta)
        res.worker = self.name
        return res

    def ready(self) -> str:
        return self.name


def new_worker() -> Any:
    """One XRD actor (1 CPU). No Ray restarts: the stage's driver replaces a lost actor and
    hands its batches to the live ones, which also works when the actor's node is gone."""
    import ray

    return ray.remote(XRDWorker).options(
        num_cpus=1, max_restarts=0, max_task_retries=0, runtime_env={"env_vars": dict(WORKER_ENV)},
    ).remote()
