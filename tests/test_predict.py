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
        "flat.dat": "\n".join(f"{10 + 0.02 * i:.2f} 100" for i in range(500)).encode(),
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
    (d / "flat.xy").write_text("\n".join(f"{10 + 0.02 * i:.2f} 100" for i in range(500)))
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
