"""How often is an MD verdict wrong? Synthetic trajectories with a known answer, decided by
``diffusion.decide`` on the point estimate of sigma(300 K) (``verdict_z`` 0, the rule before the
error band) and with the error band (``verdict_z`` of the config, and 2).

Three kinds of Li, each in cells of 1 to 32 Li (plus 32 S, 10 A cube), one fresh seed per run,
frames as the protocol of the config's ``validation`` section writes them:
  cage  rattles only (MSD plateau 1.7 A^2 at 1200 K): no diffusion, any label is wrong
  fast  D(1200 K) = 3e-4 cm^2/s, Ea 0.2 eV, plateau 1 A^2: sigma(300 K) ~ 7e-3 S/cm x n_Li/32, superionic
  slow  D(1200 K) = 1e-4 cm^2/s, Ea 0.6 eV, plateau 1 A^2: sigma(300 K) ~ 2e-7 S/cm x n_Li/32, not
The Nernst-Einstein sigma scales with the Li density; 1 Li in 1000 A^3 is still superionic (fast)
and not (slow) by orders of magnitude, so every label has a right answer. The band's width is
verdict_z standard errors widened by Student's t over the cell's Li ions (``band_multiplier``).

    python benchmarks/verdict_reliability.py [--config configs/default.yaml] [--seeds 60]
"""

from __future__ import annotations

import argparse
import time

KINDS = {  # name: (D(1200 K) cm^2/s, Ea eV, plateau at 1200 K A^2, the right label or None)
    "cage": (0.0, 0.0, 1.7, None),
    "fast": (3e-4, 0.2, 1.0, "superionic"),
    "slow": (1e-4, 0.6, 1.0, "not_superionic"),
}


def analyses_of(kind: str, n_li: int, seed: int, cfg) -> list:
    import math

    from xrdmatch.simulation.diffusion import analyze_temperature
    from xrdmatch.simulation.synthetic import KB_EV, caged_walk, host

    d1200, ea, plateau, _ = KINDS[kind]
    frame_fs = cfg.timestep_fs * cfg.traj_interval
    n_frames = cfg.production_steps // cfg.traj_interval + 1
    out = []
    for i, t in enumerate(cfg.temperatures):
        d = d1200 * math.exp(-ea / KB_EV * (1 / t - 1 / 1200)) if d1200 else 0.0
        frames = caged_walk(host(n_li), t, n_frames, frame_fs, 1000 * seed + i, d, plateau)
        out.append(analyze_temperature(frames, t, cfg.timestep_fs, cfg.traj_interval, cfg.msd_fit_start_fs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--seeds", type=int, default=60, help="runs of each kind in each cell size")
    ap.add_argument("--n-li", default="1,2,4,8,16,32")
    args = ap.parse_args()

    from xrdmatch.config import load_config
    from xrdmatch.simulation import diffusion
    from xrdmatch.simulation.diffusion import decide
    from xrdmatch.simulation.synthetic import host

    cfg = load_config(args.config).validation
    zs = sorted({0.0, cfg.verdict_z, 2.0})
    sizes = [int(v) for v in args.n_li.split(",")]
    t0 = time.perf_counter()
    print(f"protocol of {args.config}: {', '.join(f'{t:g}' for t in cfg.temperatures)} K, "
          f"{cfg.production_steps * cfg.timestep_fs / 1000:g} ps production each, a frame every "
          f"{cfg.traj_interval * cfg.timestep_fs:g} fs; min_li_msd {cfg.min_li_msd:g} A^2; {args.seeds} seeds per cell")
    print("labels right/wrong of the runs (the rest inconclusive); cage: only wrong labels exist")
    head = f"{'n_Li':>4}  {'verdict_z':>9}  " + "  ".join(f"{k:>13}" for k in KINDS) + f"  {'wrong / labels':>15}"
    print(head)
    totals = {z: [0, 0] for z in zs}
    plain = [0, 0]  # the ablation: verdict_z of the config, its error of few ions at face value
    for n_li in sizes:
        runs = {k: [analyses_of(k, n_li, s, cfg) for s in range(args.seeds)] for k in KINDS}
        if cfg.verdict_z:
            real, diffusion.band_multiplier = diffusion.band_multiplier, lambda z, n: z
            try:
                for k, rr in runs.items():
                    v = [x for x in (decide(r, host(n_li), cfg)[0] for r in rr) if x != "inconclusive"]
                    plain[0] += sum(x == KINDS[k][3] for x in v)
                    plain[1] += sum(x != KINDS[k][3] for x in v)
            finally:
                diffusion.band_multiplier = real
        for z in zs:
            c = cfg.model_copy(update={"verdict_z": z})
            cells, right, wrong = [], 0, 0
            for k, rr in runs.items():
                truth = KINDS[k][3]
                v = [decide(r, host(n_li), c)[0] for r in rr]
                labelled = [x for x in v if x != "inconclusive"]
                r_ = sum(x == truth for x in labelled)
                w_ = len(labelled) - r_
                right, wrong = right + r_, wrong + w_
                cells.append(f"{r_:>5}/{w_:<3}" if truth else f"{'-':>5}/{w_:<3}")
            totals[z][0] += right
            totals[z][1] += wrong
            share = f"{wrong / (right + wrong):.0%}" if right + wrong else "-"
            mark = " (config)" if z == cfg.verdict_z else (" (point estimate)" if z == 0 else "")
            print(f"{n_li:>4}  {z:>9g}  " + "  ".join(f"{x:>13}" for x in cells)
                  + f"  {f'{wrong}/{right + wrong} = {share}':>15}{mark}")
    print("all cell sizes:")
    for z in zs:
        right, wrong = totals[z]
        print(f"  verdict_z {z:g}: {right + wrong} labels, {wrong} wrong ({wrong / max(right + wrong, 1):.0%}), "
              f"{right} right")
    if cfg.verdict_z:
        print(f"  verdict_z {cfg.verdict_z:g} without Student's t (the error of few ions at face value): "
              f"{sum(plain)} labels, {plain[1]} wrong ({plain[1] / max(sum(plain), 1):.0%}), {plain[0]} right")
    r0, w0 = totals[0.0]
    rz, wz = totals[cfg.verdict_z]
    print(f"point estimate -> verdict_z {cfg.verdict_z:g}: wrong labels {w0} -> {wz}, right labels {r0} -> {rz} "
          f"({rz / max(r0, 1):.2f}x)")
    from xrdmatch.simulation.diffusion import propagated_se

    lever = ", ".join(f"{lo:g}-{hi:g} K: {propagated_se(ts, [1.0] * len(ts), [0.1] * len(ts)):.2f}"
                      for ts in ([600.0, 800.0, 1000.0, 1200.0], [800.0, 1000.0, 1200.0], [1000.0, 1200.0])
                      for lo, hi in [(ts[0], ts[-1])])
    print(f"standard error of ln sigma(300 K) for 10 % errors of D at every temperature ({lever})")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
