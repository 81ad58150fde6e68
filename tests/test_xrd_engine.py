"""The vectorised XRD engine against pymatgen's XRDCalculator itself (real pymatgen, real data).

Parity sample: 300 structures of the shipped database chosen deterministically: the records
sorted by (site count, id), 290 picked at evenly spaced ranks (every size class, smallest cell
included) plus the 10 largest cells (up to 688 sites). pymatgen needs ~10 ms for a typical
structure and < 0.5 s for the largest, so nothing is cached between runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from xrdmatch import N_BINS, TWO_THETA_STEP
from xrdmatch.platform.data import iter_jsonl_lines, structure_from_record
from xrdmatch.simulation import xrd
from xrdmatch.simulation.xrd import XRDError, reference_pattern, xrd_pattern, xrd_pattern_arrays

N_PARITY = 300
N_LARGEST = 10
TOL = 1e-3


def _assert_parity(pat: np.ndarray, ref: np.ndarray, what: str) -> None:
    diff = float(np.abs(pat - ref).max())
    assert diff <= TOL, f"{what}: max |engine - pymatgen| = {diff:.3g}"
    mismatch = np.flatnonzero((pat > 0) != (ref > 0))
    assert mismatch.size == 0, f"{what}: non-zero bins differ at 2-theta {(mismatch * TWO_THETA_STEP).tolist()[:10]}"


@pytest.fixture(scope="module")
def parity_records(database_path) -> list[dict]:
    recs = [json.loads(line) for _, line in iter_jsonl_lines(database_path)]
    order = sorted(range(len(recs)), key=lambda i: (len(recs[i]["species"]), str(recs[i]["id"])))
    ranks = set(np.linspace(0, len(order) - 1 - N_LARGEST, N_PARITY - N_LARGEST).round().astype(int).tolist())
    ranks |= set(range(len(order) - N_LARGEST, len(order)))
    assert len(ranks) == N_PARITY
    return [recs[order[r]] for r in sorted(ranks)]


def test_parity_with_pymatgen_on_database_sample(parity_records):
    sizes = [len(r["species"]) for r in parity_records]
    assert len(parity_records) == N_PARITY and max(sizes) == 688 and min(sizes) <= 2
    failures = []
    for rec in parity_records:
        pat = xrd_pattern_arrays(rec["lattice"], rec["species"], rec["frac_coords"])
        ref = reference_pattern(structure_from_record(rec))
        try:
            _assert_parity(pat, ref, f"{rec['id']} ({len(rec['species'])} sites)")
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, f"{len(failures)}/{len(parity_records)} differ: " + "; ".join(failures[:5])


def test_constants_and_parameters_are_pymatgens():
    from pymatgen.analysis.diffraction.core import AbstractDiffractionPatternCalculator as Calc
    from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS, WAVELENGTHS, XRDCalculator
    from pymatgen.core import Element

    assert xrd.WAVELENGTH == WAVELENGTHS["CuKa"] == XRDCalculator().wavelength
    assert xrd.TWO_THETA_TOL == Calc.TWO_THETA_TOL
    assert xrd.SCALED_INTENSITY_TOL == Calc.SCALED_INTENSITY_TOL
    table = xrd._scattering_table()
    assert set(table) == set(ATOMIC_SCATTERING_PARAMS)
    for sym, (z, coeff) in table.items():
        assert z == Element(sym).Z, sym
        np.testing.assert_array_equal(coeff, np.asarray(ATOMIC_SCATTERING_PARAMS[sym]))


def test_output_contract_and_physics():
    from pymatgen.core import Lattice, Structure

    cu = Structure(Lattice.cubic(3.615), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    pat = xrd_pattern(cu)
    assert pat.dtype == np.float32 and pat.shape == (N_BINS,)
    assert pat.max() == 1.0 and pat.min() >= 0.0
    # fcc: (111) is the strongest line, (100) and (110) are systematically absent
    two_theta = lambda h, k, l: 2 * np.degrees(np.arcsin(xrd.WAVELENGTH * np.sqrt(h * h + k * k + l * l) / (2 * 3.615)))  # noqa: E731
    assert int(np.argmax(pat)) == round(two_theta(1, 1, 1) / TWO_THETA_STEP)
    assert pat[round(two_theta(1, 0, 0) / TWO_THETA_STEP)] == 0.0
    assert pat[round(two_theta(1, 1, 0) / TWO_THETA_STEP)] == 0.0
    assert pat[round(two_theta(2, 0, 0) / TWO_THETA_STEP)] > 0.0
    _assert_parity(pat, reference_pattern(cu), "fcc Cu")


def test_disordered_sites_parity():
    from pymatgen.core import Lattice, Structure

    # rock salt with a mixed cation site, and a partially vacant mixed site
    half = Structure(Lattice.cubic(4.4), [{"Li": 0.5, "Na": 0.5}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    vacant = Structure(
        Lattice.from_parameters(5.1, 6.3, 7.2, 90, 101, 90),
        [{"Li": 0.7, "Mg": 0.2}, "O", {"Li": 0.5}, "P", "O", "O"],
        [[0, 0, 0], [0.21, 0.33, 0.12], [0.5, 0.1, 0.7], [0.6, 0.6, 0.3], [0.9, 0.2, 0.45], [0.35, 0.8, 0.6]],
    )
    for name, s in (("Li0.5Na0.5Cl", half), ("partially vacant", vacant)):
        pat = xrd_pattern(s)
        _assert_parity(pat, reference_pattern(s), name)
        species = [{sp.symbol: occ for sp, occ in site.species.items()} for site in s]
        np.testing.assert_array_equal(xrd_pattern_arrays(s.lattice.matrix, species, s.frac_coords), pat)
    # the occupancy weighting is not a no-op: pure LiCl is a different pattern
    pure = Structure(Lattice.cubic(4.4), ["Li", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert np.abs(xrd_pattern(pure) - xrd_pattern(half)).max() > 0.05


def test_mixed_valence_and_spin_species_match_pymatgen_on_every_path(tmp_path):
    """A site of Mn3+ 0.5 + Mn4+ 0.5 is Mn 1.0 for X-rays: the engine, the database record of a
    CIF/JSON file and the queue's record agree with pymatgen (a record keyed by element once kept
    Mn 0.5); a species with a spin is its element."""
    from pymatgen.core import Lattice, Species, Structure

    from xrdmatch.platform.databases import _parse_file, record_of_structure

    s = Structure(Lattice.cubic(4.1), ["Li", {Species("Mn", 3): 0.5, Species("Mn", 4): 0.5}, "O", "O"],
                  [[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [0.75, 0.75, 0.75]])
    ref = reference_pattern(s)
    _assert_parity(xrd_pattern(s), ref, "Mn3+/Mn4+ site")
    rec = record_of_structure("lmo", s)
    assert rec.species[1] == "Mn"
    _assert_parity(xrd_pattern_arrays(rec.lattice, rec.species, rec.frac_coords), ref, "record of the structure")
    from_json = _parse_file("lmo.json", s.to_json().encode())
    _assert_parity(xrd_pattern_arrays(from_json.lattice, from_json.species, from_json.frac_coords), ref, "JSON file")
    spin = Structure(Lattice.cubic(4.3), [Species("Fe", 2, spin=5), "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    _assert_parity(xrd_pattern(spin), reference_pattern(spin), "Fe2+ with spin")


def test_site_order_oxidation_states_and_periodic_images(parity_records):
    """Interleaved species (the regrouping path), 'O2-'-style species, coordinates off by lattice vectors."""
    from pymatgen.core import Structure

    rec = next(r for r in parity_records if 20 <= len(r["species"]) <= 40 and len(set(r["species"])) >= 3)
    s = structure_from_record(rec)
    perm = np.random.default_rng(0).permutation(len(s))
    shuffled = Structure(s.lattice, [s[i].species for i in perm], s.frac_coords[perm])
    _assert_parity(xrd_pattern(shuffled), reference_pattern(shuffled), "shuffled sites")

    shifted = np.asarray(rec["frac_coords"]) + np.random.default_rng(1).integers(-2, 3, size=(len(s), 3))
    np.testing.assert_allclose(
        xrd_pattern_arrays(rec["lattice"], rec["species"], shifted), xrd_pattern(s), atol=1e-6
    )

    oxi = s.copy()
    oxi.add_oxidation_state_by_guess()
    assert any(str(sp) != sp.symbol for sp in oxi.species)  # really decorated
    _assert_parity(xrd_pattern(oxi), reference_pattern(oxi), "oxidation-state species")


def test_chunked_structure_factors_agree(parity_records, monkeypatch):
    rec = max(parity_records, key=lambda r: len(r["species"]))  # the 688-site cell
    args = (rec["lattice"], rec["species"], rec["frac_coords"])
    whole = xrd_pattern_arrays(*args)
    monkeypatch.setattr(xrd, "PHASE_CHUNK_ENTRIES", 5000)  # a few rows per chunk
    np.testing.assert_allclose(xrd_pattern_arrays(*args), whole, atol=1e-6)


CUBIC = [[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]]


@pytest.mark.parametrize(
    "lattice, species, coords, message",
    [
        (CUBIC, [], np.zeros((0, 3)), "no sites"),
        (CUBIC, ["Li", "Xx"], [[0, 0, 0], [0.5, 0.5, 0.5]], "site 1: unknown element 'Xx'"),
        (CUBIC, ["Li", {"Li": 0.5, "Qq": 0.5}], [[0, 0, 0], [0.5, 0.5, 0.5]], "site 1: unknown element 'Qq'"),
        (CUBIC, ["Li", "O"], [[0, 0, 0], [0.5, np.nan, 0.5]], "site 1: non-finite fractional coordinates"),
        (CUBIC, ["Li", "O"], [[0, 0, 0], [0.5, np.inf, 0.5]], "site 1: non-finite fractional coordinates"),
        (CUBIC, ["Li", "O"], [[0, 0, 0]], "frac_coords has shape"),
        ([[1, 0, 0], [0, 1, 0], [1, 1, 0]], ["Li"], [[0, 0, 0]], "degenerate lattice"),
        ([[4, 0, 0], [0, 4, 0], [0, 0, 0]], ["Li"], [[0, 0, 0]], "degenerate lattice"),
        ([[4, 0, 0], [0, np.nan, 0], [0, 0, 4]], ["Li"], [[0, 0, 0]], "lattice has non-finite entries"),
        ([[4, 0], [0, 4]], ["Li"], [[0, 0, 0]], "lattice must be 3x3"),
        ([[0.8, 0, 0], [0, 0.8, 0], [0, 0, 0.8]], ["Li"], [[0, 0, 0]], "no reflections in 2-theta 0-90"),
        ([[300, 0, 0], [0, 300, 0], [0, 0, 300]], ["Li"], [[0, 0, 0]], "lattice too large"),
        # within the box limit, but ten species' structure-factor sums would hold ~450 MB at once
        (np.eye(3) * 105.0, ["Li", "Na", "K", "Rb", "Cs", "Mg", "Ca", "Sr", "Ba", "Zn"],
         np.random.default_rng(0).random((10, 3)), "cell too large for the engine: 10 species x"),
        (CUBIC, [{"Li": 0.7, "Na": 0.6}], [[0, 0, 0]], "site 0: occupancies sum to 1.3 > 1"),
        (CUBIC, [{"Li": -0.5}], [[0, 0, 0]], "site 0: occupancy of Li must be finite and >= 0"),
        (CUBIC, [{"Li": "lots"}], [[0, 0, 0]], "site 0: occupancy of Li is not a number"),
    ],
)
def test_bad_input_raises_xrderror(lattice, species, coords, message):
    with pytest.raises(XRDError, match=message.replace("(", r"\(").replace(")", r"\)")):
        xrd_pattern_arrays(lattice, species, coords)


def test_xrderror_is_a_valueerror_and_reference_needs_reflections():
    assert issubclass(XRDError, ValueError)
    with pytest.raises(XRDError, match="no reflections"):
        xrd.bin_peaks(np.array([]), np.array([]))
