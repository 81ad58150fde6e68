"""Ray validation workers: thin actors that pull MD jobs from the persistent queue.

Each actor is created with ``num_cpus=validation.cpus_per_job`` and
``num_gpus=validation.gpus_per_job`` so that jobs pack onto a cluster's nodes without
oversubscription. A lost actor (crashed process, dead node) is replaced by the driver, up to
``validation.max_restarts`` times per slot, and ends the lease of the job it held so that the
job is claimed again at once. The lease covers what no driver sees: a worker whose driver
died too stops renewing it, and its job is claimed again when it expires. Either way the MD
resumes from its trajectory checkpoint in the job's work directory (``run_dir/md/<id>-<protocol>``).

:func:`process_job` is a plain function (the actor only loops over it), so the same logic
runs without Ray.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from xrdmatch.config import Config, ValidationConfig
from xrdmatch.platform import queue
from xrdmatch.platform.db import store_url
from xrdmatch.platform.labels import label_from_result
from xrdmatch.platform.lock import DirectoryBusy, exclusive_dir
from xrdmatch.platform.paths import RunPaths

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """This worker's lease expired and another worker took the job: stop, touch nothing."""


@dataclass
class JobOutcome:
    job_id: int
    structure_id: str
    state: str  # done | inconclusive | failed | lost
    verdict: str | None = None
    error: str | None = None
    runtime_s: float = 0.0
    worker_id: str = ""
    mlflow_run_id: str | None = None


@dataclass
class WorkSummary:
    outcomes: list[JobOutcome] = field(default_factory=list)
    actor_crashes: int = 0  # actors lost for good (Ray restarts exhausted)

    def count(self, state: str) -> int:
        return sum(o.state == state for o in self.outcomes)


class WorkersLost(RuntimeError):
    """Every worker slot lost its actor more than ``validation.max_restarts`` times."""


def make_worker_id(tag: str | int = 0) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{tag}"


