"""The validation queue and the label store: idempotency, leases, exclusive claims.

Runs on SQLite; with ``XRDMATCH_TEST_PG_URL`` set (``scripts/postgres.sh``) every store test
also runs on PostgreSQL, each in a schema of its own.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import uuid

import pytest

from xrdmatch.config import ValidationConfig
from xrdmatch.platform import queue
from xrdmatch.platform.labels import LabelInputError, LabelRecord, add_label, import_labels, list_labels

PG_URL = os.environ.get("XRDMATCH_TEST_PG_URL")
# the PostgreSQL variant shows as skipped (with the reason) where no server is configured
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not PG_URL, reason="XRDMATCH_TEST_PG_URL not set (scripts/postgres.sh starts a server; .ci/run does)"))]

LI3N = {  # alpha-Li3N, shipped record format
    "id": "li3n",
    "formula": "Li3N",
    "lattice": [[3.65, 0.0, 0.0], [-1.825, 3.161, 0.0], [0.0, 0.0, 3.87]],
    "species": ["Li", "Li", "Li", "N"],
    "frac_coords": [[0, 0, 0.5], [1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0], [0, 0, 0]],
}


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    """A fresh, empty store: a SQLite file, or a PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    from sqlalchemy import create_engine, text

    from xrdmatch.platform.db import engine_for

    schema = f"xq_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    yield url
    engine_for(url).dispose()
    with admin.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _proto(**kw) -> ValidationConfig:
    return ValidationConfig(**kw)


def test_submit_is_idempotent_and_keyed_by_protocol(store_url):
    a = queue.submit(store_url, "li3n", LI3N, _proto(), priority=1)
    b = queue.submit(store_url, "li3n", LI3N, _proto(), priority=5)
    assert a == b
    assert queue.counts_by_state(store_url)["queued"] == 1
    c = queue.submit(store_url, "li3n", LI3N, _proto(temperatures=[900.0, 1300.0]))
    assert c != a  # another protocol is another job
    job = queue.get_job(store_url, a)
    assert job.record["species"] == LI3N["species"] and job.formula == "Li3N"
    assert job.protocol["temperatures"] == [600.0, 800.0, 1000.0, 1200.0]
    assert job.state == "queued" and job.attempts == 0


def test_submit_rejects_a_malformed_record_naming_it(store_url):
    with pytest.raises(queue.QueueError, match="bad-1"):
        queue.submit(store_url, "bad-1", {"species": ["Li"]}, _proto())


def test_claim_order_lease_expiry_and_lost_worker(store_url):
    low = queue.submit(store_url, "low", LI3N, _proto(), priority=0)
    high = queue.submit(store_url, "high", LI3N, _proto(), priority=9)
    # leases long enough that a stalled machine cannot expire them between these lines
    j1 = queue.claim(store_url, "w1", lease_s=60)
    assert j1.id == high and j1.state == "running" and j1.attempts == 1 and j1.worker_id == "w1"
    j2 = queue.claim(store_url, "w2", lease_s=60)
    assert j2.id == low
    assert queue.claim(store_url, "w3", lease_s=60) is None  # both leased
    assert not queue.heartbeat(store_url, high, "w2", lease_s=60)  # not w2's job
    # w1's last heartbeat asks for a short lease, then w1 "dies": the lease runs out
    assert queue.heartbeat(store_url, high, "w1", lease_s=0.2, progress={"temperature": 600.0, "step": 3})
    assert queue.get_job(store_url, high).progress["step"] == 3
    time.sleep(0.5)
    j3 = queue.claim(store_url, "w3", lease_s=60)
    assert j3.id == high and j3.worker_id == "w3" and j3.attempts == 2
    assert j3.progress["step"] == 3  # progress survives for the resume / ETA
    assert not queue.heartbeat(store_url, high, "w1", lease_s=60)  # w1 learns it lost the job
    # nor can the stale w1 end the job w3 now runs: neither fail it nor finish it with a label
    from xrdmatch.platform.labels import label_from_result

    assert not queue.fail(store_url, high, "w1", "MD exploded")
    lab = label_from_result(_result("high"), protocol_hash=j3.protocol_hash, job_id=high, record=j3.record)
    assert not queue.complete(store_url, high, "w1", _result("high"), lab)
    assert queue.get_job(store_url, high).state == "running" and list_labels(store_url) == []
    assert queue.heartbeat(store_url, high, "w3", lease_s=60)
    assert queue.complete(store_url, high, "w3", _result("high"), lab)
    assert [lb.structure_id for lb in list_labels(store_url)] == ["high"]


