"""Loaders for the shipped data: the paper's labelled patterns and the crystal database.

Conventions used everywhere in xrdmatch:
- label 1 = superionic (sigma(300 K) >= 5e-5 S/cm). The paper's CSV uses 0 = superionic;
  :func:`load_labelled` converts on import.
- A database record is ``{"id", "formula", "lattice", "species", "frac_coords"}`` (the
  shipped JSONL format); :func:`iter_records` streams them without loading the file.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import json
import lzma
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xrdmatch import N_BINS
from xrdmatch.config import resolve_path

DEFAULT_LABELLED = "data/xrdmatch_lbs.csv"
DEFAULT_DATABASE = "data/mp_li_structures.jsonl.xz"

_PREFIX = re.compile(r"^(?:[a-z]+)_")  # a_, b_, c_, as_, ms_, tetragonal_
_SUFFIX = re.compile(r"(?:\((?:EES|NC|nc_error)\))+$", re.IGNORECASE)


class LabelledDataError(ValueError):
    """A labelled file that cannot be used; the message names the file and the row."""


@dataclass
class LabelledSet:
    """Labelled patterns. ``y`` is 1 = superionic. Rows are aligned across all fields."""

    ids: list[str]
    formulas: list[str]
    groups: list[str]  # reduced formula: the unit of grouped splits
    conductivity: np.ndarray  # S/cm, NaN when unknown
    y: np.ndarray  # int64, 1 = superionic
    X: np.ndarray  # float32 (n, 4501)
    sources: list[str] = field(default_factory=list)  # paper / mlip-md / aimd / experiment / imported

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: np.ndarray | list[int]) -> "LabelledSet":
        idx = np.asarray(idx, dtype=int)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return LabelledSet(
            ids=pick(self.ids),
            formulas=pick(self.formulas),
            groups=pick(self.groups),
            conductivity=self.conductivity[idx],
            y=self.y[idx],
            X=self.X[idx],
            sources=pick(self.sources),
        )

    def hash(self) -> str:
        """Content hash (ids, labels, patterns): the lineage of a trained model."""
        import hashlib

        h = hashlib.sha256()
        for i, lab, src in zip(self.ids, self.y.tolist(), self.sources):
            h.update(f"{i}|{lab}|{src};".encode())
        h.update(np.ascontiguousarray(self.X, dtype=np.float32).tobytes())
        return h.hexdigest()[:16]


def clean_formula(formula_id: str) -> str:
    """Strip the paper's polymorph prefixes and annotation suffixes: 'a_Li3N' -> 'Li3N'."""
    f = _SUFFIX.sub("", formula_id.strip())
    return _PREFIX.sub("", f)


def reduced_formula(formula: str) -> str:
    from pymatgen.core import Composition

    return Composition(clean_formula(formula)).reduced_formula


def formula_group(formula: str) -> str:
    """The group of grouped splits and of candidate exclusion: the reduced formula of the
    cleaned name ('a_Li3N' and 'Li6N2' are both 'Li3N'); an unparsable name is its own group."""
    try:
        return reduced_formula(formula)
    except Exception:  # noqa: BLE001 - pymatgen raises several types for a bad formula
        return formula


@functools.lru_cache(maxsize=None)
def composition_key(formula: str) -> str:
    """One string per composition, to match compositions across sources: pymatgen's
    ``reduced_formula`` leaves fractional amounts as written, so the paper's 'La0.5Li0.5TiO3' and
    the database's 'LiLaTi2O6' are two reduced formulas of one composition; both have the key
    'LiLaTi2O6' (the integer formula). Group names stay ``formula_group``'s (the splits' labels);
    this key only decides which groups are the same composition."""
    try:
        from pymatgen.core import Composition

        return Composition(clean_formula(formula)).get_integer_formula_and_factor(max_denominator=100)[0]
    except Exception:  # noqa: BLE001 - pymatgen raises several types for a bad formula
        return formula


