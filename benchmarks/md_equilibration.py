"""Is the MD cell at its target temperature when production starts?

Runs the demo protocol (configs/default.yaml's `validation` section, CHGNet, Nose-Hoover) on
antifluorite Li2O at 1000 K through the validation code itself (``md.run_temperature``), once with
the section's equilibration and once with the 40 steps (80 fs) it had before, and prints the mean
instantaneous temperature of the trajectory frames in windows of the run. Velocities are drawn
at T on a cell at its minimum, so about half the kinetic energy flows into the potential first.

    python benchmarks/md_equilibration.py [--temperature 1000] [--old-steps 40]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def mean_temperatures(cfg, temperature: float, workdir: Path) -> tuple[list[float], int]:
    """Instantaneous temperature (K) of every frame of one run, and the equilibration frame count."""
    from pymatgen.core import Lattice, Structure

    from xrdmatch.simulation.calculators import get_calculator
    from xrdmatch.simulation.md import frame_counts, prepare, read_frames, run_temperature

    li2o = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.61), ["Li", "O"], [[0.25] * 3, [0, 0, 0]])
    atoms = prepare(li2o.get_primitive_structure(), cfg).atoms
    calc, _ = get_calculator(cfg.calculator, device="cpu", threads=1)
    run = run_temperature(atoms, calc, temperature, cfg, workdir, "benchmark")
    return [f.get_temperature() for f in read_frames(run.traj_path)], frame_counts(cfg)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--temperature", type=float, default=1000.0)
    ap.add_argument("--old-steps", type=int, default=40, help="equilibration steps before this benchmark")
    args = ap.parse_args()
    import numpy as np
    import torch

    from xrdmatch.config import load_config

    torch.set_num_threads(1)
    base = load_config(args.config).validation
    dt = base.timestep_fs * base.traj_interval
    print(f"Li2O at {args.temperature:g} K, {base.thermostat} (time constant {base.thermostat_time_fs:g} fs), "
          f"{base.production_steps} production steps of {base.timestep_fs:g} fs")
    for steps in (args.old_steps, base.equilibration_steps):
        cfg = base.model_copy(update={"equilibration_steps": steps})
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="xrdmatch-eq-") as tmp:
            temps, eq_f = mean_temperatures(cfg, args.temperature, Path(tmp))
        prod = np.asarray(temps[eq_f:])
        third = max(1, len(prod) // 3)
        print(f"equilibration {steps:4d} steps ({steps * base.timestep_fs:5.0f} fs): production mean T "
              f"first third {prod[:third].mean():6.0f} K, rest {prod[third:].mean():6.0f} K, "
              f"all {prod.mean():6.0f} K ({prod.mean() / args.temperature:.2f} x target; "
              f"first third = {third * dt:.0f} fs; {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
