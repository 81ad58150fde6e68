"""Does semi-supervision help when labels are scarcer? Single models at a share of the labels.

XRDMatch's premise is that unlabelled patterns make up for few labels; with all ~90 labels of
a training fold the semi-supervised rows of the README's grouped CV do not beat supervised.
This runs the same folds and seeds as `xrdmatch evaluate --protocol grouped-cv`, keeps a
share of each training fold's formulas (drawn per class, seeded: `splits.subsample_groups`),
and trains the single `fast` model supervised, with FixMatch and with FlexMatch on exactly
the same labels and the config's unlabelled sample and iterations. Test folds are untouched
and nothing is chosen on them (threshold 0.5). Prints macro-F1 / PR-AUC per share and the
paired per-fold difference of each semi-supervised algorithm from supervised.

Members are cached with the evaluation's (the full-share ones are the grouped CV's own
single models), so a killed run resumes and `xrdmatch evaluate --dir runs/eval` reuses them.

    python benchmarks/label_scarcity.py [--config configs/default.yaml] [--shares 0.25,0.5,1]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from xrdmatch.config import load_config
from xrdmatch.training.evaluation import (
    MemberJob, inner_seed, load_eval_data, member_digest, member_seed, members_dir, run_jobs, training_config,
)
from xrdmatch.training.metrics import binary_metrics, calls, summarise_repeats
from xrdmatch.training.splits import repeated_grouped_splits, subsample_groups

ALGORITHMS = ("supervised", "fixmatch", "flexmatch")


def job_key(share: float, repeat: int, fold: int, algorithm: str) -> str:
    """The grouped CV's own key at the full share (its cache is shared), a labelsNN one below."""
    phase = "full" if share >= 1 else f"labels{round(share * 100)}"
    return f"r{repeat}/f{fold}/{phase}/{algorithm}/m0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--dir", default="runs/eval", help="run directory (patterns and member cache)")
    ap.add_argument("--shares", default="0.25,0.5,1")
    args = ap.parse_args()

    def log(msg: str) -> None:  # progress to stderr: stdout is the report
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    cfg = load_config(args.config, {"run_dir": args.dir})
    ev, tcfg = cfg.evaluation, training_config(cfg)
    data = load_eval_data(cfg, tcfg, log)
    shares = [float(s) for s in args.shares.split(",")]
    splits = repeated_grouped_splits(data.y, data.groups, ev.folds, ev.repeats, ev.seed)
    jobs, n_train = [], {}
    for share in shares:
        for s in splits:
            # the subsample's seed is fixed by the split, so every algorithm sees the same labels
            tr = subsample_groups(s.train, data.y, data.groups, share, inner_seed(ev.seed, s.repeat, s.fold))
            n_train.setdefault(share, []).append(len(tr))
            for a in ALGORITHMS:
                j = MemberJob(job_key(share, s.repeat, s.fold, a), a, member_seed(ev.seed, s.repeat, s.fold, 0),
                              tr, s.test)
                j.digest = member_digest(j, tcfg, data.data_hash, data.unlab_hash)
                jobs.append(j)
    probs = run_jobs(jobs, data.X, data.y, data.X_unlab, tcfg, members_dir(cfg, "grouped-cv"), cfg, log)

    print(f"grouped-cv: {ev.folds} folds x {ev.repeats} repeats by reduced formula (seed {ev.seed}); single "
          f"{tcfg.network} models, {tcfg.iterations} iterations, unlabelled {data.unlab_source}; "
          "mean ± std over repeats; threshold 0.5")
    print(f"{'labels (share)':16s} " + " ".join(f"{a:>22s}" for a in ALGORITHMS) + "   macro-F1 / PR-AUC")
    rows: dict[tuple[float, str], list[dict]] = {}
    for share in shares:
        for s in splits:
            for a in ALGORITHMS:
                p = probs[job_key(share, s.repeat, s.fold, a)]
                r = binary_metrics(data.y[s.test], calls(p), p)
                rows.setdefault((share, a), []).append({**r, "repeat": s.repeat, "fold": s.fold})
        cells = []
        for a in ALGORITHMS:
            m = summarise_repeats(rows[(share, a)], ("macro_f1", "pr_auc"))
            cells.append(f"{m['macro_f1']:.3f}±{m['macro_f1_std']:.3f} / {m['pr_auc']:.3f}")
        print(f"{np.mean(n_train[share]):5.1f} ({share:>4.0%})   " + " ".join(f"{c:>22s}" for c in cells))
    for share in shares:
        sup = np.array([r["macro_f1"] for r in rows[(share, "supervised")]])
        diffs = []
        for a in ALGORITHMS[1:]:
            d = np.array([r["macro_f1"] for r in rows[(share, a)]]) - sup
            diffs.append(f"{a} {d.mean():+.3f} ± {d.std(ddof=1):.3f} (better in {(d > 0).sum()}/{len(d)})")
        print(f"{share:>4.0%} of the labels, macro-F1 minus supervised, paired per fold: " + ";  ".join(diffs))
    print(f"{len(jobs)} member trainings, wall time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
