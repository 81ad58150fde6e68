"""Powder XRD patterns on the labelled set's grid (Cu K-alpha, 2-theta 0-90, 4501 bins of 0.02 deg).

A vectorised re-implementation of pymatgen's ``XRDCalculator()`` (default settings,
``get_pattern(s, two_theta_range=(0, 90))``), binned into the nearest 0.02-degree bin and
scaled to a maximum of 1. It mirrors pymatgen's semantics step by step, so the binned patterns
agree with pymatgen's (tests/test_xrd_engine.py checks that against pymatgen itself):

1. reflections: every reciprocal-lattice point ``g = h b1 + k b2 + l b3`` (crystallographic
   reciprocal lattice, no 2 pi) with ``|g| <= 2 sin(45 deg) / lambda``; ``|g|`` is evaluated with
   the same floating-point operations as pymatgen's neighbour search, so borderline points and
   peak-merge keys come out identical; one Friedel half-space (``I(g) = I(-g)``, intensities
   doubled), ``g = 0`` excluded;
2. atomic form factors ``f(s) = Z - 41.78214 s^2 sum_i a_i exp(-b_i s^2)``, ``s = |g| / 2``, from
   pymatgen's own parameter table; a disordered site scatters with its occupancies;
3. ``I = |F|^2 (1 + cos^2 2theta) / (sin^2 theta cos theta)``; no Debye-Waller factor;
4. reflections whose 2-theta round to the same multiple of ``TWO_THETA_TOL`` merge into one peak
   (at the 2-theta of its lowest-|g| member); peaks at or below ``SCALED_INTENSITY_TOL`` percent
   of the strongest are dropped; the rest is scaled to 100 and binned.

The structure factor ``F = sum_species f_sp(|g|) sum_j occ_j exp(2 pi i (h x_j + k y_j + l z_j))``
is separable in h, k, l. Per-axis phase tables ``exp(2 pi i n x_j)`` come from one cos/sin per
atom and axis and complex powers; their product over every (a, b) index pair is contracted with
the third axis' table by one complex matrix product (BLAS) per species. That replaces
n_hkl x n_atoms sin/cos evaluations and has no Python loop per reflection or per atom.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from xrdmatch import N_BINS, TWO_THETA_STEP

try:  # the gufunc behind np.linalg.inv; see _inv3
    from numpy.linalg import _umath_linalg
except ImportError:  # pragma: no cover
    _umath_linalg = None

# pymatgen's constants (pymatgen.analysis.diffraction.{xrd,core}), duplicated rather than
# imported: importing that module pulls matplotlib and spglib into every Ray worker.
# tests/test_xrd_engine.py asserts they still equal pymatgen's.
WAVELENGTH = 1.54184  # WAVELENGTHS["CuKa"], angstrom
TWO_THETA_TOL = 1e-5  # AbstractDiffractionPatternCalculator.TWO_THETA_TOL, degrees
SCALED_INTENSITY_TOL = 1e-3  # AbstractDiffractionPatternCalculator.SCALED_INTENSITY_TOL, % of max
FORM_FACTOR_PREFACTOR = 41.78214
TWO_THETA_RANGE = (0, 90)
#: Radius of the limiting sphere for 2-theta <= 90 deg: pymatgen's expression, python floats.
MAX_G = 2 * math.sin(math.radians(TWO_THETA_RANGE[1] / 2)) / WAVELENGTH

#: Elements by atomic number (Z = index + 1), up to the last one with scattering parameters.
_ELEMENTS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br "
    "Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho "
    "Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf"
).split()
_Z = {sym: z for z, sym in enumerate(_ELEMENTS, start=1)}
_Z["D"] = 1  # deuterium has its own scattering parameters in pymatgen's table
_SPECIES_RE = re.compile(r"^([A-Z][a-z]?)(?:\d*(?:\.\d+)?[+-])?$")  # "Li", "Li+", "O2-", "Fe3+"

#: Upper bound on complex entries of the (index pairs x atoms) phase block held at once (32 MB).
PHASE_CHUNK_ENTRIES = 1 << 21
#: Refuse cells whose reflection search box (~2x the reflections), per-axis phase tables or
#: per-species structure-factor sums would exceed these sizes (a cubic cell of ~130 A; ~1 GB of
#: temporaries) with an XRDError instead of exhausting a worker's memory. The shipped
#: database's largest cells need about 150,000 box points and 200,000 table entries.
MAX_BOX_POINTS = 4_000_000
MAX_TABLE_ENTRIES = 1 << 24
MAX_SPECIES_SUMS = 1 << 24  # complex entries of the (species x box rows x l) sums: 256 MB


class XRDError(ValueError):
    """A structure whose pattern cannot be computed; the message says why (the caller adds the id)."""


@lru_cache(maxsize=1)
def _scattering_table() -> dict[str, tuple[int, np.ndarray]]:
    """{symbol: (Z, (4, 2) [a_i, b_i])} from pymatgen's own parameter file (read, not imported)."""
    spec = importlib.util.find_spec("pymatgen")
    if spec is None or not spec.submodule_search_locations:
        raise XRDError("pymatgen is not installed: its atomic scattering parameters are needed")
    root = Path(next(iter(spec.submodule_search_locations)))
    with open(root / "analysis" / "diffraction" / "atomic_scattering_params.json", "rb") as fh:
        params = json.load(fh)
    return {sym: (_Z[sym], np.asarray(c, dtype=np.float64)) for sym, c in params.items() if sym in _Z}


