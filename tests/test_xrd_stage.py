"""The XRD stage end to end: real local Ray, real pymatgen, real files, kill -9 resume."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xrdmatch.platform.data import iter_records, structure_from_record
from xrdmatch.platform.patterns import (
    PatternsError,
    ensure_patterns,
    iter_pattern_batches,
    load_errors,
    load_patterns,
    read_manifest,
)
from xrdmatch.platform.xrd_stage import StageError, run_xrd_stage
from xrdmatch.simulation.xrd import xrd_pattern


#: An entry with this id kills the worker process that reads it (xrdmatch.actors.xrd_faults).
KILLER_ID = "test-entry-that-kills-its-worker"
#: The batch holding an entry with this id raises while writing its shard, the first RAISES times.
RAISER_ID = "test-entry-whose-batch-raises"
RAISES = 3


@pytest.fixture(scope="module")
def raise_count(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults") / "raises"


@pytest.fixture(scope="module")
def ray_local(raise_count):
    import ray

    from xrdmatch.actors.xrd_faults import faults
    from xrdmatch.platform.ray_utils import WORKER_ENV

    hook = faults(kill_id=KILLER_ID, raise_id=RAISER_ID, raise_times=RAISES, raise_count=raise_count)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": dict(WORKER_ENV), "worker_process_setup_hook": hook})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def records(database_path):
    return list(itertools.islice(iter_records(database_path), 60))


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``root`` (Linux /proc)."""
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
    out = []
    for pid in parent:
        p = pid
        while p in parent and p not in (0, 1, root):
            p = parent[p]
        if p == root and pid != root:
            out.append((pid, cmd[pid]))
    return out


def _shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / "shards").glob("part-*.parquet"))}


def test_jsonl_slice_each_id_once_and_patterns_equal_engine(ray_local, database_path, records, tmp_path):
    out = tmp_path / "patterns"
    s = run_xrd_stage(database_path, out, workers=2, batch_size=16, limit=50, progress=False)
    assert s.done and s.entries == 50 and s.patterns == 50 and s.failures == 0
    assert s.shards == 4 and s.computed_shards == 4 and s.duplicate_ids == 0

    table = load_patterns(out)
    assert table.ids == [r["id"] for r in records[:50]]  # database order, each id once
    assert table.formulas == [r["formula"] for r in records[:50]]
    assert table.X.dtype == np.float32 and table.X.shape == (50, 4501)
    for i in (0, 17, 49):
        np.testing.assert_allclose(table.X[i], xrd_pattern(structure_from_record(records[i])), atol=1e-6)

    man = read_manifest(out)
    assert man["done"] and man["batch_size"] == 16 and man["source"]["limit"] == 50
    assert [sh["count"] for sh in man["shards"]] == [16, 16, 16, 2]
    assert man["totals"] == {"entries": 50, "patterns": 50, "errors": 0, "shards": 4}
    assert [len(b) for b in iter_pattern_batches(out)] == [16, 16, 16, 2]

    import pyarrow.parquet as pq

    schema = pq.read_schema(out / "shards" / "part-000000.parquet")
    assert schema.names == ["id", "formula", "pattern"] and schema.field("pattern").type.list_size == 4501

    # Idempotent: a finished folder is not recomputed, not even rewritten.
    before = _shard_stats(out)
    again = run_xrd_stage(database_path, out, workers=2, batch_size=16, limit=50, progress=False)
    assert again.done and again.computed_shards == 0 and _shard_stats(out) == before

    with pytest.raises(StageError, match="another run"):
        run_xrd_stage(database_path, out, batch_size=10, limit=50, progress=False)


