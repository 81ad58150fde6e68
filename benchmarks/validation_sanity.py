"""Physical sanity of the MD validation chain (CHGNet + ASE + pymatgen-analysis-diffusion).

Short CHGNet NVT runs at 1000 and 1200 K of Li10GeP2S12 (mp-696138, a superionic conductor)
and of poor conductors Li3PO4 (mp-13725) and LiAlO2 (mp-3427) from the shipped database; prints
the Li diffusivity of each and checks D(LGPS) > D(poor) at every temperature. This checks the
ordering, not accuracy: runs of ~1 ps are far too short for converged diffusivities.

It also measures CHGNet seconds per MD step on each material's supercell for the default and the
``short`` protocol (median of timed force calls on this machine) and extrapolates the wall time
of a full validation = s/step x total steps (no full default run is made: it takes hours on CPU).

    python benchmarks/validation_sanity.py [--out runs/benchmarks/validation_sanity] [--prod 400]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

MATERIALS = {"mp-696138": "LGPS (superionic)", "mp-13725": "Li3PO4 (poor)", "mp-3427": "LiAlO2 (poor)"}


def load(ids):
    from xrdmatch.platform.data import iter_records, structure_from_record

    out = {}
    for rec in iter_records():
        if rec["id"] in ids:
            out[rec["id"]] = structure_from_record(rec)
        if len(out) == len(ids):
            break
    return out


def seconds_per_step(structure, cfg, n: int = 8) -> tuple[float, float, int]:
    """Median (wall, CPU) seconds of one CHGNet energy+forces call on the protocol's supercell.

    CPU seconds (one thread) are what a dedicated core would take; wall seconds include waiting
    for a shared CPU.
    """
    import numpy as np

    from xrdmatch.simulation.calculators import get_calculator
    from xrdmatch.simulation.md import prepare

    atoms = prepare(structure, cfg).atoms
    atoms.calc, _ = get_calculator(cfg.calculator, device=cfg.device, threads=cfg.torch_threads)
    atoms.get_forces()
    rng = np.random.default_rng(0)
    wall, cpu = [], []
    for _ in range(n):
        atoms.positions += rng.normal(scale=0.01, size=atoms.positions.shape)
        t, c = time.perf_counter(), time.process_time()
        atoms.get_forces()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu), len(atoms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/benchmarks/validation_sanity")
    ap.add_argument("--prod", type=int, default=400, help="production steps of the sanity runs (2 fs)")
    ap.add_argument("--timing-only", action="store_true", help="only the s/step measurements")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from xrdmatch.config import ValidationConfig
    from xrdmatch.simulation.md import frame_counts
    from xrdmatch.simulation.validate import apply_profile, run_validation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    structures = load(set(MATERIALS))
    sanity = ValidationConfig(
        temperatures=[1000.0, 1200.0], equilibration_steps=150, production_steps=args.prod, traj_interval=5,
        min_atoms=1, min_length=0.0, min_li_msd=1.0,
    )
    report: dict = {"machine": f"{platform.node()} {os.cpu_count()} CPUs, torch threads 1", "sanity_protocol": sanity.model_dump(mode="json"), "materials": {}}
    for mid, label in MATERIALS.items():
        if args.timing_only:
            break
        t0 = time.perf_counter()
        r = run_validation(structures[mid], sanity, out / mid, mid)
        wall = time.perf_counter() - t0
        report["materials"][mid] = {"label": label, "result": r.to_dict(), "wall_s": wall}
        d = ", ".join(f"D({t:g} K) = {v:.2e}" for t, v in r.diffusivity.items())
        msd = ", ".join(f"{t:g} K: {v:.2f} ({r.li_msd_plateau[t]:.2f})" for t, v in r.li_msd.items())
        print(f"{mid:10s} {label:18s} {r.n_atoms:3d} atoms  {d} cm^2/s  Li MSD (plateau) [A^2] {msd}  "
              f"{r.verdict}  ({wall:.0f} s)", flush=True)

    ok = True
    for t in sanity.temperatures if report["materials"] else []:
        lgps = report["materials"]["mp-696138"]["result"]["diffusivity"][f"{t:g}"]
        for mid in ("mp-13725", "mp-3427"):
            poor = report["materials"][mid]["result"]["diffusivity"][f"{t:g}"]
            good = lgps > poor
            ok &= good
            print(f"{t:g} K: D(LGPS) {lgps:.2e} {'>' if good else '<='} D({mid}) {poor:.2e}  {'OK' if good else 'FAIL'}")
    report["order_ok"] = bool(ok) if report["materials"] else None

    timing = {}
    for prof in ("default", "short"):
        cfg = apply_profile(ValidationConfig(), prof)
        eq_f, prod_f = frame_counts(cfg)
        steps = len(cfg.temperatures) * (eq_f + prod_f) * cfg.traj_interval
        for mid in MATERIALS:
            wall, cpu, n = seconds_per_step(structures[mid], cfg)
            timing[f"{prof}/{mid}"] = {"atoms": n, "wall_s_per_step": wall, "cpu_s_per_step": cpu, "steps": steps,
                                       "extrapolated_cpu_s": cpu * steps, "extrapolated_wall_s": wall * steps}
            print(f"{prof:8s} {mid:10s} {n:4d} atoms  {cpu:.3f} CPU-s/step ({wall:.3f} wall) x {steps} steps = "
                  f"{cpu * steps / 60:.1f} CPU-min (extrapolated)", flush=True)
    report["timing"] = timing
    (out / ("timing.json" if args.timing_only else "report.json")).write_text(json.dumps(report, indent=1))
    print("order D(LGPS) > D(poor):", "OK" if ok else "FAIL")


if __name__ == "__main__":
    main()
