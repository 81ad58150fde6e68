"""CIF data blocks, split as pymatgen splits them, so that every reader of a CIF (database
folders, ``xrdmatch predict``) counts the same structures in a file."""

from __future__ import annotations

import re

#: A CIF data block starts here (pymatgen's own split, ``CifFile.from_str``). Its ``^\s*`` is kept
#: within one line here: across lines it rescans a run of blank lines from each of its lines
#: (quadratic: 200,000 blank lines took 50 s), and the blocks found are the same.
_BLOCK = re.compile(r"^[^\S\n]*data_", flags=re.MULTILINE)
#: Data names of atom sites: a block without them holds no structure (e.g. ``data_global``).
_ATOMS = re.compile(r"^[^\S\n]*_atom_site_", flags=re.MULTILINE | re.IGNORECASE)


def structure_blocks(text: str) -> list[tuple[str, str]]:
    """(block name, text) of each data block that describes atom sites, in file order.

    Blocks without ``_atom_site_`` data names (a publication's ``data_global``, a powder pattern)
    describe no structure and are left out; duplicate block names are kept (pymatgen's CifFile
    would let the last one overwrite the others).
    """
    out = []
    for chunk in _BLOCK.split(f"x\n{text}")[1:]:
        if _ATOMS.search(chunk):
            header = chunk.split(None, 1)[0] if chunk.strip() else ""
            out.append((header, f"data_{chunk}"))
    return out
