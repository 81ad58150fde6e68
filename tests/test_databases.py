"""Database readers: shipped JSONL, folders of CIF/POSCAR, ASE databases; bad entries become BadEntry."""

from __future__ import annotations

import gzip
import itertools
import json
import re

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
    raw_item_id,
)


def _raw_ids(path) -> list[str]:
    """The ids the XRD stage names entries by before parsing them (e.g. one that kills a worker)."""
    return [raw_item_id(item)[0] for _, items in iter_raw_batches(path, 100) for item in items]


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
    assert _raw_ids(path) == [e.id for e in entries]  # unparsed, each line goes by the same name


def test_folder_of_cif_and_poscar(tmp_path, first_records):
    from pymatgen.core import Lattice, Structure

    s0, s1 = _structure(first_records[0]), _structure(first_records[1])
    s0.to(filename=str(tmp_path / "a-first.cif"))
    s1.to(filename=str(tmp_path / "POSCAR_b"), fmt="poscar")
    disordered = Structure(Lattice.cubic(4.2), [{"Li": 0.5, "Na": 0.5}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    disordered.to(filename=str(tmp_path / "c-disordered.cif"))
    (tmp_path / "d-empty.cif").write_text("")
    (tmp_path / "e-garbage.cif").write_text("this is not a CIF\n")
    two = s0.to(fmt="cif") + "\n" + s1.to(fmt="cif").replace("data_", "data_second_", 1)
    (tmp_path / "g-two-blocks.cif").write_text(two)  # pymatgen alone would read the first block only
    # a journal's CIF: a metadata block without atoms, then the one structure
    (tmp_path / "h-journal.cif").write_text("data_global\n_journal_name_full 'J. Chem.'\n_journal_year 2024\n\n"
                                            + s0.to(fmt="cif"))
    (tmp_path / "POSCAR_f").write_text("no sites\n1.0\n4 0 0\n0 4 0\n0 0 4\nLi\n0\nDirect\n")
    (tmp_path / ".hidden").write_text("ignored")

    entries = list(iter_entries(tmp_path))
    assert database_kind(tmp_path) == "folder"
    assert [e.id for e in entries] == ["POSCAR_b", "POSCAR_f", "a-first", "c-disordered", "d-empty", "e-garbage",
                                       "g-two-blocks", "h-journal"]
    by = {e.id: e for e in entries}
    assert isinstance(by["a-first"], Record) and by["a-first"].formula == s0.composition.reduced_formula
    assert len(by["a-first"].species) == len(s0)
    np.testing.assert_allclose(by["POSCAR_b"].lattice, s1.lattice.matrix, atol=1e-6)
    assert by["c-disordered"].species[0] == {"Li": 0.5, "Na": 0.5}
    assert by["d-empty"].reason == "d-empty.cif: empty file"
    assert "unreadable by pymatgen" in by["e-garbage"].reason
    assert by["POSCAR_f"].reason == "POSCAR_f: structure has no sites"
    assert "holds 2 structures (CIF data blocks with atom sites)" in by["g-two-blocks"].reason
    assert isinstance(by["h-journal"], Record) and by["h-journal"].formula == s0.composition.reduced_formula
    np.testing.assert_allclose(by["h-journal"].lattice, s0.lattice.matrix, atol=1e-6)
    assert count_entries(tmp_path) == 8
    assert _raw_ids(tmp_path) == [e.id for e in entries]


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
    assert _raw_ids(path) == [e.id for e in entries]


def test_a_file_that_is_not_an_ase_database_is_refused_and_left_as_it_was(tmp_path):
    """ASE's connect creates its tables in an empty or foreign file: it is refused before, naming
    it, and `xrdmatch xrd` writes nothing."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    for name, content, why in (("empty.db", b"", "empty file, not an ASE database"),
                               ("notes.db", b"my notes, not SQLite\n", "not an ASE (SQLite) database")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DatabaseError, match=re.escape(why)):
            list(iter_entries(path))
        with pytest.raises(DatabaseError, match=re.escape(why)):
            count_entries(path)
        out = tmp_path / f"out-{name}"
        res = CliRunner().invoke(app, ["xrd", "--db", str(path), "--out", str(out), "--no-progress"])
        assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
        assert path.read_bytes() == content and not out.exists()


def test_unusable_database_paths(tmp_path):
    with pytest.raises(DatabaseError, match="not found"):
        list(iter_entries(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatabaseError, match="unknown database kind"):
        list(iter_entries(tmp_path / "x.csv"))


# ----------------------------------------------------------------------------- broken files and bad ids


def _jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _broken_databases(tmp_path, records):
    """A truncated .xz, a truncated .gz and a .gz whose deflate data is overwritten (real files)."""
    import lzma

    raw = _jsonl_bytes(records)
    xz = lzma.compress(raw)
    trunc_xz = tmp_path / "trunc.jsonl.xz"
    trunc_xz.write_bytes(xz[: len(xz) // 2])
    gz = gzip.compress(raw)
    trunc_gz = tmp_path / "trunc.jsonl.gz"
    trunc_gz.write_bytes(gz[: len(gz) // 2])
    bad = bytearray(gz)
    bad[len(bad) // 3: len(bad) // 3 + 64] = b"\0" * 64
    corrupt_gz = tmp_path / "corrupt.jsonl.gz"
    corrupt_gz.write_bytes(bytes(bad))
    not_gz = tmp_path / "notgz.jsonl.gz"
    not_gz.write_bytes(b"\x1f\x8b" + b"this is not gzip data" * 10)
    return [trunc_xz, trunc_gz, corrupt_gz, not_gz]


def test_truncated_or_corrupt_compressed_database_names_the_file_and_line(tmp_path, first_records):
    for path in _broken_databases(tmp_path, first_records):
        for read in (lambda: list(iter_entries(path)), lambda: count_entries(path),
                     lambda: list(iter_raw_batches(path, 2))):
            with pytest.raises(DatabaseError, match="truncated or corrupt compressed file") as ei:
                read()
            msg = str(ei.value)
            assert str(path) in msg and ("after line" in msg or "before the first line" in msg), msg
    # the line reached is the last whole line: every line before it was read, none after
    import lzma

    raw = _jsonl_bytes(first_records)
    xz = lzma.compress(raw)
    path = tmp_path / "cut.jsonl.xz"
    path.write_bytes(xz[:-12])  # only the stream footer is missing: every line decodes, the end does not
    with pytest.raises(DatabaseError, match=rf"after line {len(first_records)}\b"):
        list(iter_raw_batches(path, 100))
    seen = []
    with pytest.raises(DatabaseError):
        for _, items in iter_raw_batches(path, 1):
            seen += [json.loads(it[2])["id"] for it in items]
    assert seen == [r["id"] for r in first_records]


def test_xrd_cli_reports_a_truncated_database_in_one_line_and_writes_no_pattern(tmp_path, first_records):
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    for path in _broken_databases(tmp_path, first_records):
        out = tmp_path / f"out-{path.name}"
        res = CliRunner().invoke(app, ["xrd", "--db", str(path), "--out", str(out), "--batch-size", "500",
                                       "--no-progress"])
        assert res.exit_code == 2, res.output
        err = res.output.strip()
        assert "Aborted" not in err and "Traceback" not in err
        assert err.startswith(f"error: {path}: truncated or corrupt compressed file"), err
        assert len(err.splitlines()) == 1, err
        assert not list(out.glob("shards/*.parquet")) and not (out / "errors.parquet").exists()


def test_null_empty_and_non_string_ids_are_error_entries(tmp_path, first_records):
    good = first_records[0]
    lines = [
        json.dumps({**good, "id": None}),
        json.dumps({**good, "id": ""}),
        json.dumps({**good, "id": "   "}),
        json.dumps({**good, "id": ["mp-1"]}),
        json.dumps({**good, "id": True}),
        json.dumps({**good, "id": 1234}),
        json.dumps(good),
    ]
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(lines) + "\n")
    entries = list(iter_entries(path))
    assert [e.id for e in entries] == ["ids.jsonl:1", "ids.jsonl:2", "ids.jsonl:3", "ids.jsonl:4", "ids.jsonl:5",
                                       "1234", good["id"]]
    assert _raw_ids(path) == [e.id for e in entries]  # named the same before parsing
    assert entries[0].reason == "ids.jsonl:1: 'id' is null"
    assert "'id' is empty" in entries[1].reason and "'id' is empty" in entries[2].reason
    assert "'id' must be a string" in entries[3].reason and "'id' must be a string" in entries[4].reason
    assert isinstance(entries[5], Record) and isinstance(entries[6], Record)
    assert not any(e.id in ("None", "") for e in entries)


def test_an_unparsed_line_goes_by_the_id_the_parser_gives_it(tmp_path, first_records):
    # a worker that dies on a line is reported by the line's id: the parser's, not the first
    # '"id": "..."' text in it (a nested id, an escaped quote, a number)
    good = first_records[0]
    lines = [json.dumps({"meta": {"id": "icsd-9"}, **good, "id": "mp-1"}),
             json.dumps({**good, "id": 'a"b'}),
             json.dumps({**good, "id": 123}),
             '{"id": "mp-cut", "lattice": [[1, 0',  # not JSON: the id it seems to hold
             json.dumps({**good, "id": None})]
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert _raw_ids(path) == [e.id for e in iter_entries(path)] == ["mp-1", 'a"b', "123", "mp-cut", "odd.jsonl:5"]


def test_a_file_name_that_is_not_utf8_gets_a_storable_id(tmp_path, first_records):
    """Python holds such names with surrogates, which no UTF-8 writer takes: the folder's cache key,
    the entry's id and its Parquet row must still work, and the other files be read."""
    import os

    from xrdmatch.platform.patterns import encode_shard

    folder = tmp_path / "db"
    folder.mkdir()
    _structure(first_records[0]).to(filename=str(folder / "good.cif"))
    _structure(first_records[1]).to(filename=str(folder / "spare.cif"))
    os.rename(folder / "spare.cif", os.path.join(os.fsencode(folder), b"bad\xff.cif"))
    from xrdmatch.platform.paths import database_key

    assert database_key(folder)  # hashing the file names does not raise
    entries = list(iter_entries(folder))
    assert [e.id for e in entries] == ["bad\\xff", "good"] and all(isinstance(e, Record) for e in entries)
    assert _raw_ids(folder) == ["bad\\xff", "good"]
    encode_shard([e.id for e in entries], [e.formula for e in entries], np.zeros((2, 4501), np.float32), {})


@pytest.fixture()
def ray_one_cpu():
    import ray

    from xrdmatch.platform.ray_utils import WORKER_ENV

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": dict(WORKER_ENV)},
             logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_xrd_cli_warns_of_duplicate_ids_and_fails_when_no_pattern_is_computed(ray_one_cpu, tmp_path, first_records):
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    a, b = first_records[0], first_records[1]
    dup = tmp_path / "dup.jsonl"
    flat = {**a, "lattice": [[1, 0, 0], [2, 0, 0], [0, 0, 1]]}  # an error row under a's id: a duplicate too
    dup.write_text("\n".join(json.dumps(r) for r in [a, b, {**a, "id": None}, a, {**b, "id": ""}, b, a, flat]) + "\n")
    res = CliRunner().invoke(app, ["xrd", "--db", str(dup), "--out", str(tmp_path / "o1"), "--workers", "1",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"warning: 4 entries (patterns or errors) repeat an id of an earlier entry of {dup}, e.g. " \
           f"{a['id']!r}, {b['id']!r}" in res.output
    assert "3 entries could not be used" in res.output
    assert "  dup.jsonl:3: 'id' is null\n" in res.output and "dup.jsonl:3: dup.jsonl:3" not in res.output  # named once
    errs = pq.read_table(tmp_path / "o1" / "errors.parquet").to_pylist()
    assert [(e["id"], e["reason"]) for e in errs][:2] == [("dup.jsonl:3", "dup.jsonl:3: 'id' is null"),
                                                          ("dup.jsonl:5", "dup.jsonl:5: 'id' is empty ('')")]
    assert errs[2]["id"] == a["id"] and "zero volume" in errs[2]["reason"]

    all_bad = tmp_path / "allbad.jsonl"
    all_bad.write_text("\n".join(json.dumps({**a, "id": i}) for i in (None, "")) + "\n")
    res = CliRunner().invoke(app, ["xrd", "--db", str(all_bad), "--out", str(tmp_path / "o2"), "--workers", "1",
                                   "--no-progress"])
    assert res.exit_code == 1, res.output
    assert (f"error: no pattern was computed: all 2 entries failed (see {tmp_path / 'o2' / 'errors.parquet'})"
            in res.output)
    assert len(pq.read_table(tmp_path / "o2" / "errors.parquet")) == 2  # the reasons are kept

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    res = CliRunner().invoke(app, ["xrd", "--db", str(empty), "--out", str(tmp_path / "o3"), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert f"error: no pattern was computed: {empty} has no entries" in res.output


def test_a_structure_file_that_names_code_is_refused_without_running_it(tmp_path, first_records):
    """pymatgen JSON decodes site properties with monty, which imports any @module and calls any
    @callable: such a file is refused (folder database, predict) and the module is never
    imported; a plain pymatgen JSON or YAML structure, site properties included, still reads."""
    import json
    import sys

    from xrdmatch.platform.predict import read_structures
    from xrdmatch.platform.structure_files import read_structure

    s = _structure(first_records[0])
    s.add_site_property("magmom", [0.0] * len(s))
    d = s.as_dict()
    evil = json.loads(json.dumps(d))
    evil["sites"][0]["properties"]["x"] = {"@module": "this", "@callable": "__name__"}  # `import this` prints
    (tmp_path / "evil.json").write_text(json.dumps(evil))
    (tmp_path / "plain.json").write_text(json.dumps(d))
    s.to(filename=str(tmp_path / "plain-y.yaml"))
    assert "this" not in sys.modules
    by = {e.id: e for e in iter_entries(tmp_path)}
    assert "names code outside pymatgen" in by["evil"].reason and "@callable" in by["evil"].reason
    with pytest.raises(ValueError, match="names code outside pymatgen"):
        read_structures(tmp_path / "evil.json")
    assert "this" not in sys.modules
    for name in ("plain", "plain-y"):
        assert isinstance(by[name], Record) and by[name].formula == s.composition.reduced_formula
    y = read_structure(tmp_path / "plain-y.yaml")
    assert y.composition == s.composition and list(y.site_properties["magmom"]) == [0.0] * len(s)


def test_a_structure_file_too_large_to_parse_is_an_error_entry_not_a_stall(tmp_path, first_records):
    """A folder database (the XRD stage, `validate submit` by id) refuses before parsing, naming the
    file, the count and the limit: a CIF block over 5,000 atom-site rows (pymatgen's parser takes
    time quadratic in them), a file over 20,000,000 bytes (not even read into the driver), and a
    small .cif.gz that holds more than that. The other files are read."""
    import random

    rng = random.Random(0)
    rows = "".join(f"S{k} Li {rng.random():.5f} {rng.random():.5f} {rng.random():.5f} 1\n" for k in range(5_001))
    (tmp_path / "big.cif").write_text(
        "data_big\n_cell_length_a 40\n_cell_length_b 40\n_cell_length_c 40\n_cell_angle_alpha 90\n"
        "_cell_angle_beta 90\n_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n_atom_site_label\n"
        "_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n"
        + rows)
    with open(tmp_path / "huge.vasp", "wb") as fh:
        fh.truncate(20_000_001)
    good = _structure(first_records[0]).to(fmt="cif")
    with gzip.open(tmp_path / "bomb.cif.gz", "wt") as fh:
        fh.write(good + ("#" * 99 + "\n") * 200_000)
    with gzip.open(tmp_path / "POSCAR_bomb.gz", "wt") as fh:  # not a CIF: pymatgen would decompress it whole
        fh.write(_structure(first_records[0]).to(fmt="poscar") + ("0.0 0.0 0.0\n" * 2_000_000))
    (tmp_path / "good.cif").write_text(good)
    by = {e.id: e for e in iter_entries(tmp_path)}
    assert by["POSCAR_bomb"].reason == "POSCAR_bomb.gz: refused before parsing: over 20,000,000 characters once " \
                                       "decompressed, the limit for a structure file"
    assert by["big"].reason == "big.cif: refused before parsing: CIF data block data_big has 5,001 atom-site rows, " \
                               "over the limit of 5,000"
    assert by["huge"].reason == "huge.vasp: refused before parsing: 20,000,001 bytes, over the limit of 20,000,000 " \
                                "bytes for a structure file"
    assert by["bomb.cif"].reason == "bomb.cif.gz: refused before parsing: over 20,000,000 characters once " \
                                    "decompressed, the limit for a structure file"
    assert isinstance(by["good"], Record) and by["good"].formula == first_records[0]["formula"]
