"""Campaign state on the shared SQLAlchemy store: campaigns, rounds, stages, scores, candidates.

Every stage writes its result here before the next stage starts; that record is what makes
a killed campaign resume at the first unfinished stage. A campaign is identified by the id
written once into ``RUN_DIR/campaign.json``, so two run directories never share rows even
on one PostgreSQL server.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, select, update,
)
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from xrdmatch.platform.db import Base, connect

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class CampaignRow(Base):
    __tablename__ = "campaigns"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_dir: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=RUNNING)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    config_json: Mapped[str] = mapped_column(Text, default="{}")


class RoundRow(Base):
    __tablename__ = "campaign_rounds"
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=RUNNING)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class StageRow(Base):
    __tablename__ = "campaign_stages"
    __table_args__ = (UniqueConstraint("campaign_id", "round", "stage", name="uq_campaign_stage"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    result_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class ScoreRow(Base):
    """Pointer to one round's screening scores (Parquet under the run directory)."""

    __tablename__ = "campaign_scores"
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    n: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)


class CandidateRow(Base):
    __tablename__ = "campaign_candidates"
    __table_args__ = (UniqueConstraint("campaign_id", "structure_id", name="uq_campaign_candidate"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    structure_id: Mapped[str] = mapped_column(String(128))
    formula: Mapped[str] = mapped_column(String(255))
    p_mean: Mapped[float] = mapped_column(Float)
    p_std: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    verdict: Mapped[str | None] = mapped_column(String(32), nullable=True)
    sigma_300k: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail_json: Mapped[str | None] = mapped_column(Text, nullable=True)


@dataclass
class StageRecord:
    round: int
    stage: str
    status: str
    attempts: int
    result: dict[str, Any] | None
    duration_s: float | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None


def _record(r: StageRow) -> StageRecord:
    return StageRecord(r.round, r.stage, r.status, r.attempts,
                       json.loads(r.result_json) if r.result_json else None,
                       r.duration_s, r.started_at, r.finished_at, r.error)


def _read_campaign_id(p: Path) -> str:
    """The ``campaign_id`` of an existing campaign.json; CampaignError naming the file if unusable.

    Never rewritten here: a new id would orphan the campaign's rows in the store.
    """
    from xrdmatch.platform.campaign import CampaignError  # campaign imports this module

    fix = ("restore it (the id is the campaigns.id row of the store), or move it away to start a "
           "new campaign in this directory")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CampaignError(f"{p}: cannot read the campaign file ({e}); {fix}") from None
    if not text.strip():
        raise CampaignError(f"{p}: the campaign file is empty (no campaign_id); {fix}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CampaignError(f"{p}: the campaign file is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict) or "campaign_id" not in data:
        raise CampaignError(f"{p}: the campaign file has no 'campaign_id' key; {fix}")
    cid = data["campaign_id"]
    if not isinstance(cid, str) or not cid.strip() or len(cid) > 32:
        raise CampaignError(f"{p}: 'campaign_id' must be a non-empty string of at most 32 characters, "
                            f"got {cid!r}; {fix}")
    return cid


def campaign_id_for(run_dir: str | os.PathLike[str], create: bool = True) -> str | None:
    """The campaign id of a run directory (written once, atomically, into campaign.json)."""
    p = Path(run_dir) / "campaign.json"
    if p.exists():
        return _read_campaign_id(p)
    if not create:
        return None
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"campaign_id": uuid.uuid4().hex, "run_dir": str(Path(run_dir).resolve())}))
    os.replace(tmp, p)
    return json.loads(p.read_text())["campaign_id"]


