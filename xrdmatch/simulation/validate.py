"""The one entry point of MD validation: structure in, verdict out (resumable, idempotent).

``run_validation`` orders and checks the structure, builds the supercell, optionally pre-relaxes,
runs NVT MD per temperature (each resumable from its trajectory, see ``md``), analyses Li
diffusion (see ``diffusion``) and writes ``result.json`` and ``arrhenius.png`` into ``workdir``.
Calling it again on the same workdir reuses finished temperatures and continues a cut one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xrdmatch.config import ValidationConfig
from xrdmatch.simulation.calculators import CalculatorUnavailable, get_calculator
from xrdmatch.simulation.md import (
    Heartbeat,
    Progress,
    ValidationInputError,
    beating,
    prepare,
    production_frames,
    read_json,
    relax,
    run_temperature,
    temperature_dir,
    write_json_atomic,
)

__all__ = [
    "PROFILES",
    "CalculatorUnavailable",
    "ValidationInputError",
    "ValidationResult",
    "apply_profile",
    "protocol_hash",
    "run_validation",
]

#: Named protocol presets (overrides of ValidationConfig). "short" fits a few CPU-minutes per
#: candidate (campaign demo); its verdicts are mostly 'inconclusive' for poor conductors because
#: 0.6 ps cannot show slow diffusion. "default" = the ValidationConfig defaults (hours on CPU).
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "short": {
        "temperatures": [800.0, 1000.0, 1200.0],
        "equilibration_steps": 150,  # 0.3 ps = 3 thermostat times: production starts at T, not ~0.75 T
        "production_steps": 300,
        "traj_interval": 5,
        "min_atoms": 1,
        "min_length": 6.0,
        "max_atoms": 160,
        "min_li_msd": 1.0,
    },
}

#: Fields that change the trajectories (analysis thresholds and queue settings are excluded).
PHYSICS_FIELDS = (
    "calculator",
    "calculator_kwargs",
    "method",
    "temperatures",
    "timestep_fs",
    "equilibration_steps",
    "production_steps",
    "traj_interval",
    "thermostat",
    "thermostat_time_fs",
    "seed",
    "min_atoms",
    "min_length",
    "max_order_sites",
    "relax",
    "relax_optimizer",
    "relax_fmax",
    "relax_steps",
    "explode_temperature_factor",  # both stop a trajectory (MD.check_and_write)
    "min_distance",
)


def apply_profile(cfg: ValidationConfig, name: str) -> ValidationConfig:
    """Return cfg with a named profile's overrides applied (unknown name: ValueError listing them)."""
    if name not in PROFILES:
        raise ValueError(f"unknown validation profile {name!r}; choose one of {sorted(PROFILES)}")
    return ValidationConfig.model_validate({**cfg.model_dump(), **PROFILES[name]})


