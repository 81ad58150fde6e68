"""The persistent MD validation queue: jobs, leases, heartbeats (SQLite or PostgreSQL).

A job carries everything a worker on another node needs: the structure (shipped record
format) and the MD protocol (``ValidationConfig`` as JSON, identified by its hash).
States: ``queued`` -> ``running`` -> ``done`` | ``inconclusive`` | ``failed``.

Claiming is one conditional ``UPDATE ... WHERE id = :id AND (state = 'queued' OR
(state = 'running' AND lease_expires < now))`` with a rowcount check: exclusive on SQLite
(one writer at a time) and on PostgreSQL (READ COMMITTED re-checks the WHERE clause on the
row's newest version after waiting for a concurrent writer). A worker that dies stops
renewing its lease, so its job is claimed again once the lease expires (at once when the
worker's driver saw it die: :func:`expire`); ``attempts`` counts claims and a job that keeps
killing its workers ends ``failed`` after ``max_attempts``. All times are the store's clock
(unix seconds), not the worker's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Float, Integer, String, Text, UniqueConstraint, and_, case, delete, or_, select, update
from sqlalchemy.orm import Mapped, mapped_column

from xrdmatch.platform.db import Base, connect, engine_for, shorten, too_long
from xrdmatch.platform.labels import LabelRecord, LabelRow, insert_ignore, insert_label, now_sql

STATES = ("queued", "running", "done", "inconclusive", "failed")
FINISHED = ("done", "inconclusive", "failed")


class QueueError(ValueError):
    """A submission that cannot be queued; the message names the structure."""


class JobRow(Base):
    __tablename__ = "validation_jobs"
    __table_args__ = (UniqueConstraint("structure_id", "protocol_hash", name="uq_jobs_structure_protocol"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    structure_id: Mapped[str] = mapped_column(String(200), index=True)
    protocol_hash: Mapped[str] = mapped_column(String(64))
    formula: Mapped[str] = mapped_column(String(200))
    structure_json: Mapped[str] = mapped_column(Text)
    protocol_json: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    campaign_round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    verdict: Mapped[str | None] = mapped_column(String(32), nullable=True)
    sigma_300: Mapped[float | None] = mapped_column(Float, nullable=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


@dataclass
class Job:
    """A queue entry as workers and the status table see it."""

    id: int
    structure_id: str
    formula: str
    protocol_hash: str
    record: dict[str, Any]
    protocol: dict[str, Any]
    priority: int
    campaign_round: int | None
    state: str
    attempts: int
    worker_id: str | None
    lease_expires: float | None
    heartbeat_at: float | None
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    result: dict[str, Any] | None = None
    verdict: str | None = None
    sigma_300: float | None = None
    mlflow_run_id: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


def _job(r: Any) -> Job:
    return Job(
        id=r.id,
        structure_id=r.structure_id,
        formula=r.formula,
        protocol_hash=r.protocol_hash,
        record=json.loads(r.structure_json),
        protocol=json.loads(r.protocol_json),
        priority=r.priority,
        campaign_round=r.campaign_round,
        state=r.state,
        attempts=r.attempts,
        worker_id=r.worker_id,
        lease_expires=r.lease_expires,
        heartbeat_at=r.heartbeat_at,
        progress=json.loads(r.progress_json) if r.progress_json else {},
        error=r.error,
        result=json.loads(r.result_json) if r.result_json else None,
        verdict=r.verdict,
        sigma_300=r.sigma_300,
        mlflow_run_id=r.mlflow_run_id,
        created_at=r.created_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )


def _engine(url: str):
    connect(url)  # creates the tables once per process
    return engine_for(url)


def _as_record(structure_id: str, structure: Any) -> dict[str, Any]:
    """A shipped-format record from a record dict or a pymatgen Structure."""
    from dataclasses import asdict

    from xrdmatch.platform.databases import record_of_structure

    if isinstance(structure, dict):
        missing = {"lattice", "species", "frac_coords"} - set(structure)
        if missing:
            raise QueueError(f"structure {structure_id!r}: record lacks {sorted(missing)}")
        rec = dict(structure)
        rec["id"] = str(structure_id)
        return rec
    if hasattr(structure, "lattice") and hasattr(structure, "frac_coords"):
        return asdict(record_of_structure(str(structure_id), structure))  # disordered: MD orders it
    raise QueueError(f"structure {structure_id!r}: expected a shipped-format record or a pymatgen Structure, got {type(structure).__name__}")


def _checked_structure(structure_id: str, rec: dict[str, Any], min_distance: float):
    """The pymatgen Structure of ``rec`` once it passes the checks MD would make at a worker
    (readable arrays, real elements, sane occupancies, Li and a host, no atoms closer than
    ``min_distance``); a ``QueueError`` naming the structure and the problem otherwise."""
    import math

    from pymatgen.core import Element

    from xrdmatch.platform.data import structure_from_record
    from xrdmatch.platform.databases import _check_arrays
    from xrdmatch.simulation.md import ValidationInputError, check_composition, check_distances, check_structure
    from xrdmatch.simulation.xrd import XRDError, check_lattice

    def bad(why: str) -> QueueError:
        return QueueError(f"structure {structure_id!r}: {why}")

    why = _check_arrays(structure_id, rec["lattice"], rec["species"], rec["frac_coords"])
    if why:
        raise bad(why)
    try:  # the XRD engine's cheap lattice checks, before the distance check's memory grows with the cell
        check_lattice(rec["lattice"])
    except XRDError as err:
        raise bad(str(err)) from None
    for i, sp in enumerate(rec["species"]):
        if isinstance(sp, dict):
            try:
                occ = [float(o) for o in sp.values()]
            except (TypeError, ValueError):
                raise bad(f"site {i}: occupancies {sp!r} are not numbers") from None
            if not all(math.isfinite(o) and 0.0 < o <= 1.0 for o in occ) or sum(occ) > 1.0 + 1e-6:
                raise bad(f"site {i}: occupancies {sp!r} must each be in (0, 1] and sum to at most 1")
    try:
        s = structure_from_record(rec)
    except Exception as err:  # noqa: BLE001 - any pymatgen refusal is bad input
        raise bad(f"not a valid structure ({type(err).__name__}: {err})") from None
    unknown = sorted({el.symbol for el in s.composition.elements if not Element.is_valid_symbol(el.symbol)})
    if unknown:
        raise bad(f"species {unknown} are not chemical elements")
    try:
        if s.is_ordered:
            check_structure(s, min_distance)  # no Li, Li only, atoms too close
        else:
            # Ordering (at the worker) may empty one of two close partially occupied sites:
            # Li on the composition, distances between fully occupied sites only.
            from pymatgen.core import Structure

            check_composition(s)
            full = [site for site in s if site.is_ordered]
            if len(full) > 1:
                check_distances(Structure.from_sites(full), min_distance, name=s.composition.reduced_formula)
    except ValidationInputError as err:
        raise bad(str(err)) from None
    return s


def _protocol(protocol: Any) -> tuple[dict[str, Any], str]:
    """(protocol dict, protocol hash) from a ValidationConfig (or its dict)."""
    from xrdmatch.config import ValidationConfig
    from xrdmatch.simulation.validate import protocol_hash

    cfg = protocol if isinstance(protocol, ValidationConfig) else ValidationConfig.model_validate(protocol)
    return cfg.model_dump(mode="json"), protocol_hash(cfg)


def submit(url: str, structure_id: str, structure: Any, protocol: Any, priority: int = 0,
           campaign_round: int | None = None) -> int:
    """Queue one structure for validation under ``protocol`` (a ``ValidationConfig``).

    Idempotent: an existing job for (structure id, protocol hash) is returned, whatever its
    state (use :func:`requeue` to run a failed one again), if it holds the same structure; a
    different structure under a queued id is refused (two files named POSCAR, an edited CIF),
    never merged into the old job. Returns the job id.

    Refuses (``QueueError`` naming the structure and the problem) what a worker could only
    fail: unreadable arrays, unknown elements, bad occupancies, a lattice the XRD engine refuses
    (degenerate, too large), no Li, atoms closer than the protocol's ``min_distance``, an id or
    formula longer than its column.
    """
    if why := too_long(JobRow.__table__, {"structure_id": str(structure_id)}):  # before any message names it
        raise QueueError(f"structure {shorten(str(structure_id))!r}: {why}")
    proto, phash = _protocol(protocol)
    rec = _as_record(str(structure_id), structure)
    s = _checked_structure(str(structure_id), rec, float(proto["min_distance"]))
    if not rec.get("formula"):
        rec["formula"] = s.composition.reduced_formula
    if why := too_long(JobRow.__table__, {"formula": str(rec["formula"])}):
        raise QueueError(f"structure {structure_id!r}: {why}")
    eng = _engine(url)
    with eng.begin() as conn:
        insert_ignore(
            conn,
            JobRow.__table__,
            {
                "structure_id": str(structure_id),
                "protocol_hash": phash,
                "formula": str(rec["formula"]),
                "structure_json": json.dumps(rec),
                "protocol_json": json.dumps(proto),
                "priority": int(priority),
                "campaign_round": campaign_round,
                "state": "queued",
                "attempts": 0,
                "created_at": now_sql(conn),
            },
            ["structure_id", "protocol_hash"],
        )
        jid, held = conn.execute(
            select(JobRow.id, JobRow.structure_json)
            .where(JobRow.structure_id == str(structure_id), JobRow.protocol_hash == phash)
        ).one()
    old = json.loads(held)
    if not _same_structure(old, rec):
        raise QueueError(
            f"structure {structure_id!r}: job {jid} already holds a different structure under this id "
            f"({old.get('formula')}, {len(old['species'])} sites; now {rec['formula']}, {len(rec['species'])} "
            f"sites); submit it under another id")
    return jid


def _same_structure(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-6) -> bool:
    """Same species, lattice and coordinates (to ``tol``): a resubmission, not another structure."""
    import numpy as np

    if a["species"] != b["species"]:
        return False
    try:
        return bool(np.allclose(a["lattice"], b["lattice"], atol=tol)
                    and np.allclose(a["frac_coords"], b["frac_coords"], atol=tol))
    except ValueError:  # shapes differ
        return False


def _claimable(now):
    return or_(JobRow.state == "queued", and_(JobRow.state == "running", JobRow.lease_expires < now))


def claim(url: str, worker_id: str, lease_s: float, max_attempts: int | None = None) -> Job | None:
    """Take the next job (highest priority, then oldest) for ``lease_s`` seconds, or None.

    A running job whose lease expired is taken over; one that has already been claimed
    ``max_attempts`` times is marked failed instead (it keeps killing its workers).
    """
    eng = _engine(url)
    if max_attempts is not None:
        with eng.begin() as conn:
            now = now_sql(conn)
            conn.execute(
                update(JobRow)
                .where(JobRow.state == "running", JobRow.lease_expires < now, JobRow.attempts >= max_attempts)
                .values(state="failed", finished_at=now, worker_id=None,
                        error=f"worker lost (lease expired) on each of {max_attempts} attempts")
            )
    next_job = select(JobRow.id).order_by(JobRow.priority.desc(), JobRow.id)
    if eng.dialect.name == "postgresql":
        # lock the first claimable row that no other worker's transaction holds: workers on
        # many nodes never race for one row, and none sees "empty" while rows are left
        with eng.begin() as conn:
            now = now_sql(conn)
            jid = conn.execute(next_job.where(_claimable(now)).limit(1).with_for_update(skip_locked=True)).scalar()
            if jid is None:
                return None
            conn.execute(update(JobRow).where(JobRow.id == jid).values(**_claimed(worker_id, now, lease_s)))
            return _job(conn.execute(select(JobRow).where(JobRow.id == jid)).one())
    # SQLite has no row locks (one writer at a time): a candidate can be taken between our
    # SELECT and UPDATE, so the UPDATE re-checks it and a lost one moves on to the next
    for _ in range(20):
        with eng.connect() as conn:
            cands = conn.execute(next_job.where(_claimable(now_sql(conn))).limit(8)).scalars().all()
        if not cands:
            return None
        for jid in cands:
            with eng.begin() as conn:
                now = now_sql(conn)
                res = conn.execute(update(JobRow).where(JobRow.id == jid, _claimable(now))
                                   .values(**_claimed(worker_id, now, lease_s)))
                if res.rowcount == 1:
                    return _job(conn.execute(select(JobRow).where(JobRow.id == jid)).one())
    return None


def _claimed(worker_id: str, now, lease_s: float) -> dict[str, Any]:
    """The columns of a job a worker has just claimed (a new attempt)."""
    return {"state": "running", "worker_id": worker_id, "lease_expires": now + float(lease_s),
            "heartbeat_at": now, "started_at": now, "attempts": JobRow.attempts + 1, "error": None}


def heartbeat(url: str, job_id: int, worker_id: str, lease_s: float, progress: dict[str, Any] | None = None) -> bool:
    """Renew the lease (and store progress). False if the job is no longer this worker's:
    its lease expired and another worker took it, or it was finished elsewhere."""
    eng = _engine(url)
    with eng.begin() as conn:
        now = now_sql(conn)
        values: dict[str, Any] = {"lease_expires": now + float(lease_s), "heartbeat_at": now}
        if progress is not None:
            values["progress_json"] = json.dumps(progress)
        res = conn.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.worker_id == worker_id, JobRow.state == "running")
            .values(**values)
        )
        return res.rowcount == 1


def complete(url: str, job_id: int, worker_id: str, result: dict[str, Any], label: LabelRecord | None,
             mlflow_run_id: str | None = None) -> bool:
    """Record a finished validation and its label in one transaction.

    ``label`` None (an inconclusive result) ends the job ``inconclusive`` with no label.
    Only the worker running the job can finish it: one whose lease expired and was taken over
    (or failed by the lease sweep) gets False and writes nothing, so a label never exists for
    a job that is not ``done``. Idempotent: the label is keyed by (structure id, protocol
    hash), and a job already finished keeps its first result. Returns True if this call
    finished the job.
    """
    eng = _engine(url)
    state = "done" if label is not None else "inconclusive"
    with eng.begin() as conn:
        now = now_sql(conn)
        res = conn.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.state == "running", JobRow.worker_id == worker_id)
            .values(state=state, result_json=json.dumps(result), verdict=result.get("verdict"),
                    sigma_300=_float(result.get("sigma_300")), error=result.get("reason") if label is None else None,
                    finished_at=now, lease_expires=None, mlflow_run_id=mlflow_run_id)
        )
        if res.rowcount != 1:
            return False
        if label is not None:
            insert_label(conn, label)
        return True


def fail(url: str, job_id: int, worker_id: str, reason: str) -> bool:
    """End a job as failed with its reason (bad input, calculator missing, crash in MD).

    Like ``complete``, only for the worker running it: a stale worker cannot fail a job that
    another worker has taken over. Returns True if this call failed the job.
    """
    eng = _engine(url)
    with eng.begin() as conn:
        now = now_sql(conn)
        res = conn.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.state == "running", JobRow.worker_id == worker_id)
            .values(state="failed", error=str(reason)[:4000], finished_at=now, lease_expires=None)
        )
        return res.rowcount == 1


def set_mlflow_run(url: str, job_id: int, run_id: str, only_if_unlinked: bool = False) -> bool:
    """Link a job to its MLflow run; ``only_if_unlinked``: unless another process linked one first
    (two drivers reconciling the same job). True if this call linked it."""
    which = JobRow.id == job_id
    if only_if_unlinked:
        which = and_(which, JobRow.mlflow_run_id.is_(None))
    with _engine(url).begin() as conn:
        return conn.execute(update(JobRow).where(which).values(mlflow_run_id=run_id)).rowcount == 1


def requeue(url: str, states: tuple[str, ...] = ("failed",), job_ids: list[int] | None = None) -> int:
    """Put finished jobs back in the queue (e.g. after installing a missing calculator), each with
    a fresh ``max_attempts`` budget (its earlier claims said nothing about the fixed setup).

    A ``done`` job's label is withdrawn in the same transaction: a label exists only for a job
    that is done, and the rerun's verdict (which may differ: the analysis thresholds are not part
    of the protocol) becomes the label, or none if it is inconclusive."""
    bad = set(states) - set(FINISHED)
    if bad:
        raise QueueError(f"cannot requeue jobs in states {sorted(bad)}: only finished ones {FINISHED}")
    with _engine(url).begin() as conn:
        which = JobRow.state.in_(list(states))
        if job_ids is not None:
            which = and_(which, JobRow.id.in_(list(job_ids)))
        done = conn.execute(select(JobRow.id).where(which, JobRow.state == "done")).scalars().all()
        if done:
            conn.execute(delete(LabelRow).where(LabelRow.job_id.in_(done)))
        return conn.execute(update(JobRow).where(which).values(  # the old result goes with the old run
            state="queued", worker_id=None, lease_expires=None, error=None, attempts=0, verdict=None,
            sigma_300=None, result_json=None, finished_at=None, mlflow_run_id=None)).rowcount


def release(url: str, worker_ids) -> int:
    """Hand back the running jobs of these workers, which were stopped (Ctrl-C, SIGTERM), not
    lost: queued again at once instead of leased until ``lease_s`` runs out, and the interrupted
    claim does not count against ``max_attempts``. The MD resumes from its checkpoint."""
    return _update_running_jobs_of(url, worker_ids, lambda conn: {
        "state": "queued", "worker_id": None, "lease_expires": None,
        "attempts": case((JobRow.attempts > 0, JobRow.attempts - 1), else_=0)})


def expire(url: str, worker_ids) -> int:
    """End the leases of these workers' running jobs now: Ray reported the workers dead (a
    crash, an OOM kill, a lost node), so their jobs are taken again at once instead of when
    ``lease_s`` runs out. The lost claim still counts against ``max_attempts``, so a job that
    keeps killing its workers still ends failed. A worker that is alive after all (a node cut
    off from Ray but not from the store) renews at its next heartbeat, unless another worker
    took the job first: then its heartbeat says the job is no longer its own."""
    return _update_running_jobs_of(url, worker_ids, lambda conn: {"lease_expires": now_sql(conn) - 1.0})


def _update_running_jobs_of(url: str, worker_ids, values) -> int:
    """Set ``values(conn)`` on the running jobs these workers hold; returns how many."""
    ids = [w for w in worker_ids if w]
    if not ids:
        return 0
    with _engine(url).begin() as conn:
        return conn.execute(
            update(JobRow).where(JobRow.state == "running", JobRow.worker_id.in_(ids)).values(**values(conn))
        ).rowcount


def get_job(url: str, job_id: int) -> Job | None:
    with _engine(url).connect() as conn:
        r = conn.execute(select(JobRow).where(JobRow.id == job_id)).first()
        return _job(r) if r is not None else None


def list_jobs(url: str, states: list[str] | None = None, limit: int | None = None) -> list[Job]:
    """Jobs in id order (optionally only some states)."""
    q = select(JobRow).order_by(JobRow.id)
    if states:
        q = q.where(JobRow.state.in_(list(states)))
    if limit:
        q = q.limit(limit)
    with _engine(url).connect() as conn:
        return [_job(r) for r in conn.execute(q)]


def finished_under(url: str, protocol_hash: str) -> list[tuple[str, str, str]]:
    """(structure id, formula, state) of every job finished under this protocol: submitting one
    of them again returns that job, so no MD would run."""
    q = (select(JobRow.structure_id, JobRow.formula, JobRow.state)
         .where(JobRow.protocol_hash == protocol_hash, JobRow.state.in_(list(FINISHED))).order_by(JobRow.id))
    with _engine(url).connect() as conn:
        return [tuple(r) for r in conn.execute(q)]


def unlinked_finished(url: str, older_than_s: float) -> list[Job]:
    """Finished jobs with no MLflow run linked, finished over ``older_than_s`` ago: their worker
    died between recording the job and linking its run (a worker still logging is younger)."""
    with _engine(url).connect() as conn:
        cutoff = float(conn.execute(select(now_sql(conn))).scalar_one()) - older_than_s
        q = (select(JobRow).where(JobRow.state.in_(list(FINISHED)), JobRow.mlflow_run_id.is_(None),
                                  JobRow.finished_at < cutoff).order_by(JobRow.id))
        return [_job(r) for r in conn.execute(q)]


def counts_by_state(url: str) -> dict[str, int]:
    """{state: number of jobs} with every state present."""
    from sqlalchemy import func

    with _engine(url).connect() as conn:
        rows = conn.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
    out = {s: 0 for s in STATES}
    out.update({s: int(n) for s, n in rows})
    return out


def store_now(url: str) -> float:
    """The store's clock (unix seconds), for ETA and lease display."""
    with _engine(url).connect() as conn:
        return float(conn.execute(select(now_sql(conn))).scalar_one())


def run_workers(cfg, n: int | None = None, until_empty: bool = True, max_jobs: int | None = None, stop=None):
    """Run ``n`` Ray validation workers on the config's store (see ``xrdmatch.actors.validation_workers``)."""
    from xrdmatch.actors.validation_workers import run_workers as _run

    return _run(cfg, n=n, until_empty=until_empty, max_jobs=max_jobs, stop=stop)


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v and abs(v) != float("inf") else None
