"""The XRD stage: patterns of a whole database on a pool of Ray actors, resumable.

Why it is shaped this way:

* Batch ``k`` is always entries ``[k*B, (k+1)*B)`` of the database, so a finished batch is
  identified by its index and its shard file (``shards/part-{k}.parquet``) is the proof
  that it is done. After a kill -9 the rerun skips those batches without reading them.
* The driver only cuts the database into raw batches (JSONL lines as bytes, files as
  bytes) and writes the Parquet bytes the actors return; parsing and XRD happen in the
  actors. Every file is written to a temporary name then ``os.replace``d, errors part
  before shard, so a batch is counted once and never half-written.
* A lost actor (process or node) fails its in-flight batches, which go back to the queue
  for the live actors, and a replacement actor is asked for; it gets work once Ray can
  place it. A batch whose computation raises is retried ``max_retries`` times, then left
  for the next run (the summary says so, nothing is marked done).
* An entry that kills its worker (a crash or an OOM kill, which no ``try`` in the worker can
  catch) would otherwise hold up every stage after this one, run after run. The batches an
  actor held when it died run again, each alone on an actor (so a death names its task); one
  that kills its actor again is split in halves, and so on, until the entry is alone. Once it
  has killed ``max_retries`` + 1 actors it becomes an error row naming it, and the rest of its
  batch is written as one shard as usual.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from xrdmatch import N_BINS, __version__
from xrdmatch.config import resolve_path
from xrdmatch.platform.databases import (
    DatabaseError,
    check_ase_file,
    count_entries,
    database_kind,
    iter_raw_batches,
    raw_item_id,
)
from xrdmatch.platform.lock import exclusive_file
from xrdmatch.platform.paths import database_key
from xrdmatch.platform.patterns import (
    ERRORS,
    ERRORS_DIR,
    MANIFEST,
    SHARDS,
    atomic_write_bytes,
    decode_errors,
    decode_shard,
    encode_errors,
    encode_shard,
    errors_part_path,
    read_manifest,
    shard_index,
    shard_meta,
    shard_path,
)
from xrdmatch.platform.ray_utils import (  # no Ray import
    cluster_cpus,
    error_text,
    init_ray,
    kill_actors,
)

#: Batches queued per actor: one running, one waiting, so an actor never idles on the driver.
INFLIGHT_PER_ACTOR = 2
#: Rewrite the manifest at most this often while running (the shard files are the truth).
MANIFEST_EVERY_S = 1.0
#: Warn this often while no actor of the pool can be placed on the cluster.
NO_ACTOR_WARN_S = 60.0
#: Actor starts that may fail in a row, per worker, before the stage stops and says why (an
#: actor that cannot be created, e.g. a node without the package, would otherwise be retried forever).
MAX_FAILED_STARTS = 3
#: Entries a run may record as killing their workers. More looks like broken workers or nodes,
#: not broken entries: the batches are then left unfinished (rerun) instead of turned into errors.
MAX_KILLER_ENTRIES = 10
#: How long a run waits for another run writing the same patterns folder.
LOCK_WAIT_S = 24 * 3600.0

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """The stage cannot run as asked (e.g. the output folder holds another run); says what to do."""


def engine_version() -> str:
    """Version of what turns a database entry into a pattern: the engine's, the readers' and the
    batch's code (records, structure files, CIF blocks, ``compute_batch``; syntax trees: comments
    and docstrings do not count)
    and pymatgen's version (its scattering table and parsers). A cache made by another is
    recomputed, never mixed: an entry an older reader refused is read again."""
    from importlib import metadata

    from xrdmatch.actors import xrd_actors
    from xrdmatch.platform import cif, databases, structure_files
    from xrdmatch.simulation import xrd
    from xrdmatch.training.fingerprint import source_fingerprint

    code = source_fingerprint(Path(m.__file__).read_text()
                              for m in (xrd, databases, structure_files, cif, xrd_actors))
    return f"xrdmatch-{__version__}+{code[:12]}-pymatgen-{metadata.version('pymatgen')}"


@dataclass
class StageSummary:
    out_dir: str
    source: str
    entries: int = 0  # database entries covered so far (patterns + failures)
    patterns: int = 0
    failures: int = 0  # bad entries, listed in errors.parquet
    shards: int = 0
    computed_shards: int = 0  # shards computed by this run (the rest were already there)
    entries_this_run: int = 0
    wall_s: float = 0.0
    done: bool = False
    failed_batches: dict[int, str] = field(default_factory=dict)
    duplicate_ids: int = 0
    ray_start_s: float = 0.0  # connecting to / starting Ray, part of wall_s
    replaced_actors: int = 0  # actors of this run lost (crash, OOM kill, node gone, failed start) and replaced

    @property
    def rate(self) -> float:
        """Structures per second of this run (wall time, Ray start included)."""
        return self.entries_this_run / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        state = "done" if self.done else f"UNFINISHED ({len(self.failed_batches)} batches failed; rerun to finish)"
        lost = f"; {self.replaced_actors} actors replaced" if self.replaced_actors else ""
        return (
            f"XRD {state}: {self.entries} structures, {self.patterns} patterns, {self.failures} failures, "
            f"{self.shards} shards ({self.computed_shards} computed now) in {self.wall_s:.1f} s wall "
            f"(Ray start {self.ray_start_s:.1f} s{lost}), {self.rate:.0f} patterns/s -> {self.out_dir}"
        )


# ----------------------------------------------------------------------------- state on disk


def _identity(db: Path, kind: str, limit: int | None, batch_size: int) -> dict[str, Any]:
    return {
        "source": {"path": str(db.resolve()), "key": database_key(db, limit), "kind": kind, "limit": limit},
        "batch_size": batch_size,
        "engine_version": engine_version(),
        "n_bins": N_BINS,
    }


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("batch_size", "engine_version", "n_bins")
    return all(a.get(k) == b.get(k) for k in keys) and (a.get("source") or {}).get("key") == b["source"]["key"]


def _clear(out: Path) -> None:
    for d in (SHARDS, ERRORS_DIR):
        shutil.rmtree(out / d, ignore_errors=True)
    for f in (ERRORS, MANIFEST):
        (out / f).unlink(missing_ok=True)


def _remove_tmp(out: Path) -> None:
    """Leftovers of writes interrupted by a kill (never renamed, so never counted)."""
    for d in (out, out / SHARDS, out / ERRORS_DIR):
        if d.is_dir():
            for f in d.glob(".*.tmp"):
                f.unlink(missing_ok=True)


def _finished(out: Path, ident: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shards on disk that belong to this run (their footer says batch size, source, engine)."""
    done: dict[int, dict[str, Any]] = {}
    if not (out / SHARDS).is_dir():
        return done
    for f in sorted((out / SHARDS).glob("part-*.parquet")):
        k = shard_index(f)
        meta = shard_meta(f)
        if k is None or meta is None or meta.get("batch") != k or meta.get("run") != _run_tag(ident):
            continue
        if meta.get("errors") and not errors_part_path(out, k).is_file():
            continue  # cannot happen with our write order; recompute rather than lose error rows
        done[k] = meta
    return done