def test_bad_entries_recorded_rest_completes(ray_local, records, tmp_path):
    from pymatgen.core import Structure

    folder = tmp_path / "cifs"
    folder.mkdir()
    good = {}
    for name, rec, fmt in [("mp-a.cif", records[0], "cif"), ("POSCAR_b", records[1], "poscar"), ("mp-c.cif", records[2], "cif")]:
        structure_from_record(rec).to(filename=str(folder / name), fmt=fmt)
        good[Path(name).stem] = xrd_pattern(Structure.from_file(str(folder / name)))
    (folder / "empty.cif").write_text("")
    (folder / "garbage.cif").write_text("loop_\n_nonsense\n")
    (folder / "POSCAR_nosites").write_text("no sites\n1.0\n4 0 0\n0 4 0\n0 0 4\nLi\n0\nDirect\n")

    out = tmp_path / "out"
    s = run_xrd_stage(folder, out, workers=1, batch_size=2, progress=False)
    assert s.done and s.entries == 6 and s.patterns == 3 and s.failures == 3
    table = load_patterns(out)
    assert sorted(table.ids) == sorted(good)
    for sid, x in zip(table.ids, table.X):
        np.testing.assert_allclose(x, good[sid], atol=1e-6)
    errors = load_errors(out).set_index("id")["reason"].to_dict()
    assert errors == {
        "empty": "empty.cif: empty file",
        "garbage": errors["garbage"],
        "POSCAR_nosites": "POSCAR_nosites: structure has no sites",
    }
    assert "unreadable by pymatgen" in errors["garbage"]

    # a bad JSON line in a JSONL database
    db = tmp_path / "db.jsonl.gz"
    with gzip.open(db, "wt") as fh:
        fh.write(json.dumps(records[0]) + "\n" + '{"id": "mp-cut", "lattice": [[1, 0\n' + json.dumps(records[1]) + "\n")
    s = run_xrd_stage(db, tmp_path / "out2", workers=1, batch_size=500, progress=False)
    assert s.done and s.patterns == 2 and s.failures == 1
    assert load_patterns(tmp_path / "out2").ids == [records[0]["id"], records[1]["id"]]
    err = load_errors(tmp_path / "out2")
    assert err["id"].tolist() == ["mp-cut"] and "db.jsonl.gz:2: not valid JSON" in err["reason"][0]


def test_an_entry_that_kills_its_worker_is_an_error_and_its_batch_is_written(ray_local, records, tmp_path,
                                                                              monkeypatch):
    from xrdmatch.platform import xrd_stage

    db = tmp_path / "db.jsonl"
    recs = [dict(r) for r in records[:8]]
    recs[3]["id"] = KILLER_ID  # line 4, the last of batch 0 (entries 0-3)
    db.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    s = run_xrd_stage(db, out, workers=2, batch_size=4, max_retries=1, progress=False)
    assert s.done and (s.entries, s.patterns, s.failures) == (8, 7, 1) and not s.failed_batches
    # its actor died with batch 0 in flight, then under batch 0 alone, its half [2, K], and K alone twice
    assert s.replaced_actors == 5 and "5 actors replaced" in s.line()
    table = load_patterns(out)
    assert table.ids == [r["id"] for r in recs if r["id"] != KILLER_ID]  # in database order, each once
    for r, x in zip(recs[:3], table.X[:3]):  # the killer's batch, computed in parts and merged
        np.testing.assert_allclose(x, xrd_pattern(structure_from_record(r)), atol=1e-6)
    err = load_errors(out)
    assert err["id"].tolist() == [KILLER_ID] and err["batch"].tolist() == [0]
    assert err["reason"][0].startswith("db.jsonl:4: the XRD worker died computing this entry, alone, 2 times (ActorDiedError, worker exit type ")
    assert [(sh["index"], sh["entries"], sh["count"], sh["errors"]) for sh in read_manifest(out)["shards"]] == [
        (0, 4, 3, 1), (1, 4, 4, 0)]
    again = run_xrd_stage(db, out, workers=2, batch_size=4, max_retries=1, progress=False)
    assert again.done and again.computed_shards == 0 and load_patterns(out).ids == table.ids

    # beyond the run's allowance, dying workers look like broken workers, not entries: the batch
    # is left unfinished for a rerun, nothing is written off as an error
    monkeypatch.setattr(xrd_stage, "MAX_KILLER_ENTRIES", 0)
    s = run_xrd_stage(db, tmp_path / "out2", workers=1, batch_size=1, max_retries=0, limit=4, progress=False)
    assert not s.done and list(s.failed_batches) == [3] and "broken workers or nodes" in s.failed_batches[3]
    assert (s.patterns, s.failures) == (3, 0)


