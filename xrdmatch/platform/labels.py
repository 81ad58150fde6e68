"""The label store: every validated verdict, with where it came from.

One row per (structure id, protocol hash): a job that runs twice, or an import repeated,
yields one label (insert-or-ignore on a unique key, race-free on SQLite and PostgreSQL).
``method`` records the source (``mlip-md``, ``aimd``, ``experiment``, ``paper``,
``imported``) so training can weight or exclude sources (``labels.source_weights``).
Inconclusive MD results are never labels; they stay on their job (state ``inconclusive``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Float, Integer, String, Text, UniqueConstraint, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from xrdmatch.config import LABEL_SOURCES
from xrdmatch.platform.db import Base, connect, engine_for, shorten, too_long

METHODS = LABEL_SOURCES
VERDICT_LABEL = {"superionic": 1, "not_superionic": 0}


class LabelInputError(ValueError):
    """A label (or a label file row) that cannot be stored; the message names it."""


class LabelRow(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("structure_id", "protocol_hash", name="uq_labels_structure_protocol"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    structure_id: Mapped[str] = mapped_column(String(200), index=True)
    protocol_hash: Mapped[str] = mapped_column(String(64))
    formula: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(32), index=True)
    label: Mapped[int] = mapped_column(Integer)  # 1 = superionic
    verdict: Mapped[str | None] = mapped_column(String(32), nullable=True)
    sigma_300: Mapped[float | None] = mapped_column(Float, nullable=True)  # S/cm
    sigma_300_lo: Mapped[float | None] = mapped_column(Float, nullable=True)
    sigma_300_hi: Mapped[float | None] = mapped_column(Float, nullable=True)
    ea_ev: Mapped[float | None] = mapped_column(Float, nullable=True)
    ea_err_ev: Mapped[float | None] = mapped_column(Float, nullable=True)
    calculator: Mapped[str | None] = mapped_column(String(64), nullable=True)
    calculator_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    temperatures_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    diffusivity_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # {T: D cm2/s}
    diffusivity_err_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    n_atoms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    runtime_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    campaign_round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source: Mapped[str | None] = mapped_column(Text, nullable=True)  # provenance: job/worker or file:line
    structure_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # shipped-format record
    created_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # unix seconds


@dataclass
class LabelRecord:
    """One label with its provenance (1 = superionic)."""

    structure_id: str
    formula: str
    method: str
    label: int
    protocol_hash: str
    verdict: str | None = None
    sigma_300: float | None = None
    sigma_300_range: tuple[float, float] | None = None
    ea_ev: float | None = None
    ea_err_ev: float | None = None
    calculator: str | None = None
    calculator_version: str | None = None
    temperatures: list[float] = field(default_factory=list)
    diffusivity: dict[float, float] = field(default_factory=dict)
    diffusivity_err: dict[float, float] = field(default_factory=dict)
    n_atoms: int | None = None
    runtime_s: float | None = None
    job_id: int | None = None
    campaign_round: int | None = None
    source: str | None = None
    record: dict | None = None  # the structure (shipped record format), when known
    created_at: float | None = None
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["diffusivity"] = {str(k): v for k, v in self.diffusivity.items()}
        d["diffusivity_err"] = {str(k): v for k, v in self.diffusivity_err.items()}
        return d


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _tmap(d: dict | None) -> dict[float, float]:
    return {float(k): float(v) for k, v in (d or {}).items() if _finite(v) is not None}


def _row_values(rec: LabelRecord) -> dict[str, Any]:
    if rec.label not in (0, 1):
        raise LabelInputError(f"label for {rec.structure_id!r} must be 0 or 1, got {rec.label!r}")
    if rec.method not in METHODS:
        raise LabelInputError(f"label for {rec.structure_id!r}: unknown method {rec.method!r} (one of {METHODS})")
    lo, hi = rec.sigma_300_range or (None, None)
    return {
        "structure_id": str(rec.structure_id),
        "protocol_hash": rec.protocol_hash,
        "formula": rec.formula,
        "method": rec.method,
        "label": int(rec.label),
        "verdict": rec.verdict,
        "sigma_300": _finite(rec.sigma_300),
        "sigma_300_lo": _finite(lo),
        "sigma_300_hi": _finite(hi),
        "ea_ev": _finite(rec.ea_ev),
        "ea_err_ev": _finite(rec.ea_err_ev),
        "calculator": rec.calculator,
        "calculator_version": rec.calculator_version,
        "temperatures_json": json.dumps([float(t) for t in rec.temperatures]),
        "diffusivity_json": json.dumps({str(k): v for k, v in _tmap(rec.diffusivity).items()}),
        "diffusivity_err_json": json.dumps({str(k): v for k, v in _tmap(rec.diffusivity_err).items()}),
        "n_atoms": rec.n_atoms,
        "runtime_s": _finite(rec.runtime_s),
        "job_id": rec.job_id,
        "campaign_round": rec.campaign_round,
        "source": rec.source,
        "structure_json": json.dumps(rec.record) if rec.record is not None else None,
    }


def _from_row(r: Any) -> LabelRecord:
    lo, hi = r.sigma_300_lo, r.sigma_300_hi
    return LabelRecord(
        id=r.id,
        structure_id=r.structure_id,
        protocol_hash=r.protocol_hash,
        formula=r.formula,
        method=r.method,
        label=int(r.label),
        verdict=r.verdict,
        sigma_300=r.sigma_300,
        sigma_300_range=(lo, hi) if lo is not None and hi is not None else None,
        ea_ev=r.ea_ev,
        ea_err_ev=r.ea_err_ev,
        calculator=r.calculator,
        calculator_version=r.calculator_version,
        temperatures=json.loads(r.temperatures_json or "[]"),
        diffusivity=_tmap(json.loads(r.diffusivity_json or "{}")),
        diffusivity_err=_tmap(json.loads(r.diffusivity_err_json or "{}")),
        n_atoms=r.n_atoms,
        runtime_s=r.runtime_s,
        job_id=r.job_id,
        campaign_round=r.campaign_round,
        source=r.source,
        record=json.loads(r.structure_json) if r.structure_json else None,
        created_at=r.created_at,
    )


def now_sql(conn: Connection):
    """The database's clock in unix seconds, as a SQL expression: every worker on every
    node compares leases against one clock (the store's), not its own."""
    from sqlalchemy import literal_column

    if conn.dialect.name == "sqlite":
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)")
    if conn.dialect.name == "postgresql":
        return literal_column("CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)")
    return literal_column("CAST(CURRENT_TIMESTAMP AS FLOAT)")  # pragma: no cover - other dialects


