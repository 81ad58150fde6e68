"""Li diffusion from MD frames with pymatgen-analysis-diffusion, Arrhenius fit and the verdict.

Per temperature: ``DiffusionAnalyzer`` on the production frames' displacements (drift-corrected
Li MSD -> D and its error). Across temperatures: ``fit_arrhenius`` (Ea and its standard error),
``get_extrapolated_conductivity`` (Nernst-Einstein via ``get_conversion_factor``) to 300 K, and
the verdict. Data that cannot support a label (too few hops, melted framework, non-Arrhenius)
gives ``inconclusive`` with the reason instead of a label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xrdmatch.config import ValidationConfig

SPECIE = "Li"
#: pymatgen-analysis-diffusion turns an MSD slope <= 0 into 1e-15 A^2/fs (D = slope / 60 in
#: cm^2/s): that D is no measurement, and is read here as "no positive D" (left out of the fit).
PMG_D_FLOOR = 1e-15 / 60


@dataclass
class TemperatureAnalysis:
    temperature: float
    diffusivity: float  # cm^2/s
    diffusivity_err: float  # cm^2/s: standard error of D over the Li ions (per-ion MSD slopes)
    li_msd: float  # A^2, mean drift-corrected Li square displacement over the production run
    framework_msd: float  # A^2, same for every non-Li atom (melting / decomposition indicator)
    n_frames: int
    smoothed: str  # DiffusionAnalyzer smoothing used ("max", or "none" for runs too short for it)
    #: A^2: the Li MSD's vibrational offset, the intercept of its fitted line where significant
    #: (``vibrational_plateau``), else 0. A caged Li rattles up to this within ~0.1 ps and stays.
    li_msd_plateau: float = 0.0

    @property
    def li_hop_msd(self) -> float:
        """A^2: the Li MSD beyond its vibrational plateau, what the hop gate counts."""
        return max(self.li_msd - self.li_msd_plateau, 0.0)


@dataclass
class ArrheniusFit:
    temperatures: list[float]
    ea_ev: float
    ea_err_ev: float | None
    prefactor: float  # cm^2/s
    r2: float | None  # of ln D vs 1/T, None with 2 points
    sigma_300: float  # S/cm
    sigma_300_range: tuple[float, float] | None  # +-1 standard error of the extrapolated ln D
    #: standard error of ln sigma(300 K): the per-temperature errors of D propagated through the
    #: fit, or the fit's residual scatter (3+ points) where larger; None where D has no error
    ln_sigma_se: float | None = None


def frames_to_structures(frames) -> list:
    """ASE frames -> pymatgen Structures (lattice, species, fractional coordinates only)."""
    from pymatgen.core import Lattice, Structure

    if not frames:
        return []
    species = frames[0].get_chemical_symbols()
    out = []
    for f in frames:
        lat = Lattice(np.asarray(f.cell[:], dtype=float))
        out.append(Structure(lat, species, f.get_scaled_positions(wrap=False), coords_are_cartesian=False))
    return out


def displacements(frames) -> np.ndarray:
    """(n_sites, n_frames, 3) cartesian displacements from frame 0, unwrapped by minimum image.

    Same as ``DiffusionAnalyzer.from_structures`` for a fixed (NVT) cell, vectorised.
    """
    frac = np.stack([f.get_scaled_positions(wrap=False) for f in frames])  # (F, N, 3)
    dp = np.diff(frac, axis=0)
    dp -= np.round(dp)
    f_disp = np.concatenate([np.zeros_like(frac[:1]), np.cumsum(dp, axis=0)])
    cart = f_disp @ np.asarray(frames[0].cell[:], dtype=float)
    return np.ascontiguousarray(cart.transpose(1, 0, 2))


#: Lags pymatgen's "max" smoothing must have to fit D: fewer (a production run just over 1 ps, or a
#: cell with few Li) and its fit is a sliver of lags, or fails; the plain MSD(t) is used instead.
MIN_LAGS = 20


def max_lags(n_frames: int, n_li: int, timestep_fs: float, step_skip: int, min_obs: int = 30) -> int:
    """How many lags pymatgen's ``smoothed="max"`` fits: from 1 ps to n_Li x n_frames / min_obs
    frames (``DiffusionAnalyzer``'s own window)."""
    min_dt = int(1000 / (step_skip * timestep_fs))
    max_dt = min(n_li * n_frames // min_obs, n_frames)
    return max(0, max_dt - min_dt)


def msd_line(dt: np.ndarray, msd: np.ndarray, weighted: bool) -> np.ndarray:
    """[slope A^2/fs, intercept A^2] of an MSD (n_lags,) or of each row of (n, n_lags), fitted as
    pymatgen fits it (weights 1/dt under "max")."""
    a = np.stack([dt, np.ones_like(dt)], axis=1)
    w = np.sqrt(1.0 / np.where(dt > 0, dt, np.inf)) if weighted else np.ones_like(dt)
    return np.linalg.lstsq(a * w[:, None], (msd * w).T, rcond=None)[0]


def windowed_msd(disp: np.ndarray, frame_fs: float, start_fs: float) -> tuple[np.ndarray, np.ndarray]:
    """(lags fs, per-ion MSD (n, n_lags)) averaged over every time origin, for lags >= start_fs up
    to the whole run. Like pymatgen's "max" smoothing, but from ``start_fs`` instead of 1 ps and
    without its n_Li x n_frames / 30 cap (which would leave a short run no lag): the last lags
    rest on few origins, and the 1/dt weights of the fit discount them."""
    n_frames = disp.shape[1]
    lags = np.arange(max(1, math.ceil(start_fs / frame_fs - 1e-9)), n_frames)
    msd = np.stack([np.mean(np.sum((disp[:, k:] - disp[:, :-k]) ** 2, axis=-1), axis=1) for k in lags], axis=1) \
        if len(lags) else np.zeros((len(disp), 0))
    return lags * frame_fs, msd


def vibrational_plateau(dt: np.ndarray, ion_msd: np.ndarray) -> float:
    """A^2: the intercept of the fitted Li MSD line where it is significant (> 2 standard errors
    over the ions), else 0: a random walk's noisy intercept, clamped at 0, would be a bias."""
    icepts = msd_line(dt, ion_msd, weighted=True)[1]
    mean = float(np.mean(icepts))
    se = float(np.std(icepts, ddof=1) / np.sqrt(len(icepts))) if len(icepts) > 1 else math.inf
    return mean if mean > 2 * se else 0.0


def per_ion_standard_error(sq_disp: np.ndarray, dt: np.ndarray, weighted: bool) -> float:
    """Standard error of D over the Li ions (cm^2/s): each ion's MSD slope fitted as pymatgen fits
    the mean (weights 1/dt for "max"), then std / sqrt(n). pymatgen's ``diffusivity_std_dev`` treats
    the correlated MSD points as independent, and under "max" weighting is ~1000x too small."""
    n = len(sq_disp)
    if n < 2 or len(dt) < 2:
        return float("nan")
    slopes = msd_line(dt, sq_disp, weighted)[0]
    return float(np.std(slopes / 60.0, ddof=1) / np.sqrt(n))  # /60: A^2/fs -> cm^2/s, and 2 x 3 dimensions


def analyze_temperature(
    frames, temperature: float, timestep_fs: float, step_skip: int,
    fit_start_fs: float = ValidationConfig.model_fields["msd_fit_start_fs"].default,
) -> TemperatureAnalysis:
    """Li diffusivity at one temperature from its production frames (>= 2 frames).

    The plain MSD (runs too short for "max" smoothing) is fitted from ``fit_start_fs`` on: fitted
    from t = 0, the vibrational rise of a caged Li reads as a positive slope, a diffusivity with
    no hop behind it. "max" smoothing starts at 1 ps already.
    """
    from pymatgen.analysis.diffusion.analyzer import DiffusionAnalyzer, get_diffusivity_from_msd

    if len(frames) < 2:
        raise ValueError(f"{temperature:g} K: {len(frames)} production frame(s), need at least 2")
    structure = frames_to_structures(frames[:1])[0]
    disp = displacements(frames)
    n_li = sum(1 for site in structure if site.specie.symbol == SPECIE)
    smoothed: str | bool = "max" if max_lags(len(frames), n_li, timestep_fs, step_skip) >= MIN_LAGS else False
    try:
        da = DiffusionAnalyzer(structure, disp, SPECIE, temperature, timestep_fs, step_skip, smoothed=smoothed)
    except (ValueError, IndexError, np.linalg.LinAlgError):
        if not smoothed:
            raise
        # too few lags for pymatgen's fit after all: the plain MSD(t) from the first frame
        smoothed = False
        da = DiffusionAnalyzer(structure, disp, SPECIE, temperature, timestep_fs, step_skip, smoothed=False)
    sq = np.sum(da.corrected_displacements**2, axis=-1)  # (n_sites, n_frames)
    li_msd = float(np.mean(sq[da.indices]))
    fw_msd = float(np.mean(sq[da.framework_indices])) if len(da.framework_indices) else 0.0
    if smoothed:  # pymatgen's own fit, from 1 ps
        dt, ion_msd = np.asarray(da.dt, float), da.sq_disp_ions[da.indices]
        d = float(da.diffusivity)
    else:
        dt, ion_msd = windowed_msd(da.corrected_displacements[da.indices], timestep_fs * step_skip, fit_start_fs)
        if len(dt) < 3:  # pymatgen's error of the slope needs a residual
            raise ValueError(f"{temperature:g} K: {len(frames)} production frames leave {len(dt)} lag(s) from "
                             f"msd_fit_start_fs={fit_start_fs:g} fs, need at least 3")
        d = float(get_diffusivity_from_msd(ion_msd.mean(axis=0), dt, "max")[0])
    err = per_ion_standard_error(ion_msd, dt, weighted=True)
    plateau = vibrational_plateau(dt, ion_msd)
    return TemperatureAnalysis(
        temperature=float(temperature),
        diffusivity=0.0 if d <= PMG_D_FLOOR * (1 + 1e-9) else d,  # the MSD did not grow: no D to fit
        diffusivity_err=err if math.isfinite(err) else float("nan"),
        li_msd=li_msd,
        framework_msd=fw_msd,
        n_frames=len(frames),
        smoothed=str(smoothed) if smoothed else "none",
        li_msd_plateau=plateau,
    )


def propagated_se(temps, diffs, d_errs, at: float = 300.0) -> float | None:
    """Standard error of ln D(``at``) from the standard errors of each D, carried through the
    unweighted ln D vs 1/T line that pymatgen fits (ln D(at) = sum c_i ln D_i, Var = sum c_i^2
    (err_i / D_i)^2). None if a D has no error: one Li ion gives no scatter to measure it by."""
    x = 1.0 / np.asarray(temps, dtype=float)
    rel = np.asarray(d_errs, dtype=float) / np.asarray(diffs, dtype=float)
    if len(x) < 2 or not np.all(np.isfinite(rel)):
        return None
    sxx = float(np.sum((x - x.mean()) ** 2))
    c = 1.0 / len(x) + (1.0 / at - x.mean()) * (x - x.mean()) / sxx
    return float(math.sqrt(np.sum(c**2 * rel**2)))


def band_multiplier(z: float, n_li: int) -> float:
    """Standard errors that cover what ``z`` normal ones cover, when the error itself is estimated
    from the scatter of ``n_li`` ions: Student's t with n_li - 1 degrees of freedom (x1.84 for 2 Li
    at z = 1, x1.08 for 8). The error of 2 ions is a guess: taken at face value, it let through
    most of the wrong labels that benchmarks/verdict_reliability.py counts with the band."""
    from scipy.stats import norm, t

    return float(t.ppf(norm.cdf(z), n_li - 1)) if n_li > 1 else math.inf


def error_band(sigma: float, ln_width: float) -> tuple[float, float]:
    """sigma x exp(-+ln_width), finite: a D known to no better than 1000 % gives a width past what exp
    can hold."""
    w = min(ln_width, 700.0)
    return sigma * math.exp(-w), sigma * math.exp(w)


def fit(temps: list[float], diffs: list[float], structure, d_errs: list[float] | None = None) -> ArrheniusFit:
    """Arrhenius fit of D(T) and Nernst-Einstein conductivity extrapolated to 300 K, with the
    standard error of ln sigma(300 K) where the errors of D (``d_errs``) or 3+ points give one."""
    from pymatgen.analysis.diffusion.analyzer import fit_arrhenius, get_extrapolated_conductivity

    t = np.asarray(temps, dtype=float)
    d = np.asarray(diffs, dtype=float)
    ea, c, ea_err = fit_arrhenius(t, d)
    sigma = float(get_extrapolated_conductivity(t, d, 300.0, structure, SPECIE)) / 1000.0  # mS/cm -> S/cm
    x, y = 1.0 / t, np.log(d)
    slope, icept = np.polyfit(x, y, 1)
    resid = y - (slope * x + icept)
    n = len(t)
    r2 = se_fit = None
    if n > 2:
        ss_tot = float(np.sum((y - y.mean()) ** 2))
        r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
        s2 = float(np.sum(resid**2)) / (n - 2)
        se_fit = math.sqrt(s2 * (1.0 / n + (1.0 / 300.0 - x.mean()) ** 2 / float(np.sum((x - x.mean()) ** 2))))
    se_d = propagated_se(t, d, d_errs) if d_errs is not None else None
    # the residuals of 3-4 points alone are too few to trust as the error: they only widen it
    se = max(se_d, se_fit or 0.0) if se_d is not None else None
    band = se if se is not None else se_fit
    rng = error_band(sigma, band) if band is not None else None
    return ArrheniusFit(
        temperatures=[float(v) for v in t],
        ea_ev=float(ea),
        ea_err_ev=None if ea_err is None else float(ea_err),
        prefactor=float(c),
        r2=r2,
        sigma_300=sigma,
        sigma_300_range=rng,
        ln_sigma_se=se,
    )


def decide(
    analyses: list[TemperatureAnalysis], structure, cfg: ValidationConfig, failures: list[str] | None = None
) -> tuple[str, str, ArrheniusFit | None]:
    """(verdict, reason, fit): 'superionic' | 'not_superionic' | 'inconclusive'."""
    if failures:
        return "inconclusive", "; ".join(failures), None
    if not analyses:
        return "inconclusive", "no temperature finished", None
    melted = [a for a in analyses if a.framework_msd > cfg.max_framework_msd]
    if melted:
        txt = ", ".join(f"{a.temperature:g} K ({a.framework_msd:.1f} A^2)" for a in melted)
        return "inconclusive", f"framework melted/decomposed: non-Li MSD > {cfg.max_framework_msd} A^2 at {txt}", None
    hot = max(analyses, key=lambda a: a.temperature)
    if hot.li_hop_msd < cfg.min_li_msd:
        return (
            "inconclusive",
            f"too few Li hops: Li MSD beyond its vibrational plateau {hot.li_hop_msd:.2f} A^2 at {hot.temperature:g} K "
            f"(MSD {hot.li_msd:.2f}, plateau {hot.li_msd_plateau:.2f}) < min_li_msd={cfg.min_li_msd} A^2 "
            "(no diffusion seen on this time scale; run longer or hotter)",
            None,
        )
    usable = [a for a in sorted(analyses, key=lambda a: a.temperature)
              if a.li_hop_msd >= cfg.min_li_msd and a.diffusivity > 0]
    skipped = [a.temperature for a in analyses if a not in usable]
    if len(usable) < cfg.min_fit_temperatures:
        return (
            "inconclusive",
            f"Li diffusion seen at {len(usable)} temperature(s) < min_fit_temperatures={cfg.min_fit_temperatures}",
            None,
        )
    f = fit([a.temperature for a in usable], [a.diffusivity for a in usable], structure,
            [a.diffusivity_err for a in usable])
    if f.ea_ev <= 0:
        return "inconclusive", f"non-Arrhenius: Ea = {f.ea_ev:.3f} eV <= 0", f
    if f.r2 is not None and f.r2 < cfg.min_r2:
        return "inconclusive", f"non-Arrhenius: R^2 = {f.r2:.2f} < min_r2={cfg.min_r2}", f
    why = {a.temperature: "too few hops" if a.li_hop_msd < cfg.min_li_msd else "no positive D" for a in analyses}
    note = (f" (fit excludes {', '.join(f'{t:g} K: {why[t]}' for t in sorted(skipped))})" if skipped else "")
    label = "superionic" if f.sigma_300 >= cfg.sigma_threshold else "not_superionic"
    cmp = ">=" if label == "superionic" else "<"
    if cfg.verdict_z > 0:  # a label only where the threshold lies outside sigma's error band
        n_li = sum(1 for site in structure if site.specie.symbol == SPECIE)  # of the MD cell
        if f.ln_sigma_se is None:
            return ("inconclusive",
                    f"sigma(300 K) = {f.sigma_300:.2e} S/cm {cmp} {cfg.sigma_threshold:.3g} has no error estimate "
                    f"({n_li} Li ion{'s' if n_li != 1 else ''} in the cell: no scatter over ions to measure the "
                    "error of D by); a supercell with more Li (min_atoms)", f)
        k = band_multiplier(cfg.verdict_z, n_li)
        lo, hi = error_band(f.sigma_300, k * f.ln_sigma_se)
        if lo < cfg.sigma_threshold <= hi:
            return ("inconclusive",
                    f"sigma(300 K) = {f.sigma_300:.2e} S/cm, but its range of {k:.2f} standard errors "
                    f"[{lo:.1e}, {hi:.1e}] (verdict_z={cfg.verdict_z:g}, Student's t over {n_li} Li ions) spans "
                    f"the threshold {cfg.sigma_threshold:.3g}: too uncertain to label (more Li in the cell, or "
                    "longer runs)", f)
    if f.sigma_300 > cfg.max_plausible_sigma:  # the verdict stands; the number does not
        note += (f"; CAUTION: above max_plausible_sigma={cfg.max_plausible_sigma:g} S/cm, more than any known "
                 f"Li solid: the magnitude is an extrapolation from {min(f.temperatures):g} K, only the verdict is used")
    return (
        label,
        f"sigma(300 K) = {f.sigma_300:.2e} S/cm {cmp} {cfg.sigma_threshold:.0e}; Ea = {f.ea_ev:.3f} eV "
        f"from {len(usable)} temperatures{note}",
        f,
    )


def arrhenius_png(analyses: list[TemperatureAnalysis], f: ArrheniusFit | None, path: Path, title: str) -> str | None:
    """Arrhenius plot (pymatgen's get_arrhenius_plot when a fit exists); None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [a for a in analyses if a.diffusivity > 0]
    if not pts:
        return None
    if f is not None:
        from pymatgen.analysis.diffusion.analyzer import get_arrhenius_plot

        used = [a for a in pts if a.temperature in f.temperatures]
        ax = get_arrhenius_plot(
            np.array([a.temperature for a in used]),
            np.array([a.diffusivity for a in used]),
            diffusivity_errors=np.array([a.diffusivity_err for a in used]),
            unit="eV",
        )
        rest = [a for a in pts if a not in used]
        if rest:
            ax.plot([1000 / a.temperature for a in rest], [a.diffusivity for a in rest], "x", color="grey", markersize=10)
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(
            [1000 / a.temperature for a in pts],
            [a.diffusivity for a in pts],
            yerr=[a.diffusivity_err for a in pts],
            fmt="ko",
        )
        ax.set_yscale("log")
        ax.set_xlabel("1000/T (K$^{-1}$)")
        ax.set_ylabel("D (cm$^2$/s)")
    ax.set_title(title)
    path = Path(path)
    ax.figure.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(ax.figure)
    return str(path)