def job_workdir(cfg: Config, job: queue.Job) -> Path:
    """One directory per (structure, protocol): a re-run of the job resumes its checkpoint there.
    The readable part of the id is cut and sanitised, so a digest of the whole id keeps two ids
    ('LiCl x', 'LiCl_x') from sharing one folder and one trajectory."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", job.structure_id)[:80]
    sid = hashlib.sha256(job.structure_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    proto = re.sub(r"[^0-9a-f]+", "_", job.protocol_hash[:12])  # a hex digest; never a path from the store
    return RunPaths.of(cfg.run_dir).md_dir / f"{safe}-{sid}-{proto}"


class _Progress:
    """Turns the MD's progress/heartbeat callbacks into throttled lease renewals with progress."""

    def __init__(self, url: str, job: queue.Job, worker_id: str, vcfg: ValidationConfig, proto: ValidationConfig):
        self.url, self.job, self.worker_id = url, job, worker_id
        self.lease_s = vcfg.lease_s
        self.every = min(vcfg.heartbeat_s, vcfg.lease_s / 3.0)
        self.temps = [float(t) for t in proto.temperatures]
        prev = job.progress or {}
        self.state: dict[str, Any] = {
            "temperatures_done": [float(t) for t in prev.get("temperatures_done", [])],
            "n_temperatures": len(self.temps),
            "temperature": prev.get("temperature"),
            "step": prev.get("step", 0),
            "nsteps": prev.get("nsteps", 0),
            "fraction": float(prev.get("fraction", 0.0)),
        }
        self.state["fraction_at_claim"] = self.state["fraction"]
        self.state["first_progress"] = None  # (T, step) of this attempt's first MD frame: shows a resume
        self.last = 0.0

    def _fraction(self) -> float:
        n = max(1, len(self.temps))
        done = len(self.state["temperatures_done"])
        cur = self.state["step"] / self.state["nsteps"] if self.state["nsteps"] else 0.0
        if self.state["temperature"] in self.state["temperatures_done"]:
            cur = 0.0
        return min(1.0, (done + cur) / n)

    def _send(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        try:
            mine = queue.heartbeat(self.url, self.job.id, self.worker_id, self.lease_s, progress=dict(self.state))
        except SQLAlchemyError as err:  # a store outage is not the MD's failure: go on, retry at the next beat
            log.warning("job %s: lease not renewed, store unreachable (%s); MD goes on", self.job.id,
                        str(err).splitlines()[0])
            return
        if not mine:
            raise LeaseLost(f"job {self.job.id} ({self.job.structure_id}) is no longer leased to {self.worker_id}")

    def progress(self, temperature: float, step: int, nsteps: int) -> None:
        t = float(temperature)
        changed = t != self.state["temperature"]
        prev_t = self.state["temperature"]
        if changed and prev_t is not None and prev_t not in self.state["temperatures_done"]:
            self.state["temperatures_done"].append(prev_t)
        self.state.update(temperature=t, step=int(step), nsteps=int(nsteps))
        if self.state["first_progress"] is None:
            self.state["first_progress"] = [t, int(step)]
        finished = nsteps and step >= nsteps
        if finished and t not in self.state["temperatures_done"]:
            self.state["temperatures_done"].append(t)
        self.state["fraction"] = self._fraction()
        self._send(force=changed or bool(finished))

    def heartbeat(self) -> None:
        self._send()


def _log_mlflow(cfg: Config, job: queue.Job, state: str, result: dict[str, Any] | None, error: str | None,
                attempts: int = 3) -> str | None:
    """One MLflow run per finished job: the protocol as params, Ea/sigma/D(T) as metrics,
    the Arrhenius plot and the full result as artifacts. Never fails the job: a store that
    is busy (SQLite locked) is retried, a half-written run is deleted before the retry."""
    for attempt in range(1, attempts + 1):
        run_id = _log_mlflow_once(cfg, job, state, result, error)
        if isinstance(run_id, str):
            return run_id
        log.warning("MLflow logging of job %s (%s) failed (attempt %d/%d): %s", job.id, job.structure_id,
                    attempt, attempts, run_id)
        time.sleep(0.5 * attempt)
    return None


def _log_mlflow_once(cfg, job, state, result, error) -> str | Exception:
    run_id = None
    try:
        import mlflow
        from mlflow.tracking import MlflowClient

        from xrdmatch.platform.tracking import mlflow_run

        res = result or {}
        tags = {
            "structure_id": job.structure_id,
            "formula": job.formula,
            "job_id": str(job.id),
            "protocol_hash": job.protocol_hash,
            "state": state,
            "method": str(res.get("method") or ""),
            "verdict": str(res.get("verdict") or state),
            "calculator": str(res.get("calculator") or job.protocol.get("calculator", "")),
        }
        if error:
            tags["error"] = error[:4000]
        with mlflow_run(cfg, f"validate-{job.structure_id}", tags=tags, log_config=False) as run:
            run_id = run.info.run_id
            params = {f"validation.{k}": str(v)[:6000] for k, v in job.protocol.items()}
            params |= {"structure_id": job.structure_id, "protocol_hash": job.protocol_hash, "run_dir": cfg.run_dir}
            mlflow.log_params(params)
            metrics = {"attempts": float(job.attempts)}
            for key in ("ea_ev", "ea_err_ev", "sigma_300", "runtime_s", "n_atoms"):
                v = queue._float(res.get(key))
                if v is not None:
                    metrics[key] = v
            rng = res.get("sigma_300_range") or []
            if len(rng) == 2:
                for key, v in zip(("sigma_300_lo", "sigma_300_hi"), rng):
                    if queue._float(v) is not None:
                        metrics[key] = float(v)
            for t, d in (res.get("diffusivity") or {}).items():
                if queue._float(d) is not None:
                    metrics[f"D_{float(t):.0f}K"] = float(d)
            mlflow.log_metrics(metrics)
            if result is not None:
                mlflow.log_dict(result, "validation_result.json")
            png = res.get("arrhenius_png")
            if png and Path(png).is_file():
                mlflow.log_artifact(str(png))
        if state == "failed":
            MlflowClient().set_terminated(run_id, status="FAILED")
        return run_id
    except Exception as err:  # tracking is a record of the job, not part of it
        if run_id is not None:
            try:
                from mlflow.tracking import MlflowClient

                MlflowClient().delete_run(run_id)
            except Exception:
                pass
        return err


def _lost(out: JobOutcome, job: queue.Job, worker_id: str, what: str) -> JobOutcome:
    """The job stopped being this worker's before it could record its end: record nothing."""
    out.state = "lost"
    out.error = (f"job {job.id} ({job.structure_id}) {what} on {worker_id} after its lease was taken over or "
                 f"expired; not recorded (the job's owner or a requeue records it, reusing the MD checkpoint)")
    log.warning("%s", out.error)
    return out


def _link_mlflow(url: str, job: queue.Job, run_id: str | None) -> None:
    """Point the finished job at its MLflow run; a store outage loses only the link, not the job."""
    if not run_id:
        return
    try:
        queue.set_mlflow_run(url, job.id, run_id)
    except SQLAlchemyError as err:
        log.warning("job %s: MLflow run %s not linked, store unreachable (%s)", job.id, run_id, str(err).splitlines()[0])


#: A finished job without a linked MLflow run this long is taken as its worker's loss, not as
#: a worker still logging it (that takes seconds).
RECONCILE_AFTER_S = 120.0


def reconcile_mlflow(cfg: Config, url: str, older_than_s: float = RECONCILE_AFTER_S) -> int:
    """Give every finished job its MLflow run: a worker killed between recording a job and
    linking its run left the job without one (and maybe a half-logged run, RUNNING for ever).
    A complete run of the job is linked; otherwise the run is logged again from the stored
    result, and then the half-logged ones are deleted. Returns the number of jobs linked.

    Runs are matched by job id, protocol, structure and run directory (job ids are per store,
    and stores may share a tracking server). The logging runs in a thread of its own: MLflow's
    active run is per thread, and a campaign calls this inside its round's run."""
    jobs = queue.unlinked_finished(url, older_than_s)
    if not jobs:
        return 0
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(_reconcile(cfg, url, jobs)), name="mlflow-reconcile")
    t.start()
    t.join()
    return out[0] if out else 0