def test_job_that_keeps_losing_workers_fails_after_max_attempts(store_url):
    jid = queue.submit(store_url, "li3n", LI3N, _proto())
    for attempt in (1, 2):
        job = queue.claim(store_url, f"w{attempt}", lease_s=0.2, max_attempts=2)
        assert job.id == jid and job.attempts == attempt
        time.sleep(0.4)
    assert queue.claim(store_url, "w3", lease_s=60, max_attempts=2) is None
    job = queue.get_job(store_url, jid)
    assert job.state == "failed" and "lease expired" in job.error
    # the last worker finishing late does not put a label on a failed job
    from xrdmatch.platform.labels import label_from_result

    lab = label_from_result(_result("li3n"), protocol_hash=job.protocol_hash, job_id=jid, record=job.record)
    assert not queue.complete(store_url, jid, "w2", _result("li3n"), lab)
    assert queue.get_job(store_url, jid).state == "failed" and list_labels(store_url) == []


def _result(sid: str, verdict: str = "superionic") -> dict:
    return {
        "structure_id": sid, "formula": "Li3N", "verdict": verdict, "reason": "test", "method": "mlip-md",
        "calculator": "chgnet", "calculator_version": "0.4.2", "temperatures": [600.0, 900.0],
        "diffusivity": {"600.0": 1e-6, "900.0": 1e-5}, "diffusivity_err": {"600.0": 1e-7, "900.0": 1e-6},
        "ea_ev": 0.25, "ea_err_ev": 0.02, "sigma_300": 1e-3, "sigma_300_range": [5e-4, 2e-3],
        "n_atoms": 64, "runtime_s": 12.0,
    }


@pytest.mark.parametrize(
    ("verdict", "label", "sigma", "sigma_range"),
    [("superionic", 1, 1e-3, (5e-4, 2e-3)), ("not_superionic", 0, 2.5e-8, (1e-8, 6e-8))],
    ids=["superionic", "not_superionic"],
)
def test_completing_twice_yields_one_label(store_url, verdict, label, sigma, sigma_range):
    from xrdmatch.platform.labels import label_from_result

    res = _result("li3n", verdict) | {"sigma_300": sigma, "sigma_300_range": list(sigma_range)}
    jid = queue.submit(store_url, "li3n", LI3N, _proto())
    job = queue.claim(store_url, "w1", lease_s=60)
    lab = label_from_result(res, protocol_hash=job.protocol_hash, job_id=jid, record=job.record)
    assert lab is not None and lab.label == label  # a verdict either way is a label; only inconclusive is not
    assert queue.complete(store_url, jid, "w1", res, lab)
    assert not queue.complete(store_url, jid, "w2", res, lab)  # a second run of the same job
    labels = list_labels(store_url)
    assert len(labels) == 1
    got = labels[0]
    assert (got.structure_id, got.label, got.method, got.formula) == ("li3n", label, "mlip-md", "Li3N")
    # the label carries the MD's own conductivity, whichever side of the threshold it is on
    assert (got.verdict, got.sigma_300, got.sigma_300_range) == (verdict, sigma, sigma_range)
    assert got.diffusivity == {600.0: 1e-6, 900.0: 1e-5}
    assert got.record["species"] == LI3N["species"] and got.job_id == jid
    done = queue.get_job(store_url, jid)
    assert done.state == "done" and done.error is None  # not_superionic is a result, not an inconclusive one
    assert (done.verdict, done.sigma_300) == (verdict, sigma)
    # the same (structure, protocol) added directly is still one label
    _, created = add_label(store_url, lab)
    assert not created and len(list_labels(store_url)) == 1


def test_inconclusive_is_a_result_not_a_label(store_url):
    from xrdmatch.platform.labels import label_from_result

    jid = queue.submit(store_url, "li3n", LI3N, _proto())
    job = queue.claim(store_url, "w1", lease_s=60)
    res = _result("li3n", verdict="inconclusive") | {"reason": "too few Li hops at 600 K"}
    lab = label_from_result(res, protocol_hash=job.protocol_hash, job_id=jid, record=job.record)
    assert lab is None
    queue.complete(store_url, jid, "w1", res, lab)
    job = queue.get_job(store_url, jid)
    assert job.state == "inconclusive" and job.result["verdict"] == "inconclusive" and "hops" in job.error
    assert list_labels(store_url) == []


def test_fail_and_requeue(store_url):
    jid = queue.submit(store_url, "li3n", LI3N, _proto())
    queue.claim(store_url, "w1", lease_s=60)
    assert queue.fail(store_url, jid, "w1", "CalculatorUnavailable: gpaw is not installed")
    assert queue.counts_by_state(store_url)["failed"] == 1
    with pytest.raises(queue.QueueError, match="running"):
        queue.requeue(store_url, ("running",))
    assert queue.requeue(store_url, ("failed",)) == 1
    job = queue.claim(store_url, "w2", lease_s=60)
    assert job.id == jid and job.attempts == 1 and job.error is None  # a fresh crash budget



