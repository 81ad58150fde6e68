"""Measured powder patterns -> the 4501-bin stick grid the model was trained on.

The model only knows simulated *stick* patterns (Cu K-alpha, 2-theta 0-90 deg, 0.02 deg
bins, maximum 1). A diffractometer scan is broadened, sits on a background and may use
another anode, so ``measured_pattern`` turns it into sticks:

1. read two columns (2-theta in degrees, intensity); extra columns (e.g. .xye errors) are
   ignored; header/comment lines before the data are skipped; fields are separated by
   whitespace or ``,``, or by ``;`` with ``,`` as the decimal mark (``11,25;1010,0``); every data
   line must have as many fields as the first; a scan needs positive intensities;
2. resampled on a uniform grid of 0.02 deg x lambda / lambda_Cu (linear interpolation);
3. (see 7)
4. background: rolling minimum followed by a rolling mean of the same width
   (``tracking.measured.background_window_deg``), subtracted;
5. optional Savitzky-Golay smoothing (``smooth_points``) against counting noise;
5b. Cu K-alpha2 (a Cu K-alpha scan only: a wavelength within 0.0005 A of pymatgen's ``CuKa``, the
   default): a tube scan holds the K-alpha1/K-alpha2 doublet, the simulator one weighted line, and
   above ~50 deg the doublet splits into two peaks. Rachinger correction on the background-free
   profile: going up in 2-theta, I1(2t) = I(2t) - R x I1(2t1), 2t1 the K-alpha1 angle of the
   d-spacing K-alpha2 puts at 2t (sin t1 = sin t x lambda1 / lambda2; pymatgen's ``CuKa1`` 1.54056 A,
   ``CuKa2`` 1.54439 A), R = ``kalpha2_ratio`` (0.5); the peaks left are K-alpha1 peaks and go
   through step 7 from lambda1. ``kalpha2``: "auto" (default) strips unless stripping would dig
   holes where a single-line scan's K-alpha2 partners would be (:func:`kalpha2_evidence`: the scan
   has no K-alpha2, e.g. a monochromated one, which stripping would spoil), "strip" always, "none"
   never; ``--wavelength CuKa1`` (K-alpha1 only) or another anode is never stripped;
6. peaks: ``scipy.signal.find_peaks`` with a prominence of at least ``peak_prominence`` x maximum
   and ``peak_min_snr`` x the counting noise (robust sigma of point-to-point differences), and a
   minimum separation; each peak's background-free height becomes a stick at its 2-theta;
7. other wavelengths (and K-alpha1 after 5b): peak positions are converted through d-spacings (Bragg,
   d = lambda / (2 sin theta)) to the Cu K-alpha 2-theta (pymatgen's ``CuKa`` = 1.54184 A) and
   heights corrected by the Lorentz-polarization ratio; peaks beyond 90 deg are dropped;
8. sticks are binned with the simulator's ``bin_peaks`` (nearest bin, maximum scaled to 1).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from xrdmatch import TWO_THETA_MAX, TWO_THETA_STEP
from xrdmatch.config import MeasuredConfig

#: Pattern file suffixes read as measured scans (two numeric columns).
MEASURED_SUFFIXES = (".xy", ".xye", ".csv", ".txt", ".dat")
CU_KA = 1.54184
_SPLIT = re.compile(r"[\s,;]+")
#: A number written with a decimal comma (or an integer): 11,25  -3,5E+02  1010
_COMMA_NUMBER = re.compile(r"[+-]?(\d+(,\d*)?|,\d+)([eE][+-]?\d+)?")


def _fields(line: str) -> list[str]:
    """The fields of a data line, with '.' as the decimal mark.

    ``;`` separates fields and ``,`` is then the decimal mark (``11,250;1010,0``); whitespace-separated
    numbers written with a decimal comma (``11,250  1010,0``) likewise; otherwise whitespace and ``,``
    separate fields (``11.25,1010`` or ``11.25 1010``).
    """
    if ";" in line:
        return [t.strip().replace(",", ".") for t in line.split(";") if t.strip()]
    words = line.split()
    if len(words) >= 2 and any("," in w for w in words) and all(_COMMA_NUMBER.fullmatch(w) for w in words):
        return [w.replace(",", ".") for w in words]
    return [t for t in _SPLIT.split(line) if t]


class MeasuredPatternError(ValueError):
    """A measured pattern that cannot be used; the message names the file and the problem."""


def wavelength_angstrom(value: str | float | None) -> float:
    """A wavelength in Angstrom from a number or an anode name (pymatgen's table: CuKa, MoKa, Co, ...)."""
    from pymatgen.analysis.diffraction.xrd import WAVELENGTHS

    if value is None or value == "":
        return CU_KA
    if isinstance(value, (int, float)):
        lam = float(value)
    else:
        text = str(value).strip()
        try:
            lam = float(text)
        except ValueError:
            by_lower = {k.lower(): v for k, v in WAVELENGTHS.items()}
            key = text.lower()
            if key not in by_lower and key + "ka" in by_lower:  # "Mo" -> "MoKa"
                key += "ka"
            if key not in by_lower:
                raise MeasuredPatternError(
                    f"unknown wavelength {text!r}: give Angstrom or one of {', '.join(sorted(WAVELENGTHS))}"
                ) from None
            lam = float(by_lower[key])
    if not (0.1 <= lam <= 5.0):
        raise MeasuredPatternError(f"wavelength {lam} A is outside 0.1-5 A")
    return lam


def read_two_column(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """(2-theta, intensity) of a text scan; raises MeasuredPatternError naming the file and line."""
    p = Path(path)
    raw = p.read_bytes()
    if not raw.strip():
        raise MeasuredPatternError(f"{p}: empty file")
    if b"\x00" in raw[:4096]:
        raise MeasuredPatternError(f"{p}: binary file, expected two text columns (2-theta, intensity)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    rows: list[tuple[float, float]] = []
    first = 0  # line number of the first data line
    n_fields = 0  # and its number of fields: every data line must have as many
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s[0] in "#!;%'\"":
            continue
        parts = _fields(s)
        try:
            a, b = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            if not rows:  # a header line before the data
                continue
            raise MeasuredPatternError(f"{p}: line {n}: expected two numbers (2-theta, intensity), got {s[:60]!r}") from None
        if not rows:
            first, n_fields = n, len(parts)
        elif len(parts) != n_fields:
            raise MeasuredPatternError(
                f"{p}: line {n}: {len(parts)} fields, but the first data line (line {first}) has {n_fields} "
                f"(mixed separators or decimal marks?), got {s[:60]!r}"
            )
        if not (np.isfinite(a) and np.isfinite(b)):
            raise MeasuredPatternError(f"{p}: line {n}: NaN or infinite value")
        rows.append((a, b))
    if not rows:
        raise MeasuredPatternError(f"{p}: no numeric (2-theta, intensity) rows")
    arr = np.asarray(rows, dtype=np.float64)
    return arr[:, 0], arr[:, 1]


#: Cu K-alpha2 handling of a Cu K-alpha scan: "auto" strips it (Rachinger) unless the scan shows it
#: has none (:func:`kalpha2_evidence` above ``KALPHA2_AUTO_MAX``), "strip" always, "none" never.
KALPHA2_MODES = ("auto", "strip", "none")
#: "auto" leaves a Cu K-alpha scan unstripped when stripping would dig holes of more than this
#: fraction of the peak area (:func:`kalpha2_evidence`; synthetic K-alpha1+2 scans: <= 0.026,
#: single-line scans with peaks >= 20x the counting noise: >= 0.05; weaker ones overlap).
KALPHA2_AUTO_MAX = 0.03
#: I(K-alpha2) / I(K-alpha1) of a Cu tube.
KALPHA2_RATIO = 0.5
#: A wavelength this close to pymatgen's CuKa (1.54184 A) is a Cu K-alpha1+2 scan; CuKa1 is 0.0013 A away.
_CU_KA_TOL = 5e-4


def cu_kalpha_lines() -> tuple[float, float, float]:
    """(weighted CuKa, CuKa1, CuKa2) in Angstrom from pymatgen's table (the usual values if it lacks one)."""
    from pymatgen.analysis.diffraction.xrd import WAVELENGTHS

    return (float(WAVELENGTHS.get("CuKa", CU_KA)), float(WAVELENGTHS.get("CuKa1", 1.540562)),
            float(WAVELENGTHS.get("CuKa2", 1.544390)))


def is_cu_kalpha(wavelength: float) -> bool:
    """Whether a scan at ``wavelength`` is Cu K-alpha (the unresolved K-alpha1 + K-alpha2 pair)."""
    return abs(float(wavelength) - cu_kalpha_lines()[0]) <= _CU_KA_TOL


def strip_kalpha2(grid: np.ndarray, intensity: np.ndarray, ratio: float = KALPHA2_RATIO,
                  lambda1: float | None = None, lambda2: float | None = None) -> np.ndarray:
    """Rachinger K-alpha2 stripping of a profile on a uniform, increasing 2-theta ``grid`` (degrees).

    Going up in 2-theta, I1(2t) = I(2t) - ratio x I1(2t1): 2t1 = 2 asin(sin t x lambda1 / lambda2) is
    where K-alpha1 diffracts from the d-spacing that K-alpha2 puts at 2t, I1 there linearly
    interpolated between the already stripped points (solved for the current point when 2t1 lies
    within one step below 2t, at low angles). Points whose 2t1 lies before the scan are kept.
    Returns the K-alpha1 profile (not clipped; linear in ``intensity``).
    """
    _, l1, l2 = cu_kalpha_lines()
    l1 = l1 if lambda1 is None else float(lambda1)
    l2 = l2 if lambda2 is None else float(lambda2)
    x = np.asarray(grid, dtype=np.float64)
    y = np.asarray(intensity, dtype=np.float64)
    if ratio == 0 or len(x) < 2:
        return y.copy()
    step = (x[-1] - x[0]) / (len(x) - 1)
    s1 = np.clip(np.sin(np.radians(x / 2.0)) * (l1 / l2), -1.0, 1.0)
    frac = (2.0 * np.degrees(np.arcsin(s1)) - x[0]) / step  # fractional grid index of 2t1
    j_all = np.floor(frac).astype(np.int64)
    w_all = frac - j_all
    out = y.copy()
    for i in range(len(x)):
        j, w = int(j_all[i]), float(w_all[i])
        if j < 0:
            continue  # K-alpha1 partner before the scan starts: nothing known to subtract
        if j + 1 < i:
            out[i] = y[i] - ratio * ((1.0 - w) * out[j] + w * out[j + 1])
        elif j + 1 == i:  # I1(i) = y(i) - ratio ((1 - w) I1(j) + w I1(i))
            out[i] = (y[i] - ratio * (1.0 - w) * out[j]) / (1.0 + ratio * w)
        else:  # 2t1 rounds onto 2t itself
            out[i] = y[i] / (1.0 + ratio)
    return out


def _hole_fraction(stripped: np.ndarray, noise: float, ratio: float) -> float:
    """Area of a stripped profile below -2 sigma over its area above +2 sigma (see kalpha2_evidence)."""
    thr = 2.0 * noise / np.sqrt(1.0 - ratio**2)
    pos = float(stripped[stripped > thr].sum())
    return float(-stripped[stripped < -thr].sum()) / pos if pos > 0 else 0.0


def kalpha2_evidence(grid: np.ndarray, signal: np.ndarray, noise: float, ratio: float = KALPHA2_RATIO) -> float:
    """How strongly a background-free Cu K-alpha profile says it holds no K-alpha2 (about 0: it does).

    Stripping a K-alpha1+2 profile leaves a clean, non-negative K-alpha1 profile; stripping a
    single-line one digs a hole of depth ``ratio`` x height where each peak's K-alpha2 partner
    would be. Returns the area of the stripped profile below -2 sigma over its area above +2 sigma
    (sigma: ``noise`` times the recursion's noise gain 1 / sqrt(1 - ratio^2)).
    """
    return _hole_fraction(strip_kalpha2(grid, signal, ratio), noise, ratio)


def to_cu_two_theta(two_theta: np.ndarray, wavelength: float) -> np.ndarray:
    """2-theta measured at ``wavelength`` -> 2-theta of the same d-spacing under Cu K-alpha (NaN if unreachable)."""
    if abs(wavelength - CU_KA) < 1e-9:
        return np.asarray(two_theta, dtype=np.float64)
    d = wavelength / (2.0 * np.sin(np.radians(np.asarray(two_theta) / 2.0)))
    s = CU_KA / (2.0 * d)
    with np.errstate(invalid="ignore"):
        return np.where(s <= 1.0, 2.0 * np.degrees(np.arcsin(np.clip(s, 0.0, 1.0))), np.nan)


def lorentz_polarization(two_theta: np.ndarray) -> np.ndarray:
    """pymatgen's Lorentz-polarization factor (1 + cos^2 2t) / (sin^2 t cos t)."""
    t = np.radians(np.asarray(two_theta) / 2.0)
    return (1.0 + np.cos(2 * t) ** 2) / (np.sin(t) ** 2 * np.cos(t))


def _kalpha2_options(cfg: MeasuredConfig, kalpha2: str | None, ratio: float | None) -> tuple[str, float]:
    """The K-alpha2 mode and ratio: the arguments, else the config's (tracking.measured)."""
    mode = kalpha2 if kalpha2 is not None else cfg.kalpha2
    r = ratio if ratio is not None else cfg.kalpha2_ratio
    mode = str(mode).lower()
    if mode not in KALPHA2_MODES:
        raise ValueError(f"kalpha2={mode!r}: expected one of {', '.join(KALPHA2_MODES)}")
    if not (0.0 <= float(r) < 1.0):
        raise ValueError(f"kalpha2_ratio={r}: expected 0 <= ratio < 1")
    return mode, float(r)


def _check_coverage(tt: np.ndarray, wavelength: float, cfg: MeasuredConfig, name: str) -> None:
    """Refuse a scan too narrow or too coarse for a model that reads whole 0-90 deg patterns."""
    scale = wavelength / CU_KA  # degrees here per degree of Cu 2-theta (small-angle)
    lo, hi = to_cu_two_theta(np.array([tt[0], tt[-1]]), wavelength)
    hi = TWO_THETA_MAX if not np.isfinite(hi) else min(float(hi), TWO_THETA_MAX)
    if not np.isfinite(lo) or hi - lo < cfg.min_span_deg:
        where = f"{tt[0]:g}-{tt[-1]:g} deg" + ("" if scale == 1 else f" ({lo:.1f}-{hi:.1f} deg Cu K-alpha)")
        raise MeasuredPatternError(
            f"{name}: the scan covers 2-theta {where}, less than min_span_deg {cfg.min_span_deg:g} of the 0-"
            f"{TWO_THETA_MAX:g} deg the model reads: a partial scan, or not 2-theta in degrees (d-spacing, Q, "
            "radians)?")
    steps = np.diff(tt) / scale
    k = int(np.argmax(steps))
    if steps[k] > cfg.max_step_deg:
        raise MeasuredPatternError(
            f"{name}: no points between 2-theta {tt[k]:g} and {tt[k + 1]:g} deg (a step of {steps[k]:.2g} deg Cu "
            f"K-alpha, over max_step_deg {cfg.max_step_deg:g}): peaks there would be missed")


def sticks_from_scan(two_theta: np.ndarray, intensity: np.ndarray, cfg: MeasuredConfig,
                     wavelength: float = CU_KA, name: str = "pattern", kalpha2: str | None = None,
                     kalpha2_ratio: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Background-free peak positions (Cu 2-theta) and heights of a scan (steps 2-7 of the module doc).

    ``kalpha2`` ("auto" | "strip" | "none") and ``kalpha2_ratio``: step 5b, for a Cu K-alpha scan
    (None: the config's ``kalpha2`` / ``kalpha2_ratio``, "auto" and 0.5 by default).

    Peaks are found in the scan's own angles (grid step and windows scaled by lambda / lambda_Cu,
    so a Mo scan is treated like a Cu one); their positions then move to Cu 2-theta and their
    heights are corrected by the ratio of Lorentz-polarization factors (Cu angle / measured
    angle), as pymatgen's simulated sticks include it.
    """
    from scipy.ndimage import minimum_filter1d, uniform_filter1d
    from scipy.signal import find_peaks, savgol_filter

    mode, ratio = _kalpha2_options(cfg, kalpha2, kalpha2_ratio)
    tt = np.asarray(two_theta, dtype=np.float64)
    y = np.asarray(intensity, dtype=np.float64)
    if tt.shape != y.shape or tt.ndim != 1:
        raise MeasuredPatternError(f"{name}: 2-theta and intensity must be 1-D of the same length")
    if not (np.isfinite(tt).all() and np.isfinite(y).all()):
        raise MeasuredPatternError(f"{name}: NaN or infinite values")
    if len(y) and not y.max() > 0:
        raise MeasuredPatternError(f"{name}: no positive intensity (maximum {y.max():g}): not a diffraction scan")
    if len(y) and np.median(y) < 0 and -y.min() > y.max():
        raise MeasuredPatternError(
            f"{name}: mostly negative intensities (median {np.median(y):g}, minimum {y.min():g}, maximum "
            f"{y.max():g}): inverted or over-subtracted scan?"
        )
    if len(tt) < cfg.min_points:
        raise MeasuredPatternError(f"{name}: {len(tt)} points, need at least {cfg.min_points}")
    if (tt <= 0).any() or (tt >= 180).any():
        raise MeasuredPatternError(f"{name}: 2-theta values must lie in (0, 180) degrees")
    order = np.argsort(tt, kind="stable")
    tt, y = tt[order], y[order]
    repeat = np.flatnonzero(np.diff(tt) == 0)
    clash = repeat[y[repeat] != y[repeat + 1]]
    if len(clash):  # the same angle twice, counted twice: keeping one would drop a scan without a word
        k = int(clash[0])
        raise MeasuredPatternError(
            f"{name}: 2-theta {tt[k]:g} deg appears twice with different intensities ({y[k]:g}, {y[k + 1]:g}; "
            f"{len(clash)} such angles): two scans in one file? Merge or split them first")
    tt, idx = np.unique(tt, return_index=True)  # exact repeats (a row written twice) count once
    y = y[idx]
    if len(tt) < cfg.min_points:
        raise MeasuredPatternError(f"{name}: {len(tt)} distinct 2-theta values, need at least {cfg.min_points}")
    _check_coverage(tt, wavelength, cfg, name)
    # counting noise on the raw samples: robust sigma of point-to-point differences
    # (peaks are sparse outliers; interpolation would smooth the noise and hide it)
    noise = 1.4826 * float(np.median(np.abs(np.diff(y)))) / np.sqrt(2.0)
    scale = wavelength / CU_KA  # degrees here per degree of Cu 2-theta (small-angle)
    step = TWO_THETA_STEP * scale
    grid = np.arange(tt[0], tt[-1] + step / 2, step)
    sig = np.interp(grid, tt, y)
    win = max(3, int(round(cfg.background_window_deg / TWO_THETA_STEP)) | 1)
    background = uniform_filter1d(minimum_filter1d(sig, win, mode="nearest"), win, mode="nearest")
    sig = np.clip(sig - np.minimum(background, sig), 0.0, None)
    if cfg.smooth_points >= 3 and len(sig) > cfg.smooth_points:
        sig = np.clip(savgol_filter(sig, cfg.smooth_points | 1, 2), 0.0, None)
    peak_lambda = wavelength  # the wavelength the found peak positions belong to
    if mode != "none" and ratio > 0 and is_cu_kalpha(wavelength) and sig.max() > 0:
        _, lambda1, lambda2 = cu_kalpha_lines()
        stripped = strip_kalpha2(grid, sig, ratio, lambda1, lambda2)
        if mode == "strip" or _hole_fraction(stripped, noise, ratio) <= KALPHA2_AUTO_MAX:
            sig, peak_lambda = np.clip(stripped, 0.0, None), lambda1  # K-alpha1 peaks from here on
            noise /= np.sqrt(1.0 - ratio**2)  # the recursion's noise gain (independent points)
    top = sig.max()
    if not top > 0:
        raise MeasuredPatternError(f"{name}: flat pattern, no peaks above the background")
    dist = max(1, int(round(cfg.peak_min_distance_deg / TWO_THETA_STEP)))
    min_prom = max(cfg.peak_prominence * top, cfg.peak_min_snr * noise)
    peaks, _ = find_peaks(sig, prominence=min_prom, distance=dist)
    if len(peaks) == 0:
        raise MeasuredPatternError(
            f"{name}: no peaks found (prominence >= {cfg.peak_prominence:g} x maximum and {cfg.peak_min_snr:g} x noise)"
        )
    # sub-step peak position: vertex of the parabola through the maximum and its neighbours
    inner = np.clip(peaks, 1, len(sig) - 2)
    a, b, c = sig[inner - 1], sig[inner], sig[inner + 1]
    den = a - 2 * b + c
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.where(den < 0, 0.5 * (a - c) / den, 0.0)
    shift = np.where(inner == peaks, np.clip(shift, -0.5, 0.5), 0.0)
    pos, height = grid[peaks] + shift * step, sig[peaks]
    if abs(peak_lambda - CU_KA) > 1e-9:
        cu = to_cu_two_theta(pos, peak_lambda)
        ok = np.isfinite(cu)
        height = height[ok] * lorentz_polarization(cu[ok]) / lorentz_polarization(pos[ok])
        pos = cu[ok]
    keep = pos <= TWO_THETA_MAX
    if not keep.any():
        raise MeasuredPatternError(f"{name}: no peaks inside 2-theta 0-{TWO_THETA_MAX:g} deg (Cu K-alpha)")
    return pos[keep], height[keep]


def measured_pattern(path: str | os.PathLike[str], wavelength: str | float | None = None,
                     cfg: MeasuredConfig | None = None, kalpha2: str | None = None,
                     kalpha2_ratio: float | None = None) -> np.ndarray:
    """(4501,) float32 stick pattern (maximum 1) of a measured two-column scan.

    ``kalpha2`` / ``kalpha2_ratio``: Cu K-alpha2 stripping (see :func:`sticks_from_scan`).
    """
    from xrdmatch.simulation.xrd import XRDError, bin_peaks

    cfg = cfg or MeasuredConfig()
    lam = wavelength_angstrom(wavelength)
    tt, y = read_two_column(path)
    pos, height = sticks_from_scan(tt, y, cfg, lam, name=str(path), kalpha2=kalpha2, kalpha2_ratio=kalpha2_ratio)
    try:
        return bin_peaks(pos, height)
    except XRDError as e:
        raise MeasuredPatternError(f"{path}: {e}") from None