def insert_ignore(conn: Connection, table, values: dict[str, Any], keys: list[str]) -> bool:
    """INSERT that does nothing when the unique ``keys`` already exist; True if a row was added."""
    name = conn.dialect.name
    if name in ("sqlite", "postgresql"):
        if name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dinsert
        else:
            from sqlalchemy.dialects.postgresql import insert as dinsert
        # RETURNING, not rowcount: psycopg2 reports -1 for an INSERT with implicit RETURNING
        stmt = dinsert(table).values(**values).on_conflict_do_nothing(index_elements=keys)
        return conn.execute(stmt.returning(*table.primary_key.columns)).first() is not None
    try:  # pragma: no cover - other dialects
        with conn.begin_nested():
            conn.execute(insert(table).values(**values))
        return True
    except IntegrityError:  # pragma: no cover
        return False


def insert_label(conn: Connection, rec: LabelRecord) -> bool:
    """Add ``rec`` inside the caller's transaction (the queue completes a job and adds its
    label atomically). Returns False if (structure id, protocol hash) was already labelled."""
    values = _row_values(rec) | {"created_at": now_sql(conn)}
    return insert_ignore(conn, LabelRow.__table__, values, ["structure_id", "protocol_hash"])


def add_label(url: str, rec: LabelRecord) -> tuple[LabelRecord, bool]:
    """Store one label; idempotent by (structure id, protocol hash).

    Returns the stored label (the existing one if it was already there) and whether it was new.
    """
    connect(url)
    with engine_for(url).begin() as conn:
        created = insert_label(conn, rec)
        row = conn.execute(
            select(LabelRow).where(
                LabelRow.structure_id == str(rec.structure_id), LabelRow.protocol_hash == rec.protocol_hash
            )
        ).one()
    return _from_row(row), created