def test_requeueing_a_done_job_withdraws_its_label_until_the_rerun_gives_one(store_url):
    """A label exists only for a done job: requeued, its label goes; the rerun's verdict (the
    analysis thresholds are not part of the protocol, so it can differ) becomes the label, and an
    inconclusive rerun leaves none."""
    from xrdmatch.platform.labels import label_from_result

    def finish(worker: str, verdict: str, sigma: float) -> None:
        job = queue.claim(store_url, worker, lease_s=60)
        res = _result("li3n", verdict) | {"sigma_300": sigma}
        queue.complete(store_url, job.id, worker, res,
                       label_from_result(res, protocol_hash=job.protocol_hash, job_id=job.id, record=job.record))

    other = add_label(store_url, LabelRecord("x-9", "LiCl", "experiment", 0, "import:experiment"))[0]
    queue.submit(store_url, "li3n", LI3N, _proto())
    finish("w1", "superionic", 1e-3)
    assert [(lab.structure_id, lab.label) for lab in list_labels(store_url)] == [("x-9", 0), ("li3n", 1)]
    assert queue.requeue(store_url, ("done",)) == 1
    assert [lab.structure_id for lab in list_labels(store_url)] == ["x-9"]  # not the job's any more
    job = queue.list_jobs(store_url)[0]  # nor its verdict: a failed rerun must not show it
    assert (job.state, job.verdict, job.sigma_300, job.result) == ("queued", None, None, None)
    finish("w2", "not_superionic", 1e-9)
    assert {lab.structure_id: (lab.label, lab.sigma_300) for lab in list_labels(store_url)} == {
        "x-9": (0, None), "li3n": (0, 1e-9)}
    queue.requeue(store_url, ("done",))
    finish("w3", "inconclusive", 1e-6)
    assert list_labels(store_url) == [other]  # an inconclusive rerun: no label; other labels untouched


def test_release_hands_back_only_the_stopped_workers_running_jobs(store_url):
    """A stopped worker's job (Ctrl-C, SIGTERM) is queued again at once and its interrupted claim
    is not counted; other workers' jobs and finished jobs are left as they are."""
    a, b, c = (queue.submit(store_url, sid, LI3N, _proto()) for sid in ("a", "b", "c"))
    queue.claim(store_url, "w1", lease_s=600)
    time.sleep(0.01)
    assert queue.claim(store_url, "w1", lease_s=0.01).id == b  # lease runs out: w2 takes b over
    time.sleep(0.05)
    assert queue.claim(store_url, "w2", lease_s=600).id == b
    assert queue.heartbeat(store_url, b, "w2", lease_s=600, progress={"fraction": 0.4})
    assert queue.claim(store_url, "w3", lease_s=600).id == c
    assert queue.fail(store_url, c, "w3", "MD exploded")
    assert queue.release(store_url, ["w2", "w3", "nobody"]) == 1  # b only: c is finished
    got = {j.structure_id: (j.state, j.attempts, j.worker_id) for j in queue.list_jobs(store_url)}
    assert got == {"a": ("running", 1, "w1"), "b": ("queued", 1, None), "c": ("failed", 1, "w3")}
    assert queue.get_job(store_url, b).progress["fraction"] == 0.4  # kept for the resume
    assert queue.release(store_url, []) == 0
    job = queue.claim(store_url, "w4", lease_s=600)
    assert job.id == b and job.attempts == 2  # w1's lost claim counts, w2's stopped one does not


def test_expire_frees_only_the_lost_workers_running_jobs_and_counts_the_claim(store_url):
    """A worker Ray reported dead: its job may be taken at once (not after its 10-minute lease),
    and the lost claim counts against max_attempts."""
    a, b = (queue.submit(store_url, sid, LI3N, _proto()) for sid in ("a", "b"))
    queue.claim(store_url, "w1", lease_s=600)
    queue.claim(store_url, "w2", lease_s=600)
    assert queue.claim(store_url, "w3", lease_s=600) is None  # both leased
    assert queue.expire(store_url, ["w1", "nobody", None]) == 1 and queue.expire(store_url, []) == 0
    job = queue.claim(store_url, "w3", lease_s=600, max_attempts=2)
    assert (job.id, job.attempts, job.worker_id) == (a, 2, "w3")
    assert not queue.heartbeat(store_url, a, "w1", lease_s=600)  # the lost worker, if alive, lets go
    assert queue.expire(store_url, ["w3"]) == 1
    assert queue.claim(store_url, "w4", lease_s=600, max_attempts=2) is None  # a killed 2 workers: failed
    got = {j.structure_id: (j.state, j.attempts) for j in queue.list_jobs(store_url)}
    assert got == {"a": ("failed", 2), "b": ("running", 1)}

def test_label_import_is_validated_and_idempotent(store_url, tmp_path):
    good = tmp_path / "exp.csv"
    good.write_text("structure_id,formula,sigma_300,label\nicsd-1,Li10GeP2S12,1.2e-2,\nicsd-2,Li3N,,0\n")
    assert import_labels(store_url, good) == (2, 0, 0)
    assert import_labels(store_url, good) == (0, 2, 0)
    labs = {r.structure_id: r for r in list_labels(store_url, methods=["experiment"])}
    assert labs["icsd-1"].label == 1 and labs["icsd-2"].label == 0 and labs["icsd-1"].source == "exp.csv:2"
    bad = tmp_path / "bad.csv"
    bad.write_text("structure_id,formula,label\nx-1,Li2O,1\nx-2,Li2S,7\n")
    with pytest.raises(LabelInputError, match="row 3 .x-2.: label '7'"):
        import_labels(store_url, bad)
    assert len(list_labels(store_url)) == 2  # nothing of the bad file was written
    with pytest.raises(LabelInputError, match="unknown method"):
        add_label(store_url, LabelRecord("y", "Li2O", "guess", 1, "p"))