def _quoted(v: str) -> str:
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _reconcile(cfg: Config, url: str, jobs: list[queue.Job]) -> int:
    from mlflow.tracking import MlflowClient

    from xrdmatch.platform.tracking import configure

    configure(cfg)
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    linked = 0
    for job in jobs:
        runs = client.search_runs([exp.experiment_id], " and ".join([
            f"tags.job_id = {_quoted(job.id)}", f"tags.protocol_hash = {_quoted(job.protocol_hash)}",
            f"tags.structure_id = {_quoted(job.structure_id)}", f"params.run_dir = {_quoted(cfg.run_dir)}"]
        )) if exp is not None else []
        whole = [r for r in runs if r.info.status in ("FINISHED", "FAILED")]
        if whole:
            run_id, logged = whole[0].info.run_id, False
        else:
            state = {"done": "done", "inconclusive": "inconclusive"}.get(job.state, "failed")
            run_id, logged = _log_mlflow(cfg, job, state, job.result, job.error), True
        if not run_id:
            continue
        try:
            mine = queue.set_mlflow_run(url, job.id, run_id, only_if_unlinked=True)
        except SQLAlchemyError as err:
            log.warning("job %s: MLflow run %s not linked, store unreachable (%s)", job.id, run_id,
                        str(err).splitlines()[0])
            continue
        if not mine:  # another driver reconciled it meanwhile: keep its run, not a second one
            if logged:
                client.delete_run(run_id)
            continue
        for r in runs:  # half-logged by the killed worker: gone once the whole run is linked
            if r.info.run_id != run_id and r.info.status not in ("FINISHED", "FAILED"):
                client.delete_run(r.info.run_id)
        linked += 1
        log.warning("job %s (%s): its worker died before linking an MLflow run; linked %s", job.id,
                    job.structure_id, run_id)
    return linked