def list_labels(url: str, methods: list[str] | None = None) -> list[LabelRecord]:
    """All labels, oldest first by when they were stored (a replaced row counts from its
    replacement), optionally only some methods."""
    connect(url)
    # coalesce: rows without a time come first on every backend (PostgreSQL sorts NULL last)
    q = select(LabelRow).order_by(func.coalesce(LabelRow.created_at, 0.0), LabelRow.id)
    if methods:
        q = q.where(LabelRow.method.in_(list(methods)))
    with engine_for(url).connect() as conn:
        return [_from_row(r) for r in conn.execute(q)]


def label_from_result(result: dict[str, Any], *, protocol_hash: str, job_id: int | None, record: dict | None,
                      campaign_round: int | None = None, source: str | None = None) -> LabelRecord | None:
    """The label of a finished validation (``ValidationResult.to_dict()``); None if inconclusive."""
    verdict = result.get("verdict")
    if verdict not in VERDICT_LABEL:
        return None
    rng = result.get("sigma_300_range")
    return LabelRecord(
        structure_id=str(result["structure_id"]),
        formula=str(result.get("formula") or (record or {}).get("formula") or ""),
        method=str(result.get("method") or "mlip-md"),
        label=VERDICT_LABEL[verdict],
        protocol_hash=protocol_hash,
        verdict=verdict,
        sigma_300=result.get("sigma_300"),
        sigma_300_range=tuple(rng) if rng is not None and len(rng) == 2 else None,
        ea_ev=result.get("ea_ev"),
        ea_err_ev=result.get("ea_err_ev"),
        calculator=result.get("calculator"),
        calculator_version=result.get("calculator_version"),
        temperatures=[float(t) for t in result.get("temperatures") or []],
        diffusivity=_tmap(result.get("diffusivity")),
        diffusivity_err=_tmap(result.get("diffusivity_err")),
        n_atoms=result.get("n_atoms"),
        runtime_s=result.get("runtime_s"),
        job_id=job_id,
        campaign_round=campaign_round,
        source=source,
        record=record,
    )


class ImportCounts(NamedTuple):
    """What :func:`import_labels` did: rows new to the store, rows already stored with the same
    values, and stored rows whose values a re-import replaced."""

    added: int
    present: int
    replaced: int = 0


def _same_label(a: LabelRecord, b: LabelRecord) -> list[str]:
    """The fields in which two labels of one (structure, source) disagree (empty: the same)."""
    diff = [f"label {a.label} vs {b.label}"] if a.label != b.label else []
    sa, sb = a.sigma_300, b.sigma_300
    if (sa is None) != (sb is None) or (sa is not None and not math.isclose(sa, sb, rel_tol=1e-9)):
        diff.append(f"sigma_300 {sa} vs {sb}")
    if a.formula != b.formula:
        diff.append(f"formula {a.formula!r} vs {b.formula!r}")
    return diff



def _not_utf8(p: Path, path) -> str:
    """Where a file stops being UTF-8 (the reader's own offset is into a buffer, not the file)."""
    raw = p.read_bytes()
    try:
        raw.decode("utf-8-sig")
        return f"{path}: not UTF-8 text; save it as UTF-8 CSV"
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        return f"{path}: line {line} is not UTF-8 text (byte {raw[err.start:err.start + 1]!r}); save it as UTF-8 CSV"


