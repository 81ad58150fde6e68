"""Does the fast CPU network keep the accuracy of the authors' vgg16_paper? Grouped CV of both.

Both networks go through the same honest protocol in one run (`xrdmatch evaluate --protocol
grouped-cv`: folds grouped by reduced formula, the same splits, seeds and iterations, threshold
0.5, nothing chosen on a test fold), so the per-fold differences are paired. Prints each
network's metrics, the paired per-fold macro-F1 difference and the wall-time ratio.

    python benchmarks/network_accuracy.py [--methods supervised] [--iterations 200] [--repeats 2] [--calls]

The default compares the supervised single model (vgg16_paper with FlexMatch costs ~10-20 s per
iteration on one CPU core, benchmarks/train_throughput.py; its 10 FlexMatch members would add
~6-11 CPU-hours at 200 iterations, ~29-56 at 1000; on a GPU pass --methods supervised,flexmatch).
Member predictions are cached in --dir: a killed run resumes.

The members of one network can be trained on another machine, e.g. vgg16_paper on a GPU that
has torch but not Ray or pymatgen: `--export-jobs DIR --networks vgg16_paper` writes the data and
the member trainings not yet cached, `scripts/train_member_jobs.py DIR --out OUT` trains them
there (scripts/gpu_check.sh does both halves), and OUT copied into --dir is read as the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from xrdmatch.config import load_config
from xrdmatch.training.evaluation import evaluate_grouped_cv, load_eval_data, plan_grouped_cv, training_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--networks", default="fast,vgg16_paper")
    ap.add_argument("--methods", default="supervised")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default="runs/bench/network-accuracy")
    ap.add_argument("--calls", action="store_true",
                    help="also print, per fold, how many test compounds each model called superionic")
    ap.add_argument("--export-jobs", metavar="DIR",
                    help="write the member trainings that --dir does not hold yet (and their data) to DIR, "
                         "train nothing; scripts/train_member_jobs.py trains them elsewhere")
    args = ap.parse_args()

    def progress(msg: str) -> None:  # to stderr: stdout is the report
        print(msg, file=sys.stderr, flush=True)

    methods = args.methods.split(",")
    results, walls, cached, exports = {}, {}, {}, []
    data = None
    for net in args.networks.split(","):
        cfg = load_config(args.config, {
            "run_dir": f"{args.dir}/{net}",
            "training": {"network": net},
            "evaluation": {"methods": methods, "iterations": args.iterations, "folds": args.folds,
                           "repeats": args.repeats},
        })
        if data is None:  # the same labelled set and unlabelled sample for every network
            data = load_eval_data(cfg, training_config(cfg), print)
        plan = plan_grouped_cv(cfg, data)
        todo = plan.uncached()
        if args.export_jobs:
            exports.append((net, plan.cache_dir, plan.tcfg, todo))
            continue
        cached[net] = (len(plan.jobs) - len(todo), len(plan.jobs))
        t0 = time.time()
        results[net] = evaluate_grouped_cv(cfg, data=data, log_fn=progress)
        walls[net] = time.time() - t0
        if results[net]["config"]["training"]["network"] != net:
            raise SystemExit(f"evaluation ran {results[net]['config']['training']['network']}, not {net}")

    if args.export_jobs:
        export_jobs(Path(args.export_jobs), Path(args.dir), data, exports)
        return
    nets = list(results)
    over = results[nets[0]]["results"][0].get("std_over", "repeats")  # one repeat: the folds' spread
    print(f"\ngrouped-cv: {args.folds} folds x {args.repeats} repeats by reduced formula, "
          f"{args.iterations} iterations, mean ± std over {over}")
    print(f"{'network':12s} {'method':12s} {'macro-F1':>14s} {'F1 superionic':>14s} {'PR-AUC':>14s} {'wall s':>8s}")
    for net in nets:
        wall = "-" if cached[net][0] == cached[net][1] else f"{walls[net]:.0f}"  # all read from the cache
        for r in results[net]["results"]:
            print(f"{net:12s} {r['method']:12s} {r['macro_f1']:7.3f} ± {r['macro_f1_std']:.3f} "
                  f"{r['f1_superionic']:7.3f} ± {r['f1_superionic_std']:.3f} "
                  f"{r['pr_auc']:7.3f} ± {r['pr_auc_std']:.3f} {wall:>8s}")
    base = nets[0]
    for other in nets[1:]:
        for m in methods:
            def folds(net):
                rows = [r for r in results[net]["per_fold"] if r["method"] == m]
                return {(r["repeat"], r["fold"]): r["macro_f1"] for r in rows}
            a, b = folds(base), folds(other)
            d = np.array([a[k] - b[k] for k in sorted(a)])
            print(f"{m}: macro-F1 {base} - {other} per fold (paired, n={len(d)}): "
                  f"mean {d.mean():+.3f}, std {d.std(ddof=1):.3f}, {base} >= {other} in {(d >= 0).sum()}/{len(d)} folds")
        if cached[base][0] or cached[other][0]:
            print("wall time: not comparable, members came from the cache (above)")
        else:
            print(f"wall time {other} / {base}: {walls[other] / max(walls[base], 1e-9):.1f}x")
    if args.calls:
        print_calls(results)
    for net, (n_cached, n) in cached.items():
        if n_cached:
            print(f"{net}: {n_cached} of {n} member trainings read from the cache in {args.dir} "
                  f"(trained before or on another machine), wall s counts only the rest")


def print_calls(results: dict) -> None:
    """Called superionic (at the evaluation's threshold) against truly superionic, per test fold:
    what a low macro-F1 with an unchanged PR-AUC is made of (a shifted threshold, not a lost ranking)."""
    print("called superionic / truly superionic / compounds, per test fold (repeat/fold order)")
    for net, res in results.items():
        for m, cols in res["predictions"].items():
            rep, fold, pred, y = (np.asarray(cols[k]) for k in ("repeat", "fold", "pred", "y"))
            cells = []
            for r, f in sorted(set(zip(rep.tolist(), fold.tolist()))):
                on = (rep == r) & (fold == f)
                cells.append(f"{pred[on].sum()}/{y[on].sum()}/{on.sum()}")
            print(f"{net:12s} {m:12s} " + " ".join(f"{c:>8s}" for c in cells))


def export_jobs(out: Path, run_root: Path, data, exports: list) -> None:
    """The member trainings (and their data) for scripts/train_member_jobs.py, with the cache
    folder each result goes to, relative to --dir."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "data.npz", X=data.X, y=data.y, X_unlab=data.X_unlab)
    rows = [
        {"network": net, "cache_dir": str(cache.relative_to(run_root.resolve())), "cache_name": j.cache_name(),
         "key": j.key, "algorithm": j.algorithm, "seed": j.seed, "train": j.train.tolist(),
         "predict": j.predict.tolist(),
         "sample_weight": None if j.sample_weight is None else j.sample_weight.tolist(),
         "training": tcfg.model_dump(mode="json")}
        for net, cache, tcfg, todo in exports for j in todo
    ]
    (out / "jobs.json").write_text(json.dumps(rows))
    for net, _, _, todo in exports:
        print(f"{net}: {len(todo)} member trainings exported to {out}")


if __name__ == "__main__":
    main()
