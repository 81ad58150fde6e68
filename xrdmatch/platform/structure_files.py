"""Reading a structure file a user hands us (database folders, ``predict``, ``validate submit``)
without letting it run code.

pymatgen reads its JSON/YAML serialisation through monty's decoder, which imports any module a
``@module`` key names and calls what ``@callable`` names (site properties go through it). A
structure file is data: such files are parsed here, refused when they name anything outside
pymatgen, and only then handed to ``Structure.from_dict``. Every other format goes to
``Structure.from_file`` as before.
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


def read_structure(path: str | os.PathLike[str]):
    """A pymatgen Structure from any file pymatgen reads; serialised ones checked first."""
    from pymatgen.core import Structure

    p = Path(path)
    name = p.name.lower()
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
