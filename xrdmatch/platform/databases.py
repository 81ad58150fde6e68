"""Crystal database readers: shipped JSONL, a folder of CIF/POSCAR, or an ASE database.

Two layers, so that the XRD stage's driver stays cheap:

* :func:`iter_raw_batches` cuts a database into deterministic batches of *raw items*
  (a JSONL line as bytes, a file's name and bytes, or an already-read ASE row) without
  parsing them; batch ``k`` is always entries ``[k*B, (k+1)*B)``.
* :func:`parse_raw` turns one raw item into an :data:`Entry`: a :class:`Record` or a
  :class:`BadEntry` (id + reason). It never raises for bad input, so one unreadable file
  or bad JSON line becomes an error row instead of crashing a run. Ray workers call it.

:func:`iter_entries` composes both for in-process use. Nothing here loads a whole
database into memory.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import tempfile
import warnings
import zlib
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from xrdmatch.config import resolve_path

try:  # pymatgen depends on orjson; ~3x faster than json on the hot path
    import orjson as _orjson

    _loads = _orjson.loads
    _JSONError: tuple[type[Exception], ...] = (_orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover
    _loads = json.loads
    _JSONError = (ValueError,)

Kind = Literal["jsonl", "folder", "ase"]
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".jsonl.bz2", ".json.xz", ".json.gz", ".ndjson")
ASE_SUFFIXES = (".db", ".json.db")


class DatabaseError(ValueError):
    """A database that cannot be read at all (missing path, unknown kind); names the path."""


@dataclass(frozen=True, slots=True)
class Record:
    """One structure as raw arrays (the shipped JSONL format).

    ``species``: per site an element symbol or a ``{symbol: occupancy}`` mapping.
    """

    id: str
    formula: str
    lattice: list
    species: list
    frac_coords: list


@dataclass(frozen=True, slots=True)
class BadEntry:
    """An entry that could not be read; ``reason`` says why (shown in the errors table)."""

    id: str
    reason: str


Entry = Union[Record, BadEntry]

#: A raw, unparsed item: ("json", where, line bytes) | ("file", file name, bytes) | ("entry", Entry)
RawItem = tuple


# ----------------------------------------------------------------------------- kinds


def database_kind(path: str | os.PathLike[str]) -> Kind:
    """jsonl / folder / ase, from the path (a folder, or the file name's suffix)."""
    p = Path(path)
    if p.is_dir():
        return "folder"
    name = p.name.lower()
    if name.endswith(ASE_SUFFIXES):
        return "ase"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise DatabaseError(
        f"{path}: unknown database kind; expected a .jsonl(.xz/.gz/.bz2) file, a folder of "
        "CIF/POSCAR files, or an ASE database (.db)"
    )


def _resolve(path: str | os.PathLike[str]) -> Path:
    p = resolve_path(path)
    if not p.exists():
        raise DatabaseError(f"database not found: {path}")
    return p


def _open_binary(p: Path):
    name = p.name.lower()
    if name.endswith(".xz"):
        return lzma.open(p, "rb")
    if name.endswith(".gz"):
        return gzip.open(p, "rb")
    if name.endswith(".bz2"):
        return bz2.open(p, "rb")
    return open(p, "rb")


def printable_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (Python holds them as surrogates, which no
    UTF-8 writer accepts) are spelled out as \\xNN, so the entry keeps an id that can be stored."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def folder_files(p: Path) -> list[Path]:
    """Every visible regular file of the folder (not recursive), in name order: the entries of a
    folder database, and what its cache key hashes (``paths.database_key``)."""
    return sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))


# ----------------------------------------------------------------------------- raw items


#: What a broken compressed stream raises while it is read: a truncated .xz/.gz/.bz2 ends in
#: EOFError (which Click would turn into a bare "Aborted."), a corrupt one in one of the others.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, lzma.LZMAError, zlib.error, OSError)


def _stream_error(p: Path, lines: int, e: BaseException) -> DatabaseError:
    """DatabaseError naming the file, how far it could be read, and the reader's own words."""
    name = "zlib.error" if isinstance(e, zlib.error) else type(e).__name__
    detail = f"{name}: {e}" if str(e) else name
    where = f"after line {lines}" if lines else "before the first line"
    if p.name.lower().endswith((".xz", ".gz", ".bz2")):
        what = f"truncated or corrupt compressed file {where}"
    else:
        what = f"read error {where}"
    return DatabaseError(f"{p}: {what} ({detail}); no entry after that point was read")


