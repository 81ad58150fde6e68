"""Reading a structure file a user hands us (database folders, ``predict``, ``validate submit``)
without letting it run code.

pymatgen reads its JSON/YAML serialisation through monty's decoder, which imports any module a
``@module`` key names and calls what ``@callable`` names (site properties go through it). A
structure file is data: such files are parsed here, refused when they name anything outside
pymatgen, and only then handed to ``Structure.from_dict``. CIFs go to pymatgen's CifParser
(:func:`parse_cif`), every other format to ``Structure.from_file``.

Nor may one file stall the batch it is in: a file over ``MAX_STRUCTURE_FILE_BYTES``, and a CIF
whose data block has more atom-site rows (or rows x symmetry operations) than
``MAX_CIF_SITES`` (``MAX_CIF_POSITIONS``), is refused with :class:`StructureTooLarge` before it is
parsed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path

class UnsafeStructureFile(ValueError):
    """A serialised structure that names code to import or call."""


class StructureTooLarge(ValueError):
    """A structure file over one of the size limits below; the message gives the count and the
    limit (the caller adds the file name)."""


#: Refuse structure files (decompressed, for a CIF) above this many bytes before reading them,
#: and CIF data blocks with more atom-site rows than ``MAX_CIF_SITES`` or more rows x symmetry
#: operations (the positions pymatgen generates before merging duplicates) than
#: ``MAX_CIF_POSITIONS``: pymatgen's CIF parser takes time quadratic in them (P1: 0.8 s at 2,000
#: sites, 4 s at 5,000, 17 s at 10,000; a 2 MB CIF of 60,000 sites never finished), so one such
#: file would stall a whole ``predict`` batch, XRD stage or ``validate submit``. The shipped
#: database's largest cell has 688 sites (37 kB as a P1 CIF, parsed in 0.13 s); written with its
#: symmetry, 3,000 of its structures need at most 1,920 rows x operations.
MAX_STRUCTURE_FILE_BYTES = 20_000_000
MAX_CIF_SITES = 5_000
MAX_CIF_POSITIONS = 20_000


def check_file_size(path: str | os.PathLike[str]) -> None:
    """StructureTooLarge when the file is over ``MAX_STRUCTURE_FILE_BYTES`` (read from its size on disk)."""
    size = os.stat(path).st_size
    if size > MAX_STRUCTURE_FILE_BYTES:
        raise StructureTooLarge(f"{size:,} bytes, over the limit of {MAX_STRUCTURE_FILE_BYTES:,} bytes for a "
                                "structure file")


def read_text(path: str | os.PathLike[str], errors: str = "replace") -> str:
    """A (possibly compressed) structure file's text, refused (StructureTooLarge) once it passes
    ``MAX_STRUCTURE_FILE_BYTES``: a small .cif.gz can hold a huge CIF."""
    from monty.io import zopen

    check_file_size(path)
    with zopen(str(path), mode="rt", encoding="utf-8", errors=errors) as f:
        text = f.read(MAX_STRUCTURE_FILE_BYTES + 1)
    if len(text) > MAX_STRUCTURE_FILE_BYTES:
        raise StructureTooLarge(f"over {MAX_STRUCTURE_FILE_BYTES:,} characters once decompressed, the limit for a "
                                "structure file")
    return text


def _check_cif_size(text: str, parser) -> None:
    """StructureTooLarge naming the first data block whose atom-site rows, or rows x symmetry
    operations (as pymatgen's parser would read them), are over the limits."""
    from pymatgen.io.cif import CifFile

    for name, block in CifFile.from_str(text).data.items():
        xs = block.data.get("_atom_site_fract_x", block.data.get("_atom_site_Cartn_x"))
        rows = 0 if xs is None else 1 if isinstance(xs, str) else len(xs)
        if rows > MAX_CIF_SITES:
            raise StructureTooLarge(f"CIF data block data_{name} has {rows:,} atom-site rows, over the limit of "
                                    f"{MAX_CIF_SITES:,}")
        try:
            ops = len(parser.get_symops(block)) if rows else 1
        except Exception:  # noqa: BLE001 - unusable operations: pymatgen's own parse says so
            ops = 1
        if rows * ops > MAX_CIF_POSITIONS:
            raise StructureTooLarge(f"CIF data block data_{name} has {rows:,} atom-site rows x {ops} symmetry "
                                    f"operations = {rows * ops:,} positions, over the limit of {MAX_CIF_POSITIONS:,}")


#: pymatgen's own patterns for its serialised structures (``pymatgen.io.registry``).
SERIALISED = ("*.json*", "*.mson*", "*.yaml*", "*.yml*")


def foreign_objects(obj, where: str = "$") -> list[str]:
    """Places in a decoded document that would make monty import or call code outside pymatgen."""
    out: list[str] = []
    if isinstance(obj, dict):
        mod = obj.get("@module")
        if "@callable" in obj:
            out.append(f"{where}: @callable {obj.get('@callable')!r} of {mod!r}")
        elif isinstance(mod, str) and mod != "pymatgen" and not mod.startswith("pymatgen."):
            out.append(f"{where}: @module {mod!r}")
        for k, v in obj.items():
            out += foreign_objects(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += foreign_objects(v, f"{where}[{i}]")
    return out


#: A CIF site whose occupancies sum to at most this is rounding (3 x 0.334 = 1.002, common in
#: ICSD files), scaled down to 1 by pymatgen; above it the CIF is refused (two atoms on one site).
CIF_OCCUPANCY_TOLERANCE = 1.05
#: Blank lines, dropped before pymatgen reads a CIF: its block split (``^\s*data_``) rescans a run
#: of them from each of its lines (200,000 took 50 s), and it drops them itself before parsing.
_BLANK_LINES = re.compile(r"\n\s*\n")


def parse_cif(source: str | os.PathLike[str], text: bool = False):
    """The first structure of a CIF (a file, or its text); else ValueError with pymatgen's own
    reasons, which it only warns about before saying "no structures" (blocks without atoms, such
    as a journal's metadata block, are skipped as pymatgen does). StructureTooLarge, before the
    atoms are parsed, for a CIF over the size limits."""
    import warnings

    from pymatgen.io.cif import CifParser

    body = _BLANK_LINES.sub("\n", str(source) if text else read_text(source))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parser = CifParser.from_str(body, occupancy_tolerance=CIF_OCCUPANCY_TOLERANCE)
        _check_cif_size(body, parser)
        try:
            return parser.parse_structures(primitive=False, on_error="warn")[0]
        except ValueError as err:  # "Invalid CIF file with no structures!": say what pymatgen warned
            said = [" ".join(str(w.message).split()) for w in caught if issubclass(w.category, UserWarning)]
            why = [m for m in said if m.startswith("No structure parsed")] or said  # the per-block verdicts
            raise ValueError("; ".join(dict.fromkeys(why)) or str(err)) from None


#: Names monty's ``zopen`` (and so pymatgen) decompresses on the fly.
COMPRESSED = ("*.gz", "*.bz2", "*.xz", "*.lzma", "*.z")


def read_structure(path: str | os.PathLike[str]):
    """A pymatgen Structure from any file pymatgen reads; serialised ones checked first, and
    every file for its size (:class:`StructureTooLarge`) before it is parsed."""
    from pymatgen.core import Structure

    p = Path(path)
    name = p.name.lower()
    check_file_size(p)
    if fnmatch.fnmatch(name, "*.cif") or fnmatch.fnmatch(name, "*.mcif") or fnmatch.fnmatch(name, "*.cif.*"):
        return parse_cif(p)
    if not any(fnmatch.fnmatch(name, pat) for pat in SERIALISED):
        if any(fnmatch.fnmatch(name, pat) for pat in COMPRESSED):
            read_text(p)  # its decompressed size, before pymatgen decompresses it whole
        return Structure.from_file(str(p))
    text = read_text(p, errors="strict")
    if fnmatch.fnmatch(name, "*.json*") or fnmatch.fnmatch(name, "*.mson*"):
        data = json.loads(text)
    else:
        from ruamel.yaml import YAML

        data = YAML(typ="safe", pure=True).load(text)
    bad = foreign_objects(data)
    if bad:
        raise UnsafeStructureFile(f"{p.name}: names code outside pymatgen ({'; '.join(bad[:3])}); a structure file must "
                         "hold data only, so it is refused")
    if not isinstance(data, dict):
        raise ValueError(f"{p.name}: not a serialised pymatgen Structure (top level is {type(data).__name__})")
    return Structure.from_dict(data)