def _at_once(target, argsets: list[tuple]) -> list:
    """Run ``target(*args, conn, barrier)`` in one spawned process per argument set, all released
    by one barrier; returns what each sent back, in order."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(argsets))
    pipes, procs = [], []
    for args in argsets:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=target, args=(*args, child, barrier))
        p.start()
        pipes.append(parent)
        procs.append(p)
    got = [pipe.recv() for pipe in pipes]
    for p in procs:
        p.join(60)
    return got


def _claimer(url: str, worker: str, conn, barrier) -> None:
    queue.counts_by_state(url)  # connect (imports, engine) before the start line
    barrier.wait()
    got = []
    while True:
        job = queue.claim(url, worker, lease_s=600)
        if job is None:
            break
        got.append(job.id)
    conn.send(got)
    conn.close()


def test_claim_is_exclusive_across_processes(store_url):
    n_jobs = 120
    proto = _proto()
    ids = {queue.submit(store_url, f"s{i}", LI3N, proto) for i in range(n_jobs)}
    claimed = _at_once(_claimer, [(store_url, f"w{w}") for w in range(4)])
    flat = [j for got in claimed for j in got]
    assert sorted(flat) == sorted(ids)  # every job claimed exactly once
    assert sum(bool(got) for got in claimed) >= 2  # and the claims really were concurrent
    assert queue.counts_by_state(store_url)["running"] == n_jobs


def _opener(url, conn, barrier):
    from xrdmatch.platform.campaign_store import CampaignStore

    barrier.wait()
    try:
        queue.counts_by_state(url)  # the queue and label tables ...
        CampaignStore(url, "c").stages()  # ... and the campaign's, all created on first use
        conn.send("ok")
    except Exception as e:  # noqa: BLE001 - reported to the test
        conn.send(f"{type(e).__name__}: {e}")
    conn.close()


def test_a_new_store_opened_by_many_processes_at_once(store_url):
    # The campaign and its workers (or workers on many nodes) open a new store together:
    # the table creation races must not fail anyone.
    assert _at_once(_opener, [(store_url,)] * 6) == ["ok"] * 6
    assert queue.counts_by_state(store_url)["queued"] == 0


def _wal_opener(urls, conn, barrier):
    from xrdmatch.platform.db import engine_for

    got = []
    for url in urls:
        barrier.wait()
        try:
            with engine_for(url).connect() as c:
                got.append(c.exec_driver_sql("PRAGMA journal_mode").scalar())
        except Exception as e:  # noqa: BLE001 - reported to the test
            got.append(f"{type(e).__name__}: {e}")
    conn.send(got)
    conn.close()


def test_new_sqlite_files_opened_at_once_all_switch_to_wal(tmp_path):
    # SQLite answers "database is locked" at once, without waiting its busy timeout, to some of
    # the processes that switch one new file to WAL together (~3 % of connections here before the
    # fix): the engine retries the switch.
    urls = [f"sqlite:///{tmp_path}/new{i}.db" for i in range(150)]
    got = _at_once(_wal_opener, [(urls,)] * 6)
    assert got == [["wal"] * len(urls)] * 6


def test_validate_cli_defaults_to_the_default_config(tmp_path):
    """`xrdmatch validate` without --config queues under configs/default.yaml's protocol, as
    every other command reads that file: the campaign's jobs and a user's submissions share keys."""
    from pymatgen.core import Lattice, Structure
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.config import load_config
    from xrdmatch.simulation.validate import protocol_hash

    cif = tmp_path / "li3n.cif"
    Structure(Lattice(LI3N["lattice"]), LI3N["species"], LI3N["frac_coords"]).to(filename=str(cif))
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(app, ["validate", "submit", str(cif), "--dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    (job,) = queue.list_jobs(f"sqlite:///{run_dir / 'store.db'}")
    default_yaml = load_config("configs/default.yaml").validation
    assert job.protocol_hash == protocol_hash(default_yaml) != protocol_hash(ValidationConfig())


def test_validate_status_refuses_filter_typos_and_says_an_unreadable_store_in_one_line(tmp_path):
    """A misspelt --state (an empty table) and --limit 0 or -1 (every job) are exit 2; a store that
    is not a database is one line naming it, exit 1, not a traceback."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    url = f"sqlite:///{run_dir / 'store.db'}"
    for sid in ("a", "b"):
        queue.submit(url, sid, LI3N, _proto())
    runner = CliRunner()
    res = runner.invoke(app, ["validate", "status", "--dir", str(run_dir), "--state", "faild"])
    assert res.exit_code == 2, res.output
    assert "--state 'faild': not one of queued, running, done, inconclusive, failed" in res.output
    for limit in ("0", "-1"):
        res = runner.invoke(app, ["validate", "status", "--dir", str(run_dir), "--limit", limit])
        assert res.exit_code == 2 and "--limit" in res.output, res.output
    res = runner.invoke(app, ["validate", "status", "--dir", str(run_dir), "--limit", "1", "--state", "queued"])
    assert res.exit_code == 0 and "queued: 2" in res.output, res.output

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"x" * 4096)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {run_dir}\nstore:\n  url: sqlite:///{garbage}\n")
    for args in (["status"], ["requeue"]):
        res = runner.invoke(app, ["validate", *args, "-c", str(cfg)])
        assert res.exit_code == 1, res.output
        assert res.output.strip() == f"error: store sqlite:///{garbage}: (sqlite3.DatabaseError) file is not a database"


