"""Measured scans with Cu K-alpha2 (Rachinger stripping) and CIFs with several data blocks (one row each)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from tests.test_predict import _OVERLAP_CIF
from xrdmatch import TWO_THETA_STEP
from xrdmatch.platform.measured import (
    cu_kalpha_lines,
    is_cu_kalpha,
    kalpha2_evidence,
    measured_pattern,
    strip_kalpha2,
    wavelength_angstrom,
)


def _li2o():
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.61), ["Li", "O"], [[0.25, 0.25, 0.25], [0, 0, 0]])


def _licl():
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.14), ["Li", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _scan(path: Path, lines, structure=None, fwhm: float = 0.08, lo: float = 10.0, hi: float = 90.0,
          step: float = 0.01, seed: int = 0) -> Path:
    """A tube-like scan: pymatgen sticks of each (wavelength, weight) line, Gaussian peaks on a
    sloping background, Poisson noise (lab Cu tube: [("CuKa1", 1), ("CuKa2", 0.5)])."""
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    s = structure or _li2o()
    tt = np.arange(lo, hi, step)
    y = 60.0 + 300.0 * np.exp(-tt / 25.0)
    sigma = fwhm / 2.355
    for wl, w in lines:
        pat = XRDCalculator(wavelength=wl).get_pattern(s, two_theta_range=(max(1.0, lo - 5), min(150.0, hi + 5)))
        for x, h in zip(pat.x, pat.y):
            y = y + w * 20.0 * h * np.exp(-0.5 * ((tt - x) / sigma) ** 2)
    y = np.random.default_rng(seed).poisson(y).astype(float)
    np.savetxt(path, np.c_[tt, y], fmt="%.4f")
    return path


def _sticks(pattern: np.ndarray, min_height: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    b = np.flatnonzero(pattern >= min_height)
    return b, pattern[b]


TUBE = [("CuKa1", 1.0), ("CuKa2", 0.5)]


def test_kalpha2_doublet_scan_gives_the_simulated_sticks(tmp_path):
    """Li2O measured with K-alpha1 + 0.5 K-alpha2: stripped, it gives the simulator's 5 sticks at their
    bins (K-alpha1 angles converted to the weighted CuKa the simulator uses); unstripped, the split
    doublets above ~50 deg give 8 sticks and the main peaks sit 2-4 bins low."""
    from xrdmatch.simulation.xrd import WAVELENGTH, xrd_pattern

    ref_bins, ref_h = _sticks(xrd_pattern(_li2o()))
    assert len(ref_bins) == 5
    path = _scan(tmp_path / "tube.xy", TUBE)
    for kwargs in ({}, {"wavelength": "CuKa"}, {"kalpha2": "strip"}):
        bins, h = _sticks(measured_pattern(path, **kwargs))
        assert len(bins) == len(ref_bins), (ref_bins * TWO_THETA_STEP, bins * TWO_THETA_STEP)
        assert np.abs(bins - ref_bins).max() <= 1, (ref_bins * TWO_THETA_STEP, bins * TWO_THETA_STEP)
        np.testing.assert_allclose(h, ref_h, atol=0.05)
    # the defect without stripping: extra K-alpha2 sticks (56.56, 67.50, 84.12 deg) and shifted peaks
    bins, _ = _sticks(measured_pattern(path, kalpha2="none"))
    assert len(bins) == 8
    # the simulator and the measured side agree on what "CuKa" is
    assert wavelength_angstrom("CuKa") == WAVELENGTH == pytest.approx(cu_kalpha_lines()[0])


@pytest.mark.parametrize("structure", [_li2o, _licl])
def test_kalpha2_doublet_broad_peaks(tmp_path, structure):
    """Broader peaks (FWHM 0.2 deg, doublet resolved only at high angles) of another crystal too."""
    from xrdmatch.simulation.xrd import xrd_pattern

    ref_bins, ref_h = _sticks(xrd_pattern(structure()))
    bins, h = _sticks(measured_pattern(_scan(tmp_path / "tube.xy", TUBE, structure(), fwhm=0.2, seed=3)))
    assert len(bins) == len(ref_bins), (ref_bins * TWO_THETA_STEP, bins * TWO_THETA_STEP)
    assert np.abs(bins - ref_bins).max() <= 3
    np.testing.assert_allclose(h, ref_h, atol=0.06)


def test_single_line_scans_are_unchanged(tmp_path):
    """A scan without K-alpha2 gives exactly what it gave before stripping existed ("none"): a
    single-line Cu K-alpha scan (auto: stripping would dig holes, so it is left alone), a K-alpha1-only
    scan declared as CuKa1, and another anode (never stripped, whatever the mode)."""
    single = _scan(tmp_path / "single.xy", [("CuKa", 1.0)], fwhm=0.12)
    np.testing.assert_array_equal(measured_pattern(single), measured_pattern(single, kalpha2="none"))
    mono = _scan(tmp_path / "ka1.xy", [("CuKa1", 1.0)])
    mo = _scan(tmp_path / "mo.xy", [("MoKa", 1.0)], lo=5.0, hi=40.0)
    for path, wl in ((mono, "CuKa1"), (mo, "MoKa"), (mono, 1.5406)):
        none = measured_pattern(path, wl, kalpha2="none")
        for mode in (None, "auto", "strip"):
            np.testing.assert_array_equal(measured_pattern(path, wl, kalpha2=mode), none)
    assert is_cu_kalpha(wavelength_angstrom("CuKa")) and is_cu_kalpha(1.5418)
    assert not is_cu_kalpha(wavelength_angstrom("CuKa1")) and not is_cu_kalpha(wavelength_angstrom("MoKa"))
    # the K-alpha1-only scan read as CuKa1 lands on the simulator's bins (converted through d)
    from xrdmatch.simulation.xrd import xrd_pattern

    ref_bins, _ = _sticks(xrd_pattern(_li2o()))
    bins, _ = _sticks(measured_pattern(mono, "CuKa1"))
    assert len(bins) == len(ref_bins) and np.abs(bins - ref_bins).max() <= 1


def test_strip_kalpha2_recovers_the_kalpha1_profile():
    """Rachinger on an exact noise-free doublet (K-alpha2 peak at the angle of the same d) returns the
    K-alpha1 profile; a profile that is zero stays zero; ratio 0 is the identity."""
    _, l1, l2 = cu_kalpha_lines()
    grid = np.arange(10.0, 90.0 + 1e-9, TWO_THETA_STEP)
    ka1 = np.array([21.3, 33.7, 56.5, 67.4, 84.0])
    ka2 = 2 * np.degrees(np.arcsin(np.sin(np.radians(ka1 / 2)) * l2 / l1))
    assert 0.04 < ka2[0] - ka1[0] < ka2[-1] - ka1[-1] < 0.3  # the split grows with angle

    def profile(centres, heights, fwhm=0.1):
        s = fwhm / 2.355
        return sum(h * np.exp(-0.5 * ((grid - c) / s) ** 2) for c, h in zip(centres, heights))

    heights = np.array([0.3, 1.0, 0.7, 0.2, 0.1])
    f = profile(ka1, heights)
    y = f + 0.5 * profile(ka2, heights)
    out = strip_kalpha2(grid, y, 0.5)
    assert np.abs(out - f).max() < 0.02 * f.max()
    top = [int(np.argmax(np.where(np.abs(grid - c) < 0.2, out, -1))) for c in ka1]
    np.testing.assert_allclose(grid[top], ka1, atol=TWO_THETA_STEP)
    np.testing.assert_array_equal(strip_kalpha2(grid, np.zeros_like(grid)), 0.0)
    np.testing.assert_array_equal(strip_kalpha2(grid, y, 0.0), y)
    # the evidence that decides "auto": ~0 for the doublet, large for the single line f
    assert kalpha2_evidence(grid, y, noise=1e-4) < 0.01
    assert kalpha2_evidence(grid, f, noise=1e-4) > 0.1


def test_kalpha2_options_are_checked(tmp_path):
    path = _scan(tmp_path / "tube.xy", TUBE)
    for bad in ({"kalpha2": "maybe"}, {"kalpha2_ratio": 1.0}, {"kalpha2_ratio": -0.1}):
        with pytest.raises(ValueError):
            measured_pattern(path, **bad)
    # the ratio is used: stripping with a wrong ratio leaves part of the doublet
    assert len(_sticks(measured_pattern(path, kalpha2="strip", kalpha2_ratio=0.1))[0]) > 5


# ---- CIF files with several data blocks ----------------------------------------------------------

# two Li atoms on one site: pymatgen refuses the block (the same CIF as test_predict's)
_BAD_BLOCK = _OVERLAP_CIF.replace("{occ}", "1").replace("{x2}", "0")


def _block(structure, name: str) -> str:
    text = structure.to(fmt="cif")
    return text.replace("data_", f"data_{name}_", 1) if name else text


def _simulated(structure) -> np.ndarray:
    from xrdmatch.simulation.xrd import xrd_pattern

    return np.asarray(xrd_pattern(structure), dtype=np.float32)


def test_multi_block_cif_gives_one_row_per_block(tmp_path):
    from xrdmatch.platform.predict import collect_items

    a, b = _li2o(), _licl()
    path = tmp_path / "two.cif"
    path.write_text(_block(a, "A") + "\n" + _block(b, "B"))
    items = collect_items([path])
    assert [it.id for it in items] == ["two#0", "two#1"]  # named like extxyz frames
    assert all(it.error is None and it.source == str(path) for it in items), [it.error for it in items]
    np.testing.assert_array_equal(items[0].pattern, _simulated(a))
    np.testing.assert_array_equal(items[1].pattern, _simulated(b))


def test_multi_block_cif_bad_block_and_duplicates_and_gzip(tmp_path):
    """A block pymatgen refuses is an error row naming it, the others are predicted; blocks that share
    a name are all kept; a gzipped CIF is split the same way; metadata blocks without atoms are no rows."""
    from xrdmatch.platform.predict import collect_items

    a, b = _li2o(), _licl()
    text = _block(a, "same") + "\n" + _BAD_BLOCK.format(name="broken") + "\n" + _block(b, "same")
    (tmp_path / "mixed.cif").write_text(text)
    with gzip.open(tmp_path / "zipped.cif.gz", "wt") as fh:
        fh.write(_block(a, "A") + "\n" + _block(b, "B"))
    (tmp_path / "meta.cif").write_text("data_global\n_journal_year 2024\n_publ_section_title 'x'\n\n" + _block(a, "A"))
    items = {it.id: it for it in collect_items([tmp_path])}
    assert set(items) == {"mixed#0", "mixed#1", "mixed#2", "zipped.cif#0", "zipped.cif#1", "meta"}
    assert items["mixed#1"].pattern is None
    assert "data block #1 (data_broken)" in items["mixed#1"].error and "pymatgen" in items["mixed#1"].error
    for sid, s in (("mixed#0", a), ("mixed#2", b), ("zipped.cif#0", a), ("zipped.cif#1", b), ("meta", a)):
        assert items[sid].error is None, items[sid].error
        np.testing.assert_array_equal(items[sid].pattern, _simulated(s))


def test_single_block_cif_is_read_as_before(tmp_path):
    from xrdmatch.platform.predict import collect_items

    (tmp_path / "Li2O.cif").write_text(_block(_li2o(), ""))
    (tmp_path / "dup.cif").write_text(_BAD_BLOCK.format(name="dup"))
    items = {it.id: it for it in collect_items([tmp_path])}
    assert set(items) == {"Li2O", "dup"}
    np.testing.assert_array_equal(items["Li2O"].pattern, _simulated(_li2o()))
    assert items["dup"].pattern is None and "CIF refused by pymatgen" in items["dup"].error


def test_a_single_block_cif_says_why_pymatgen_refused_it_and_rounded_occupancies_are_read(tmp_path):
    """Rounded occupancies (3 x 0.334 on one site, common in ICSD files) are scaled to 1 and
    predicted; a site over 1.05 is refused with pymatgen's own reason, as in a multi-block CIF."""
    from pymatgen.core import Lattice, Structure

    from xrdmatch.platform.predict import collect_items

    mixed = Structure(Lattice.cubic(5.6), [{"Li": 1 / 3, "Na": 1 / 3, "K": 1 / 3}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    text = mixed.to(fmt="cif")
    assert text.count(" 0.33333333") == 3
    (tmp_path / "rounded.cif").write_text(text.replace(" 0.33333333", " 0.334"))
    (tmp_path / "over.cif").write_text(text.replace(" 0.33333333", " 0.5"))
    items = {it.id: it for it in collect_items([tmp_path])}
    assert items["rounded"].error is None, items["rounded"].error
    np.testing.assert_array_equal(items["rounded"].pattern, _simulated(mixed))
    assert items["over"].pattern is None
    assert re.search(r"refused by pymatgen \(.*Occupancy 1\.[56]\d* exceeded tolerance", items["over"].error)