def _unrecorded(out: JobOutcome, job: queue.Job, what: str, err: Exception) -> JobOutcome:
    """The store failed while recording the job's end: the job stays running, and once its
    lease expires a worker takes it again and records it from the MD checkpoint."""
    out.state = "lost"
    out.error = (f"job {job.id} ({job.structure_id}) {what} but the store could not record it "
                 f"({type(err).__name__}: {str(err).splitlines()[0]}); it is run again from its MD checkpoint "
                 f"once its lease expires")
    log.warning("%s", out.error)
    return out


def process_job(cfg: Config, url: str, job: queue.Job, worker_id: str) -> JobOutcome:
    """Run one claimed job to its end state: done (+ label), inconclusive, or failed with a reason."""
    t0 = time.monotonic()
    out = JobOutcome(job.id, job.structure_id, "failed", worker_id=worker_id)
    try:
        from xrdmatch.platform.data import structure_from_record
        from xrdmatch.simulation.calculators import check_trusted
        from xrdmatch.simulation.validate import ValidationInputError, run_validation

        proto = ValidationConfig.model_validate(job.protocol)
        tracker = _Progress(url, job, worker_id, cfg.validation, proto)
        check_trusted(proto, cfg.validation)
        try:
            structure = structure_from_record(job.record)
        except Exception as err:
            raise ValidationInputError(f"structure {job.structure_id!r}: unreadable record ({err})") from None
        workdir = job_workdir(cfg, job)
        # one writer per MD folder: a worker that lost this job's lease may still be running its
        # MD there until its next heartbeat tells it so
        with exclusive_dir(workdir, timeout_s=cfg.validation.lease_s, while_waiting=tracker.heartbeat):
            result = run_validation(structure, proto, workdir, job.structure_id,
                                    progress=tracker.progress, heartbeat=tracker.heartbeat)
    except (LeaseLost, DirectoryBusy) as err:
        log.warning("%s", err)
        out.state, out.error = "lost", str(err)
        return out
    except Exception as err:
        expected = type(err).__name__ in ("ValidationInputError", "CalculatorUnavailable")
        reason = f"{type(err).__name__}: {err}"
        if not expected:  # a crash inside MD: keep the place it happened
            tb = traceback.extract_tb(err.__traceback__)[-1]
            reason += f" (at {Path(tb.filename).name}:{tb.lineno})"
        try:
            if not queue.fail(url, job.id, worker_id, reason):
                return _lost(out, job, worker_id, f"failed ({reason})")
        except SQLAlchemyError as store_err:
            return _unrecorded(out, job, f"failed ({reason})", store_err)
        log.warning("validation job %s (%s) failed: %s", job.id, job.structure_id, reason)
        out.error = reason
        out.mlflow_run_id = _log_mlflow(cfg, job, "failed", None, reason)
        _link_mlflow(url, job, out.mlflow_run_id)
        out.runtime_s = time.monotonic() - t0
        return out
    res = result.to_dict()
    label = label_from_result(res, protocol_hash=job.protocol_hash, job_id=job.id, record=job.record,
                              campaign_round=job.campaign_round, source=f"validation job {job.id} by {worker_id}")
    try:
        if not queue.complete(url, job.id, worker_id, res, label):
            return _lost(out, job, worker_id, f"finished ({res.get('verdict')})")
    except SQLAlchemyError as store_err:
        return _unrecorded(out, job, f"finished ({res.get('verdict')})", store_err)
    out.state = "done" if label is not None else "inconclusive"
    out.verdict = res.get("verdict")
    out.error = None if label is not None else res.get("reason")
    out.mlflow_run_id = _log_mlflow(cfg, job, out.state, res, out.error)
    _link_mlflow(url, job, out.mlflow_run_id)
    out.runtime_s = time.monotonic() - t0
    return out


