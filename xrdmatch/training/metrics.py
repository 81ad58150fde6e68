"""Binary classification metrics (1 = superionic) via scikit-learn, plus summaries over folds."""

from __future__ import annotations

import math

import numpy as np

#: The metrics reported per method, each as mean and std over folds x repeats.
METRICS = ("macro_f1", "f1_superionic", "precision", "recall", "pr_auc")


def binary_metrics(y_true, y_pred, score=None) -> dict[str, float]:
    """Macro-F1, superionic-class F1/precision/recall, PR-AUC (average precision) of ``score``.

    Undefined ratios (no predicted / no true superionic) count as 0, as scikit-learn's
    ``zero_division=0``; PR-AUC is NaN when the test set has no superionic compound.
    """
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

    y_true = np.asarray(y_true).astype(int)
    y_pred = np.asarray(y_pred).astype(int)
    out = {
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=[0, 1], zero_division=0)),
        "f1_superionic": float(f1_score(y_true, y_pred, pos_label=1, zero_division=0)),
        "precision": float(precision_score(y_true, y_pred, pos_label=1, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, pos_label=1, zero_division=0)),
        "n": int(len(y_true)),
        "n_superionic": int(y_true.sum()),
        "prevalence": float(y_true.mean()) if len(y_true) else math.nan,
    }
    if score is not None:
        has_both = 0 < y_true.sum() < len(y_true)
        out["pr_auc"] = float(average_precision_score(y_true, np.asarray(score, float))) if has_both else math.nan
    return out


#: the counts among ``binary_metrics``' keys (MLflow stores every metric as a float)
COUNTS = ("n", "n_superionic")


def metric_text(name: str, value: float | None) -> str:
    """A metric for a table or a status line: a count (``n``, ``grouped_cv_n_superionic``) as an
    integer, any other to three decimals, a missing one as ``-``."""
    if value is None:
        return "-"
    count = name in COUNTS or name.endswith(tuple(f"_{c}" for c in COUNTS))
    return f"{value:.0f}" if count else f"{value:.3f}"


def calls(p, threshold: float = 0.5) -> np.ndarray:
    """1 (superionic) where p > threshold, else 0. At 0.5 this is the network's own argmax (a tie
    goes to class 0): every single-model call, member vote and threshold search uses this rule."""
    return (np.asarray(p) > threshold).astype(int)


def vote_threshold(n_members: int, vote_fraction: float) -> int:
    """Votes needed to call superionic: ceil(fraction * n), at least 1 (paper: 5 of 10)."""
    return max(1, math.ceil(vote_fraction * n_members - 1e-9))


def vote(p_members, vote_fraction: float, threshold: float = 0.5) -> np.ndarray:
    """(members, samples) probabilities -> the ensemble's call: superionic when at least
    ceil(vote_fraction x members) members call it (one member: its own call)."""
    p_members = np.atleast_2d(np.asarray(p_members))
    return (calls(p_members, threshold).sum(axis=0) >= vote_threshold(len(p_members), vote_fraction)).astype(int)


def pooled_mean_std(rows: list[dict[str, float]], keys=METRICS) -> dict[str, float]:
    """``{k: mean, k_std: std}`` over rows (NaN ignored; std is the population std, ddof=0)."""
    out: dict[str, float] = {}
    for k in keys:
        v = np.array([r[k] for r in rows if k in r], dtype=float)
        v = v[np.isfinite(v)]
        out[k] = float(v.mean()) if len(v) else math.nan
        out[f"{k}_std"] = float(v.std()) if len(v) else math.nan
    return out


def summarise_repeats(rows: list[dict], keys=METRICS) -> dict[str, float]:
    """Mean and std over repeats of the per-repeat mean over folds.

    The spread that matters for "how good is the method" is between repeats (each one a full
    CV estimate); the per-fold spread is also reported (``*_fold_std``) to show how noisy a
    single fold of ~20 compounds is.
    """
    by_rep: dict[int, list[dict]] = {}
    for r in rows:
        by_rep.setdefault(int(r["repeat"]), []).append(r)
    per_rep = [pooled_mean_std(v, keys) for _, v in sorted(by_rep.items())]
    out = pooled_mean_std(per_rep, keys)
    folds = pooled_mean_std(rows, keys)
    for k in keys:
        out[f"{k}_fold_std"] = folds[f"{k}_std"]
        if len(per_rep) == 1:  # one repeat has no spread between repeats: report the folds'
            out[f"{k}_std"] = folds[f"{k}_std"]
    out["std_over"] = "repeats" if len(per_rep) > 1 else "folds"
    return out


def best_threshold(y_true, score, grid=None) -> float:
    """The decision threshold (call superionic when score > t) maximising macro-F1 on (inner validation) data; ties -> closest to 0.5."""
    y_true = np.asarray(y_true).astype(int)
    score = np.asarray(score, float)
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2) if grid is None else np.asarray(grid, float)
    best, best_f = 0.5, -1.0
    for t in sorted(grid, key=lambda t: abs(t - 0.5)):
        f = binary_metrics(y_true, calls(score, t))["macro_f1"]
        if f > best_f + 1e-12:
            best, best_f = float(t), f
    return best