def species_element(name: str) -> str:
    """Element symbol of a species string: 'Li', 'Li+', 'O2-', 'Fe3+' -> 'Li', 'Li', 'O', 'Fe'
    (anything else is returned as it is, for the caller to refuse)."""
    name = str(name).strip()
    m = _SPECIES_RE.match(name)
    return m.group(1) if m else name


@lru_cache(maxsize=4096)
def _element_of(name: str) -> str:
    """Element symbol of a species string ('Li', 'Li+', 'O2-'); XRDError when it has no parameters."""
    sym = species_element(name)
    if sym not in _scattering_table():
        raise XRDError(f"unknown element {name!r} (no atomic scattering parameters)")
    return sym


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
    """pymatgen's XRDCalculator (defaults, two_theta_range=(0, 90)) binned to the grid: the oracle."""
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    pat = XRDCalculator().get_pattern(structure, scaled=True, two_theta_range=TWO_THETA_RANGE)
    return bin_peaks(np.asarray(pat.x), np.asarray(pat.y))


def xrd_pattern(structure) -> np.ndarray:
    """(4501,) float32 pattern of a pymatgen Structure, maximum 1.

    Site properties (e.g. U11_cif thermal displacements) are ignored: no Debye-Waller factor.
    """
    if structure.is_ordered:
        species: list = [sp.symbol for sp in structure.species]  # scattering depends on the element only
    else:
        species = [element_occupancies(site) for site in structure]
    return xrd_pattern_arrays(structure.lattice.matrix, species, structure.frac_coords)


def element_occupancies(site) -> dict[str, float]:
    """{element: occupancy} of a site, summed over its species: a site of Mn3+ 0.5 and Mn4+ 0.5
    is Mn 1.0 (keyed by species it would be two entries; keyed naively by element, Mn 0.5)."""
    occ: dict[str, float] = {}
    for sp, o in site.species.items():
        occ[sp.symbol] = occ.get(sp.symbol, 0.0) + float(o)
    return occ