def work_one(cfg: Config, url: str, worker_id: str, wait_s: float = 0.0) -> JobOutcome | None:
    """Claim and run one job; poll up to ``wait_s`` seconds for one. None: nothing claimable."""
    v = cfg.validation
    deadline = time.monotonic() + wait_s
    while True:
        try:
            job = queue.claim(url, worker_id, v.lease_s, max_attempts=v.max_attempts)
        except SQLAlchemyError as err:  # store outage: this worker waits and asks again, it does not die
            log.warning("%s: cannot claim, store unreachable (%s)", worker_id, str(err).splitlines()[0])
            job = None
        if job is not None:
            return process_job(cfg, url, job, worker_id)
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(v.poll_s, max(0.05, deadline - time.monotonic())))


@lru_cache(maxsize=1)
def _actor_class():
    import ray

    @ray.remote
    class ValidationWorker:
        """Holds the config and its worker id; each call runs at most one job."""

        def __init__(self, cfg: dict[str, Any], url: str, tag: int) -> None:
            self.cfg = Config.model_validate(cfg)
            self.url = url
            self.worker_id = make_worker_id(tag)
            try:
                import torch

                torch.set_num_threads(max(1, int(self.cfg.validation.cpus_per_job)))
            except Exception:  # pragma: no cover
                pass

        def ready(self) -> str:
            return self.worker_id

        def work_one(self, wait_s: float) -> dict[str, Any] | None:
            out = work_one(self.cfg, self.url, self.worker_id, wait_s)
            return asdict(out) if out is not None else None

    return ValidationWorker


