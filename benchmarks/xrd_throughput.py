"""Throughput of the XRD engine against pymatgen's XRDCalculator, one process (= per core).

    python benchmarks/xrd_throughput.py [--n 300] [--seed 0] [--database PATH] [--full]

Draws the same random sample (fixed seed) of the shipped database for all and times, in
alternating blocks of ``--block`` structures (each method runs warm, as in the stage, and all
see the same machine load):
  * pymatgen:   ``reference_pattern(structure)`` (XRDCalculator().get_pattern + binning);
  * engine:     ``xrd_pattern_arrays(lattice, species, frac_coords)`` on the record's fields,
                which is how the Ray XRD stage calls it;
  * engine(S):  ``xrd_pattern(structure)`` on the pymatgen Structure;
and checks parity on the sample (max |difference|, same non-zero bins). ``--full`` then runs
the engine over the whole database (JSON line parsing included) and prints the mean time per
structure. BLAS/OpenMP threads are pinned to 1 before numpy is imported.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def _sample_records(database: str, n: int, seed: int) -> list[dict]:
    from xrdmatch.platform.data import iter_jsonl_lines

    lines = [line for _, line in iter_jsonl_lines(database)]
    idx = np.sort(np.random.default_rng(seed).choice(len(lines), size=min(n, len(lines)), replace=False))
    return [json.loads(lines[i]) for i in idx]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="structures in the random sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--database", default="data/mp_li_structures.jsonl.xz")
    ap.add_argument("--block", type=int, default=20, help="structures per timing block")
    ap.add_argument("--full", action="store_true", help="also time the engine on the whole database")
    args = ap.parse_args(argv)

    from xrdmatch.platform.data import structure_from_record
    from xrdmatch.simulation.xrd import reference_pattern, xrd_pattern, xrd_pattern_arrays

    recs = _sample_records(args.database, args.n, args.seed)
    structs = [structure_from_record(r) for r in recs]
    reference_pattern(structs[0])  # imports and caches outside the timed region
    xrd_pattern_arrays(recs[0]["lattice"], recs[0]["species"], recs[0]["frac_coords"])

    # Blocks of structures, each method over the whole block in turn: every method runs warm
    # (as in the stage) and all see the same machine load (the machine may be shared).
    clock = {"wall": time.perf_counter, "cpu": time.process_time}
    methods = {
        "pymatgen": lambda i: reference_pattern(structs[i]),
        "engine": lambda i: xrd_pattern_arrays(recs[i]["lattice"], recs[i]["species"], recs[i]["frac_coords"]),
        "engine(S)": lambda i: xrd_pattern(structs[i]),
    }
    t = {k: {c: 0.0 for c in clock} for k in methods}
    out: dict[str, list] = {k: [None] * len(recs) for k in methods}
    for b0 in range(0, len(recs), args.block):
        block = range(b0, min(len(recs), b0 + args.block))
        for key, fn in methods.items():
            w0, c0 = time.perf_counter(), time.process_time()
            res = [fn(i) for i in block]
            t[key]["wall"] += time.perf_counter() - w0
            t[key]["cpu"] += time.process_time() - c0
            out[key][block.start : block.stop] = res
    worst, same_bins = 0.0, 0
    for ref, pat, pat_s in zip(out["pymatgen"], out["engine"], out["engine(S)"]):
        worst = max(worst, float(np.abs(pat - ref).max()), float(np.abs(pat_s - ref).max()))
        same_bins += bool(np.array_equal(pat > 0, ref > 0) and np.array_equal(pat_s > 0, ref > 0))
    sites = [len(r["species"]) for r in recs]

    n = len(recs)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {sys.version.split()[0]}, numpy {np.__version__}")
    print(f"sample: {n} structures (seed {args.seed}), sites: median {int(np.median(sites))}, max {max(sites)}")
    print(f"{'':10s} {'wall ms/struct':>15s} {'patterns/s/core':>16s} {'cpu ms/struct':>14s}")
    for key, v in t.items():
        print(f"{key:10s} {v['wall'] / n * 1e3:15.3f} {n / v['wall']:16.1f} {v['cpu'] / n * 1e3:14.3f}")
    for c in clock:
        print(
            f"speed-up over pymatgen ({c}): engine {t['pymatgen'][c] / t['engine'][c]:.1f}x, "
            f"engine(S) {t['pymatgen'][c] / t['engine(S)'][c]:.1f}x"
        )
    print(f"parity: max |engine - pymatgen| = {worst:.3g}; same non-zero bins: {same_bins}/{n}")
    ok = worst <= 1e-3 and same_bins == n

    if args.full:
        from xrdmatch.platform.data import iter_jsonl_lines
        from xrdmatch.simulation.xrd import XRDError

        lines = [line for _, line in iter_jsonl_lines(args.database)]
        errors = 0
        w0, c0 = time.perf_counter(), time.process_time()
        for line in lines:
            rec = json.loads(line)
            try:
                xrd_pattern_arrays(rec["lattice"], rec["species"], rec["frac_coords"])
            except XRDError:
                errors += 1
        w, c = time.perf_counter() - w0, time.process_time() - c0
        print(
            f"full database: {len(lines)} structures ({errors} XRDError) in {w:.1f} s wall, {c:.1f} s cpu: "
            f"mean {w / len(lines) * 1e3:.3f} ms wall / {c / len(lines) * 1e3:.3f} ms cpu per structure "
            "(JSON parsing included)"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