def load_labelled(path: str | os.PathLike[str] = DEFAULT_LABELLED) -> LabelledSet:
    """Read the paper's labelled CSV (0 = superionic there) into a LabelledSet (1 = superionic).

    Validates every row: pattern columns exactly v1..v4501 in order, finite non-negative
    values with a peak, label in {0, 1}, unique ids; at least one row.
    """
    import pandas as pd

    p = resolve_path(path)
    if not p.is_file():
        raise LabelledDataError(f"labelled file not found: {path}")
    try:
        df = pd.read_csv(p, dtype={"name": str, "formula_id": str})  # ids '01' and '1' stay two ids
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise LabelledDataError(f"{path}: not a readable CSV ({' '.join(str(err).split())})") from None
    required = {"formula_id", "name", "label"}
    missing = required - set(df.columns)
    if missing:
        raise LabelledDataError(f"{path}: missing columns {sorted(missing)}")
    vcols = [c for c in df.columns if re.fullmatch(r"v\d+", str(c))]
    if len(vcols) != N_BINS:
        raise LabelledDataError(f"{path}: pattern has {len(vcols)} columns v1..vN, expected {N_BINS}")
    expected = [f"v{i}" for i in range(1, N_BINS + 1)]
    if vcols != expected:  # a missing or swapped column would shift every pattern by a bin
        k = next(i for i, (a, b) in enumerate(zip(vcols, expected)) if a != b)
        raise LabelledDataError(f"{path}: pattern column {k + 1} is {vcols[k]!r}, expected {expected[k]!r} "
                                f"(columns must be v1..v{N_BINS} in order)")
    if len(df) == 0:
        raise LabelledDataError(f"{path}: no rows (only a header)")
    ids = [str(x).strip() if isinstance(x, str) else "" for x in df["name"]]
    seen: dict[str, int] = {}
    for row, i in enumerate(ids):
        if not i:
            raise LabelledDataError(f"{path}: row {row + 2}: empty id (column name)")
        if i in seen:
            raise LabelledDataError(f"{path}: row {row + 2}: duplicated id {i!r} (first at row {seen[i] + 2})")
        seen[i] = row
    try:
        X = df[vcols].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):  # text in a cell: NaN here, named by the check below
        X = df[vcols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        col = vcols[int(np.flatnonzero(~np.isfinite(X[row]))[0])]
        raise LabelledDataError(f"{path}: row {row + 2} ({ids[row]}): pattern has NaN or non-numeric values "
                                f"(first in column {col}: {df[col].iloc[row]!r})")
    bad = (np.abs(X) > np.finfo(np.float32).max).any(axis=1)  # stored as float32: would become inf
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise LabelledDataError(f"{path}: row {row + 2} ({ids[row]}): pattern value {X[row].max():g} is too "
                                "large (over float32's 3.4e38)")
    bad = (X < 0).any(axis=1) | (X.max(axis=1) <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise LabelledDataError(f"{path}: row {row + 2} ({ids[row]}): pattern has negative intensities or no "
                                "peak (all zero)")
    raw = pd.to_numeric(df["label"], errors="coerce").to_numpy()
    badl = ~np.isin(raw, [0, 1])
    if badl.any():
        row = int(np.flatnonzero(badl)[0])
        raise LabelledDataError(f"{path}: row {row + 2} ({ids[row]}): label {df['label'].iloc[row]!r} not in {{0, 1}}")
    y = (raw == 0).astype(np.int64)  # paper: 0 = superionic -> ours: 1 = superionic
    formulas, groups = [], []
    for row, f in enumerate(df["formula_id"]):
        try:
            groups.append(reduced_formula(f))
        except Exception:  # noqa: BLE001 - NaN (empty cell) or a name pymatgen cannot parse
            raise LabelledDataError(f"{path}: row {row + 2} ({ids[row]}): formula_id {f!r} is not a chemical "
                                    "formula") from None
        formulas.append(clean_formula(f))
    cond = pd.to_numeric(df.get("condutivity", pd.Series([np.nan] * len(df))), errors="coerce").to_numpy(float)
    return LabelledSet(
        ids=ids,
        formulas=formulas,
        groups=groups,
        conductivity=cond,
        y=y,
        X=X.astype(np.float32),
        sources=["paper"] * len(ids),
    )


def _open_text(path: Path):
    name = path.name.lower()
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """(line number, raw line) of a (compressed) JSONL file, streamed."""
    p = resolve_path(path)
    with _open_text(p) as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                yield n, line


def iter_records(path: str | os.PathLike[str] = DEFAULT_DATABASE) -> Iterator[dict]:
    """Records of a JSONL database in the shipped format, streamed (never the whole file)."""
    for n, line in iter_jsonl_lines(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        yield rec


def find_records(path: str | os.PathLike[str], ids, limit: int | None = None) -> tuple[dict[str, dict], dict[str, str]]:
    """(records, problems) of ``ids`` in a database of any supported format, streamed; stops
    once all are found.

    A bad entry (a line that is not JSON, a record with broken arrays) does not stop the
    search: it is skipped, and its reason is kept under its id (when it names one) in case that
    id is found nowhere else. A missing, unreadable or truncated database keeps what was found
    before it and gives its error as the problem of every id not found.
    """
    from xrdmatch.platform.databases import BadEntry, DatabaseError, iter_entries

    want = {str(i) for i in ids}
    found: dict[str, dict] = {}
    problems: dict[str, str] = {}
    try:
        for entry in iter_entries(path, limit):
            sid = str(entry.id)
            if sid not in want or sid in found:
                continue
            if isinstance(entry, BadEntry):
                problems.setdefault(sid, entry.reason)
                continue
            found[sid] = {"id": sid, "formula": entry.formula, "lattice": entry.lattice,
                          "species": entry.species, "frac_coords": entry.frac_coords}
            if len(found) == len(want):
                break
    except DatabaseError as err:
        for sid in want - found.keys():
            problems.setdefault(sid, str(err))
    return found, {k: v for k, v in problems.items() if k not in found}


def structure_from_record(rec: dict):
    """A pymatgen Structure from a shipped-format record."""
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(rec["lattice"]), rec["species"], rec["frac_coords"])


def iter_structures(path: str | os.PathLike[str] = DEFAULT_DATABASE) -> Iterator[tuple[str, object]]:
    """(id, pymatgen Structure) for every entry of a shipped-format JSONL database."""
    for rec in iter_records(path):
        yield str(rec["id"]), structure_from_record(rec)