def xrd_pattern_arrays(lattice, species, frac_coords) -> np.ndarray:
    """Pattern from raw arrays (no Structure construction: the hot path of the XRD stage).

    ``lattice``: 3x3, rows are the lattice vectors (angstrom); ``species``: one entry per site,
    an element symbol (an oxidation-state suffix such as 'O2-' is allowed) or a
    {symbol: occupancy} mapping; ``frac_coords``: (n_sites, 3). Returns (4501,) float32 with
    maximum 1. Raises XRDError for input it cannot use.
    """
    recip, hmax = _parse_lattice(lattice)
    frac, groups, neg_b, a_block, z = _parse_sites(species, frac_coords)
    rows, idx, g = _reflections(recip, hmax)

    # Everything but F depends on |g| only, and symmetry-equivalent reflections share it.
    new = np.empty(g.size, dtype=bool)
    new[0] = True
    np.not_equal(g[1:], g[:-1], out=new[1:])
    gi = np.cumsum(new)
    gi -= 1  # reflection -> distinct |g|
    gu = g[new]
    sin_t = WAVELENGTH * gu / 2  # <= sin(45 deg): pymatgen's clip to [-1, 1] never acts
    two_thetas = np.degrees(2 * np.arcsin(sin_t))  # pymatgen's expression: merge keys agree
    s2 = (gu / 2) ** 2
    # f = Z - 41.78214 s^2 sum_i a_i exp(-b_i s^2), all species at once: (n_species, n_distinct_g)
    fs = z - s2 * (a_block @ np.exp(np.multiply.outer(neg_b, s2)))
    # Lorentz-polarisation (1 + cos^2 2t) / (sin^2 t cos t) = 2 (1 - 2u + 2u^2) / (u sqrt(1 - u)),
    # u = sin^2 t; times 2 for the Friedel mate -g
    u = sin_t * sin_t
    v = 1 - u
    lp2 = (4 * (u * u + v * v)) / (u * np.sqrt(v))

    s = _phase_sums(rows, idx, hmax, frac, groups)  # (n_species, M) complex
    fsg = fs[:, gi]
    f_re = np.einsum("sm,sm->m", s.real, fsg)
    f_im = np.einsum("sm,sm->m", s.imag, fsg)
    f_re *= f_re
    f_im *= f_im
    f_re += f_im  # |F|^2
    intensities = np.bincount(gi, weights=f_re) * lp2  # per distinct |g|
    return _merge_and_bin(two_thetas, intensities)


# --------------------------------------------------------------------------------------------
# parsing