def _jsonl_lines(p: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every line; a broken file raises DatabaseError, never EOFError/OSError."""
    try:
        fh = _open_binary(p)
    except OSError as e:
        raise DatabaseError(f"{p}: cannot open ({e.strerror or e})") from None
    n = 0
    with fh:
        try:
            for n, line in enumerate(fh, 1):
                yield n, line
        except _STREAM_ERRORS as e:
            # n lines were read whole; a partial last line is never yielded (the reader raises first)
            raise _stream_error(p, n, e) from None


def _jsonl_raw(p: Path) -> Iterator[RawItem]:
    for n, line in _jsonl_lines(p):
        if line.strip():
            yield ("json", f"{p.name}:{n}", line)


def check_ase_file(p: Path) -> None:
    """Refuse what is not an SQLite file before ASE opens it: ``ase.db.connect`` creates its
    tables in an empty or foreign file, writing into the user's input."""
    with open(p, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise DatabaseError(f"{p}: empty file, not an ASE database")
    if head != b"SQLite format 3\x00":
        raise DatabaseError(f"{p}: not an ASE (SQLite) database")


def _ase_connect(p: Path):
    import ase.db

    check_ase_file(p)
    return ase.db.connect(str(p))


def _ase_rows(p: Path) -> Iterator[Any]:
    import sqlite3

    try:
        db = _ase_connect(p)
        yield from db.select(sort="id")
    except sqlite3.DatabaseError as err:  # a damaged file with an SQLite header
        raise DatabaseError(f"{p}: not a readable ASE database ({err})") from None


def _ase_entry(row) -> Entry:
    """Record of an ASE database row; id = ``mp_id`` / ``material_id`` key, else the row id."""
    kv = row.key_value_pairs
    sid = str(kv.get("mp_id") or kv.get("material_id") or row.id)
    try:
        atoms = row.toatoms()
        if len(atoms) == 0:
            return BadEntry(sid, "structure has no sites")
        cell = np.asarray(atoms.cell[:], dtype=float)
        if not atoms.pbc.all() or abs(np.linalg.det(cell)) < 1e-8:
            return BadEntry(sid, "not a periodic crystal (no full 3-D cell / pbc)")
        species = atoms.get_chemical_symbols()
        return Record(
            id=sid,
            formula=_reduced_formula(species),
            lattice=cell.tolist(),
            species=species,
            frac_coords=atoms.get_scaled_positions(wrap=False).tolist(),
        )
    except Exception as e:  # noqa: BLE001 - bad input becomes an error row
        return BadEntry(sid, f"unreadable ASE row {row.id}: {type(e).__name__}: {e}")


def _iter_units(p: Path, kind: Kind) -> Iterator[Any]:
    """Cheap per-entry handles (no file contents read yet)."""
    if kind == "jsonl":
        return _jsonl_raw(p)
    if kind == "folder":
        return iter(folder_files(p))
    return _ase_rows(p)


def _materialise(unit: Any, kind: Kind) -> RawItem:
    if kind == "jsonl":
        return unit
    if kind == "folder":
        from xrdmatch.platform.structure_files import StructureTooLarge, check_file_size

        name = printable_name(unit.name)
        try:
            check_file_size(unit)  # the driver reads the bytes: not a file of any size
            return ("file", name, unit.read_bytes())
        except StructureTooLarge as e:
            return ("entry", BadEntry(Path(name).stem, f"{name}: refused before parsing: {e}"))
        except OSError as e:
            return ("entry", BadEntry(Path(name).stem, f"cannot read file {name}: {e.strerror or e}"))
    return ("entry", _ase_entry(unit))


def iter_raw_batches(
    path: str | os.PathLike[str],
    batch_size: int,
    limit: int | None = None,
    skip: Container[int] = (),
) -> Iterator[tuple[int, list[RawItem]]]:
    """(k, raw items of entries [k*B, (k+1)*B)) for every batch not in ``skip``.

    Skipped batches are still walked (to keep numbering) but their items are not read.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    p = _resolve(path)
    kind = database_kind(p)
    k, chunk, n = 0, [], 0
    for unit in _iter_units(p, kind):
        if limit is not None and n >= limit:
            break
        n += 1
        chunk.append(unit)
        if len(chunk) == batch_size:
            if k not in skip:
                yield k, [_materialise(u, kind) for u in chunk]
            k, chunk = k + 1, []
    if chunk and k not in skip:
        yield k, [_materialise(u, kind) for u in chunk]


def count_entries(path: str | os.PathLike[str], limit: int | None = None) -> int:
    """Number of entries (one pass over a JSONL, a directory listing, or a COUNT)."""
    p = _resolve(path)
    kind = database_kind(p)
    if kind == "folder":
        n = len(folder_files(p))
    elif kind == "ase":
        import sqlite3

        try:
            n = _ase_connect(p).count()
        except sqlite3.DatabaseError as err:
            raise DatabaseError(f"{p}: not a readable ASE database ({err})") from None
    else:
        n = 0
        for _, line in _jsonl_lines(p):
            if limit is not None and n >= limit:
                break
            if line.strip():
                n += 1
    return n if limit is None else min(n, limit)


# ----------------------------------------------------------------------------- parsing


def record_composition(species: list) -> dict[str, float]:
    """{element: amount} of a record's sites, each 'Li', 'Li+', 'O2-' or {'Li': 0.5, 'Na': 0.5}:
    what element filters and formula groups read (an oxidation state is not another element)."""
    from xrdmatch.simulation.xrd import species_element

    comp: dict[str, float] = {}
    for sp in species:
        for name, occ in (sp.items() if isinstance(sp, dict) else ((sp, 1.0),)):
            el = species_element(name)
            comp[el] = comp.get(el, 0.0) + float(occ)
    return comp


def _reduced_formula(species: list) -> str:
    from pymatgen.core import Composition

    return Composition(record_composition(species)).reduced_formula


_ID_IN_LINE = re.compile(rb'"id"\s*:\s*"([^"]{1,200})"')


def _check_arrays(sid: str, lattice: Any, species: Any, frac_coords: Any) -> str | None:
    """Why a record's arrays cannot describe a crystal, or None."""
    if not isinstance(species, list) or not isinstance(frac_coords, list):
        return "species and frac_coords must be lists"
    if len(species) == 0:
        return "structure has no sites"
    try:
        lat = np.asarray(lattice, dtype=float)
        fc = np.asarray(frac_coords, dtype=float)
    except (TypeError, ValueError):
        return "lattice / frac_coords are not numeric arrays"
    if lat.shape != (3, 3):
        return f"lattice must be 3x3, got shape {lat.shape}"
    if fc.shape != (len(species), 3):
        return f"frac_coords shape {fc.shape} does not match {len(species)} species"
    if not (np.isfinite(lat).all() and np.isfinite(fc).all()):
        return "lattice or frac_coords has NaN/inf"
    if abs(np.linalg.det(lat)) < 1e-8:
        return "degenerate lattice (zero volume)"
    for sp in species:
        if not (isinstance(sp, str) or (isinstance(sp, dict) and sp)):
            return f"bad species entry {sp!r} (need a symbol or a {{symbol: occupancy}} mapping)"
    return None


def _bad_id(raw: Any) -> str | None:
    """Why a record's ``id`` cannot name a structure (null, empty, not a string/integer), or None."""
    if raw is None:
        return "'id' is null"
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        return f"'id' must be a string, got {type(raw).__name__} {raw!r}"[:200]
    if isinstance(raw, str) and not raw.strip():
        return f"'id' is empty ({raw!r})"
    return None


def _json_line_id(where: str, line: bytes) -> str:
    """The id :func:`_parse_json_line` gives a line (``where`` when it has no usable one)."""
    try:
        rec = _loads(line)
    except _JSONError:
        m = _ID_IN_LINE.search(line)  # unparsable: the id the line seems to hold, if any
        return m.group(1).decode("utf-8", "replace") if m else where
    ok = isinstance(rec, dict) and "id" in rec and not _bad_id(rec["id"])
    return str(rec["id"]) if ok else where


def _parse_json_line(where: str, line: bytes) -> Entry:
    try:
        rec = _loads(line)
    except _JSONError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return BadEntry(_json_line_id(where, line), f"{where}: not valid JSON ({msg})")
    if not isinstance(rec, dict):
        return BadEntry(where, f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "id" not in rec:
        return BadEntry(where, f"{where}: record has no 'id'")
    why_id = _bad_id(rec["id"])
    if why_id:
        return BadEntry(where, f"{where}: {why_id}")
    sid = str(rec["id"])
    missing = [k for k in ("lattice", "species", "frac_coords") if k not in rec]
    if missing:
        return BadEntry(sid, f"{where}: missing keys {missing}")
    why = _check_arrays(sid, rec["lattice"], rec["species"], rec["frac_coords"])
    if why:
        return BadEntry(sid, f"{where}: {why}")
    formula = rec.get("formula")
    if not formula:
        try:
            formula = _reduced_formula(rec["species"])
        except Exception as e:  # noqa: BLE001
            return BadEntry(sid, f"{where}: bad species ({e})")
    return Record(sid, str(formula), rec["lattice"], rec["species"], rec["frac_coords"])


def record_of_structure(sid: str, structure) -> Record:
    """Record of a pymatgen Structure; disordered sites become {symbol: occupancy} mappings."""
    from xrdmatch.simulation.xrd import element_occupancies

    species: list = []
    for site in structure:
        if site.is_ordered:
            species.append(site.specie.symbol)
        else:
            occ = element_occupancies(site)  # mixed valence (Mn3+ 0.5 + Mn4+ 0.5) is Mn 1.0
            species.append(next(iter(occ)) if len(occ) == 1 and abs(sum(occ.values()) - 1.0) < 1e-9 else occ)
    return Record(
        id=sid,
        formula=structure.composition.reduced_formula,
        lattice=structure.lattice.matrix.tolist(),
        species=species,
        frac_coords=structure.frac_coords.tolist(),
    )


def _parse_file(name: str, data: bytes) -> Entry:
    sid = Path(name).stem
    if not data.strip():
        return BadEntry(sid, f"{name}: empty file")
    if name.lower().endswith(".cif"):
        from xrdmatch.platform.cif import structure_blocks

        blocks = len(structure_blocks(data.decode("utf-8", errors="replace")))
        if blocks > 1:  # pymatgen would read the first and drop the rest without a word
            return BadEntry(sid, f"{name}: holds {blocks} structures (CIF data blocks with atom sites); a "
                                 "database folder takes one structure per file: split it")
    from xrdmatch.platform.structure_files import StructureTooLarge, read_structure

    # from_file picks the format from the name (CIF, POSCAR/CONTCAR, .vasp, pymatgen JSON, ...)
    with tempfile.TemporaryDirectory(prefix="xrdmatch-") as tmp:
        f = Path(tmp) / name
        f.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = read_structure(f)
        except StructureTooLarge as e:
            return BadEntry(sid, f"{name}: refused before parsing: {e}")
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad entry
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "at least 1 site" in msg:
                return BadEntry(sid, f"{name}: structure has no sites")
            return BadEntry(sid, f"{name}: unreadable by pymatgen ({type(e).__name__}: {msg})")
    if len(s) == 0:
        return BadEntry(sid, f"{name}: structure has no sites")
    return record_of_structure(sid, s)


def parse_raw(item: RawItem) -> Entry:
    """One raw item -> Record or BadEntry; never raises for bad input."""
    tag = item[0]
    if tag == "json":
        return _parse_json_line(item[1], item[2])
    if tag == "file":
        return _parse_file(item[1], item[2])
    if tag == "entry":
        return item[1]
    raise ValueError(f"unknown raw item tag {tag!r}")


def raw_item_id(item: RawItem) -> tuple[str, str]:
    """(id, where) of a raw item without building its structure: that may be what kills a worker,
    and the XRD stage must still name the entry that did, by the id the parser gives it."""
    tag = item[0]
    if tag == "json":
        return _json_line_id(item[1], item[2]), item[1]
    if tag == "file":
        return Path(item[1]).stem, item[1]
    if tag == "entry":
        return item[1].id, item[1].id
    raise ValueError(f"unknown raw item tag {tag!r}")


def iter_entries(path: str | os.PathLike[str], limit: int | None = None) -> Iterator[Entry]:
    """Every entry of a database (streamed): a Record, or a BadEntry saying why not."""
    for _, items in iter_raw_batches(path, 256, limit):
        for item in items:
            yield parse_raw(item)
