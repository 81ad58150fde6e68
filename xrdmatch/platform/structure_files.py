"""Reading a structure file a user hands us (database folders, ``predict``, ``validate submit``)
without letting it run code.

pymatgen reads its JSON/YAML serialisation through monty's decoder, which imports any module a
``@module`` key names and calls what ``@callable`` names (site properties go through it). A
structure file is data: such files are parsed here, refused when they name anything outside
pymatgen, and only then handed to ``Structure.from_dict``. CIFs go to pymatgen's CifParser
(:func:`parse_cif`), every other format to ``Structure.from_file``.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

class UnsafeStructureFile(ValueError):
    """A serialised structure that names code to import or call."""


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


def parse_cif(source: str | os.PathLike[str], text: bool = False):
    """The first structure of a CIF (a file, or its text); else ValueError with pymatgen's own
    reasons, which it only warns about before saying "no structures" (blocks without atoms, such
    as a journal's metadata block, are skipped as pymatgen does)."""
    import warnings

    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parser = (CifParser.from_str(str(source), occupancy_tolerance=CIF_OCCUPANCY_TOLERANCE) if text
                  else CifParser(str(source), occupancy_tolerance=CIF_OCCUPANCY_TOLERANCE))
        try:
            return parser.parse_structures(primitive=False, on_error="warn")[0]
        except ValueError as err:  # "Invalid CIF file with no structures!": say what pymatgen warned
            said = [" ".join(str(w.message).split()) for w in caught if issubclass(w.category, UserWarning)]
            why = [m for m in said if m.startswith("No structure parsed")] or said  # the per-block verdicts
            raise ValueError("; ".join(dict.fromkeys(why)) or str(err)) from None


def read_structure(path: str | os.PathLike[str]):
    """A pymatgen Structure from any file pymatgen reads; serialised ones checked first."""
    from pymatgen.core import Structure

    p = Path(path)
    name = p.name.lower()
    if fnmatch.fnmatch(name, "*.cif") or fnmatch.fnmatch(name, "*.mcif") or fnmatch.fnmatch(name, "*.cif.*"):
        return parse_cif(p)
    if not any(fnmatch.fnmatch(name, pat) for pat in SERIALISED):
        return Structure.from_file(str(p))
    from monty.io import zopen

    with zopen(str(p), mode="rt", encoding="utf-8") as f:
        text = f.read()
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
