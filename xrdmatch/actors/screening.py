"""Batched screening of a whole database with a trained ensemble on Ray actors.

The ensemble goes into the object store once (``ray.put``) and every actor resolves that one
reference at start-up; each task then scores a block of hundreds/thousands of patterns, so
per-task overhead is negligible next to the forward passes. Results come back as small
arrays (mean probability, spread, votes) and are written to one Parquet file per round.
An actor that dies (OOM kill, lost node) is replaced and its blocks are scored again, so one
lost process does not cost the round's whole screen.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class _Scorer:
    """Holds one ensemble; ``score`` returns (p_mean, p_std, votes) for a block of patterns
    (votes: members with p > ``threshold``)."""

    def __init__(self, ensemble, torch_threads: int = 1, device: str = "cpu", threshold: float = 0.5):
        import torch

        torch.set_num_threads(max(1, torch_threads))
        self.ensemble = ensemble
        self.device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
        self.threshold = threshold

    def score(self, start: int, X: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        out = self.ensemble.predict_proba(np.asarray(X, dtype=np.float32), device=self.device,
                                          decision_threshold=self.threshold)
        votes = out.get("votes")
        votes = np.asarray(votes, dtype=np.float32) if votes is not None else np.full(len(X), np.nan, np.float32)
        return (start, np.asarray(out["p_mean"], np.float32), np.asarray(out["p_std"], np.float32), votes)


@dataclass
class ScreeningResult:
    p_mean: np.ndarray
    p_std: np.ndarray
    votes: np.ndarray


def screen(
    ensemble,
    blocks: Iterable[tuple[int, np.ndarray]],
    n_total: int,
    *,
    actors: int,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    max_in_flight: int | None = None,
    progress: Callable[[int], None] | None = None,
    threshold: float = 0.5,
    max_replacements: int | None = None,
) -> ScreeningResult:
    """Score every (start, X) block on a pool of actors; results land at ``start`` offsets.

    ``votes``: members with p > ``threshold`` (the registered model's decision threshold).

    ``blocks`` is consumed lazily, so at most ``max_in_flight`` blocks are in memory/flight.
    A dead actor is replaced (at most ``max_replacements``, default 2 per actor) and its blocks
    go to the new one; a block that loses its actor 3 times is an error naming it.
    """
    import ray
    from ray.exceptions import RayActorError

    from xrdmatch.platform.ray_utils import error_text, kill_actors

    Scorer = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)(_Scorer)
    model_ref = ray.put(ensemble)  # once; actors share it
    device = "cuda" if gpus_per_actor > 0 else "cpu"

    def new_actor():
        return Scorer.remote(model_ref, max(1, int(cpus_per_actor)), device, threshold)

    pool = [new_actor() for _ in range(max(1, actors))]
    started = list(pool)  # every actor, replacements too: all are killed at the end
    replacements_left = 2 * len(pool) if max_replacements is None else max_replacements
    losses: dict[int, int] = {}  # block start -> actors lost while scoring it
    p_mean = np.full(n_total, np.nan, np.float32)
    p_std = np.full(n_total, np.nan, np.float32)
    votes = np.full(n_total, np.nan, np.float32)
    limit = max_in_flight or 2 * len(pool)
    pending: dict = {}  # ref -> (slot, actor, start, X): what to send again if the actor dies
    it = iter(blocks)
    k = 0

    def submit(slot: int, start: int, X) -> None:
        pending[pool[slot].score.remote(start, X)] = (slot, pool[slot], start, X)

    def collect(done_refs) -> None:
        nonlocal replacements_left
        for ref in done_refs:
            slot, actor, start, X = pending.pop(ref)
            try:
                _, m, s, v = ray.get(ref)
            except RayActorError as err:
                losses[start] = losses.get(start, 0) + 1
                if losses[start] >= 3:
                    raise RuntimeError(f"screening block {start}..{start + len(X) - 1} lost its actor "
                                       f"{losses[start]} times: {error_text(err)}") from err
                if pool[slot] is actor:  # the first of its blocks to report the death replaces it
                    if replacements_left <= 0:
                        raise RuntimeError(f"screening actors kept dying, no replacement left: {error_text(err)}") from err
                    replacements_left -= 1
                    pool[slot] = new_actor()
                    started.append(pool[slot])
                    log.warning("screening actor %d lost (%s); a new one scores its blocks again", slot,
                                error_text(err))
                submit(slot, start, X)
                continue
            p_mean[start:start + len(m)], p_std[start:start + len(m)], votes[start:start + len(m)] = m, s, v
            if progress:
                progress(len(m))

    try:
        for start, X in it:
            while len(pending) >= limit:
                done, _ = ray.wait(list(pending), num_returns=1)
                collect(done)
            submit(k % len(pool), start, X)
            k += 1
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            collect(done)
    finally:
        kill_actors(*started)
    if np.isnan(p_mean).any():
        raise RuntimeError(f"screening left {int(np.isnan(p_mean).sum())} structures unscored")
    return ScreeningResult(p_mean, p_std, votes)


def pool_size(n: int, batch_size: int, actors: int | None, gpus_per_actor: float) -> int:
    """Screening actors the cluster can run at once: ``actors`` (config) or one per CPU, never
    more than blocks, and on GPUs never more than fit (an actor that cannot be placed would hold
    its blocks forever). No GPU with ``gpus_per_actor`` > 0 is an error naming the setting."""
    import ray

    from xrdmatch.platform.ray_utils import cluster_cpus

    want = actors or max(1, min(cluster_cpus(), -(-n // batch_size)))
    if gpus_per_actor <= 0:
        return want
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    fit = int(gpus // gpus_per_actor + 1e-9)
    if fit < 1:
        raise RuntimeError(f"campaign.screen_gpus_per_actor = {gpus_per_actor:g} but the Ray cluster has "
                           f"{gpus:g} GPUs: set it to 0 to screen on CPUs")
    return max(1, min(want, fit))


def blocks_of(X: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(X), batch_size):
        yield start, X[start:start + batch_size]


def write_scores(path: str | os.PathLike[str], ids: list[str], formulas: list[str], res: ScreeningResult,
                 extra: dict[str, np.ndarray] | None = None) -> str:
    """Atomic Parquet write (tmp + rename); returns the file's sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"id": pa.array(ids, pa.string()), "formula": pa.array(formulas, pa.string()),
            "p_mean": pa.array(res.p_mean), "p_std": pa.array(res.p_std), "votes": pa.array(res.votes)}
    for k, v in (extra or {}).items():
        cols[k] = pa.array(v)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    try:
        pq.write_table(pa.table(cols), tmp)
        os.replace(tmp, p)
    except BaseException:  # e.g. ``path`` is a folder: leave no half-written temp file beside it
        tmp.unlink(missing_ok=True)
        raise
    return hashlib.sha256(p.read_bytes()).hexdigest()


def read_scores(path: str | os.PathLike[str]):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()
