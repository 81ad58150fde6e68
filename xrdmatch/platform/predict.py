"""``xrdmatch predict``: inputs of any kind -> patterns -> the registered pyfunc -> CSV rows.

Inputs (each path may be a folder: its files are taken in sorted order, recursively):
- structure files any format pymatgen reads (CIF, POSCAR/CONTCAR, vasprun.xml, ...), else ASE
  (extxyz with several frames -> one row per frame; never for a CIF that pymatgen refuses):
  simulated Cu K-alpha stick pattern; a CIF with several structure data blocks -> one row per
  block (``<stem>#<i>``, like frames), a block pymatgen refuses -> an error row for that block;
- a JSONL database in the shipped format (``.jsonl``, ``.jsonl.xz/.gz/.bz2``): one row per record;
- measured powder scans (``.xy .xye .csv .txt .dat``: 2-theta, intensity) -> sticks
  (see :mod:`xrdmatch.platform.measured`), ``wavelength`` applies to these.

A bad input yields a row with ``error`` and no probability; the rest are predicted.
Nothing read from an input is unpickled.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from xrdmatch.config import MeasuredConfig
from xrdmatch.platform.measured import MEASURED_SUFFIXES, MeasuredPatternError, measured_pattern

CSV_COLUMNS = ["source", "id", "p_superionic", "p_std", "superionic", "error"]
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".jsonl.bz2")
#: Closest two atoms of an input structure may be (Angstrom, periodic images included): below
#: this they overlap (the shortest bond in nature, H-H, is 0.74 A) and the structure is refused.
MIN_DISTANCE = 0.5
#: Occupancy sums up to 1 + this count as split sites (rounded CIF occupancies), not overlaps.
_OCC_TOL = 0.05


@dataclass
class Item:
    """One thing to predict: where it came from, its id, its pattern or why there is none."""

    source: str
    id: str
    pattern: np.ndarray | None = None
    error: str | None = None


def _short(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def overlap_error(structure, min_distance: float = MIN_DISTANCE) -> str | None:
    """Why a pymatgen structure has overlapping atoms, or None.

    Two sites (periodic images included) closer than ``min_distance`` overlap unless their
    occupancies sum to at most 1 (+ ``_OCC_TOL``): split sites of a disordered crystal are fine.
    """
    if len(structure) == 0:
        return None
    centers, points, _images, dists = structure.get_neighbor_list(r=min_distance, exclude_self=True)
    if len(dists) == 0:
        return None
    occ = np.array([float(site.species.num_atoms) for site in structure])
    bad = np.flatnonzero(occ[centers] + occ[points] > 1.0 + _OCC_TOL)
    if len(bad) == 0:
        return None
    k = bad[int(np.argmin(dists[bad]))]
    i, j = int(centers[k]), int(points[k])
    return (f"atoms overlap: {structure[i].species_string} site {i} and {structure[j].species_string} site {j} "
            f"are {float(dists[k]):.3f} A apart (< {min_distance:g} A)")


def _pattern(structure, source: str, sid: str) -> Item:
    from xrdmatch.simulation.xrd import XRDError, check_lattice, xrd_pattern

    try:
        if len(structure) == 0:
            return Item(source, sid, error="structure has no sites")
        try:  # the engine's own refusal, before the overlap check's memory grows with the cell
            check_lattice(structure.lattice.matrix)
        except XRDError as e:
            return Item(source, sid, error=str(e))
        if why := overlap_error(structure):
            return Item(source, sid, error=f"{source} [{sid}]: {why}")
        x = np.asarray(xrd_pattern(structure), dtype=np.float32)
        if not np.isfinite(x).all() or not x.max() > 0:
            return Item(source, sid, error="simulated pattern is empty or not finite")
        return Item(source, sid, pattern=x)
    except Exception as e:  # one bad structure must not stop the others
        return Item(source, sid, error=f"XRD pattern failed: {_short(e)}")


def is_cif(path: Path) -> bool:
    """Whether pymatgen reads ``path`` as a CIF (its patterns ``*.cif*``, ``*.mcif*``: also .cif.gz)."""
    name = path.name.lower()
    return fnmatch.fnmatch(name, "*.cif*") or fnmatch.fnmatch(name, "*.mcif*")


def cif_blocks(path: Path) -> list[tuple[str, str]]:
    """(block name, text) of each data block of a CIF that describes atom sites (``cif.structure_blocks``)."""
    from xrdmatch.platform.cif import structure_blocks
    from xrdmatch.platform.structure_files import read_text

    return structure_blocks(read_text(path))  # StructureTooLarge past the size limit


def cif_items(path: Path) -> list[Item] | None:
    """One item per structure block of a CIF with several (ids ``<stem>#<i>``, like extxyz frames);
    None for a CIF with at most one, which :func:`read_structures` reads as before.

    Each block is parsed on its own, so a block pymatgen refuses becomes an error row naming the
    block and pymatgen's reason, and the other blocks are still predicted.
    """
    from xrdmatch.platform.structure_files import StructureTooLarge, parse_cif

    blocks = cif_blocks(path)
    if len(blocks) < 2:
        return None
    items = []
    for i, (header, text) in enumerate(blocks):
        sid = f"{path.stem}#{i}"
        try:
            structure = parse_cif(text, text=True)
        except StructureTooLarge as e:
            items.append(Item(str(path), sid, error=f"CIF data block #{i}: {e}"))
            continue
        except Exception as e:
            items.append(Item(str(path), sid, error=f"CIF data block #{i} (data_{header}) refused by pymatgen: "
                                                     f"{_short(e, 200)}"))
            continue
        items.append(_pattern(structure, str(path), sid))
    return items


def read_structures(path: Path) -> list[tuple[str, object]]:
    """(id, pymatgen Structure) of a structure file: pymatgen first, then ASE (all frames).

    A CIF that pymatgen refuses is refused (ValueError with pymatgen's reason): ASE's CIF
    reader would merge coinciding atoms and drop partial occupancies without a word, which is
    how a CIF with two atoms on one site used to be predicted as if nothing were wrong.
    Only a CIF's first structure is read here: :func:`items_for_file` gives a CIF with several
    data blocks to :func:`cif_items` first.
    """
    from xrdmatch.platform.structure_files import StructureTooLarge, UnsafeStructureFile, read_structure

    try:
        return [(path.stem or path.name, read_structure(path))]
    except UnsafeStructureFile as e:
        raise ValueError(str(e)) from None
    except StructureTooLarge as e:  # not for ASE either: refused before anything parses it
        raise ValueError(f"refused before parsing: {e}") from None
    except Exception as e_pmg:
        pmg_err = _short(e_pmg, 150)
    if path.suffix.lower() in (".cif", ".mcif"):
        raise ValueError(f"not readable as a structure: CIF refused by pymatgen ({pmg_err}), not read with "
                         "ASE, which would merge or drop what pymatgen refused") from None
    try:
        import ase.io
        from pymatgen.io.ase import AseAtomsAdaptor

        frames = ase.io.read(path, index=":")
        if not isinstance(frames, list):
            frames = [frames]
        if not frames:
            raise ValueError("no structures in file")
        if len(frames) == 1:
            return [(path.stem, AseAtomsAdaptor.get_structure(frames[0]))]
        return [(f"{path.stem}#{i}", AseAtomsAdaptor.get_structure(a)) for i, a in enumerate(frames)]
    except Exception as e_ase:
        raise ValueError(f"not readable as a structure (pymatgen: {pmg_err}; ASE: {_short(e_ase, 150)})") from None


def _jsonl_items(path: Path) -> list[Item]:
    from xrdmatch.platform.data import iter_jsonl_lines, structure_from_record

    items = []
    try:
        for n, line in iter_jsonl_lines(path):
            sid = f"line{n}"
            try:
                rec = json.loads(line)
                sid = str(rec.get("id", sid)) if isinstance(rec, dict) else sid
                items.append(_pattern(structure_from_record(rec), str(path), sid))
            except Exception as e:
                items.append(Item(str(path), sid, error=f"line {n}: bad record: {_short(e)}"))
    except Exception as e:  # unreadable / corrupt compressed file
        items.append(Item(str(path), path.name, error=f"cannot read JSONL: {_short(e)}"))
    if not items:
        items.append(Item(str(path), path.name, error="empty JSONL database"))
    return items


def items_for_file(path: Path, wavelength: str | float | None, measured_cfg: MeasuredConfig) -> list[Item]:
    from xrdmatch.platform.structure_files import StructureTooLarge

    name = path.name.lower()
    src = str(path)
    try:
        if path.stat().st_size == 0:
            return [Item(src, path.stem, error="empty file")]
    except OSError as e:
        return [Item(src, path.name, error=f"cannot read: {_short(e)}")]
    if name.endswith(JSONL_SUFFIXES):
        return _jsonl_items(path)
    if name.endswith(MEASURED_SUFFIXES):
        try:
            return [Item(src, path.stem, pattern=measured_pattern(path, wavelength, measured_cfg))]
        except MeasuredPatternError as e:
            return [Item(src, path.stem, error=str(e))]
        except Exception as e:
            return [Item(src, path.stem, error=f"measured pattern failed: {_short(e)}")]
    if is_cif(path):
        try:
            items = cif_items(path)
        except StructureTooLarge as e:
            return [Item(src, path.stem, error=f"refused before parsing: {e}")]
        except Exception as e:
            return [Item(src, path.stem, error=f"cannot read CIF: {_short(e)}")]
        if items is not None:
            return items
    try:
        structures = read_structures(path)
    except Exception as e:
        return [Item(src, path.stem, error=str(e))]
    return [_pattern(s, src, sid) for sid, s in structures]


def collect_items(inputs: list[str | os.PathLike[str]], wavelength: str | float | None = None,
                  measured_cfg: MeasuredConfig | None = None,
                  skip: str | os.PathLike[str] | None = None) -> list[Item]:
    """Every input (files, folders) -> items in input order. ``skip`` (predict's --out) is left out
    of folder walks: a CSV written into an input folder is not read back as a scan next time."""
    cfg = measured_cfg or MeasuredConfig()
    skipped = Path(skip).resolve() if skip is not None else None
    items: list[Item] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and f.resolve() != skipped)
            if not files:
                items.append(Item(str(p), p.name, error="folder has no files"))
            for f in files:
                items.extend(items_for_file(f, wavelength, cfg))
        elif p.is_file():
            items.extend(items_for_file(p, wavelength, cfg))
        else:
            items.append(Item(str(p), p.stem or p.name, error="no such file or folder"))
    return items


def load_model(model_uri: str, cfg=None):
    """The registered model (``models:/name@alias``, ``runs:/...``, a local path) as the pyfunc
    serves it, built from its weights (safetensors) and the decision rule in its MLmodel: no
    code or pickle shipped inside a model folder is run (whoever can move an alias could
    otherwise run code on the machine that predicts)."""
    from xrdmatch.config import Config
    from xrdmatch.platform.registry import decision_rule, ensemble_dir_of
    from xrdmatch.platform.pyfunc_model import XRDMatchPyfunc

    ens_dir = ensemble_dir_of(model_uri)
    threshold, vote_fraction, _ = decision_rule(ens_dir, cfg or Config())
    return _Served(XRDMatchPyfunc.from_ensemble(ens_dir, threshold, vote_fraction))


class _Served:
    """``.predict(frame)`` like a loaded pyfunc, on the model object itself."""

    def __init__(self, model) -> None:
        self.model = model

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.model.predict(None, frame)


def predict_items(model, items: list[Item], batch_size: int = 1024) -> pd.DataFrame:
    """Rows for the CSV: predictions for items with a pattern, errors for the others."""
    from xrdmatch.platform.pyfunc_model import patterns_frame

    rows = pd.DataFrame({
        "source": [it.source for it in items],
        "id": [it.id for it in items],
        "p_superionic": np.nan,
        "p_std": np.nan,
        "superionic": pd.array([pd.NA] * len(items), dtype="Int64"),
        "error": [it.error or "" for it in items],
    })
    ok = [i for i, it in enumerate(items) if it.pattern is not None and not it.error]
    for start in range(0, len(ok), batch_size):
        idx = ok[start : start + batch_size]
        out = model.predict(patterns_frame(np.stack([items[i].pattern for i in idx])))
        # models registered before nullable outputs give NaN, newer ones <NA>: both become NaN here
        rows.loc[idx, "p_superionic"] = out["p_superionic"].to_numpy(float, na_value=np.nan)
        rows.loc[idx, "p_std"] = out["p_std"].to_numpy(float, na_value=np.nan)
        rows.loc[idx, "superionic"] = pd.array(out["superionic"], dtype="Int64")
        if "error" in out:  # versions registered before the column existed raise instead
            rows.loc[idx, "error"] = out["error"].fillna("").astype(str).to_numpy()
    return rows[CSV_COLUMNS]


def predict_paths(model_uri: str, inputs: list[str | os.PathLike[str]], wavelength: str | float | None = None,
                  measured_cfg: MeasuredConfig | None = None) -> pd.DataFrame:
    """Load the model, read every input, predict: the CSV rows as a DataFrame."""
    items = collect_items(inputs, wavelength, measured_cfg)
    return predict_items(load_model(model_uri), items)