def run_workers(cfg: Config, n: int | None = None, until_empty: bool = True, max_jobs: int | None = None,
                on_outcome=None, stop=None) -> WorkSummary:
    """Run ``n`` (default ``validation.workers``) Ray worker actors on the config's store.

    ``until_empty``: return once no job is queued or running (a job held by a dead worker is
    waited for until its lease expires, then run); otherwise poll forever. ``max_jobs``
    stops after that many finished jobs. ``on_outcome(JobOutcome)`` is called as jobs end.

    A lost actor (its process crashed, or its node died) is replaced by a new one, up to
    ``validation.max_restarts`` times per slot; the replacement gets work once Ray has placed
    it, so a cluster that lost a node goes on with the nodes it has. The job the lost actor
    held is taken again at once, as one more attempt (its lease is ended: ``queue.expire``),
    and resumes from its MD checkpoint. Stopped
    (Ctrl-C, or SIGTERM: Ray's driver turns it into SystemExit), or told to by ``stop`` (a
    ``threading.Event``, for a caller that runs it in a thread), it kills its actors and hands
    their jobs back at once.
    """
    import ray
    from ray.exceptions import RayActorError, RayError

    from xrdmatch.platform.ray_utils import error_text, init_ray, kill_actors
    from xrdmatch.platform.tracking import configure

    v = cfg.validation
    n = n or v.workers
    url = store_url(cfg)
    queue.counts_by_state(url)  # creates the tables before the workers race to
    configure(cfg)  # creates the MLflow store once, before several workers race to migrate it
    reconcile_mlflow(cfg, url)  # jobs whose worker died while logging them: a run each, linked
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    cls = _actor_class()
    cfg_dict = cfg.model_dump(mode="json")
    summary = WorkSummary()
    wait_s = v.poll_s
    starting: dict[Any, tuple[int, Any]] = {}  # ready() ref -> (slot, actor): not placed yet
    working: dict[Any, tuple[int, Any]] = {}  # work_one() ref -> (slot, actor)
    actors: list[Any] = []
    worker_id: dict[int, str] = {}  # slot -> id of its live actor: its job is handed back on the way out
    replaced = [0] * n
    gone: dict[int, str] = {}  # slot -> why its last actor was lost, once it is not replaced again

    def spawn(slot: int) -> None:
        a = cls.options(num_cpus=v.cpus_per_job, num_gpus=v.gpus_per_job, max_restarts=0,
                        max_task_retries=0).remote(cfg_dict, url, slot)
        actors.append(a)
        starting[a.ready.remote()] = (slot, a)

    def lost(slot: int, err: BaseException) -> None:
        summary.actor_crashes += 1
        wid = worker_id.pop(slot, None)
        try:  # Ray says it is dead: its job is taken again now, as one more attempt, not after its lease
            queue.expire(url, [wid])
        except SQLAlchemyError as e:
            log.warning("could not end the lost worker's lease (%s): its job is taken again when the lease "
                        "expires", str(e).splitlines()[0])
        if replaced[slot] < v.max_restarts:
            replaced[slot] += 1
            log.warning("validation worker %d lost (%s); starting a replacement (%d/%d); its job is "
                        "taken again at once", slot, error_text(err), replaced[slot], v.max_restarts)
            spawn(slot)
        else:
            gone[slot] = error_text(err)
            log.warning("validation worker %d lost for good after %d replacements (%s)", slot, v.max_restarts,
                        gone[slot])

    def more_work() -> bool:
        if max_jobs is not None and len(summary.outcomes) >= max_jobs:
            return False
        if not until_empty:
            return True
        try:
            counts = queue.counts_by_state(url)
        except SQLAlchemyError as err:  # cannot tell: keep the workers asking (they wait out an outage)
            log.warning("validation queue unreachable (%s)", str(err).splitlines()[0])
            return True
        return counts["queued"] + counts["running"] > 0

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    for i in range(n):
        spawn(i)
    waited = time.monotonic()
    try:
        while working or starting:
            if stopped():
                break
            if not working and not more_work():
                break  # actors still waiting for a place on the cluster are not needed
            done, _ = ray.wait(list(working) + list(starting), num_returns=1, timeout=max(1.0, wait_s))
            if not done and not working and time.monotonic() - waited > 60:
                log.warning("no validation worker could be placed for 60 s: does the cluster have %g free "
                            "CPU(s)%s per worker?", v.cpus_per_job, f" and {v.gpus_per_job:g} GPU(s)" if v.gpus_per_job else "")
                waited = time.monotonic()
            for ref in done:
                if ref in starting:
                    slot, actor = starting.pop(ref)
                    try:
                        worker_id[slot] = ray.get(ref)
                    except RayError as err:
                        lost(slot, err)
                        continue
                    if more_work():
                        working[actor.work_one.remote(wait_s)] = (slot, actor)
                    continue
                slot, actor = working.pop(ref)
                try:
                    got = ray.get(ref)
                except RayActorError as err:
                    lost(slot, err)
                    continue
                except RayError as err:  # the call raised inside the actor: replace it, as if it died
                    log.warning("validation worker %d raised: %s", slot, error_text(err))
                    kill_actors(actor)
                    lost(slot, err)
                    continue
                if got is not None:
                    out = JobOutcome(**got)
                    summary.outcomes.append(out)
                    if on_outcome is not None:
                        on_outcome(out)
                if more_work():
                    working[actor.work_one.remote(wait_s)] = (slot, actor)
                waited = time.monotonic()
    finally:
        kill_actors(*actors)
        # stopped (Ctrl-C, SIGTERM, an error here): the jobs our live actors held go back to the
        # queue now, not when their leases run out, and without using up an attempt
        try:
            if n_back := queue.release(url, worker_id.values()):
                log.warning("handed %d running job(s) back to the queue; they resume from their checkpoints", n_back)
        except SQLAlchemyError as err:
            log.warning("could not hand the running jobs back (%s): they are taken again when their leases "
                        "expire", str(err).splitlines()[0])
    if stopped():
        return summary
    if len(gone) == n and more_work():  # nobody left to do the work: say why, never return as if done
        raise WorkersLost(f"all {n} validation workers were lost, each after {v.max_restarts} replacements; "
                          f"last error: {next(reversed(gone.values()))}")
    return summary
