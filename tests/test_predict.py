"""`xrdmatch predict`: structures, JSONL, measured scans (any anode) -> CSV; bad inputs -> error rows."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xrdmatch import TWO_THETA_STEP
from xrdmatch.config import MeasuredConfig
from xrdmatch.platform.measured import MeasuredPatternError, measured_pattern, wavelength_angstrom


def _li2o():
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.61), ["Li", "O"], [[0.25, 0.25, 0.25], [0, 0, 0]])


def _scan(structure, path: Path, anode: str, lo: float, hi: float, step: float = 0.01, fwhm: float = 0.12,
          seed: int = 0) -> Path:
    """A diffractometer-like scan: pymatgen sticks broadened (Gaussian), on a sloping background, Poisson noise."""
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    pat = XRDCalculator(wavelength=anode).get_pattern(structure, two_theta_range=(lo, hi))
    tt = np.arange(lo, hi, step)
    y = 60.0 + 300.0 * np.exp(-tt / 25.0)
    sigma = fwhm / 2.355
    for x, h in zip(pat.x, pat.y):
        y += 20.0 * h * np.exp(-0.5 * ((tt - x) / sigma) ** 2)
    y = np.random.default_rng(seed).poisson(y).astype(float)
    np.savetxt(path, np.c_[tt, y], header=f"synthetic {anode} scan\n2theta counts", fmt="%.4f")
    return path


def _peaks(pattern: np.ndarray, min_height: float = 0.05) -> np.ndarray:
    return np.flatnonzero(pattern >= min_height) * TWO_THETA_STEP


@pytest.mark.parametrize("anode,lo,hi", [("CuKa", 10.0, 90.0), ("MoKa", 5.0, 40.0)])
def test_measured_scan_becomes_the_simulated_sticks(tmp_path, anode, lo, hi):
    from xrdmatch.simulation.xrd import xrd_pattern

    s = _li2o()
    ref = xrd_pattern(s)
    got = measured_pattern(_scan(s, tmp_path / f"li2o_{anode}.xy", anode, lo, hi), wavelength=anode)
    assert got.shape == ref.shape and got.dtype == np.float32 and got.max() == pytest.approx(1.0)
    want, have = _peaks(ref), _peaks(got)
    # every reflection above 5 % is found within 0.1 deg (Cu 2-theta), and nothing strong is invented
    assert len(have) == len(want), (want, have)
    np.testing.assert_allclose(have, want, atol=0.1)
    # relative heights survive background removal (and the Lorentz-polarization correction for Mo)
    h_ref = np.array([ref[int(round(t / TWO_THETA_STEP))] for t in want])
    h_got = np.array([got[int(round(t / TWO_THETA_STEP))] for t in have])
    np.testing.assert_allclose(h_got, h_ref, atol=0.08)


def test_wrong_wavelength_puts_peaks_elsewhere(tmp_path):
    from xrdmatch.simulation.xrd import xrd_pattern

    s = _li2o()
    path = _scan(s, tmp_path / "mo.xy", "MoKa", 5.0, 40.0)
    strongest = float(np.argmax(xrd_pattern(s))) * TWO_THETA_STEP  # (111) at 33.7 deg Cu
    as_cu = _peaks(measured_pattern(path))  # read as if Cu K-alpha: no conversion
    assert np.min(np.abs(as_cu - strongest)) > 1.0
    converted = _peaks(measured_pattern(path, "MoKa"))
    assert np.min(np.abs(converted - strongest)) < 0.1


def test_wavelength_names():
    assert wavelength_angstrom(None) == pytest.approx(1.54184)
    assert wavelength_angstrom("MoKa") == pytest.approx(0.71073)
    assert wavelength_angstrom("mo") == pytest.approx(0.71073)
    assert wavelength_angstrom("1.7890") == pytest.approx(1.789)
    for bad in ("Xx", "12"):
        with pytest.raises(MeasuredPatternError):
            wavelength_angstrom(bad)


def test_measured_errors_name_file_and_problem(tmp_path):
    cases = {
        "empty.xy": b"",
        "junk.xy": bytes(range(256)) * 4,
        "nan.xy": b"10 5\n10.02 nan\n",
        "text.csv": b"a,b\nc,d\n",
        "flat.dat": "\n".join(f"{10 + 0.02 * i:.2f} 100" for i in range(4000)).encode(),
        "short.txt": b"10 1\n20 5\n",
    }
    expect = {"empty.xy": "empty", "junk.xy": "binary", "nan.xy": "line 2: NaN", "text.csv": "no numeric",
              "flat.dat": "no peaks", "short.txt": "need at least"}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(MeasuredPatternError) as e:
            measured_pattern(p, cfg=MeasuredConfig())
        assert name in str(e.value) and expect[name] in str(e.value), str(e.value)


def test_a_scan_the_model_cannot_read_whole_is_refused_saying_why(tmp_path):
    """Too narrow (or not 2-theta in degrees), a gap, too coarse, two scans in one file: refused
    naming the file and the cause, never turned into a few sticks the model would score."""
    full = _scan(_li2o(), tmp_path / "full.xy", "CuKa", 10.0, 90.0)
    tt, y = np.loadtxt(full).T
    d = 1.5406 / (2 * np.sin(np.radians(tt / 2)))  # d-spacing (A) written where 2-theta belongs
    cases = {
        "narrow.xy": (np.c_[tt, y][(tt >= 60) & (tt < 70)], r"covers 2-theta 60-69.99 deg, less than min_span_deg 30"),
        "dspacing.xy": (np.c_[d[::-1], y[::-1]], r"not 2-theta in degrees \(d-spacing, Q, radians\)"),
        "gap.xy": (np.c_[tt, y][(tt < 30) | (tt > 70)], r"no points between 2-theta 29.99 and 70.0\d* deg"),
        "coarse.xy": (np.c_[tt, y][::100], r"a step of 1 deg Cu K-alpha, over max_step_deg 0.5"),
        "joined.xy": (np.r_[np.c_[tt, y], np.c_[tt, y + 1]], r"2-theta 10 deg appears twice with different "
                                                           r"intensities .* two scans in one file"),
    }
    for name, (rows, expect) in cases.items():
        np.savetxt(tmp_path / name, rows, fmt="%.6f")
        with pytest.raises(MeasuredPatternError, match=expect) as e:
            measured_pattern(tmp_path / name)
        assert name in str(e.value)
    np.savetxt(tmp_path / "twice.xy", np.r_[np.c_[tt, y], np.c_[tt, y]], fmt="%.4f")  # a row written twice: fine
    np.testing.assert_array_equal(measured_pattern(tmp_path / "twice.xy"), measured_pattern(full))


def _inputs(tmp_path: Path, database_path: Path) -> tuple[Path, list[str]]:
    import ase.io
    from pymatgen.io.ase import AseAtomsAdaptor

    d = tmp_path / "inputs"
    d.mkdir()
    s = _li2o()
    s.to(filename=str(d / "Li2O.cif"))
    (d / "vasp").mkdir()
    s.to(filename=str(d / "vasp" / "POSCAR"))
    a = AseAtomsAdaptor.get_atoms(s)
    b = a.copy()
    b.set_cell(a.cell * 1.03, scale_atoms=True)
    ase.io.write(d / "frames.extxyz", [a, b], format="extxyz")
    _scan(s, d / "li2o_mo.xy", "MoKa", 5.0, 40.0)
    with lzma.open(database_path, "rt") as fh:
        lines = [next(fh) for _ in range(3)]
    (d / "db.jsonl").write_text("".join(lines) + '{"id": "broken", "lattice": [[1, 0]]}\n')
    (d / "empty.cif").write_bytes(b"")
    (d / "junk.cif").write_bytes(bytes(range(256)) * 8)
    (d / "nan.xy").write_text("10 1\n10.02 nan\n")
    (d / "flat.xy").write_text("\n".join(f"{10 + 0.02 * i:.2f} 100" for i in range(4000)))
    good = ["Li2O", "POSCAR", "frames#0", "frames#1", "li2o_mo"] + [json.loads(x)["id"] for x in lines]
    return d, good


def test_predict_cli_mixed_inputs_agree_with_pyfunc(mlflow_registry, tmp_path, database_path, monkeypatch):
    import mlflow
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.platform.data import iter_structures
    from xrdmatch.platform.pyfunc_model import patterns_frame
    from xrdmatch.simulation.xrd import xrd_pattern

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d, good = _inputs(tmp_path, database_path)
    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(app, ["predict", "--dir", str(mlflow_registry.run_dir), str(d),
                                   str(tmp_path / "missing.cif"), "--wavelength", "MoKa", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out, keep_default_na=False, dtype={"id": str})
    assert list(df.columns) == ["source", "id", "p_superionic", "p_std", "superionic", "error"]
    ok = df[df["error"] == ""]
    bad = df[df["error"] != ""].set_index("id")
    assert sorted(ok["id"]) == sorted(good)
    assert set(bad.index) == {"empty", "junk", "nan", "flat", "broken", "missing"}
    assert "line 4: bad record" in bad.loc["broken", "error"]
    assert "empty file" in bad.loc["empty", "error"]
    assert "not readable as a structure" in bad.loc["junk", "error"]
    assert "NaN" in bad.loc["nan", "error"] and "no peaks" in bad.loc["flat", "error"]
    assert "no such file" in bad.loc["missing", "error"]
    assert (bad[["p_superionic", "p_std", "superionic"]] == "").all().all()
    p = ok["p_superionic"].astype(float)
    assert ((p >= 0) & (p <= 1)).all() and set(ok["superionic"].astype(int)) <= {0, 1}

    # the same numbers straight from the registered pyfunc on independently computed patterns
    s = _li2o()
    first_id, first = next(iter_structures(d / "db.jsonl"))
    X = np.stack([xrd_pattern(s), measured_pattern(d / "li2o_mo.xy", "MoKa"), xrd_pattern(first)])
    model = mlflow.pyfunc.load_model(f"models:/{mlflow_registry.cfg.tracking.registry_name}@champion")
    direct = model.predict(patterns_frame(X))
    by_id = ok.set_index("id")
    for row, sid in enumerate(["Li2O", "li2o_mo", first_id]):
        assert float(by_id.loc[sid, "p_superionic"]) == pytest.approx(direct["p_superionic"][row], rel=1e-6)
        assert float(by_id.loc[sid, "p_std"]) == pytest.approx(direct["p_std"][row], rel=1e-5, abs=1e-9)
        assert int(by_id.loc[sid, "superionic"]) == int(direct["superionic"][row])
    # the same crystal read by pymatgen (CIF) and by ASE (extxyz frame 0) gives the same prediction
    assert by_id.loc["frames#0", "p_superionic"] == by_id.loc["Li2O", "p_superionic"]


def test_predict_cli_fails_only_when_everything_fails(mlflow_registry, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    junk = tmp_path / "a.cif"
    junk.write_text("data_nothing\n")
    out = tmp_path / "p.csv"
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--dir", str(mlflow_registry.run_dir), str(junk), "--out", str(out)])
    assert res.exit_code == 1
    assert pd.read_csv(out)["error"].notna().all()
    res = runner.invoke(app, ["predict", "--dir", str(mlflow_registry.run_dir), str(junk), "--wavelength", "Xx"])
    assert res.exit_code == 2 and "unknown wavelength" in res.output
    res = runner.invoke(app, ["predict", "--dir", str(tmp_path / "empty_run"), str(junk)])
    assert res.exit_code == 2 and "cannot load model models:/xrdmatch-superionic@champion" in res.output


def test_a_model_uri_with_a_password_is_masked_in_what_predict_prints(mlflow_registry, tmp_path, monkeypatch):
    """MLflow reads user:password@ in sftp:// or http(s):// model URIs: the lines naming the model
    show user:***@host, also when the model cannot be loaded (the error may repeat the URI)."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cif = tmp_path / "Li2O.cif"
    _li2o().to(filename=str(cif))
    runner = CliRunner()
    for uri, code, shown in ((f"file://u:s3cret@localhost{mlflow_registry.ens_b}", 0, f"with file://u:***@localhost{mlflow_registry.ens_b}"),
                             ("sftp://u:s3cret@127.0.0.1:1/models/m", 2, "error: cannot load model sftp://u:***@127.0.0.1:1/models/m: ")):
        res = runner.invoke(app, ["predict", "--dir", str(mlflow_registry.run_dir), str(cif), "--model", uri])
        assert res.exit_code == code and shown in res.output and "s3cret" not in res.output, res.output