def _parse_lattice(lattice) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(crystallographic reciprocal matrix, index bounds (H, K, L) of the reflection box)."""
    mat, hmax = check_lattice(lattice)
    # exactly pymatgen's Lattice.reciprocal_lattice_crystallographic
    return (_inv3(mat).T * 2 * np.pi) / (2 * np.pi), hmax


def check_lattice(lattice) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(3x3 matrix, index bounds (H, K, L) of the reflection box) of a lattice the engine can use;
    XRDError for non-finite entries, a degenerate cell or one over ``MAX_BOX_POINTS``.

    Cheap (3x3 arithmetic, nothing allocated by the cell's size): ``predict`` and queue
    submission run it before a neighbour search, whose memory grows with the cell volume
    (4.6 GB for a 1000 A cube)."""
    try:
        mat = np.array(lattice, dtype=np.float64).reshape((3, 3))
    except (TypeError, ValueError):
        raise XRDError("lattice must be 3x3 numbers") from None
    (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = rows = mat.tolist()
    if not all(map(math.isfinite, (a0, a1, a2, b0, b1, b2, c0, c1, c2))):
        raise XRDError(f"lattice has non-finite entries: {rows}")
    vol = abs(a0 * (b1 * c2 - b2 * c1) - a1 * (b0 * c2 - b2 * c0) + a2 * (b0 * c1 - b1 * c0))
    lengths = [math.sqrt(u * u + v * v + w * w) for u, v, w in rows]
    if not (vol > 1e-3 and vol > 1e-6 * lengths[0] * lengths[1] * lengths[2]):
        raise XRDError(f"degenerate lattice (cell volume {vol:.3g} A^3)")
    # |h| = |g . a1| <= |g| |a1| <= MAX_G |a1| inside the limiting sphere (the 1e-9 covers
    # rounding in |g|): a box that holds every reflection, filtered later.
    hmax = tuple(int(MAX_G * n * (1 + 1e-9)) for n in lengths)
    if (hmax[0] + 1) * (2 * hmax[1] + 1) * (2 * hmax[2] + 1) > MAX_BOX_POINTS:
        raise XRDError(f"lattice too large or too skewed (axis lengths {[round(n, 3) for n in lengths]} A)")
    return mat, hmax


def _inv3(mat: np.ndarray) -> np.ndarray:
    """np.linalg.inv (same LAPACK call, so bit-identical to pymatgen's) without its ~5 us wrapper."""
    try:
        return _umath_linalg.inv(mat, signature="d->d")
    except Exception:  # noqa: BLE001 - private numpy API moved or changed: use the public one
        return np.linalg.inv(mat)


@lru_cache(maxsize=1024)
def _species_params(symbols: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Form-factor parameters of a tuple of elements, laid out for one exp and one matmul.

    (-b_i flattened (4 n_sp,), block matrix of 41.78214 a_i (n_sp, 4 n_sp), Z (n_sp, 1)).
    """
    table = _scattering_table()
    coeff = np.stack([table[s][1] for s in symbols])  # (n_sp, 4, 2)
    n_sp, n_c = coeff.shape[:2]
    a_block = np.zeros((n_sp, n_sp * n_c))
    for j in range(n_sp):
        a_block[j, j * n_c : (j + 1) * n_c] = FORM_FACTOR_PREFACTOR * coeff[j, :, 0]
    z = np.array([[table[s][0]] for s in symbols], dtype=np.float64)
    return -coeff[:, :, 1].ravel(), a_block, z


def _parse_sites(species, frac_coords):
    """(frac (n_entries, 3), groups [(start, stop, occupancies | None)], *_species_params).

    Entries are grouped by element (contiguous); a disordered site contributes one entry per
    species on it (same coordinates, its occupancy as weight).
    """
    try:
        n = len(species)
    except TypeError:
        raise XRDError("species must be a list with one entry per site") from None
    if n == 0:
        raise XRDError("structure has no sites")
    try:
        frac = np.asarray(frac_coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise XRDError("frac_coords must be (n_sites, 3) numbers") from None
    if frac.shape != (n, 3):
        raise XRDError(f"frac_coords has shape {frac.shape}, expected ({n}, 3) for {n} sites")
    if not np.isfinite(frac).all():
        bad = int(np.flatnonzero(~np.isfinite(frac).all(axis=1))[0])
        raise XRDError(f"site {bad}: non-finite fractional coordinates {frac[bad].tolist()}")

    try:  # ordered sites (the database): one symbol per site
        syms = list(map(_element_of, species))
        sites = occ = None
    except TypeError:  # some site is a {symbol: occupancy} mapping
        syms, sites, occ = _disordered_entries(species)
    except XRDError:
        for i, s in enumerate(species):
            try:
                _element_of(s)
            except XRDError as e:
                raise XRDError(f"site {i}: {e}") from None
        raise
    # runs of equal symbols; the database lists sites grouped by element, so usually no reorder
    starts = [0] + [i for i in range(1, len(syms)) if syms[i] != syms[i - 1]]
    run_syms = [syms[i] for i in starts]
    if len(set(run_syms)) != len(run_syms):
        index: dict[str, int] = {}
        ids = np.array([index.setdefault(s, len(index)) for s in syms])
        order = np.argsort(ids, kind="stable")
        sites = order if sites is None else sites[order]
        occ = None if occ is None else occ[order]
        run_syms = list(index)
        starts = np.concatenate(([0], np.cumsum(np.bincount(ids))[:-1])).tolist()
    if sites is not None:
        frac = frac[sites]
    bounds = starts + [len(syms)]
    groups = [
        (bounds[j], bounds[j + 1], None if occ is None else occ[bounds[j] : bounds[j + 1]])
        for j in range(len(run_syms))
    ]
    return (frac, groups, *_species_params(tuple(run_syms)))


def _disordered_entries(species) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(element per entry, site per entry, occupancy per entry) with pymatgen's occupancy rules."""
    syms: list[str] = []
    sites: list[int] = []
    occs: list[float] = []
    for i, s in enumerate(species):
        items = [(s, 1.0)] if isinstance(s, str) else (s.items() if hasattr(s, "items") else None)
        if items is None:
            raise XRDError(f"site {i}: species must be a symbol or a {{symbol: occupancy}} mapping, got {s!r}")
        total = 0.0
        for name, occ in items:
            try:
                sym = _element_of(str(name))
            except XRDError as e:
                raise XRDError(f"site {i}: {e}") from None
            try:
                occ = float(occ)
            except (TypeError, ValueError):
                raise XRDError(f"site {i}: occupancy of {name!s} is not a number: {occ!r}") from None
            if not (math.isfinite(occ) and occ >= 0):
                raise XRDError(f"site {i}: occupancy of {name!s} must be finite and >= 0, got {occ!r}")
            if occ < 1e-8:  # pymatgen's Composition drops such amounts
                continue
            total += occ
            syms.append(sym)
            sites.append(i)
            occs.append(occ)
        if total > 1 + 1e-8:  # pymatgen refuses a site whose occupancies sum above 1
            raise XRDError(f"site {i}: occupancies sum to {total:.6g} > 1")
    if not syms:
        raise XRDError("structure has no occupied sites")
    return syms, np.asarray(sites), np.asarray(occs, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# reflections


def _reflections(recip: np.ndarray, hmax: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Friedel half-space reflections with 0 < |g| <= MAX_G, sorted by |g|.

    The search box is h in [0, H], k in [-K, K], l in [-L, L]. Returns (rows, idx, |g|): ``rows``
    the flat (h, k) indices (h * (2K + 1) + k + K) of the box rows holding any reflection,
    ``idx`` each reflection's flat index into those rows x l (C order).
    pymatgen's neighbour search (pymatgen.optimization.neighbors) forms the Cartesian point as
    ``(h*b1 + k*b2) + l*b3`` component by component, its squared norm as ``(x0^2 + x1^2) + x2^2``
    and keeps ``sqrt(d2) <= r``: the same operations in the same order give bit-identical |g|.
    """
    H, K, L = hmax
    r = recip.T[:, :, None, None, None]  # r[d, i]: component d of b_i
    hh = np.arange(0.0, H + 1)[:, None, None]
    kk = np.arange(-K, K + 1.0)[None, :, None]
    ll = np.arange(-L, L + 1.0)[None, None, :]
    x = (hh * r[:, 0] + kk * r[:, 1]) + ll * r[:, 2]  # (3, nh, nk, nl): x_d = (h b1_d + k b2_d) + l b3_d
    x *= x
    d2 = x[0] + x[1]
    d2 += x[2]
    g = np.sqrt(d2, out=d2).reshape(-1, 2 * L + 1)
    inside = g <= MAX_G
    # Friedel half-space: h > 0, or h == 0 and k > 0, or h == k == 0 and l > 0
    inside[:K] = False
    inside[K, : L + 1] = False
    rows = inside.any(axis=1).nonzero()[0]
    if rows.size == 0:
        raise XRDError("no reflections in 2-theta 0-90 degrees (cell too small)")
    inside = inside[rows]
    idx = inside.ravel().nonzero()[0]
    g = g[rows].ravel()[idx]
    # pymatgen sorts by (|g|, -h, -k, -l); reflections tied in |g| are interchangeable here
    order = np.argsort(g)
    return rows, idx[order], g[order]


# --------------------------------------------------------------------------------------------
# structure factors


def _phase_sums(rows: np.ndarray, idx: np.ndarray, hmax: tuple[int, int, int], frac: np.ndarray, groups) -> np.ndarray:
    """(n_species, M): sum_{j in species} occ_j exp(2 pi i (h x_j + k y_j + l z_j)) per reflection.

    Separable in h, k, l: per-axis tables exp(2 pi i n x_j) come from one cos/sin per atom and
    axis and complex powers (cumulative products; negative powers are conjugates; error
    ~n * 1e-16, far below what the intensity cut can see). For every box row (h, k) holding a
    reflection the product of their tables is formed (chunked to bound memory), and one complex
    matrix product per species contracts it with the l table over that species' atoms, giving
    the sums on those rows x all l, from which the reflections are picked by flat index.
    """
    H, K, L = hmax
    nk, nl = 2 * K + 1, 2 * L + 1
    n_entries = frac.shape[0]
    m = max(H, K, L)
    if (2 * m + 1) * 3 * n_entries > MAX_TABLE_ENTRIES:
        raise XRDError(f"cell too large for the engine: {n_entries} site entries, indices up to {m}")
    ang = (2 * np.pi) * frac.T  # (3, n)
    base = np.empty(ang.shape, dtype=np.complex128)
    np.cos(ang, out=base.real)
    np.sin(ang, out=base.imag)
    tab = np.empty((2 * m + 1,) + ang.shape, dtype=np.complex128)  # row m + n: exp(2 pi i n x)
    pos = np.empty((m,) + ang.shape, dtype=np.complex128)
    pos[:] = base
    np.cumprod(pos, axis=0, out=tab[m + 1 :])
    tab[m] = 1.0
    np.conjugate(tab[: m : -1], out=tab[:m])
    tab_h = tab[m : m + H + 1, 0]
    tab_k = tab[m - K : m + K + 1, 1]
    tab_l = tab[m - L : m + L + 1, 2]
    # per species, the l table weighted by occupancy, transposed: (n_entries_sp, nl)
    ltabs = [(tab_l[:, s0:s1] if w is None else tab_l[:, s0:s1] * w).T for s0, s1, w in groups]
    rh, rk = np.divmod(rows, nk)
    if len(groups) * rows.size * nl > MAX_SPECIES_SUMS:
        raise XRDError(f"cell too large for the engine: {len(groups)} species x {rows.size * nl} box points")
    q = np.empty((len(groups), rows.size, nl), dtype=np.complex128)
    step = max(1, PHASE_CHUNK_ENTRIES // n_entries)
    for r0 in range(0, rows.size, step):
        r1 = min(rows.size, r0 + step)
        p = tab_h[rh[r0:r1]] * tab_k[rk[r0:r1]]  # (rows, n_entries)
        for sp, (s0, s1, _) in enumerate(groups):
            np.matmul(p[:, s0:s1], ltabs[sp], out=q[sp, r0:r1])
    return q.reshape(len(groups), -1)[:, idx]


# --------------------------------------------------------------------------------------------
# peak merge, intensity cut and binning


def _merge_and_bin(two_thetas: np.ndarray, intensities: np.ndarray) -> np.ndarray:
    """pymatgen's merge (key round(2theta / TWO_THETA_TOL)), intensity cut, scaling and binning.

    Both arrays are per distinct |g|, ascending. A merged peak sits at the 2-theta of its
    first (lowest-|g|) member.
    """
    keys = np.rint(two_thetas / TWO_THETA_TOL).astype(np.int64)  # = np.round: half to even
    step = keys[1:] - keys[:-1]
    if step.size and step.min() < 0:  # arcsin and degrees are monotone: a guard only
        _, first, kid = np.unique(keys, return_index=True, return_inverse=True)
        merged = np.bincount(kid, weights=intensities)
    else:
        newkey = np.empty(keys.size, dtype=bool)
        newkey[0] = True
        np.not_equal(step, 0, out=newkey[1:])
        first = newkey.nonzero()[0]
        merged = np.add.reduceat(intensities, first)
    top = merged.max()
    if not top > 0:
        raise XRDError("every reflection has zero intensity")
    keep = merged / top * 100 > SCALED_INTENSITY_TOL
    y = merged[keep] / (top / 100)  # pymatgen scales the kept peaks to a maximum of 100
    idx = np.rint(two_thetas[first[keep]] / TWO_THETA_STEP).astype(np.intp)  # 2-theta <= 90
    out = np.bincount(idx, weights=y, minlength=N_BINS)
    out /= out.max()
    return out.astype(np.float32)