def test_a_batch_that_raises_is_retried_then_left_for_the_next_run(ray_local, records, tmp_path, raise_count):
    """A batch whose computation raises (not an entry: its shard cannot be written) is retried
    ``max_retries`` times, then left unfinished: the run says which batch and why, keeps every
    other shard, and the next run computes that batch alone."""
    from xrdmatch.actors.xrd_faults import RAISED

    db = tmp_path / "db.jsonl"
    recs = [dict(r) for r in records[:12]]
    recs[5]["id"] = RAISER_ID  # batch 1 (entries 4-7)
    db.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    raise_count.unlink(missing_ok=True)
    s = run_xrd_stage(db, out, workers=2, batch_size=4, max_retries=1, progress=False)
    assert raise_count.stat().st_size == 2  # the first try and its one retry
    assert not s.done and list(s.failed_batches) == [1] and RAISED in s.failed_batches[1]
    assert s.replaced_actors == 0  # it raised: its actor lives on
    man = read_manifest(out)
    assert not man["done"] and RAISED in man["failed_batches"]["1"]
    assert [sh["index"] for sh in man["shards"]] == [0, 2]
    kept = _shard_stats(out)

    again = run_xrd_stage(db, out, workers=2, batch_size=4, max_retries=1, progress=False)
    assert raise_count.stat().st_size == RAISES  # raised once more, then its retry went through
    assert again.done and again.computed_shards == 1 and not again.failed_batches
    assert {k: v for k, v in _shard_stats(out).items() if k in kept} == kept  # 0 and 2 not rewritten
    assert load_patterns(out).ids == [r["id"] for r in recs]