def test_an_unreadable_tracking_store_is_one_line_in_predict_and_ui(tmp_path, monkeypatch):
    """A run directory whose mlflow.db is not a database: predict and ui say so in one line naming
    the store, exit 1, as `xrdmatch models` does, not with a traceback (ui never starts a server)."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("os.execve", lambda *a: pytest.fail("ui started a server on an unreadable store"))
    db = tmp_path / "run" / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"x" * 4096)
    cif = tmp_path / "Li2O.cif"
    _li2o().to(filename=str(cif))
    for args in (["predict", str(cif)], ["ui"]):
        res = CliRunner().invoke(app, [*args, "--dir", str(tmp_path / "run")])
        assert res.exit_code == 1, res.output
        assert res.output.strip() == f"error: tracking store sqlite:///{db}: (sqlite3.DatabaseError) file is not a database"


# --- bad-input review: --out, decimal-comma scans, non-positive scans, overlapping atoms ---


def test_predict_cli_refuses_unusable_out_before_any_work(tmp_path, monkeypatch):
    """A directory (or a path under a file) as --out: exit 2 naming it, before the model is even looked up."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = _li2o()
    s.to(filename=str(tmp_path / "Li2O.cif"))
    outdir = tmp_path / "results"
    outdir.mkdir()
    (tmp_path / "afile").write_text("x")
    runner = CliRunner()
    for out, why in ((outdir, "is a directory"), (tmp_path / "afile" / "p.csv", "is not a directory")):
        # the run dir has no model: before the fix this got as far as "cannot load model"
        res = runner.invoke(app, ["predict", "--dir", str(tmp_path / "no_model_run"), str(tmp_path / "Li2O.cif"),
                                  "--out", str(out)])
        assert res.exit_code == 2, res.output
        assert f"--out {out}" in res.output and why in res.output, res.output
        assert "cannot load model" not in res.output
    assert list(outdir.iterdir()) == []