def protocol_hash(cfg: ValidationConfig) -> str:
    """Short hash of everything that changes the physics of a validation run."""
    data = cfg.model_dump(mode="json", include=set(PHYSICS_FIELDS))
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ValidationResult:
    structure_id: str
    formula: str
    verdict: str  # "superionic" | "not_superionic" | "inconclusive"
    reason: str
    method: str  # "mlip-md" | "aimd"
    calculator: str
    calculator_version: str
    temperatures: list[float]
    diffusivity: dict[float, float] = field(default_factory=dict)  # cm^2/s
    diffusivity_err: dict[float, float] = field(default_factory=dict)
    ea_ev: float | None = None
    ea_err_ev: float | None = None
    sigma_300: float | None = None  # S/cm
    sigma_300_range: tuple[float, float] | None = None
    n_atoms: int = 0
    runtime_s: float = 0.0
    arrhenius_png: str | None = None
    temperatures_done: list[float] = field(default_factory=list)
    protocol: str = ""
    li_msd: dict[float, float] = field(default_factory=dict)  # A^2 over the production run
    li_msd_plateau: dict[float, float] = field(default_factory=dict)  # A^2, its vibrational offset
    framework_msd: dict[float, float] = field(default_factory=dict)
    r2: float | None = None
    supercell: tuple[int, int, int] | None = None

    def to_dict(self) -> dict:
        """JSON-safe: temperature keys as strings, NaN/inf as None, tuples as lists."""

        def clean(v: Any) -> Any:
            if isinstance(v, float):
                return v if math.isfinite(v) else None
            if isinstance(v, dict):
                return {(f"{k:g}" if isinstance(k, float) else str(k)): clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return {k: clean(v) for k, v in asdict(self).items()}


def run_validation(
    structure,
    cfg: ValidationConfig,
    workdir: Path,
    structure_id: str,
    progress: Progress | None = None,
    heartbeat: Heartbeat | None = None,
) -> ValidationResult:
    """Validate one structure by MD; raises ValidationInputError / CalculatorUnavailable before MD."""
    from xrdmatch.simulation import diffusion

    t_start = time.monotonic()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with beating(heartbeat):  # ordering and loading a potential renew no lease of their own
        prep = prepare(structure, cfg)  # ValidationInputError: nothing else is done
        calc, info = get_calculator(
            cfg.calculator, cfg.calculator_kwargs, device=cfg.device, threads=cfg.torch_threads, method=cfg.method
        )
    protocol = protocol_hash(cfg)
    formula = prep.structure.composition.reduced_formula
    write_json_atomic(
        workdir / "input.json",
        {"structure_id": structure_id, "formula": formula, "protocol": protocol, "config": cfg.model_dump(mode="json"),
         "supercell": list(prep.scaling), "n_atoms": len(prep.atoms), "note": prep.note},
    )
    atoms = prep.atoms
    if cfg.relax:
        atoms = relax(atoms, calc, cfg, workdir, protocol, heartbeat)

    runs, failures, analyses = [], [], []
    prior_md_s = 0.0  # MD seconds spent by earlier (killed) calls on this workdir
    for T in cfg.temperatures:
        st = read_json(temperature_dir(workdir, T) / "state.json")
        if st and st.get("protocol") == protocol:
            prior_md_s += float(st.get("md_seconds", 0.0))
        run = run_temperature(atoms, calc, float(T), cfg, temperature_dir(workdir, T), protocol, progress, heartbeat)
        runs.append(run)
        if run.failed:
            failures.append(run.failed)
            break  # a hotter run of an exploding cell is pointless
    for run in runs:
        if not run.done:
            continue
        frames = production_frames(run.traj_path, cfg)
        analyses.append(
            diffusion.analyze_temperature(frames, run.temperature, cfg.timestep_fs, cfg.traj_interval, cfg.msd_fit_start_fs)
        )
    verdict, reason, fit = diffusion.decide(analyses, prep.structure, cfg, failures)
    if prep.note:
        reason = f"{reason} [{prep.note}]"
    png = diffusion.arrhenius_png(analyses, fit, workdir / "arrhenius.png", f"{structure_id} {formula}: {verdict}")
    result = ValidationResult(
        structure_id=structure_id,
        formula=formula,
        verdict=verdict,
        reason=reason,
        method=info.method,
        calculator=info.name,
        calculator_version=info.version,
        temperatures=[float(t) for t in cfg.temperatures],
        diffusivity={a.temperature: a.diffusivity for a in analyses},
        diffusivity_err={a.temperature: a.diffusivity_err for a in analyses},
        ea_ev=fit.ea_ev if fit else None,
        ea_err_ev=fit.ea_err_ev if fit else None,
        sigma_300=fit.sigma_300 if fit else None,
        sigma_300_range=fit.sigma_300_range if fit else None,
        n_atoms=len(prep.atoms),
        runtime_s=prior_md_s + (time.monotonic() - t_start),
        arrhenius_png=png,
        temperatures_done=[r.temperature for r in runs if r.done],
        protocol=protocol,
        li_msd={a.temperature: a.li_msd for a in analyses},
        li_msd_plateau={a.temperature: a.li_msd_plateau for a in analyses},
        framework_msd={a.temperature: a.framework_msd for a in analyses},
        r2=fit.r2 if fit else None,
        supercell=prep.scaling,
    )
    write_json_atomic(workdir / "result.json", result.to_dict())
    return result