def test_a_cluster_where_no_actor_can_start_stops_the_stage_and_says_so(database_path, tmp_path):
    """Actors that cannot start (a broken image on the nodes) are asked for again a few times,
    then the stage stops with an error that says so instead of asking forever. A Ray of its
    own, in a subprocess: every worker of it fails its start."""
    script = f"""
import ray
from xrdmatch.actors.xrd_faults import faults
from xrdmatch.platform.xrd_stage import StageError, run_xrd_stage
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
         runtime_env={{"worker_process_setup_hook": faults(fail_start=True)}})
try:
    run_xrd_stage({str(database_path)!r}, {str(tmp_path / "out")!r}, workers=2, batch_size=4, limit=8, progress=False)
except StageError as e:
    print("StageError:", e)
else:
    print("finished")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "StageError: no XRD actor could start (6 tries in a row)" in r.stdout, r.stdout + r.stderr[-3000:]
    assert not read_manifest(tmp_path / "out")["done"]


def test_ase_database_patterns(ray_local, records, tmp_path):
    import ase.db
    from pymatgen.io.ase import AseAtomsAdaptor

    path = tmp_path / "structures.db"
    with ase.db.connect(str(path)) as db:
        for r in records[:5]:
            db.write(AseAtomsAdaptor.get_atoms(structure_from_record(r)), mp_id=r["id"])
    s = run_xrd_stage(path, tmp_path / "out", workers=1, batch_size=2, progress=False)
    assert s.done and s.patterns == 5
    table = load_patterns(tmp_path / "out")
    assert table.ids == [r["id"] for r in records[:5]]
    for r, x in zip(records[:5], table.X):
        np.testing.assert_allclose(x, xrd_pattern(structure_from_record(r)), atol=1e-6)


def test_resume_after_kill9(ray_local, database_path, tmp_path):
    """kill -9 the CLI once shards exist; the rerun finishes without recomputing them, each id once."""
    out = tmp_path / "patterns"
    limit, bs = 400, 5
    args = ["--db", str(database_path), "--out", str(out), "--limit", str(limit), "--batch-size", str(bs), "--workers", "1"]
    # The CLI joins this module's local Ray (RAY_ADDRESS), like a driver on a cluster; the kill
    # takes the driver and its actors down, the Ray cluster stays.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xrdmatch.cli", "xrd", *args, "--no-progress"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(_shard_stats(out)) < 3 if (out / "shards").is_dir() else True:
            assert proc.poll() is None, "the XRD command exited before it could be killed"
            assert time.monotonic() < deadline, "no shards after 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the local Ray it started (its own session)
        except ProcessLookupError:
            pass
    before = _shard_stats(out)
    man = read_manifest(out)
    assert 3 <= len(before) < limit // bs, "the run must be killed in the middle"
    assert not man["done"]
    with pytest.raises(PatternsError, match="not finished"):
        load_patterns(out)

    from typer.testing import CliRunner

    from xrdmatch.cli import app

    res = CliRunner().invoke(app, ["xrd", *args, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"XRD done: {limit} structures" in res.output
    after = _shard_stats(out)
    assert len(after) == limit // bs
    assert {k: after[k] for k in before} == before  # finished shards untouched (same inode, mtime)
    ids = load_patterns(out).ids
    assert len(ids) == limit and len(set(ids)) == limit
    assert ids == [r["id"] for r in itertools.islice(iter_records(database_path), limit)]
    assert not list(out.rglob("*.tmp"))


def test_ensure_patterns_caches_in_run_dir(ray_local, tmp_path):
    from xrdmatch.config import load_config

    cfg = load_config(overrides={"run_dir": str(tmp_path / "run"), "database": {"limit": 12}, "xrd": {"batch_size": 5}})
    t1 = ensure_patterns(cfg, progress=False)
    assert len(t1) == 12
    shards = sorted((tmp_path / "run" / "patterns").glob("*/shards/*.parquet"))
    assert len(shards) == 3
    stats = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in shards]
    t2 = ensure_patterns(cfg, progress=False)
    assert t2.ids == t1.ids and np.array_equal(t2.X, t1.X)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in shards] == stats


def test_lost_actor_batch_is_redone(ray_local, database_path, tmp_path):
    """SIGKILL one XRD actor mid-run: the driver replaces it, its batches are redone, each id lands once."""
    import threading

    out = tmp_path / "patterns"
    killed: list[int] = []

    def kill_one_actor() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n = len(list((out / "shards").glob("*.parquet"))) if (out / "shards").is_dir() else 0
            actors = [pid for pid, cmd in _descendants(os.getpid()) if cmd.startswith("ray::XRDWorker")] if n >= 2 else []
            if actors:
                os.kill(actors[0], signal.SIGKILL)  # a process this test's Ray started
                killed.append(actors[0])
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    s = run_xrd_stage(database_path, out, workers=2, batch_size=10, limit=300, progress=False)
    killer.join()
    assert killed, "no actor was killed"
    assert s.done and s.patterns == 300 and not s.failed_batches
    ids = load_patterns(out).ids
    assert len(ids) == 300 and len(set(ids)) == 300


def test_progress_bar_in_a_log_file_draws_a_few_lines_not_one_per_update(capsys):
    """Redirected stderr (a log file): the bar draws at its start and end, not per shard."""
    from xrdmatch.platform.progress import progress_bar

    with progress_bar(total=200, desc="XRD patterns") as bar:
        for _ in range(200):
            bar.update()
    draws = [d for d in capsys.readouterr().err.replace("\r", "\n").splitlines() if "XRD patterns" in d]
    assert 1 <= len(draws) <= 3 and "200/200" in draws[-1]


def test_pattern_cache_key_follows_the_database_content(tmp_path, database_path):
    """Same file name and size but other records (or a file edited in place): another cache
    folder, never the first database's patterns. The same bytes elsewhere: the same folder."""
    import lzma
    from itertools import islice

    from xrdmatch.platform.data import iter_jsonl_lines
    from xrdmatch.platform.paths import database_key

    lines = [line for _, line in islice(iter_jsonl_lines(database_path), 4)]
    a, b, c = tmp_path / "a" / "db.jsonl", tmp_path / "b" / "db.jsonl", tmp_path / "c" / "db.jsonl"
    for d in (a, b, c):
        d.parent.mkdir()
    a.write_text("\n".join(lines[:2]) + "\n")
    c.write_text(a.read_text())
    swapped = lines[1].replace('"Li"', '"Na"', 1)  # same length, another structure
    assert swapped != lines[1]
    b.write_text("\n".join([lines[0], swapped]) + "\n")
    assert a.stat().st_size == b.stat().st_size and a.read_text() != b.read_text()
    assert database_key(a) != database_key(b)
    assert database_key(a) == database_key(c)
    assert database_key(a, limit=1) != database_key(a)
    before = database_key(a)
    a.write_text(b.read_text())  # edited in place, same size
    assert database_key(a) != before
    xz = tmp_path / "db.jsonl.xz"
    xz.write_bytes(lzma.compress(a.read_bytes()))
    assert database_key(xz).startswith("db-")