def test_predict_refuses_an_out_that_is_an_input_and_skips_it_in_folders(tmp_path, monkeypatch):
    """``predict scan.csv -o scan.csv`` would overwrite the scan: exit 2 before any work. An --out
    written into an input folder is not read back as an input on the next run."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app
    from xrdmatch.platform.predict import collect_items

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = _scan(_li2o(), scans / "li2o.csv", "CuKa", 10.0, 90.0)
    before = scan.read_bytes()
    for inputs in ([str(scan)], [str(tmp_path / "x.cif"), str(scans / ".." / "scans" / "li2o.csv")], [str(tmp_path)]):
        res = CliRunner().invoke(app, ["predict", "--dir", str(tmp_path / "no_model_run"), *inputs,
                                       "--out", str(scan)])
        assert res.exit_code == 2, res.output
        assert f"--out {scan} is one of the inputs" in res.output and "cannot load model" not in res.output
        assert scan.read_bytes() == before
    out = scans / "predictions.csv"
    out.write_text("source,id,p_superionic,p_std,superionic,error\n")  # the CSV of an earlier run
    assert [it.id for it in collect_items([scans], skip=out)] == ["li2o"]
    res = CliRunner().invoke(app, ["predict", "--dir", str(tmp_path / "no_model_run"), str(scans), "--out", str(out)])
    assert res.exit_code == 2 and "cannot load model" in res.output, res.output  # allowed: on to the model
    assert sorted(it.id for it in collect_items([scans])) == ["li2o", "predictions"]


def _semicolon_decimal_comma(src: Path, dst: Path) -> Path:
    """The same scan as a European CSV: '11,2500;1010,0' (';' separates, ',' is the decimal mark)."""
    lines = ["2Theta;Intensity"]
    for line in src.read_text().splitlines():
        if line and not line.startswith("#"):
            a, b = line.split()
            lines.append(f"{a.replace('.', ',')};{float(b):.1f}".replace(".", ","))
    dst.write_text("\n".join(lines) + "\n")
    return dst


def test_measured_semicolon_decimal_comma_reads_like_the_original(tmp_path):
    from xrdmatch.platform.measured import read_two_column

    src = _scan(_li2o(), tmp_path / "li2o.xy", "CuKa", 10.0, 90.0)
    eu = _semicolon_decimal_comma(src, tmp_path / "li2o_eu.csv")
    assert "11,2500;" in eu.read_text()
    tt0, y0 = read_two_column(src)
    tt, y = read_two_column(eu)
    np.testing.assert_allclose(tt, tt0)
    np.testing.assert_allclose(y, y0)
    np.testing.assert_array_equal(measured_pattern(eu), measured_pattern(src))
    # the same numbers separated by whitespace with a decimal comma
    ws = tmp_path / "li2o_ws.txt"
    ws.write_text(eu.read_text().replace(";", "\t"))
    np.testing.assert_allclose(read_two_column(ws)[0], tt0)


def test_measured_rejects_changing_field_count_and_non_positive_scans(tmp_path):
    tt = 10 + 0.02 * np.arange(500)
    peak = 1000 * np.exp(-0.5 * ((tt - 15) / 0.05) ** 2)
    cases = {
        # a ','-separated file with one decimal-comma intensity: 3 fields where the first data line has 2
        "mixed.csv": ("header\n" + "\n".join(f"{t:.2f},{100 + p:.0f}" for t, p in zip(tt, peak))
                      + "\n30.02,101,5\n", "line 502: 3 fields, but the first data line (line 2) has 2"),
        # .xye with the error column missing on one line
        "short.xye": ("\n".join(f"{t:.2f} {100 + p:.0f} 10" for t, p in zip(tt, peak)) + "\n30.02 101\n",
                      "line 501: 2 fields, but the first data line (line 1) has 3"),
        "negative.xy": ("\n".join(f"{t:.2f} {-100 - p:.1f}" for t, p in zip(tt, peak)), "no positive intensity"),
        # a peak that pokes above zero on a background far below it (wrongly subtracted)
        "below_zero.xy": ("\n".join(f"{t:.2f} {-200 + 0.3 * p:.1f}" for t, p in zip(tt, peak)), "mostly negative"),
    }
    for name, (text, expect) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(MeasuredPatternError) as e:
            measured_pattern(p, cfg=MeasuredConfig())
        assert str(p) in str(e.value) and expect in str(e.value), str(e.value)


_OVERLAP_CIF = """data_{name}
_cell_length_a 4.0
_cell_length_b 4.0
_cell_length_c 4.0
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_symmetry_equiv_pos_as_xyz
'x, y, z'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
Li1 Li 0 0 0 {occ}
Li2 Li {x2} 0 0 {occ}
O1 O 0.5 0.5 0.5 1
"""


def test_predict_refuses_overlapping_atoms(tmp_path):
    """Two Li at 0,0,0: pymatgen refuses the CIF (ASE would merge them silently): an error row.
    Atoms 0.04 A apart (read by pymatgen) and an extxyz frame with a duplicated atom too; split sites
    (occupancies summing to 1) are not overlaps."""
    import ase.io
    from pymatgen.io.ase import AseAtomsAdaptor

    from xrdmatch.platform.predict import collect_items

    (tmp_path / "dup.cif").write_text(_OVERLAP_CIF.format(name="dup", x2=0, occ=1))
    (tmp_path / "near.cif").write_text(_OVERLAP_CIF.format(name="near", x2=0.01, occ=1))
    (tmp_path / "split.cif").write_text(_OVERLAP_CIF.format(name="split", x2=0.05, occ=0.5))
    a = AseAtomsAdaptor.get_atoms(_li2o())
    b = a.copy()
    b += a[:1]  # the first Li twice
    ase.io.write(tmp_path / "frames.extxyz", [a, b], format="extxyz")
    items = {it.id: it for it in collect_items([tmp_path])}
    assert set(items) == {"dup", "near", "split", "frames#0", "frames#1"}
    for sid, dist in (("near", "0.040 A"), ("frames#1", "0.000 A")):
        it = items[sid]
        assert it.pattern is None and it.error, sid
        assert it.source in it.error and "atoms overlap" in it.error and dist in it.error, it.error
    assert items["dup"].pattern is None and "CIF refused by pymatgen" in items["dup"].error
    for sid in ("split", "frames#0"):
        assert items[sid].error is None and items[sid].pattern is not None, items[sid].error


# --- input robustness: oversized files, lattices the engine refuses ---


def _p1_cif(n: int, name: str, group: str = "P 1") -> str:
    """A CIF of ``n`` Li/O atom-site rows at distinct general positions in space group ``group``."""
    import random

    rng = random.Random(n)
    rows = "".join(f"S{k} {'Li' if k % 2 else 'O'} {rng.random():.5f} {rng.random():.5f} {rng.random():.5f} 1\n"
                   for k in range(n))
    side = 2.2 * n ** (1 / 3) + 4
    return (f"data_{name}\n_cell_length_a {side:.2f}\n_cell_length_b {side:.2f}\n_cell_length_c {side:.2f}\n"
            "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
            f"_symmetry_space_group_name_H-M '{group}'\nloop_\n_atom_site_label\n_atom_site_type_symbol\n"
            "_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n" + rows)


def test_predict_refuses_a_cif_too_large_to_parse_and_predicts_the_rest(tmp_path):
    """pymatgen's CIF parser takes time quadratic in a block's sites (a 60,000-site CIF never
    finished, and the good files of its batch were never predicted): a block over 5,000 atom-site
    rows, or 20,000 rows x symmetry operations, is an error row naming the count and the limit,
    before it is parsed; the other blocks and files are predicted."""
    from xrdmatch.platform.predict import collect_items

    good = _li2o().to(fmt="cif")
    (tmp_path / "big.cif").write_text(_p1_cif(5_001, "big"))
    (tmp_path / "cubic.cif").write_text(_p1_cif(105, "cubic", "F m -3 m"))  # 105 x 192 positions
    (tmp_path / "two.cif").write_text(good + "\n" + _p1_cif(5_001, "second"))
    (tmp_path / "good.cif").write_text(good)
    items = {it.id: it for it in collect_items([tmp_path])}
    assert set(items) == {"big", "cubic", "two#0", "two#1", "good"}
    assert items["big"].error == ("refused before parsing: CIF data block data_big has 5,001 atom-site rows, over "
                                  "the limit of 5,000")
    assert items["cubic"].error == ("refused before parsing: CIF data block data_cubic has 105 atom-site rows x 192 "
                                    "symmetry operations = 20,160 positions, over the limit of 20,000")
    assert items["two#1"].error == "CIF data block #1: CIF data block data_second has 5,001 atom-site rows, over " \
                                   "the limit of 5,000"
    for sid in ("two#0", "good"):
        assert items[sid].error is None and items[sid].pattern is not None, items[sid].error


def test_predict_refuses_a_lattice_the_engine_refuses_before_the_overlap_check(tmp_path):
    """A 330-byte CIF with a = 2000 A: the overlap check (pymatgen's neighbour list) tried to allocate
    27 GB (a = 1000 A used 4.6 GB) before the engine's lattice check could refuse it; a zero-volume
    cell gave "ZeroDivisionError: float division". Both now get the XRD engine's own message."""
    from xrdmatch.platform.predict import collect_items

    good = _li2o().to(fmt="cif")
    (tmp_path / "good.cif").write_text(good)
    huge = _li2o()
    huge.scale_lattice(2000.0 ** 3)
    huge.to(filename=str(tmp_path / "huge.cif"))
    flat = _li2o().as_dict()
    flat["lattice"] = {"matrix": [[0, 0, 0], [0, 4, 0], [0, 0, 4]]}
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    (tmp_path / "POSCAR_zero").write_text("Li O\n1.0\n0 0 0\n0 0 0\n0 0 0\nLi O\n1 1\ndirect\n0 0 0\n0.5 0.5 0.5\n")
    items = {it.id: it for it in collect_items([tmp_path])}
    assert items["good"].pattern is not None, items["good"].error
    assert items["huge"].error == "lattice too large or too skewed (axis lengths [2000.0, 2000.0, 2000.0] A)"
    for sid in ("flat", "POSCAR_zero"):
        assert items[sid].error == "degenerate lattice (cell volume 0 A^3)", items[sid].error


@pytest.mark.timeout(120)
def test_a_cif_padded_with_blank_lines_is_read_without_stalling(tmp_path):
    """pymatgen splits a CIF into blocks with ``^\\s*data_``, which rescans a run of blank lines from
    each of its lines (200,000 took 50 s; this file's million, hours): the readers drop blank lines
    first, which pymatgen does itself before parsing a block, so the structure is the same."""
    from xrdmatch.platform.predict import collect_items

    good = _li2o().to(fmt="cif")
    (tmp_path / "padded.cif").write_text(good + "\n" * 1_000_000)
    (tmp_path / "good.cif").write_text(good)
    items = {it.id: it for it in collect_items([tmp_path])}
    assert items["padded"].error is None, items["padded"].error
    np.testing.assert_array_equal(items["padded"].pattern, items["good"].pattern)
