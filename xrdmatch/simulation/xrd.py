"""Powder XRD patterns on the labelled set's grid (Cu K-alpha, 2-theta 0-90, 4501 bins).

TEMPORARY: reference implementation via pymatgen; the vectorised engine replaces
``xrd_pattern`` / ``xrd_pattern_arrays`` keeping these signatures.
"""

from __future__ import annotations

import numpy as np

from xrdmatch import N_BINS, TWO_THETA_STEP


class XRDError(ValueError):
    """A structure whose pattern cannot be computed; the message names it and says why."""


def bin_peaks(two_theta: np.ndarray, intensity: np.ndarray) -> np.ndarray:
    """Add stick intensities into the nearest 0.02-degree bin and scale the maximum to 1."""
    idx = np.rint(np.asarray(two_theta) / TWO_THETA_STEP).astype(np.int64)
    keep = (idx >= 0) & (idx < N_BINS)
    out = np.bincount(idx[keep], weights=np.asarray(intensity, dtype=np.float64)[keep], minlength=N_BINS)
    m = out.max()
    if not m > 0:
        raise XRDError("no reflections in 2-theta 0-90 degrees")
    return (out / m).astype(np.float32)


def reference_pattern(structure) -> np.ndarray:
    """pymatgen's XRDCalculator (defaults, two_theta_range=(0, 90)) binned to the grid."""
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    pat = XRDCalculator().get_pattern(structure, scaled=True, two_theta_range=(0, 90))
    return bin_peaks(np.asarray(pat.x), np.asarray(pat.y))


def xrd_pattern(structure) -> np.ndarray:
    """(4501,) float32 pattern of a pymatgen Structure, maximum 1."""
    if len(structure) == 0:
        raise XRDError("structure has no sites")
    return reference_pattern(structure)


def xrd_pattern_arrays(lattice, species, frac_coords) -> np.ndarray:
    """Pattern from raw arrays (no Structure construction: the hot path of the XRD stage).

    ``species``: one entry per site, an element symbol or a {symbol: occupancy} mapping.
    """
    from pymatgen.core import Lattice, Structure

    return xrd_pattern(Structure(Lattice(lattice), species, frac_coords))