def _run_tag(ident: dict[str, Any]) -> str:
    return f"{ident['source']['key']}|{ident['batch_size']}|{ident['engine_version']}|{ident['n_bins']}"


def _manifest(ident: dict[str, Any], done: dict[int, dict[str, Any]], finished: bool, extra: dict[str, Any]) -> dict:
    shards = [
        {
            "index": k,
            "file": f"{SHARDS}/{shard_path('.', k).name}",
            "count": m["ok"],
            "errors": m["errors"],
            "entries": m["entries"],
        }
        for k, m in sorted(done.items())
    ]
    totals = {
        "entries": sum(s["entries"] for s in shards),
        "patterns": sum(s["count"] for s in shards),
        "errors": sum(s["errors"] for s in shards),
        "shards": len(shards),
    }
    return {
        **ident,
        "format": {"columns": ["id", "formula", "pattern"], "pattern": f"fixed_size_list<float32>[{N_BINS}]"},
        "errors_file": ERRORS,
        "shards": shards,
        "totals": totals,
        "done": finished,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def _write_manifest(out: Path, man: dict[str, Any]) -> None:
    atomic_write_bytes(out / MANIFEST, json.dumps(man, indent=1).encode())


def _finalise(out: Path, done: dict[int, dict[str, Any]]) -> int:
    """errors.parquet from the per-batch parts; returns the number of duplicated ids (patterns
    and errors together)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [errors_part_path(out, k) for k, m in sorted(done.items()) if m["errors"]]
    if parts:
        table = pa.concat_tables([pq.read_table(p) for p in parts])
    else:
        table = pa.table({"id": pa.array([], pa.string()), "reason": pa.array([], pa.string()), "batch": pa.array([], pa.int64())})
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(out / ERRORS, buf.getvalue())
    # every id, whether it got a pattern or an error row: an id that failed once and was read
    # again elsewhere in the database is a duplicate too
    every = [i for k in sorted(done) for i in pq.read_table(shard_path(out, k), columns=["id"]).column("id").to_pylist()]
    every += table.column("id").to_pylist()
    return len(every) - len(set(every))


def _summary_from(out: Path, man: dict[str, Any], t0: float, computed: int, entries_now: int) -> StageSummary:
    tot = man["totals"]
    return StageSummary(
        out_dir=str(out),
        source=man["source"]["path"],
        entries=tot["entries"],
        patterns=tot["patterns"],
        failures=tot["errors"],
        shards=tot["shards"],
        computed_shards=computed,
        entries_this_run=entries_now,
        wall_s=time.perf_counter() - t0,
        done=bool(man["done"]),
        duplicate_ids=int(man.get("duplicate_ids", 0)),
    )


# ----------------------------------------------------------------------------- the run


def _in_background(fn, *args) -> Future:
    """``fn(*args)`` on a daemon thread (the progress bar's count of the database): unlike a
    thread pool's, it never holds up the exit of an interrupted run."""
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever reads the result
            fut.set_exception(e)

    threading.Thread(target=run, name="count-entries", daemon=True).start()
    return fut


def run_xrd_stage(
    db_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    workers: int | None = None,
    batch_size: int = 500,
    limit: int | None = None,
    progress: bool = True,
    *,
    max_retries: int = 3,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    restart_incompatible: bool = False,
) -> StageSummary:
    """Patterns of every entry of ``db_path`` into ``out_dir`` (Parquet shards + manifest).

    Resumes a previous run into the same folder; returns at once if it is complete.
    ``restart_incompatible``: discard a folder made with another batch size / database /
    engine instead of refusing (the cache in ensure_patterns does this).
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    db = resolve_path(db_path)
    if not db.exists():
        raise DatabaseError(f"database not found: {db_path}")
    kind = database_kind(db)
    if kind == "ase":  # before anything is written: a file that is not a database is the user's to fix
        check_ase_file(Path(db))
    out = Path(out_dir).expanduser().resolve()
    ident = _identity(db, kind, limit, batch_size)
    # one run per patterns folder (a campaign, `xrdmatch xrd`, train and screen share the cache):
    # a second waits and then finds the folder finished, instead of clearing the first's files
    waiting: list[bool] = []

    def say_once() -> None:
        if not waiting:
            waiting.append(True)
            log.warning("another XRD run is writing %s: waiting for it to finish", out)

    with exclusive_file(out.parent / f".{out.name}.lock", timeout_s=LOCK_WAIT_S, poll_s=1.0, while_waiting=say_once):
        return _run_locked(db, kind, out, ident, t0, workers, batch_size, limit, progress, max_retries,
                           ray_address, num_cpus, restart_incompatible)


def _run_locked(db, kind, out, ident, t0, workers, batch_size, limit, progress, max_retries, ray_address, num_cpus,
                restart_incompatible) -> StageSummary:
    prev = read_manifest(out)
    if prev is not None and not _same_run(prev, ident):
        if not restart_incompatible:
            raise StageError(
                f"{out} holds patterns of another run (source {prev.get('source', {}).get('path')}, "
                f"batch_size {prev.get('batch_size')}, engine {prev.get('engine_version')}); this run is "
                f"{ident['source']['path']}, batch_size {batch_size}, engine {ident['engine_version']}. "
                "Use another --out, or --restart to discard it."
            )
        _clear(out)
        prev = None
    out.mkdir(parents=True, exist_ok=True)
    _remove_tmp(out)
    done = _finished(out, ident)

    if prev is not None and prev.get("done") and all(s["index"] in done for s in prev["shards"]):
        return _summary_from(out, prev, t0, 0, 0)

    _write_manifest(out, _manifest(ident, done, False, {}))
    total_f = _in_background(count_entries, db, limit) if progress else None
    batches = iter_raw_batches(db, batch_size, limit, skip=set(done))
    first = next(batches, None)
    computed, entries_now, failed, ray_s, replaced = 0, 0, {}, 0.0, 0
    if first is not None:
        computed, entries_now, failed, ray_s, replaced = _run_pool(
            out, ident, done, first, batches, workers, max_retries, ray_address, num_cpus, total_f
        )

    finished = not failed
    extra: dict[str, Any] = {"last_run_wall_s": round(time.perf_counter() - t0, 2), "last_run_ray_start_s": round(ray_s, 2)}
    if finished:
        extra["duplicate_ids"] = _finalise(out, done)
    else:
        extra["failed_batches"] = {str(k): v for k, v in failed.items()}
    man = _manifest(ident, done, finished, extra)
    _write_manifest(out, man)
    summary = _summary_from(out, man, t0, computed, entries_now)
    summary.failed_batches = failed
    summary.ray_start_s = ray_s
    summary.replaced_actors = replaced
    return summary


class _Task(NamedTuple):
    k: int  # the batch
    items: list
    attempt: int  # failures charged to this task (it ran alone when its actor died, or it raised)
    off: int  # offset of items[0] in batch k (0 unless the batch was split)
    suspect: bool  # its actor died while it was in flight: it runs alone on an actor


def _death_text(e: BaseException) -> str:
    """Ray's word on a dead actor, short: its exception and the worker's exit type (the rest of
    Ray's message is the same list of possible causes every time)."""
    m = re.search(r"Worker exit type: (\w+)", str(e))
    return type(e).__name__ + (f", worker exit type {m.group(1)}" if m else "")


@dataclass
class _Split:
    """Batch ``k`` after a worker died on it: its parts' results, gathered until none is left."""

    entries: int
    left: int = 1  # parts not finished yet
    parts: list[tuple[int, Any]] = field(default_factory=list)  # (offset in the batch, BatchResult)
    killers: list[tuple[int, str, str]] = field(default_factory=list)  # (offset, id, reason)

    def merged(self, k: int, meta: dict[str, Any]) -> Any:
        """One BatchResult for the whole batch: patterns and error rows in the batch's order."""
        from xrdmatch.actors.xrd_actors import BatchResult

        ids: list[str] = []
        formulas: list[str] = []
        xs: list[np.ndarray] = []
        errors: list[tuple[int, int, str, str]] = [(off, 0, i, why) for off, i, why in self.killers]
        for off, res in sorted(self.parts, key=lambda p: p[0]):
            t = decode_shard(res.shard)
            ids += t.ids
            formulas += t.formulas
            xs.append(t.X)
            errors += [(off, n, i, why) for n, (i, why) in enumerate(zip(*decode_errors(res.errors)))]
        errors.sort(key=lambda e: (e[0], e[1]))
        X = np.concatenate(xs) if xs else np.empty((0, N_BINS), np.float32)
        meta = dict(meta, batch=k, entries=self.entries, ok=len(ids), errors=len(errors))
        err_bytes = encode_errors([e[2] for e in errors], [e[3] for e in errors], k) if errors else None
        return BatchResult(k, self.entries, len(ids), len(errors), encode_shard(ids, formulas, X, meta), err_bytes,
                           sum(r.seconds for _, r in self.parts))


def _run_pool(out, ident, done, first, batches, workers, max_retries, ray_address, num_cpus, total_f):
    """Feed batches to the actor pool, write results as they come.

    Returns (shards written, entries written, failed batches, Ray start s, actors replaced).
    """
    t_ray = time.perf_counter()
    ray = init_ray(ray_address, num_cpus)
    ray_s = time.perf_counter() - t_ray
    run = _PoolRun(ray, out, ident, done, first, batches, workers or max(1, cluster_cpus()), max_retries, total_f)
    run.run()
    return run.computed, run.entries_now, run.failed, ray_s, run.replaced


class _PoolRun:
    """One run of the actor pool over the batches left.

    An actor gets work only once it is up (its ``ready`` call returned). A lost actor (its
    process or its whole node died) fails its in-flight batches at once; they go back to the
    queue for the live actors, and a replacement actor is asked for. The replacement gets work
    only once Ray can place it, so a cluster that lost a node finishes on the nodes it has left
    instead of waiting for an actor that cannot be scheduled.
    """

    def __init__(self, ray, out, ident, done, first, batches, n, max_retries, total_f):
        from xrdmatch.actors.xrd_actors import new_worker

        self.ray, self.out, self.ident, self.done, self.batches, self.n = ray, out, ident, done, batches, n
        self.max_retries, self.total_f = max_retries, total_f
        self.new_worker = new_worker
        self.meta = {"run": _run_tag(ident)}
        # actor slots: the actor, whether it is up, batches it holds, whether it runs a suspect alone
        self.pool: list[Any] = []  # started in run(), whose finally kills them
        self.starting: dict[Any, int] = {}  # ready ref -> slot
        self.alive = [False] * n
        self.load = [0] * n
        self.alone = [False] * n
        self.inflight: dict[Any, tuple[_Task, int, Any]] = {}  # ref -> (task, slot, actor)
        # work: tasks to run again (retried, suspect, halves) before the database's next batch
        self.queue: list[_Task] = [_Task(first[0], first[1], 0, 0, False)]
        self.exhausted = False
        self.splits: dict[int, _Split] = {}
        # outcome
        self.failed: dict[int, str] = {}
        self.killers = self.replaced = self.computed = self.entries_now = 0
        self.failed_starts = 0
        self.bar = _progress_bar(total_f, sum(m["entries"] for m in done.values()))

    def run(self) -> None:
        last_manifest = time.monotonic()
        no_actor_since: float | None = None
        try:
            self.pool = [self.new_worker() for _ in range(self.n)]
            self.starting = {a.ready.remote(): s for s, a in enumerate(self.pool)}
            while self.inflight or self.work_left():
                self.fill()
                if not self.inflight and not self.work_left():
                    break
                if not any(self.alive):
                    no_actor_since = no_actor_since or time.monotonic()
                    if time.monotonic() - no_actor_since > NO_ACTOR_WARN_S:
                        log.warning("no XRD actor could be placed for %.0f s: does the cluster have free CPUs?",
                                    time.monotonic() - no_actor_since)
                        no_actor_since = time.monotonic()
                else:
                    no_actor_since = None
                ready, _ = self.ray.wait(list(self.inflight) + list(self.starting), num_returns=1,
                                         timeout=NO_ACTOR_WARN_S)
                for ref in ready:
                    if ref in self.starting:
                        self.started(ref)
                    else:
                        self.returned(ref)
                if time.monotonic() - last_manifest > MANIFEST_EVERY_S:
                    _write_manifest(self.out, _manifest(self.ident, self.done, False, {}))
                    last_manifest = time.monotonic()
        finally:
            if self.bar is not None:
                self.bar.close()
            kill_actors(*self.pool)

    def work_left(self) -> bool:
        return bool(self.queue) or not self.exhausted

    def next_task(self, idle: bool) -> _Task | None:
        for i, t in enumerate(self.queue):
            if idle or not t.suspect:
                return self.queue.pop(i)
        if self.queue:
            return None  # only suspects wait: let this actor drain, then it takes one
        if self.exhausted:
            return None
        b = next(self.batches, None)
        if b is None:
            self.exhausted = True
            return None
        return _Task(b[0], b[1], 0, 0, False)

    def fill(self) -> None:
        for slot in sorted(range(self.n), key=lambda s: self.load[s]):
            while self.alive[slot] and not self.alone[slot] and self.load[slot] < INFLIGHT_PER_ACTOR:
                t = self.next_task(idle=self.load[slot] == 0)
                if t is None:
                    break
                ref = self.pool[slot].run.remote(t.k, t.items, self.meta)
                self.inflight[ref] = (t, slot, self.pool[slot])
                self.load[slot] += 1
                self.alone[slot] = t.suspect

    def replace(self, slot: int, dead: Any) -> None:
        if self.pool[slot] is not dead:
            return  # another batch of the same dead actor already had it replaced
        self.replaced += 1
        self.alive[slot] = self.alone[slot] = False
        kill_actors(self.pool[slot])
        self.pool[slot] = self.new_worker()
        self.starting[self.pool[slot].ready.remote()] = slot

    def started(self, ref: Any) -> None:
        """An actor's ``ready`` call returned: it takes work, or it is replaced."""
        slot = self.starting.pop(ref)
        try:
            self.ray.get(ref)
            self.alive[slot] = True
            self.failed_starts = 0
        except self.ray.exceptions.RayError as e:
            self.failed_starts += 1
            if self.failed_starts >= MAX_FAILED_STARTS * self.n:  # broken nodes/image: say why, never spin
                raise StageError(f"no XRD actor could start ({self.failed_starts} tries in a row): "
                                 f"{error_text(e)}; why a worker failed is in Ray's worker logs "
                                 "(the driver's stderr, `ray logs`)") from None
            self.replace(slot, self.pool[slot])

    def returned(self, ref: Any) -> None:
        """A batch (or part of one) came back: write it once all of it is in, or handle its failure."""
        t, slot, actor = self.inflight.pop(ref)
        self.load[slot] -= 1
        if t.suspect:
            self.alone[slot] = False
        try:
            res = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self.failure(t, slot, actor, e)
            return
        if t.k in self.splits:
            sp = self.splits[t.k]
            sp.parts.append((t.off, res))
            sp.left -= 1
            if sp.left:
                return
            res = self.splits.pop(t.k).merged(t.k, self.meta)
        self.write(t.k, res)

    def failure(self, t: _Task, slot: int, actor: Any, e: BaseException) -> None:
        """Requeue, split, retry, name a killer entry, or give the batch up for this run."""
        k = t.k
        died = isinstance(e, self.ray.exceptions.RayActorError)
        if died:
            self.replace(slot, actor)  # the actor (or its node) is gone; its batches go to the others
        if died and not t.suspect:  # not known to have killed it: run it again, alone
            self.queue.append(t._replace(suspect=True))
        elif died and len(t.items) > 1:  # it killed its actor: halve it, the other half finishes
            self.splits.setdefault(k, _Split(len(t.items))).left += 1
            h = len(t.items) // 2
            self.queue += [_Task(k, t.items[:h], 0, t.off, True), _Task(k, t.items[h:], 0, t.off + h, True)]
        elif t.attempt < self.max_retries:
            self.queue.append(t._replace(attempt=t.attempt + 1))
        elif died and self.killers < MAX_KILLER_ENTRIES:
            self.killers += 1
            sid, where = raw_item_id(t.items[0])
            tries = t.attempt + 1
            why = (f"{where}: the XRD worker died computing this entry, alone, {tries} "
                   f"time{'s' if tries > 1 else ''} ({_death_text(e)})")
            log.warning("%s", why)
            sp = self.splits.setdefault(k, _Split(1))
            sp.killers.append((t.off, sid, why))
            sp.left -= 1
            if not sp.left:
                self.write(k, self.splits.pop(k).merged(k, self.meta))
        elif died:
            self.failed[k] = (f"{self.killers} entries killed their workers in this run and another one did in "
                              f"this batch: that looks like broken workers or nodes, not entries ({error_text(e)})")
        else:
            self.failed[k] = error_text(e)

    def write(self, k: int, res: Any) -> None:
        """Errors part before shard, each atomically: the shard is the proof that batch k is done."""
        if res.errors is not None:
            atomic_write_bytes(errors_part_path(self.out, k), res.errors)
        atomic_write_bytes(shard_path(self.out, k), res.shard)
        self.done[k] = {"batch": k, "entries": res.n_entries, "ok": res.n_ok, "errors": res.n_errors}
        self.computed += 1
        self.entries_now += res.n_entries
        bar, total_f = self.bar, self.total_f
        if bar is not None:
            if bar.total is None and total_f is not None and total_f.done() and not total_f.exception():
                bar.total = total_f.result()
            bar.update(res.n_entries)
            bar.set_postfix(failures=sum(m["errors"] for m in self.done.values()), refresh=False)


def _progress_bar(total_f, initial: int):
    if total_f is None:
        return None
    from xrdmatch.platform.progress import progress_bar

    total = None
    try:
        total = total_f.result(timeout=0.001)
    except Exception:  # noqa: BLE001 - still counting; the bar gets its total later
        pass
    return progress_bar(total=total, initial=initial, unit="struct", desc="XRD patterns", smoothing=0.05,
                        dynamic_ncols=True)