def test_the_engine_version_follows_the_engine_code_and_pymatgen(tmp_path, monkeypatch):
    """The pattern cache key's engine version changes with the engine's code (not its comments)
    and names the pymatgen whose scattering table it read: an old cache is never served as new."""
    from importlib import metadata

    from xrdmatch.platform.xrd_stage import engine_version
    from xrdmatch.simulation import xrd

    base = engine_version()
    assert base.endswith(f"-pymatgen-{metadata.version('pymatgen')}")
    src = Path(xrd.__file__).read_text()
    copy = tmp_path / "xrd.py"
    copy.write_text(src + "\n# a comment only\n")
    monkeypatch.setattr(xrd, "__file__", str(copy))
    assert engine_version() == base
    copy.write_text(src + "\nLORENTZ_TWEAK = 1.0\n")
    assert engine_version() != base
    monkeypatch.undo()
    # the structure-file and CIF readers and the batch loop count too: an entry an older reader
    # refused is read again
    from xrdmatch.actors import xrd_actors
    from xrdmatch.platform import cif, structure_files

    for module in (structure_files, cif, xrd_actors):
        copy = tmp_path / Path(module.__file__).name
        copy.write_text(Path(module.__file__).read_text() + "\nREADER_TWEAK = 1\n")
        with monkeypatch.context() as m:
            m.setattr(module, "__file__", str(copy))
            assert engine_version() != base
    assert engine_version() == base


def test_ray_errors_read_as_the_users_exception(ray_local):
    """A failed Ray task or actor is reported by its exception, not Ray's header line."""
    import ray

    from xrdmatch.platform.ray_utils import error_text

    @ray.remote
    def task():
        raise ValueError("entry 7: structure has no sites")

    @ray.remote
    class Broken:
        def __init__(self):
            raise ImportError("No module named 'pymatgen'")

        def run(self):
            return 1

    with pytest.raises(ray.exceptions.RayError) as e1:
        ray.get(task.remote())
    with pytest.raises(ray.exceptions.RayError) as e2:
        ray.get(Broken.remote().run.remote())
    assert error_text(e1.value) == "ValueError: entry 7: structure has no sites"
    assert error_text(e2.value) == "ActorDiedError: ImportError: No module named 'pymatgen'"


def test_one_run_per_patterns_folder(ray_local, database_path, tmp_path, monkeypatch):
    """Campaigns, `xrdmatch xrd`, train and screen share the patterns cache: while one run holds
    the folder (a real process holding its lock), another waits and, out of patience, fails
    without touching the folder; once the holder dies it runs."""
    import os
    import signal
    import subprocess
    import sys

    import xrdmatch.platform.xrd_stage as stage
    from xrdmatch.platform.lock import DirectoryBusy

    out = tmp_path / "patterns"
    first = run_xrd_stage(database_path, out, workers=1, batch_size=12, limit=24, progress=False)
    assert first.done
    before = {f: f.stat().st_mtime_ns for f in out.iterdir()}
    lock = out.parent / f".{out.name}.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from xrdmatch.platform.lock import exclusive_file\n"
                               f"with exclusive_file({str(lock)!r}, 5):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(stage, "LOCK_WAIT_S", 1.5)
        with pytest.raises(DirectoryBusy, match="still in use by another process"):
            run_xrd_stage(database_path, out, workers=1, batch_size=8, limit=24, progress=False,
                          restart_incompatible=True)  # would clear the folder: other batch size
        assert {f: f.stat().st_mtime_ns for f in out.iterdir()} == before
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(10)
        again = run_xrd_stage(database_path, out, workers=1, batch_size=8, limit=24, progress=False,
                              restart_incompatible=True)
        assert again.done and again.patterns == first.patterns
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