class CampaignStore:
    """The campaign's view of the store: every write is one short transaction."""

    def __init__(self, url: str, campaign_id: str):
        self.url = url
        self.cid = campaign_id
        self.Session: sessionmaker = connect(url)

    # -- campaign and rounds ---------------------------------------------------------
    def ensure_campaign(self, run_dir: str, config: dict[str, Any]) -> CampaignRow:
        with self.Session.begin() as s:
            row = s.get(CampaignRow, self.cid)
            if row is None:
                row = CampaignRow(id=self.cid, run_dir=str(run_dir), config_json=json.dumps(config))
                s.add(row)
            else:
                row.status = RUNNING  # a finished campaign given more rounds runs again; run_campaign ends it DONE
            s.flush()
            return row

    def campaign(self) -> CampaignRow | None:
        with self.Session() as s:
            return s.get(CampaignRow, self.cid)

    def set_campaign(self, **fields: Any) -> None:
        with self.Session.begin() as s:
            s.execute(update(CampaignRow).where(CampaignRow.id == self.cid).values(**fields))

    def ensure_round(self, rnd: int) -> RoundRow:
        with self.Session.begin() as s:
            row = s.get(RoundRow, (self.cid, rnd))
            if row is None:
                row = RoundRow(campaign_id=self.cid, round=rnd)
                s.add(row)
                s.flush()
            return row

    def set_round(self, rnd: int, **fields: Any) -> None:
        with self.Session.begin() as s:
            s.execute(update(RoundRow).where(RoundRow.campaign_id == self.cid, RoundRow.round == rnd).values(**fields))

    def rounds(self) -> list[RoundRow]:
        with self.Session() as s:
            return list(s.scalars(select(RoundRow).where(RoundRow.campaign_id == self.cid).order_by(RoundRow.round)))

    # -- stages --------------------------------------------------------------------------
    def stage(self, rnd: int, stage: str) -> StageRecord | None:
        with self.Session() as s:
            r = s.scalars(select(StageRow).where(StageRow.campaign_id == self.cid, StageRow.round == rnd,
                                                 StageRow.stage == stage)).first()
            return _record(r) if r else None

    def stages(self) -> list[StageRecord]:
        with self.Session() as s:
            rows = s.scalars(select(StageRow).where(StageRow.campaign_id == self.cid).order_by(StageRow.id))
            return [_record(r) for r in rows]

    def start_stage(self, rnd: int, stage: str) -> int:
        """Mark a stage running (attempt + 1); returns the attempt number."""
        with self.Session.begin() as s:
            r = s.scalars(select(StageRow).where(StageRow.campaign_id == self.cid, StageRow.round == rnd,
                                                 StageRow.stage == stage)).first()
            if r is None:
                r = StageRow(campaign_id=self.cid, round=rnd, stage=stage, attempts=0)
                s.add(r)
            if r.status == DONE:
                raise RuntimeError(f"stage {stage} of round {rnd} is already done; refusing to redo it")
            r.status, r.attempts = RUNNING, (r.attempts or 0) + 1
            r.host, r.pid, r.started_at, r.error = socket.gethostname(), os.getpid(), _now(), None
            s.flush()
            return r.attempts

    def finish_stage(self, rnd: int, stage: str, result: dict[str, Any], duration_s: float,
                     candidates: list[dict[str, Any]] | None = None, scores: dict[str, Any] | None = None) -> None:
        """Record a stage's result (and its candidates/scores pointer) in one transaction."""
        with self.Session.begin() as s:
            r = s.scalars(select(StageRow).where(StageRow.campaign_id == self.cid, StageRow.round == rnd,
                                                 StageRow.stage == stage)).one()
            r.status, r.result_json, r.duration_s, r.finished_at = DONE, json.dumps(result), duration_s, _now()
            for c in candidates or []:
                s.add(CandidateRow(campaign_id=self.cid, round=rnd, **c))
            if scores is not None:
                s.merge(ScoreRow(campaign_id=self.cid, round=rnd, **scores))

    def fail_stage(self, rnd: int, stage: str, error: str) -> None:
        with self.Session.begin() as s:
            s.execute(update(StageRow).where(StageRow.campaign_id == self.cid, StageRow.round == rnd,
                                             StageRow.stage == stage).values(status=FAILED, error=error[:8000],
                                                                             finished_at=_now()))

    # -- scores and candidates ---------------------------------------------------------
    def scores(self, rnd: int) -> ScoreRow | None:
        with self.Session() as s:
            return s.get(ScoreRow, (self.cid, rnd))

    def all_scores(self) -> list[ScoreRow]:
        with self.Session() as s:
            return list(s.scalars(select(ScoreRow).where(ScoreRow.campaign_id == self.cid).order_by(ScoreRow.round)))

    def candidates(self, rnd: int | None = None) -> list[CandidateRow]:
        with self.Session() as s:
            q = select(CandidateRow).where(CandidateRow.campaign_id == self.cid)
            if rnd is not None:
                q = q.where(CandidateRow.round == rnd)
            return list(s.scalars(q.order_by(CandidateRow.round, CandidateRow.rank)))

    def update_candidate(self, structure_id: str, **fields: Any) -> None:
        if "detail" in fields:
            fields["detail_json"] = json.dumps(fields.pop("detail"), default=str)
        with self.Session.begin() as s:
            s.execute(update(CandidateRow).where(CandidateRow.campaign_id == self.cid,
                                                 CandidateRow.structure_id == structure_id).values(**fields))
