"""MD validation queue end to end: real CHGNet MD through ASE, real Ray actors, real MLflow.

A tiny protocol (2 temperatures, a few Langevin steps, a small supercell) keeps each job at a
few seconds; the analysis thresholds are opened so that a few femtoseconds give a verdict.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from xrdmatch.config import Config, load_config
from xrdmatch.platform import queue
from xrdmatch.platform.db import store_url
from xrdmatch.platform.labels import list_labels

SMALL = ("mp-1009009", "mp-10182")  # LiF (2 sites), LiZnP (3 sites)

TINY = {
    "temperatures": [600.0, 1500.0],
    "thermostat": "langevin",
    "equilibration_steps": 2,
    "production_steps": 16,
    "msd_fit_start_fs": 0.0,  # 32 fs of MD: machinery, not physics
    "traj_interval": 2,
    "min_atoms": 8,
    "min_length": 0.0,
    "min_li_msd": 0.0,
    "min_r2": 0.0,
    "verdict_z": 0.0,  # 32 fs extrapolated to 300 K: no error band would ever clear the threshold
    "max_framework_msd": 1000.0,
    "lease_s": 6.0,
    "heartbeat_s": 0.5,
    "poll_s": 0.5,
}


def _cfg(tmp_path: Path, **validation) -> Config:
    return load_config(None, {"run_dir": str(tmp_path / "run"), "ray": {"num_cpus": 2},
                              "validation": TINY | validation})


@pytest.fixture(scope="module")
def records(database_path) -> dict[str, dict]:
    from xrdmatch.platform.data import iter_records

    out = {}
    for rec in iter_records(database_path):
        if rec["id"] in SMALL:
            out[rec["id"]] = rec
            if len(out) == len(SMALL):
                return out
    raise AssertionError(f"{SMALL} not in {database_path}")


@pytest.fixture(scope="module")
def ray_local():
    from xrdmatch.platform.ray_utils import init_ray

    # Ray's memory monitor kills the busiest workers when the *machine* passes 95 % memory;
    # on a shared CI box that is other jobs' memory, not ours: the kernel's OOM killer stays.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray = init_ray(None, 2)
    yield ray
    ray.shutdown()


def _mlflow_runs(cfg: Config):
    from mlflow.tracking import MlflowClient

    from xrdmatch.platform.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_two_structures_end_to_end(tmp_path, records, ray_local):
    from typer.testing import CliRunner

    from xrdmatch.actors.validation_workers import run_workers
    from xrdmatch.cli import app

    cfg = _cfg(tmp_path)
    url = store_url(cfg)
    ids = [queue.submit(url, sid, records[sid], cfg.validation) for sid in SMALL]
    summary = run_workers(cfg, n=2)
    assert sorted(o.state for o in summary.outcomes) == ["done", "done"], summary

    labels = {lab.structure_id: lab for lab in list_labels(url)}
    assert set(labels) == set(SMALL)
    for sid, lab in labels.items():
        assert lab.method == "mlip-md" and lab.calculator == "chgnet" and lab.calculator_version
        assert lab.label == (lab.verdict == "superionic") and lab.sigma_300 > 0 and lab.ea_ev > 0
        assert sorted(lab.diffusivity) == [600.0, 1500.0] and lab.runtime_s > 0
        assert lab.record["species"] == records[sid]["species"] and lab.job_id in ids
    for jid in ids:
        job = queue.get_job(url, jid)
        assert job.state == "done" and job.attempts == 1
        assert job.progress["temperatures_done"] == [600.0, 1500.0] and job.progress["fraction"] == 1.0

    client, runs = _mlflow_runs(cfg)
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {f"validate-{sid}" for sid in SMALL}
    for sid in SMALL:
        run = by_name[f"validate-{sid}"]
        assert run.data.tags["structure_id"] == sid and run.data.tags["method"] == "mlip-md"
        assert run.data.tags["verdict"] == labels[sid].verdict
        assert {"ea_ev", "sigma_300", "D_600K", "D_1500K"} <= set(run.data.metrics)
        assert "arrhenius.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert queue.get_job(url, ids[SMALL.index(sid)]).mlflow_run_id == run.info.run_id

    # resubmitting is a no-op; the status table shows the finished jobs
    assert [queue.submit(url, sid, records[sid], cfg.validation) for sid in SMALL] == ids
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    res = CliRunner().invoke(app, ["validate", "status", "--config", str(cfg_file)])
    assert res.exit_code == 0, res.output
    for sid in SMALL:
        assert sid in res.output
    assert "done: 2" in res.output


def test_bad_inputs_fail_with_reasons_and_the_next_job_completes(tmp_path, records, ray_local):
    from xrdmatch.actors.validation_workers import run_workers

    cfg = _cfg(tmp_path)
    url = store_url(cfg)
    lif = records["mp-1009009"]
    no_li = lif | {"species": ["Na" if s == "Li" else s for s in lif["species"]]}
    squeezed = lif | {"frac_coords": [lif["frac_coords"][0], [c + 0.01 for c in lif["frac_coords"][0]]]}
    # a real MLIP's ASE calculator that this environment does not have (GPAW is installed by the tests)
    mace = cfg.validation.model_copy(update={"calculator": "mace.calculators.MACECalculator"})
    # what MD could only fail is refused at submit, naming the structure (no job, nothing to run)
    for sid, rec, reason in (("no-li", no_li, "contains no Li"), ("squeezed", squeezed, "atoms too close")):
        with pytest.raises(queue.QueueError, match=f"structure '{sid}': .*{reason}"):
            queue.submit(url, sid, rec, cfg.validation, priority=5)
    # a job row is data from a shared store: a calculator the worker does not trust is never
    # built (ASE's file-based calculators run their `command` through a shell)
    marker = tmp_path / "ran"
    shell = cfg.validation.model_copy(update={"calculator": "ase.calculators.mopac.MOPAC", "method": "aimd",
                                              "calculator_kwargs": {"command": f"touch {marker}"}})
    # what only a worker can find out fails the job there, with its reason
    bad = {
        queue.submit(url, "mp-1009009", lif, mace, priority=5): "CalculatorUnavailable: calculator "
        "'mace.calculators.MACECalculator': cannot import mace.calculators (No module named 'mace'); pip install mace-torch",
        queue.submit(url, "mp-1009009", lif, shell, priority=5): "CalculatorUnavailable: calculator "
        "'ase.calculators.mopac.MOPAC' of the job's protocol is not trusted by this worker: it is not in "
        "validation.trusted_calculators ['chgnet', 'mace.calculators.MACECalculator']",
    }
    good = queue.submit(url, "mp-1009009", lif, cfg.validation, priority=0)  # runs after the bad ones
    worker = cfg.model_copy(update={"validation": cfg.validation.model_copy(
        update={"trusted_calculators": ["chgnet", "mace.calculators.MACECalculator"]})})
    summary = run_workers(worker, n=1)
    assert [o.job_id for o in summary.outcomes][-1] == good
    for jid, reason in bad.items():
        job = queue.get_job(url, jid)
        assert job.state == "failed" and reason in job.error, (job.structure_id, job.error)
    assert not marker.exists()
    assert queue.get_job(url, good).state == "done"
    assert [lab.structure_id for lab in list_labels(url)] == ["mp-1009009"]
    _, runs = _mlflow_runs(cfg)
    failed = [r for r in runs if r.data.tags.get("state") == "failed"]
    assert len(failed) == 2 and {r.info.status for r in failed} == {"FAILED"}
    assert {j.structure_id for j in queue.list_jobs(url)} == {"mp-1009009"}


def _wait_for(pred, timeout: float, proc: subprocess.Popen, log: Path):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out; worker log:\n{log.read_text()[-3000:]}")


def _cli_worker_mid_md(tmp_path: Path, records, **validation) -> SimpleNamespace:
    """`xrdmatch validate work` (its own process, session and local Ray) on one queued job,
    returned once its MD is a few steps in; the caller ends the process."""
    cfg = _cfg(tmp_path, **validation)
    url = store_url(cfg)
    sid = "mp-10182"
    jid = queue.submit(url, sid, records[sid], cfg.validation)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    log = tmp_path / "worker.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_memory_monitor_refresh_ms": "0"}
    xrdmatch = Path(sys.executable).with_name("xrdmatch")
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(xrdmatch), "validate", "work", "--workers", "1", "--config", str(cfg_file)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def mid_md():
        job = queue.get_job(url, jid)
        return job if job.state == "running" and job.progress.get("step", 0) >= 4 else None

    try:
        job = _wait_for(mid_md, 180, proc, log)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return SimpleNamespace(cfg=cfg, url=url, sid=sid, jid=jid, cfg_file=cfg_file, log=log, proc=proc, job=job)


def _ran_to_its_end(summary, url: str, jid: int, sid: str) -> queue.Job:
    """The resumed job ended with a result, and with a label exactly when it ended ``done``.
    Either end counts: these tests are about handing the job over. The verdict of these few MD
    steps is a coin toss (a negative Ea from the noise is inconclusive), and test_md checks that
    a resumed MD gives the result of one never stopped."""
    job = queue.get_job(url, jid)
    assert [(o.job_id, o.state) for o in summary.outcomes] == [(jid, job.state)], summary
    assert job.state in ("done", "inconclusive") and job.result["structure_id"] == sid, job
    labels = list_labels(url)
    assert [(lab.structure_id, lab.job_id) for lab in labels] == ([(sid, jid)] if job.state == "done" else [])
    return job


def test_killed_worker_job_is_finished_by_another_after_the_lease(tmp_path, records, ray_local):
    from xrdmatch.actors.validation_workers import run_workers

    w = _cli_worker_mid_md(tmp_path, records, production_steps=60)  # still mid-MD after 'validate status' below
    cfg, url, sid, jid, job, proc = w.cfg, w.url, w.sid, w.jid, w.job, w.proc
    try:
        from typer.testing import CliRunner

        from xrdmatch.cli import app

        res = CliRunner().invoke(app, ["validate", "status", "--config", str(w.cfg_file), "--state", "running"])
        assert res.exit_code == 0 and "running" in res.output and " K " in res.output, res.output
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its local Ray (raylet, GCS) ...
        proc.wait()
    actor_pid = int(job.worker_id.split(":")[1])
    try:
        os.kill(actor_pid, signal.SIGKILL)  # ... and the Ray actor running the MD (its own process group)
    except ProcessLookupError:
        pass
    time.sleep(0.5)
    job = queue.get_job(url, jid)
    assert job.state == "running" and job.attempts == 1 and 0 < job.progress["fraction"] < 1
    killed_at, killed_t = job.progress["fraction"], job.progress["temperature"]

    summary = run_workers(cfg, n=1)  # waits for the dead worker's lease, then takes the job over
    job = _ran_to_its_end(summary, url, jid, sid)
    assert job.attempts == 2 and int(job.worker_id.split(":")[1]) != actor_pid
    # the second worker resumed the MD from its checkpoint instead of starting over
    assert job.progress["fraction_at_claim"] == killed_at
    t_first, step_first = job.progress["first_progress"]
    assert t_first > killed_t or (t_first == killed_t and step_first > cfg.validation.traj_interval), job.progress


def test_a_stopped_worker_hands_its_job_back_at_once(tmp_path, records, ray_local):
    """SIGTERM to `validate work` mid-MD (docker stop, kubectl delete, a scheduler's time limit):
    the job it held is queued again at once, its interrupted claim not counted, instead of staying
    leased for lease_s (here 10 minutes); the next worker takes it at once and resumes the MD."""
    from xrdmatch.actors.validation_workers import run_workers

    # 80 steps a temperature: the stop takes a second or more to reach the MD actor, and 16 steps
    # (~1 s at both temperatures) could all be run by then, leaving nothing to resume
    w = _cli_worker_mid_md(tmp_path, records, lease_s=600.0, production_steps=80)
    cfg, url, sid, jid, proc, log = w.cfg, w.url, w.sid, w.jid, w.proc, w.log
    try:
        proc.send_signal(signal.SIGTERM)  # to the CLI alone, as a container runtime sends it
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert rc != 0 and "handed 1 running job(s) back to the queue" in out, out[-3000:]
    job = queue.get_job(url, jid)
    assert (job.state, job.attempts, job.worker_id) == ("queued", 0, None)
    stopped_at = job.progress["fraction"]
    assert 0 < stopped_at < 1

    summary = run_workers(cfg, n=1)  # at once: with a 10-minute lease only a handed-back job can be taken now
    job = _ran_to_its_end(summary, url, jid, sid)
    assert job.attempts == 1 and job.progress["fraction_at_claim"] == stopped_at  # resumed, not restarted


def test_workers_lost_for_good_is_an_error_not_a_finished_run(tmp_path, records, ray_local):
    """With no replacement left (max_restarts 0), a worker killed mid-MD leaves nobody to do the
    work: run_workers raises saying so (it returned as if finished, and a campaign restarted it
    forever). Its driver saw it die, so the job's 10-minute lease is ended: a later worker takes
    it at once, as its second attempt."""
    import threading

    from xrdmatch.actors.validation_workers import WorkersLost, run_workers

    cfg = _cfg(tmp_path, production_steps=400, max_restarts=0, lease_s=600.0)
    url = store_url(cfg)
    sid = "mp-10182"
    jid = queue.submit(url, sid, records[sid], cfg.validation)
    raised: list[BaseException] = []

    def work():
        try:
            run_workers(cfg, n=1)
        except BaseException as e:  # noqa: BLE001 - checked below
            raised.append(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    deadline = time.time() + 180
    job = None
    while time.time() < deadline:
        job = queue.get_job(url, jid)
        if job.state == "running" and job.progress.get("step", 0) >= 2:
            break
        time.sleep(0.2)
    assert job is not None and job.state == "running", job
    os.kill(int(job.worker_id.split(":")[1]), signal.SIGKILL)  # the actor's process: a lost worker
    t.join(120)
    assert not t.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], WorkersLost), raised
    assert "all 1 validation workers were lost" in str(raised[0])
    job = queue.get_job(url, jid)
    assert job.state == "running" and job.attempts == 1 and job.lease_expires < queue.store_now(url)
    assert queue.claim(url, "next-worker", lease_s=60.0).id == jid  # now, not in 10 minutes


def test_a_job_whose_worker_died_while_logging_it_gets_its_mlflow_run(tmp_path, records):
    """A worker killed between recording a job and linking its MLflow run leaves the job without
    a run and, maybe, a half-logged run RUNNING for ever. The next `validate work` deletes the
    half run and logs the job's run from its stored result (or links a complete one), once."""
    from mlflow.tracking import MlflowClient

    from xrdmatch.actors.validation_workers import reconcile_mlflow
    from xrdmatch.platform.tracking import configure

    cfg = _cfg(tmp_path)
    url = store_url(cfg)
    (a, b, *_) = sorted(records)
    ja = queue.submit(url, a, records[a], cfg.validation)
    jb = queue.submit(url, b, records[b], cfg.validation)
    result = {"verdict": "inconclusive", "reason": "Li did not move at 800 K", "method": "mlip-md",
              "diffusivity": {"800.0": 1.5e-7}, "runtime_s": 12.0}
    assert queue.complete(url, queue.claim(url, "w1", 60.0).id, "w1", result, None)
    assert queue.fail(url, queue.claim(url, "w2", 60.0).id, "w2", "ValidationInputError: atoms too close")
    configure(cfg)
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    proto = queue.get_job(url, ja).protocol_hash
    half = client.create_run(exp.experiment_id, tags={"job_id": str(ja), "protocol_hash": proto, "structure_id": a},
                             run_name=f"validate-{a}")  # what a kill -9 mid-logging leaves: RUNNING, no metrics
    client.log_param(half.info.run_id, "run_dir", cfg.run_dir)
    # job 1 of another store on the same tracking server: not this job's run, whatever its state
    other = client.create_run(exp.experiment_id, tags={"job_id": str(ja), "protocol_hash": proto, "structure_id": b})
    client.log_param(other.info.run_id, "run_dir", "/elsewhere/run")
    client.set_terminated(other.info.run_id)
    assert reconcile_mlflow(cfg, url, older_than_s=60.0) == 0  # just finished: a worker may still be logging it
    import mlflow

    with mlflow.start_run(run_name="round-1"):  # a campaign reconciles inside its round's run
        assert reconcile_mlflow(cfg, url, older_than_s=0.0) == 2
    _, runs = _mlflow_runs(cfg)
    runs = [r for r in runs if r.info.run_id != other.info.run_id and r.info.run_name != "round-1"]
    by_job = {r.data.tags["job_id"]: r for r in runs}
    assert set(by_job) == {str(ja), str(jb)} and half.info.run_id not in {r.info.run_id for r in runs}
    assert by_job[str(ja)].info.status == "FINISHED" and by_job[str(ja)].data.metrics["D_800K"] == 1.5e-7
    assert by_job[str(jb)].info.status == "FAILED" and "too close" in by_job[str(jb)].data.tags["error"]
    assert {j: queue.get_job(url, j).mlflow_run_id for j in (ja, jb)} == {ja: by_job[str(ja)].info.run_id,
                                                                          jb: by_job[str(jb)].info.run_id}
    assert reconcile_mlflow(cfg, url, older_than_s=0.0) == 0  # once
    assert len(_mlflow_runs(cfg)[1]) == 4  # the two jobs', the other store's, the round's
    from sqlalchemy import update

    with queue._engine(url).begin() as conn:  # killed after a complete run, before the link
        conn.execute(update(queue.JobRow).where(queue.JobRow.id == ja).values(mlflow_run_id=None))
    assert reconcile_mlflow(cfg, url, older_than_s=0.0) == 1
    assert queue.get_job(url, ja).mlflow_run_id == by_job[str(ja)].info.run_id and len(_mlflow_runs(cfg)[1]) == 4
    assert not queue.set_mlflow_run(url, ja, "someone-else", only_if_unlinked=True)  # a second driver links nothing
    assert queue.requeue(url, ("inconclusive",)) == 1 and queue.get_job(url, ja).mlflow_run_id is None  # a new run to come