def test_validate_status_shows_ids_as_they_are_not_as_rich_markup(tmp_path):
    """An id 'mp-1[/]' crashed the table (MarkupError) and a file named '[red on white]Li2O.cif'
    was listed as 'Li2O': ids are user text, printed literally."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    run_dir = tmp_path / "[bold]run"  # the store URL in the title is a path too
    run_dir.mkdir()
    url = f"sqlite:///{run_dir / 'store.db'}"
    for sid in ("mp-1[/]", "[red on white]Li2O"):
        queue.submit(url, sid, LI3N, _proto())
    res = CliRunner().invoke(app, ["validate", "status", "--dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "mp-1[/]" in res.output and "[red on white]Li2O" in res.output and "[bold]run" in res.output, res.output


# --- bad input is refused at submission, naming the structure (not at a worker, hours later) ---


def _structure(rec: dict):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(rec["lattice"]), rec["species"], rec["frac_coords"])


def _shipped_records(n: int) -> list[dict]:
    """The first ``n`` records of the shipped database, as they are stored there."""
    import json
    import lzma

    with lzma.open("data/mp_li_structures.jsonl.xz", "rt", encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def test_submit_refuses_a_structure_without_li_naming_it(store_url):
    from pymatgen.core import Lattice, Structure

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(queue.QueueError, match=r"'nacl-1'.*NaCl contains no Li"):
        queue.submit(store_url, "nacl-1", nacl, _proto())
    rec = {"lattice": nacl.lattice.matrix.tolist(), "species": [str(s.specie) for s in nacl],
           "frac_coords": nacl.frac_coords.tolist()}
    with pytest.raises(queue.QueueError, match=r"'nacl-2'.*no Li"):
        queue.submit(store_url, "nacl-2", rec, _proto())
    assert queue.list_jobs(store_url) == []


def test_submit_refuses_atoms_too_close(store_url):
    close = _structure(LI3N)
    close.append("Li", [0.02, 0.0, 0.0])  # 0.073 A from the N at the origin
    with pytest.raises(queue.QueueError, match=r"'li3n-close'.*too close.*min_distance=0.6"):
        queue.submit(store_url, "li3n-close", close, _proto())
    rec = dict(LI3N, species=LI3N["species"] + ["Li"], frac_coords=LI3N["frac_coords"] + [[0.02, 0, 0]])
    with pytest.raises(queue.QueueError, match=r"'li3n-close-rec'.*too close"):
        queue.submit(store_url, "li3n-close-rec", rec, _proto())
    # the protocol's min_distance decides
    assert queue.submit(store_url, "li3n-close", close, _proto(min_distance=0.05))
    assert [j.structure_id for j in queue.list_jobs(store_url)] == ["li3n-close"]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"frac_coords": [[0, 0, float("nan")]] + LI3N["frac_coords"][1:]}, "NaN"),
        ({"species": ["Li", "Li", "Li", "Xx"]}, r"\['Xx'\] are not chemical elements"),
        ({"lattice": [[3.65, 0, 0], [7.3, 0, 0], [0, 0, 3.87]]}, "zero volume"),
        ({"species": [], "frac_coords": []}, "no sites"),
        ({"species": [{"Li": -0.5}, "Li", "Li", "N"]}, r"site 0: occupancies .* must each be in \(0, 1\]"),
        ({"frac_coords": [[0, 0, 0]] * 4}, "too close"),
    ],
    ids=["nan-coords", "not-an-element", "zero-volume", "no-sites", "negative-occupancy", "overlapping"],
)
def test_submit_refuses_a_broken_record_naming_it(store_url, change, why):
    with pytest.raises(queue.QueueError, match=rf"structure 'broken-1': .*{why}"):
        queue.submit(store_url, "broken-1", dict(LI3N, **change), _proto())
    assert queue.list_jobs(store_url) == []


def test_valid_records_and_structures_are_still_queued(store_url):
    from pymatgen.core import Composition

    recs = _shipped_records(2)
    a = queue.submit(store_url, recs[0]["id"], recs[0], _proto())  # the shipped format, as the campaign sends it
    no_formula = {k: v for k, v in recs[1].items() if k != "formula"}
    b = queue.submit(store_url, recs[1]["id"], no_formula, _proto())
    c = queue.submit(store_url, "li3n-structure", _structure(LI3N), _proto())
    # a disordered record (the worker orders it) without a formula
    mixed = {k: v for k, v in LI3N.items() if k != "formula"} | {"species": [{"Li": 0.5, "Na": 0.5}, "Li", "Li", "N"]}
    d = queue.submit(store_url, "li-na-n", mixed, _proto())
    jobs = {j.id: j for j in queue.list_jobs(store_url)}
    assert sorted(jobs) == sorted([a, b, c, d]) and all(j.state == "queued" for j in jobs.values())
    assert jobs[a].formula == recs[0]["formula"] and jobs[b].formula == recs[1]["formula"]
    assert jobs[c].formula == "Li3N"
    assert jobs[d].formula == Composition({"Li": 2.5, "Na": 0.5, "N": 1}).reduced_formula
    assert jobs[a].record["species"] == recs[0]["species"]


def test_validate_submit_skips_a_bad_database_line(tmp_path):
    """One bad line in the configured database: the ids on good lines are queued, an id only on
    the bad line is an error naming the line's problem, and the run goes on."""
    import json

    from typer.testing import CliRunner

    from xrdmatch.cli import app

    r1, r2, r3 = _shipped_records(3)
    db = tmp_path / "db.jsonl"
    db.write_text("\n".join([json.dumps(r1), json.dumps(r2),
                             '{"id": "mp-broken", "lattice": [[1, 0, 0], [0, 1',
                             json.dumps(r3)]) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"database:\n  path: {db}\nrun_dir: {tmp_path / 'run'}\n")
    url = f"sqlite:///{tmp_path / 'run' / 'store.db'}"
    runner = CliRunner()

    res = runner.invoke(app, ["validate", "submit", r1["id"], r3["id"], "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert {j.structure_id for j in queue.list_jobs(url)} == {r1["id"], r3["id"]}

    res = runner.invoke(app, ["validate", "submit", "mp-broken", r2["id"], "mp-nowhere", "--config", str(cfg)])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)  # a clean exit, not a traceback
    assert "error: mp-broken: not read from the database" in res.output and "db.jsonl:3: not valid JSON" in res.output
    assert "error: mp-nowhere: neither a file nor an id" in res.output
    assert f"{r2['id']}: job" in res.output
    assert {j.structure_id for j in queue.list_jobs(url)} == {r1["id"], r2["id"], r3["id"]}


def test_a_different_structure_under_a_queued_id_is_refused_not_merged(store_url):
    """Resubmitting the same structure returns its job; another structure under that id (an
    edited file, two files of one name) is refused naming the id and both structures."""
    a = queue.submit(store_url, "cand", LI3N, _proto())
    assert queue.submit(store_url, "cand", _structure(LI3N), _proto()) == a  # same structure, as a Structure
    squeezed = dict(LI3N, lattice=[[3.5, 0.0, 0.0], [-1.75, 3.03, 0.0], [0.0, 0.0, 3.87]])
    with pytest.raises(queue.QueueError, match=r"'cand': job \d+ already holds a different structure"):
        queue.submit(store_url, "cand", squeezed, _proto())
    (job,) = queue.list_jobs(store_url)
    assert job.id == a and job.record["lattice"] == LI3N["lattice"]


def test_a_disordered_structure_file_is_queued_for_the_worker_to_order(store_url):
    from pymatgen.core import Composition

    from xrdmatch.platform.data import structure_from_record

    s = _structure(dict(LI3N, species=[{"Li": 0.5, "Na": 0.5}, "Li", "Li", "N"]))
    jid = queue.submit(store_url, "li-na-n", s, _proto())
    job = queue.get_job(store_url, jid)
    assert job.record["species"][0] == {"Li": 0.5, "Na": 0.5}
    assert structure_from_record(job.record).composition == s.composition
    assert job.formula == Composition({"Li": 2.5, "Na": 0.5, "N": 1}).reduced_formula


def test_validate_submit_of_two_files_of_one_name_queues_the_first_and_names_the_second(tmp_path):
    from pymatgen.core import Lattice, Structure
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    for d, a in (("a", 4.0), ("b", 4.4)):
        (tmp_path / d).mkdir()
        Structure(Lattice.cubic(a), ["Li", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(tmp_path / d / "POSCAR"),
                                                                                   fmt="poscar")
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(app, ["validate", "submit", str(tmp_path / "a" / "POSCAR"), str(tmp_path / "b" / "POSCAR"),
                                   "--dir", str(run_dir)])
    assert res.exit_code == 1
    assert "POSCAR: job 1\n" in res.output and "'POSCAR': job 1 already holds a different structure" in res.output
    assert len(queue.list_jobs(f"sqlite:///{run_dir / 'store.db'}")) == 1


def test_a_store_outage_neither_fails_the_md_nor_stops_the_worker(store_url, tmp_path):
    """A lease renewal that cannot reach the store lets the MD go on (the lease, not the job,
    is at risk); a job end that cannot be recorded leaves the job running for its lease to
    expire and be taken again, instead of raising out of the worker. The store is made
    unreachable for real: a SQLite file in a directory that does not exist."""
    import dataclasses

    from xrdmatch.actors.validation_workers import LeaseLost, _Progress, process_job
    from xrdmatch.config import Config

    jid = queue.submit(store_url, "li3n", LI3N, _proto())
    job = queue.claim(store_url, "w1", lease_s=60)
    down = f"sqlite:///{tmp_path / 'no-such-dir' / 'store.db'}"
    _Progress(down, job, "w1", _proto(heartbeat_s=0.001), _proto()).heartbeat()  # logs, does not raise
    with pytest.raises(LeaseLost):  # a store that answers still says when the job is gone
        _Progress(store_url, job, "w2", _proto(heartbeat_s=0.001), _proto()).heartbeat()

    broken = dataclasses.replace(job, record=dict(job.record, lattice=[[1.0]]))  # fails before any MD
    out = process_job(Config(run_dir=str(tmp_path / "run")), down, broken, "w1")
    assert out.state == "lost" and "store could not record it" in out.error and "unreadable record" in out.error
    assert queue.get_job(store_url, jid).state == "running"  # nothing half-recorded


def test_two_ids_that_sanitise_alike_get_two_md_folders(store_url, tmp_path):
    from xrdmatch.actors.validation_workers import job_workdir
    from xrdmatch.config import load_config

    cfg = load_config(None, {"run_dir": str(tmp_path / "run")})
    a = queue.get_job(store_url, queue.submit(store_url, "LiCl x", LI3N | {"id": "LiCl x"}, _proto()))
    b = queue.get_job(store_url, queue.submit(store_url, "LiCl_x", LI3N | {"id": "LiCl_x"}, _proto()))
    assert job_workdir(cfg, a) != job_workdir(cfg, b)
    assert job_workdir(cfg, a).name.startswith("LiCl_x-") and job_workdir(cfg, a) == job_workdir(cfg, a)


def test_a_long_blocking_call_keeps_its_lease_and_learns_when_it_is_lost(store_url):
    """Ordering a disordered cell is one blocking pymatgen call that can take minutes: the lease
    is renewed from a thread meanwhile (no other worker takes the job), and a lease lost during
    the call is raised when it returns."""
    from xrdmatch.actors.validation_workers import LeaseLost, _Progress
    from xrdmatch.simulation.md import beating

    vcfg = _proto(lease_s=1.5, heartbeat_s=0.2)
    jid = queue.submit(store_url, "li3n", LI3N, vcfg)
    job = queue.claim(store_url, "w1", lease_s=vcfg.lease_s)
    tracker = _Progress(store_url, job, "w1", vcfg, vcfg)
    with beating(tracker.heartbeat, every_s=0.1):
        time.sleep(2.5)  # the blocking call: longer than the lease
        assert queue.claim(store_url, "w2", lease_s=60.0) is None  # still w1's
    assert queue.expire(store_url, ["w1"]) == 1  # w1 reported lost: the job is free now
    assert queue.claim(store_url, "w2", lease_s=60.0).id == jid
    with pytest.raises(LeaseLost, match="no longer leased to w1"), beating(tracker.heartbeat, every_s=0.1):
        time.sleep(1.0)


# --- input robustness: lattices MD could never use, ids and formulas longer than the store holds ---


def test_submit_refuses_a_lattice_the_xrd_engine_refuses_before_the_distance_check(store_url):
    """A 2000 A cell: the distance check (pymatgen's neighbour list) tried to allocate 27 GB (a
    1000 A cell peaked at 4.3 GB and was queued). The XRD engine's cheap lattice check refuses it
    first, naming the structure, whether it comes as a record or as a Structure."""
    huge = dict(LI3N, lattice=[[2000.0, 0, 0], [0, 2000.0, 0], [0, 0, 2000.0]])
    for sid, s in (("huge-rec", huge), ("huge-structure", _structure(huge))):
        with pytest.raises(queue.QueueError, match=rf"structure '{sid}': lattice too large or too skewed \(axis "
                                                    r"lengths \[2000.0, 2000.0, 2000.0\] A\)"):
            queue.submit(store_url, sid, s, _proto())
    assert queue.list_jobs(store_url) == []


def test_an_id_or_formula_longer_than_the_store_holds_is_refused_naming_it(store_url):
    """PostgreSQL refused a 201-character id for the whole batch (StringDataRightTruncation, no
    structure named) where SQLite stored it: both refuse it now, naming the id, before the insert."""
    long_id = "L" * 201
    with pytest.raises(queue.QueueError, match=rf"structure '{'L' * 60}\.\.\. \(201 characters\)': structure_id is 201 characters long, over "
                                                "the store's limit of 200"):
        queue.submit(store_url, long_id, LI3N, _proto())
    with pytest.raises(queue.QueueError, match="structure .li3n.: formula is 204 characters long, over the store's "
                                               "limit of 200"):
        queue.submit(store_url, "li3n", dict(LI3N, formula="Li3N" * 51), _proto())
    assert queue.submit(store_url, "L" * 200, LI3N, _proto())
    assert [j.structure_id for j in queue.list_jobs(store_url)] == ["L" * 200]


def test_validate_submit_names_each_file_it_refuses_and_queues_the_rest(store_url, tmp_path):
    """One batch: a file whose name (the id) is 210 characters, a 2000 A cell, a CIF of 5,001
    sites and a good file. Each bad one is an error naming the file and what is wrong; the good
    one is queued, on SQLite and PostgreSQL alike (PostgreSQL used to drop the whole batch)."""
    import random

    from pymatgen.core import Lattice, Structure
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    li2o = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.61), ["Li", "O"], [[0.25, 0.25, 0.25], [0, 0, 0]])
    long_name = tmp_path / ("L" * 210 + ".cif")
    li2o.to(filename=str(long_name))
    huge = li2o.copy()
    huge.scale_lattice(2000.0 ** 3)
    huge.to(filename=str(tmp_path / "huge.cif"))
    rng = random.Random(0)
    (tmp_path / "big.cif").write_text(
        "data_big\n_cell_length_a 40\n_cell_length_b 40\n_cell_length_c 40\n_cell_angle_alpha 90\n"
        "_cell_angle_beta 90\n_cell_angle_gamma 90\nloop_\n_atom_site_label\n_atom_site_type_symbol\n"
        "_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n"
        + "".join(f"S{k} Li {rng.random():.5f} {rng.random():.5f} {rng.random():.5f}\n" for k in range(5_001)))
    li2o.to(filename=str(tmp_path / "ok.cif"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nstore:\n  url: '{store_url}'\n")
    files = [long_name, tmp_path / "huge.cif", tmp_path / "big.cif", tmp_path / "ok.cif"]
    res = CliRunner().invoke(app, ["validate", "submit", *map(str, files), "--config", str(cfg)])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)  # a clean exit, not a traceback
    assert (f"error: {long_name}: structure '{'L' * 60}... (210 characters)': structure_id is 210 characters long, over the store's "
            "limit of 200") in res.output
    assert (f"error: {tmp_path / 'huge.cif'}: structure 'huge': lattice too large or too skewed (axis lengths "
            "[2000.0, 2000.0, 2000.0] A)") in res.output
    assert (f"error: {tmp_path / 'big.cif'}: refused before parsing: CIF data block data_big has 5,001 atom-site "
            "rows, over the limit of 5,000") in res.output
    assert "ok: job " in res.output
    assert [j.structure_id for j in queue.list_jobs(store_url)] == ["ok"]


def test_label_import_refuses_an_id_longer_than_the_store_holds_naming_the_row(store_url, tmp_path):
    """A 300-character id was stored by SQLite and failed the import on PostgreSQL with an unnamed
    StringDataRightTruncation. Both refuse the file now, naming the row and the id (an import is
    all rows or none), and the store is left unchanged."""
    long_id = "m" * 300
    f = tmp_path / "long.csv"
    f.write_text(f"structure_id,formula,label\nmp-1,Li2O,1\n{long_id},Li2O,0\n")
    with pytest.raises(LabelInputError, match=rf"row 3 \({'m' * 60}\.\.\. \(300 characters\)\): structure_id is 300 characters long, over the "
                                              "store's limit of 200"):
        import_labels(store_url, f)
    assert list_labels(store_url) == []


def test_status_tables_never_cut_a_word_and_fall_back_to_blocks_on_a_narrow_terminal():
    """`validate status` and `models` print through print_table: a table only where each column can
    hold its longest word, else one block per row; store text is never read as rich markup."""
    import io

    from rich.console import Console

    from xrdmatch.platform.cli_common import print_table

    columns = ["id", "formula", "state", "progress", "error"]
    rows = [["1", "Li6PS5Cl", "failed", "-", "[red]calculator[/] 'gpaw' not installed"],
            ["2", "Li10GeP2S12", "running", "1000 K 40/300", ""]]

    def render(width: int) -> str:
        out = io.StringIO()
        print_table(Console(file=out, width=width, color_system=None), "jobs (sqlite:///x)", columns, rows,
                    colours={"state": {"failed": "red"}})
        return out.getvalue()

    wide = render(120)
    assert "┃ id ┃" in wide and "[red]calculator[/] 'gpaw' not installed" in wide and "…" not in wide
    narrow = render(40)
    assert "┃" not in narrow and "…" not in narrow
    assert narrow.splitlines()[:2] == ["jobs (sqlite:///x)", "id 1"]
    assert "    error: [red]calculator[/] 'gpaw' not" in narrow  # long lines wrap at a space
    assert "    progress: 1000 K 40/300" in narrow and "progress: -" not in narrow  # an empty cell says nothing
    words = " ".join(sum(rows, [])).split()
    assert set(words) - {"-"} <= set(narrow.split()) and set(words) <= set(wide.replace("│", " ").split())