def _label_row(p: Path, path, n: int, row: dict, method: str, sigma_threshold: float) -> LabelRecord:
    """One CSV row as a checked LabelRecord (LabelInputError naming the row)."""
    from pymatgen.core import Composition, Element

    from xrdmatch.platform.data import clean_formula, reduced_formula

    sid = (row.get("structure_id") or row.get("id") or "").strip()
    if not sid:
        raise LabelInputError(f"{path}: row {n}: empty structure id")
    if why := too_long(LabelRow.__table__, {"structure_id": sid}):  # before a message names it
        raise LabelInputError(f"{path}: row {n} ({shorten(sid)}): {why}")
    formula = (row.get("formula") or "").strip()
    if not formula:  # candidate selection skips labelled compositions by this formula
        raise LabelInputError(f"{path}: row {n} ({sid}): empty formula")
    if why := too_long(LabelRow.__table__, {"formula": formula}):  # before pymatgen parses it
        raise LabelInputError(f"{path}: row {n} ({sid}): {why}")
    try:
        reduced_formula(formula)
        unknown = [str(e) for e in Composition(clean_formula(formula)).elements if not isinstance(e, Element)]
    except Exception:
        raise LabelInputError(f"{path}: row {n} ({sid}): formula {formula!r} is not a chemical formula") from None
    if unknown:  # pymatgen reads any capitalised symbol ('Zz') as a placeholder species
        raise LabelInputError(f"{path}: row {n} ({sid}): formula {formula!r} is not a chemical formula "
                              f"({', '.join(unknown)}: not an element)")
    m = (row.get("method") or method).strip()
    raw_sigma = (row.get("sigma_300") or "").strip()
    sigma = _finite(raw_sigma) if raw_sigma else None
    if raw_sigma and (sigma is None or sigma < 0):
        raise LabelInputError(f"{path}: row {n} ({sid}): sigma_300 {raw_sigma!r} is not a finite non-negative number")
    raw = (row.get("label") or "").strip()
    if raw:
        if raw not in ("0", "1"):
            raise LabelInputError(f"{path}: row {n} ({sid}): label {raw!r} not in {{0, 1}}")
        lab = int(raw)
        if sigma is not None and lab != int(sigma >= sigma_threshold):
            raise LabelInputError(
                f"{path}: row {n} ({sid}): label {lab} contradicts sigma_300 {sigma:g} S/cm (threshold "
                f"{sigma_threshold:g}; 1 = superionic = sigma_300 >= threshold; the paper's files use 0 = superionic)")
    elif sigma is not None:
        lab = int(sigma >= sigma_threshold)
    else:
        raise LabelInputError(f"{path}: row {n} ({sid}): neither label nor a finite sigma_300")
    if m not in METHODS:
        raise LabelInputError(f"{path}: row {n} ({sid}): unknown method {m!r} (one of {METHODS})")
    return LabelRecord(structure_id=sid, formula=formula, method=m, label=lab, protocol_hash=f"import:{m}",
                       sigma_300=sigma, verdict="superionic" if lab else "not_superionic", source=f"{p.name}:{n}")


