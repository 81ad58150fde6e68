"""How far do pattern-only classifiers get on the 112 labels? Classical baselines, same folds.

Asks whether the ~0.6 grouped-CV macro-F1 of XRDMatch is a limit of the network or of the
data: scikit-learn's logistic regression, k-nearest neighbours (cosine) and random forest see
the same preprocessed patterns (max-pooled over windows of ``pool`` bins, 8 as ``fast``'s first
layer or 45: 563 or 101 features from the 4501 bins) under
exactly the splits of ``xrdmatch evaluate --protocol grouped-cv`` (folds by reduced formula,
same seeds). Each one's hyper-parameters (and the pool width) are chosen by a grouped inner CV
on the training fold only, scored by macro-F1; the test fold is predicted once at 0.5. The
supervised ``fast`` network is scored on the same folds in the same run (its members come from
the member cache of ``xrdmatch evaluate --dir runs/eval`` when present, else they are trained)
and a stratified random guess is the floor.
Also prints a learning curve of the best classical model (a share of each training fold's
formulas) and the leave-one-formula-out nearest-neighbour label agreement: how often the most
similar pattern of another formula has the same label.

    python benchmarks/classical_baselines.py [--config configs/default.yaml] [--no-network]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from xrdmatch.config import load_config
from xrdmatch.platform.data import load_labelled
from xrdmatch.training.evaluation import inner_seed
from xrdmatch.training.metrics import METRICS, binary_metrics, calls, summarise_repeats
from xrdmatch.training.preprocess import preprocess
from xrdmatch.training.splits import repeated_grouped_splits, subsample_groups


def max_pool(X: np.ndarray, width: int) -> np.ndarray:
    """Max over consecutive ``width`` bins (the tail padded with zeros), as ``fast``'s PeakPool."""
    n = -(-X.shape[1] // width) * width
    return np.pad(X, ((0, 0), (0, n - X.shape[1]))).reshape(len(X), -1, width).max(2)


def models(seed: int) -> dict[str, tuple]:
    """name -> (estimator, grid): the grid is searched on the training fold only."""
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    return {
        "random guess (stratified)": (DummyClassifier(strategy="stratified", random_state=seed), {}),
        "logistic regression": (LogisticRegression(class_weight="balanced", max_iter=5000),
                                {"m__C": [0.01, 0.1, 1.0, 10.0]}),
        "k-NN (cosine)": (KNeighborsClassifier(metric="cosine", weights="distance"),
                          {"m__n_neighbors": [1, 3, 5, 9]}),
        "random forest": (RandomForestClassifier(n_estimators=200, class_weight="balanced_subsample",
                                                 random_state=seed, n_jobs=1),
                          {"m__min_samples_leaf": [1, 3]}),
    }


def fit_predict(est, grid: dict, X, y, groups, tr, te, inner_folds: int, seed: int):
    """Inner grouped CV on ``tr`` picks the pool width and ``grid``; returns (p_test, chosen)."""
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    pipe = Pipeline([("pool", FunctionTransformer(max_pool, kw_args={"width": 8})), ("m", clone(est))])
    if not grid:  # nothing to choose (the random guess)
        return pipe.fit(X[tr], y[tr]).predict_proba(X[te])[:, 1], {}
    full_grid = {"pool__kw_args": [{"width": 8}, {"width": 45}], **grid}
    cv = StratifiedGroupKFold(n_splits=inner_folds, shuffle=True, random_state=seed)
    search = GridSearchCV(pipe, full_grid, scoring="f1_macro", cv=cv, n_jobs=1, error_score="raise")
    search.fit(X[tr], y[tr], groups=groups[tr])
    chosen = {("pool" if k.startswith("pool__") else k.split("__", 1)[1]): (v["width"] if isinstance(v, dict) else v)
              for k, v in sorted(search.best_params_.items())}
    return search.predict_proba(X[te])[:, 1], chosen


def nearest_other_formula(X: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Index of each compound's most similar pattern (cosine) among *other* formulas."""
    Z = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    S = Z @ Z.T
    S[groups[:, None] == groups[None, :]] = -np.inf  # never itself or a polymorph
    return S.argmax(1)


def network_rows(cfg_path: str, run_dir: str, log) -> list[dict]:
    """Per-fold rows of the supervised ``fast`` network under the same grouped CV (same run)."""
    from xrdmatch.training.evaluation import evaluate_grouped_cv

    cfg = load_config(cfg_path, {"run_dir": run_dir, "evaluation": {"methods": ["supervised"]}})
    res = evaluate_grouped_cv(cfg, log_fn=log)
    return [r for r in res["per_fold"] if r["method"] == "supervised"]


def fmt(s: dict, k: str) -> str:
    return f"{s[k]:.3f} ± {s[k + '_std']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--dir", default="runs/eval", help="run directory of the network rows (reuses the member "
                    "cache of `xrdmatch evaluate --dir runs/eval`)")
    ap.add_argument("--no-network", action="store_true", help="skip training the fast network")
    args = ap.parse_args()

    def log(msg: str) -> None:  # progress to stderr: stdout is the report
        print(msg, file=sys.stderr, flush=True)

    cfg = load_config(args.config)
    ev = cfg.evaluation
    lab = load_labelled(cfg.labels.path)
    X = preprocess(np.asarray(lab.X, np.float32), threshold=cfg.training.augment.threshold)
    y, groups = np.asarray(lab.y).astype(int), np.asarray(lab.groups)
    splits = repeated_grouped_splits(y, groups, ev.folds, ev.repeats, ev.seed)

    rows: dict[str, list[dict]] = {}
    chosen: dict[str, list[dict]] = {}
    walls: dict[str, float] = {}
    for name, (est, grid) in models(ev.seed).items():
        t0 = time.time()
        for s in splits:
            p, c = fit_predict(est, grid, X, y, groups, s.train, s.test, ev.inner_folds,
                               inner_seed(ev.seed, s.repeat, s.fold))
            r = binary_metrics(y[s.test], calls(p), p)
            rows.setdefault(name, []).append({**r, "repeat": s.repeat, "fold": s.fold})
            chosen.setdefault(name, []).append(c)
        walls[name] = time.time() - t0
        log(f"{name}: {walls[name]:.0f} s")
    if not args.no_network:
        t0 = time.time()
        rows["fast network (supervised)"] = network_rows(args.config, args.dir, log)
        walls["fast network (supervised)"] = time.time() - t0

    print(f"grouped-cv: {ev.folds} folds x {ev.repeats} repeats by reduced formula (seed {ev.seed}), "
          f"{len(y)} compounds, {int(y.sum())} superionic, {len(set(groups))} formulas; mean ± std over repeats")
    print(f"{'method':28s} {'macro-F1':>14s} {'F1 superionic':>14s} {'PR-AUC':>14s} {'wall s':>7s}")
    summ = {n: summarise_repeats(r, METRICS) for n, r in rows.items()}
    for n, s in summ.items():
        print(f"{n:28s} {fmt(s, 'macro_f1'):>14s} {fmt(s, 'f1_superionic'):>14s} {fmt(s, 'pr_auc'):>14s} {walls[n]:7.0f}")
    for n, cs in chosen.items():
        if cs and cs[0]:
            picks = sorted({", ".join(f"{k}={v}" for k, v in c.items()) for c in cs})
            print(f"  {n}: chosen on inner folds: {' | '.join(picks)}")
    best = max((n for n in summ if not n.startswith("random")), key=lambda n: summ[n]["macro_f1"])
    f = np.array([r["macro_f1"] for r in rows[best]])
    # picked by its score on these very test folds: an optimistic figure for the classical side
    print(f"best on these test folds (optimistic for it): {best}, macro-F1 {f.mean():.3f}; "
          f"single folds {f.min():.2f}..{f.max():.2f}")
    if "fast network (supervised)" in rows and best != "fast network (supervised)":
        net = {(r["repeat"], r["fold"]): r["macro_f1"] for r in rows["fast network (supervised)"]}
        d = np.array([r["macro_f1"] - net[(r["repeat"], r["fold"])] for r in rows[best]])
        print(f"{best} - fast network, paired per fold (n={len(d)}): mean {d.mean():+.3f}, std {d.std(ddof=1):.3f}, "
              f"better in {(d > 0).sum()}/{len(d)} folds")
    # learning curve of the best classical model: does the score still climb with more labels?
    if best in models(ev.seed):
        est, grid = models(ev.seed)[best]
        parts = []
        for frac in (0.25, 0.5, 0.75, 1.0):
            rs, n = [], []
            for s in splits:
                seed = inner_seed(ev.seed, s.repeat, s.fold)
                tr = subsample_groups(s.train, y, groups, frac, seed)
                n.append(len(tr))
                folds = min(ev.inner_folds, len(np.unique(groups[tr][y[tr] == 1])))
                p, _ = fit_predict(est, grid, X, y, groups, tr, s.test, folds, seed)
                rs.append({**binary_metrics(y[s.test], calls(p), p), "repeat": s.repeat})
            m = summarise_repeats(rs, ("macro_f1", "pr_auc"))
            parts.append(f"{frac:.0%} ({np.mean(n):.0f}): {m['macro_f1']:.3f} / {m['pr_auc']:.3f}")
        print(f"{best} by share of each training fold's formulas (mean labels): macro-F1 / PR-AUC  " + ",  ".join(parts))
    nn = nearest_other_formula(max_pool(X, 8), groups)
    p = y.mean()
    print(f"nearest pattern of another formula has the same label: {(y[nn] == y).mean():.3f} of compounds "
          f"(labels independent of patterns: {p * p + (1 - p) * (1 - p):.3f}); for a superionic compound it is "
          f"superionic {y[nn][y == 1].mean():.3f} of the time (prevalence {p:.3f})")


if __name__ == "__main__":
    main()
