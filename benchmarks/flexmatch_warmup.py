"""Why does semi-supervision not help here? FlexMatch's minority-class threshold, measured.

FlexMatch scales the base threshold of each class by how many unlabelled patterns the model
already predicts confidently as that class. With warm-up (the published default) the
normaliser is at least the number of patterns not yet predicted confidently, so a class that
is rare in the unlabelled set (superionic: ~20 % of the labels, fewer among the database
patterns) keeps a threshold near 0 and nearly every superionic guess becomes a pseudo-label.

Part 1 trains one member on all 112 labels and prints the class thresholds and pseudo-label
counts along the run. Part 2 runs the honest grouped CV (`xrdmatch evaluate --protocol
grouped-cv`: same splits, seeds, iterations, threshold 0.5) for FlexMatch with warm-up on and
off and FixMatch (one fixed threshold), and prints the paired per-fold macro-F1 differences.
It is a measurement, not a selection: the default stays the published algorithm, since picking
a variant by these outer test folds would choose on the test folds.

    python benchmarks/flexmatch_warmup.py [--iterations 200] [--repeats 2] [--variants warmup,no-warmup,fixmatch]

`--variants` picks the rows (keys of VARIANTS, in the order given; the paired differences are
against the first); `supervised` adds the labelled-only baseline trained the same way, for
asking whether a longer run (`--iterations 1000`, the paper's) lets FlexMatch help; `da` is
FlexMatch with distribution alignment (`training.distribution_alignment`, not the paper's),
`fixmatch-da` the same for FixMatch (its fixed threshold keeps only confident pseudo-labels).

Member predictions are cached in --dir: a killed run resumes.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from xrdmatch.config import load_config
from xrdmatch.training.evaluation import evaluate_grouped_cv, load_eval_data, training_config
from xrdmatch.training.trainer import train_member

VARIANTS = {  # key: (row name, training overrides, method)
    "warmup": ("flexmatch warm-up", {"flexmatch_warmup": True}, "flexmatch"),
    "no-warmup": ("flexmatch no warm-up", {"flexmatch_warmup": False}, "flexmatch"),
    "fixmatch": ("fixmatch", {}, "fixmatch"),
    "da": ("flexmatch warm-up + DA", {"flexmatch_warmup": True, "distribution_alignment": True}, "flexmatch"),
    "fixmatch-da": ("fixmatch + DA", {"distribution_alignment": True}, "fixmatch"),
    "supervised": ("supervised", {}, "supervised"),
}
DEFAULT_VARIANTS = "warmup,no-warmup,fixmatch"


def trajectory(cfg, data, every: int, keys: list[str]) -> None:
    """One member on every label: the class thresholds and pseudo-labels along the run."""
    for key in keys:
        _, over, method = VARIANTS[key]
        tcfg = training_config(cfg).model_copy(update={"algorithm": method, **over})
        m = train_member(data.X, data.y, data.X_unlab, tcfg, seed=cfg.seed, device="cpu")
        title = f"warm-up {'on' if tcfg.flexmatch_warmup else 'off'}" if method == "flexmatch" else "fixed threshold"
        title += ", distribution alignment" if tcfg.distribution_alignment else ""
        print(f"\n{method}, {title}: one member, all {len(data.y)} labels, {len(data.X_unlab)} unlabelled")
        da = tcfg.distribution_alignment  # the model's running superionic frequency on unlabelled batches
        print(f"{'step':>5s} {'thr not-SI':>10s} {'thr SI':>8s} {'mask rate':>9s} {'pseudo not-SI':>13s} {'pseudo SI':>9s}"
              + (f" {'p_model SI':>10s}" if da else ""))
        for h in m.history:
            if h["step"] % every == 0 or h["step"] == len(m.history):
                print(f"{h['step']:5d} {h['threshold_0']:10.3f} {h['threshold_1']:8.3f} {h['mask_rate']:9.2f} "
                      f"{h['pseudo_0']:13d} {h['pseudo_1']:9d}" + (f" {h['p_model_1']:10.3f}" if da else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma-separated, from {', '.join(VARIANTS)}; differences are against the first")
    ap.add_argument("--trajectory", metavar="KEYS",
                    help="variants whose one-member run along the steps is printed (default: the FlexMatch "
                         "and aligned ones asked for)")
    ap.add_argument("--dir", default="runs/bench/flexmatch-warmup")
    args = ap.parse_args()
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown or not keys:
        ap.error(f"--variants {args.variants!r}: unknown {unknown or 'none given'}; choose from {', '.join(VARIANTS)}")
    # the trajectory is printed for each FlexMatch or aligned variant asked for, in VARIANTS' order
    flex = [k for k in VARIANTS if k in keys
            and (VARIANTS[k][2] == "flexmatch" or VARIANTS[k][1].get("distribution_alignment"))]
    if args.trajectory is not None:
        flex = [k.strip() for k in args.trajectory.split(",") if k.strip()]
        bad = [k for k in flex if k not in VARIANTS or VARIANTS[k][2] == "supervised"]
        if bad:
            ap.error(f"--trajectory {args.trajectory!r}: {bad} not semi-supervised variants of {', '.join(VARIANTS)}")

    def progress(msg: str) -> None:  # to stderr: stdout is the report
        print(msg, file=sys.stderr, flush=True)

    results, walls, data = {}, {}, None
    for key in keys:
        name, over, method = VARIANTS[key]
        cfg = load_config(args.config, {
            "run_dir": f"{args.dir}/{key}",
            "training": over,
            "evaluation": {"methods": [method], "iterations": args.iterations, "folds": args.folds,
                           "repeats": args.repeats},
        })
        if data is None:  # the same labelled set and unlabelled sample for every variant
            data = load_eval_data(cfg, training_config(cfg), print)  # the data line belongs in the report
            trajectory(cfg, data, every=max(1, args.iterations // 8), keys=flex)
        t0 = time.time()
        results[name] = evaluate_grouped_cv(cfg, data=data, log_fn=progress)
        walls[name] = time.time() - t0
        got = results[name]["config"]["training"]
        if any(got[k] != v for k, v in over.items()):
            raise SystemExit(f"{name}: evaluation ran {got}, not {over}")

    print(f"\ngrouped-cv: {args.folds} folds x {args.repeats} repeats by reduced formula, "
          f"{args.iterations} iterations, one member each, mean ± std over repeats")
    print(f"{'variant':22s} {'macro-F1':>14s} {'F1 superionic':>14s} {'recall SI':>10s} {'PR-AUC':>14s} {'wall s':>7s}")
    for name, res in results.items():
        r = res["results"][0]
        print(f"{name:22s} {r['macro_f1']:7.3f} ± {r['macro_f1_std']:.3f} {r['f1_superionic']:7.3f} ± "
              f"{r['f1_superionic_std']:.3f} {r['recall']:10.3f} {r['pr_auc']:7.3f} ± {r['pr_auc_std']:.3f} "
              f"{walls[name]:7.0f}")

    def folds(name):
        return {(r["repeat"], r["fold"]): r["macro_f1"] for r in results[name]["per_fold"]}

    base = next(iter(results))
    for other in list(results)[1:]:
        a, b = folds(other), folds(base)
        d = np.array([a[k] - b[k] for k in sorted(b)])
        print(f"macro-F1 {other} - {base} per fold (paired, n={len(d)}): mean {d.mean():+.3f}, "
              f"std {d.std(ddof=1):.3f}, better in {(d > 0).sum()}/{len(d)} folds, worse in {(d < 0).sum()}")


if __name__ == "__main__":
    main()