def _read_label_rows(p: Path, path, method: str, sigma_threshold: float):
    """Parse and check every row of a label file; (records, {(id, method): (row, record)})."""
    recs: list[LabelRecord] = []
    first_row: dict[tuple[str, str], tuple[int, LabelRecord]] = {}
    label_row: dict[str, tuple[int, int, str]] = {}  # structure id -> (row, label, method) of its first row
    with open(p, newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets write a byte-order mark
        reader = csv.DictReader(fh)
        try:
            cols = set(reader.fieldnames or [])
            if not ({"structure_id", "id"} & cols) or "formula" not in cols or not ({"label", "sigma_300"} & cols):
                raise LabelInputError(f"{path}: needs columns structure_id (or id), formula, and label or sigma_300; "
                                      f"got {sorted(cols)}")
            for n, row in enumerate(reader, start=2):
                if None in row or None in row.values():
                    raise LabelInputError(f"{path}: row {n}: {'more' if None in row else 'fewer'} fields than the "
                                          f"header's {len(reader.fieldnames)}")
                rec = _label_row(p, path, n, row, method, sigma_threshold)
                sid, m, lab = rec.structure_id, rec.method, rec.label
                prev = first_row.get((sid, m))
                if prev is not None:
                    diff = _same_label(prev[1], rec)
                    if diff:
                        raise LabelInputError(f"{path}: rows {prev[0]} and {n}: structure {sid} ({m}) twice with "
                                              f"different values ({'; '.join(diff)})")
                    continue  # the same row again: one label
                other = label_row.setdefault(sid, (n, lab, m))
                if other[1] != lab:
                    raise LabelInputError(f"{path}: rows {other[0]} and {n}: structure {sid} labelled {other[1]} ({other[2]}) "
                                          f"and {lab} ({m}) in one file; import them separately (the newest stored "
                                          "label is the one training uses)")
                first_row[(sid, m)] = (n, rec)
                recs.append(rec)
        except csv.Error as e:  # e.g. a field over the csv module's 131072-character limit: not a traceback
            # the inner reader's line: DictReader's own line_num lags by the row that failed
            raise LabelInputError(f"{path}: line {reader.reader.line_num}: {e}") from None
    return recs, first_row


def import_labels(url: str, path: str | os.PathLike[str], method: str = "experiment",
                  sigma_threshold: float | None = None, *, replace: bool = False) -> ImportCounts:
    """Import labels from a CSV with columns ``structure_id`` (or ``id``), ``formula`` and
    ``label`` (1 = superionic) and/or ``sigma_300`` (S/cm; labelled by ``sigma_threshold``,
    by default the built-in ``ValidationConfig().sigma_threshold``, 5e-5; ``xrdmatch labels
    import`` passes the config's); optional ``method`` per row.
    Returns (rows added, rows already present), with ``.replaced``.

    The whole file is checked before anything is written, so a bad row leaves the store unchanged.
    Refused, naming the row: an empty or unparsable formula, a label that contradicts its own
    sigma_300 (1 = superionic means sigma_300 >= the threshold; the paper's CSV has 0 = superionic),
    one structure twice in the file with different values for one method, and one structure with
    both labels in the file (from two methods: which one training uses would hang on the row
    order; import them separately, the newest stored label counts). Re-importing identical rows changes
    nothing; a row whose (structure, method) is stored with another label, sigma_300 or formula is
    refused unless ``replace=True``, which replaces the stored row in place.
    """
    if sigma_threshold is None:
        from xrdmatch.config import ValidationConfig

        sigma_threshold = ValidationConfig().sigma_threshold
    p = Path(path)
    if not p.is_file():
        raise LabelInputError(f"label file not found: {path}")
    try:
        recs, first_row = _read_label_rows(p, path, method, sigma_threshold)
    except UnicodeDecodeError:
        raise LabelInputError(_not_utf8(p, path)) from None
    added = replaced = 0
    connect(url)
    with engine_for(url).begin() as conn:
        stored = {}
        for rec in recs:
            r = conn.execute(select(LabelRow).where(LabelRow.structure_id == rec.structure_id,
                                                    LabelRow.protocol_hash == rec.protocol_hash)).first()
            if r is not None:
                stored[rec.structure_id, rec.protocol_hash] = r
        changed = [(rec, row, diff) for rec in recs
                   if (row := stored.get((rec.structure_id, rec.protocol_hash))) is not None
                   and (diff := _same_label(_from_row(row), rec))]
        if changed and not replace:
            lines = [f"row {first_row[rec.structure_id, rec.method][0]} ({rec.structure_id}, {rec.method}): "
                     f"{'; '.join(diff)} (stored from {row.source})" for rec, row, diff in changed]
            raise LabelInputError(f"{path}: {len(changed)} rows differ from labels already stored (stored vs file): "
                                  + ", ".join(lines[:10]) + (" ..." if len(lines) > 10 else "")
                                  + "; nothing imported; pass replace=True to replace them")
        for rec, row, _ in changed:
            conn.execute(update(LabelRow).where(LabelRow.id == row.id)
                         .values(**_row_values(rec), created_at=now_sql(conn)))
            replaced += 1
        for rec in recs:
            if (rec.structure_id, rec.protocol_hash) not in stored:
                added += insert_label(conn, rec)
    return ImportCounts(added, len(recs) - added - replaced, replaced)
