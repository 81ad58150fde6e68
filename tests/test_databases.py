"""Database readers: shipped JSONL, folders of CIF/POSCAR, ASE databases; bad entries become BadEntry."""

from __future__ import annotations

import gzip
import itertools
import json

import numpy as np
import pytest

from xrdmatch.platform.data import iter_records
from xrdmatch.platform.databases import (
    BadEntry,
    DatabaseError,
    Record,
    count_entries,
    database_kind,
    iter_entries,
    iter_raw_batches,
)


@pytest.fixture(scope="module")
def first_records(database_path):
    return list(itertools.islice(iter_records(database_path), 12))


def _structure(rec):
    from xrdmatch.platform.data import structure_from_record

    return structure_from_record(rec)


def test_shipped_jsonl_streams_records_in_order(database_path, first_records):
    entries = list(iter_entries(database_path, limit=12))
    assert [e.id for e in entries] == [r["id"] for r in first_records]
    assert all(isinstance(e, Record) for e in entries)
    assert entries[3].species == first_records[3]["species"]
    assert entries[3].formula == first_records[3]["formula"]
    assert count_entries(database_path, limit=12) == 12


def test_batches_are_deterministic_and_skip_finished(database_path, first_records):
    batches = list(iter_raw_batches(database_path, 5, limit=12))
    assert [k for k, _ in batches] == [0, 1, 2]
    assert [len(items) for _, items in batches] == [5, 5, 2]
    # batch k holds entries [5k, 5k+5): the 7th entry is the 2nd item of batch 1
    assert json.loads(batches[1][1][1][2])["id"] == first_records[6]["id"]
    skipped = list(iter_raw_batches(database_path, 5, limit=12, skip={0, 2}))
    assert [k for k, _ in skipped] == [1]
    assert skipped[0][1] == batches[1][1]


def test_bad_jsonl_lines_become_error_entries(tmp_path, first_records):
    good = first_records[:2]
    lines = [
        json.dumps(good[0]),
        '{"id": "mp-broken", "formula": "Li", "lattice": [[1,0,0]',  # truncated JSON
        "",  # blank lines are not entries
        json.dumps({**good[1], "id": "mp-nosites", "species": [], "frac_coords": []}),
        json.dumps({"id": "mp-nolattice", "species": ["Li"], "frac_coords": [[0, 0, 0]]}),
        json.dumps({**good[1], "id": "mp-flat", "lattice": [[1, 0, 0], [2, 0, 0], [0, 0, 1]]}),
        "[1, 2, 3]",
        json.dumps(good[1]),
    ]
    path = tmp_path / "db.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    entries = list(iter_entries(path))
    assert [e.id for e in entries] == [
        good[0]["id"], "mp-broken", "mp-nosites", "mp-nolattice", "mp-flat", "db.jsonl.gz:7", good[1]["id"]
    ]
    bad = {e.id: e.reason for e in entries if isinstance(e, BadEntry)}
    assert "db.jsonl.gz:2" in bad["mp-broken"] and "not valid JSON" in bad["mp-broken"]
    assert "no sites" in bad["mp-nosites"]
    assert "missing keys ['lattice']" in bad["mp-nolattice"]
    assert "zero volume" in bad["mp-flat"]
    assert "JSON object" in bad["db.jsonl.gz:7"]
    assert isinstance(entries[0], Record) and isinstance(entries[-1], Record)


def test_folder_of_cif_and_poscar(tmp_path, first_records):
    from pymatgen.core import Lattice, Structure

    s0, s1 = _structure(first_records[0]), _structure(first_records[1])
    s0.to(filename=str(tmp_path / "a-first.cif"))
    s1.to(filename=str(tmp_path / "POSCAR_b"), fmt="poscar")
    disordered = Structure(Lattice.cubic(4.2), [{"Li": 0.5, "Na": 0.5}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    disordered.to(filename=str(tmp_path / "c-disordered.cif"))
    (tmp_path / "d-empty.cif").write_text("")
    (tmp_path / "e-garbage.cif").write_text("this is not a CIF\n")
    (tmp_path / "POSCAR_f").write_text("no sites\n1.0\n4 0 0\n0 4 0\n0 0 4\nLi\n0\nDirect\n")
    (tmp_path / ".hidden").write_text("ignored")

    entries = list(iter_entries(tmp_path))
    assert database_kind(tmp_path) == "folder"
    assert [e.id for e in entries] == ["POSCAR_b", "POSCAR_f", "a-first", "c-disordered", "d-empty", "e-garbage"]
    by = {e.id: e for e in entries}
    assert isinstance(by["a-first"], Record) and by["a-first"].formula == s0.composition.reduced_formula
    assert len(by["a-first"].species) == len(s0)
    np.testing.assert_allclose(by["POSCAR_b"].lattice, s1.lattice.matrix, atol=1e-6)
    assert by["c-disordered"].species[0] == {"Li": 0.5, "Na": 0.5}
    assert by["d-empty"].reason == "d-empty.cif: empty file"
    assert "unreadable by pymatgen" in by["e-garbage"].reason
    assert by["POSCAR_f"].reason == "POSCAR_f: structure has no sites"
    assert count_entries(tmp_path) == 6


def test_ase_database(tmp_path, first_records):
    import ase.db
    from ase import Atoms
    from pymatgen.io.ase import AseAtomsAdaptor

    path = tmp_path / "structures.db"
    with ase.db.connect(str(path)) as db:
        db.write(AseAtomsAdaptor.get_atoms(_structure(first_records[0])), mp_id=first_records[0]["id"])
        db.write(AseAtomsAdaptor.get_atoms(_structure(first_records[1])))
        db.write(Atoms())
        db.write(Atoms("Li", positions=[[0, 0, 0]]))
    entries = list(iter_entries(path))
    assert database_kind(path) == "ase"
    assert [e.id for e in entries] == [first_records[0]["id"], "2", "3", "4"]
    assert entries[0].species == first_records[0]["species"]
    np.testing.assert_allclose(entries[1].frac_coords, np.asarray(first_records[1]["frac_coords"]) % 1.0, atol=1e-6)
    assert entries[2].reason == "structure has no sites"
    assert "not a periodic crystal" in entries[3].reason
    assert count_entries(path) == 4


def test_unusable_database_paths(tmp_path):
    with pytest.raises(DatabaseError, match="not found"):
        list(iter_entries(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatabaseError, match="unknown database kind"):
        list(iter_entries(tmp_path / "x.csv"))
