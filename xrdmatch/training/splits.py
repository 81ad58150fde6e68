"""Train/test splits for evaluation: grouped + stratified CV, inner splits, the paper's split.

Why grouped: the 112 labelled compounds contain polymorphs and repeated formulas (alpha/beta
Li3N, three LLZO entries...). A random split puts near-identical patterns on both sides and
inflates every score, so the unit of a split is the reduced formula (``LabelledSet.groups``).
Splitting is delegated to scikit-learn's ``StratifiedGroupKFold``; repeats reseed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    """One outer fold: indices into the labelled set."""

    repeat: int
    fold: int
    train: np.ndarray
    test: np.ndarray


def _check(y: np.ndarray, groups: list[str] | np.ndarray, n_splits: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int)
    g = np.asarray(groups)
    if len(y) != len(g):
        raise ValueError(f"labels ({len(y)}) and groups ({len(g)}) differ in length")
    n_groups = len(np.unique(g))
    if n_splits < 2 or n_splits > n_groups:
        raise ValueError(f"folds must be in [2, {n_groups}] (number of distinct groups), got {n_splits}")
    for c in np.unique(y):
        n_c = len(np.unique(g[y == c]))
        if n_c < n_splits:
            raise ValueError(f"class {c} has only {n_c} groups: cannot stratify {n_splits} folds")
    return y, g


def grouped_stratified_kfold(y, groups, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs: no group straddles a split, classes balanced across folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    y, g = _check(y, groups, n_splits)
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
    return [(np.sort(tr), np.sort(te)) for tr, te in cv.split(np.zeros(len(y)), y, g)]


def repeated_grouped_splits(y, groups, folds: int, repeats: int, seed: int) -> list[Split]:
    """``repeats`` independent grouped stratified k-fold partitions (repeat r uses seed + r)."""
    out: list[Split] = []
    for r in range(repeats):
        for k, (tr, te) in enumerate(grouped_stratified_kfold(y, groups, folds, seed + r)):
            out.append(Split(r, k, tr, te))
    return out


def inner_split(train_idx: np.ndarray, y, groups, n_splits: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a training fold (indices into the full set) into inner-train / inner-validation.

    Only indices of ``train_idx`` are ever returned, grouped and stratified like the outer
    split; the validation part is one of ``n_splits`` inner folds. Used for model selection
    (decision threshold) so that nothing is chosen on the outer test fold.
    """
    train_idx = np.asarray(train_idx, dtype=int)
    y = np.asarray(y).astype(int)
    g = np.asarray(groups)
    tr, va = grouped_stratified_kfold(y[train_idx], g[train_idx], n_splits, seed)[0]
    return train_idx[tr], train_idx[va]


def subsample_groups(train_idx: np.ndarray, y, groups, frac: float, seed: int) -> np.ndarray:
    """A share ``frac`` of a training fold's formulas, drawn per class (seeded), with every
    compound of a drawn formula: learning curves and label-scarcity runs on the same test folds.
    At least 2 formulas of each class are kept. A formula with compounds of both classes (two
    polymorphs of Li3PS4) is drawn once, as superionic, so that each class's share is met."""
    train_idx = np.asarray(train_idx, dtype=int)
    if not 0 < frac <= 1:
        raise ValueError(f"subsample_groups: frac must be in (0, 1], got {frac}")
    if frac == 1:
        return train_idx
    y = np.asarray(y).astype(int)[train_idx]
    g = np.asarray(groups)[train_idx]
    rng = np.random.default_rng(seed)
    superionic = np.unique(g[y == 1])
    keep: list = []
    for gc in (np.setdiff1d(np.unique(g), superionic), superionic):  # class 0, then class 1, as before
        keep.extend(rng.choice(gc, min(len(gc), max(2, round(frac * len(gc)))), replace=False))
    return train_idx[np.isin(g, keep)]


def paper_permutation(n: int, seed: int = 0) -> np.ndarray:
    """The authors' shuffle: ``np.random.seed(seed); np.random.permutation(n)``.

    ``RandomState(seed).permutation(n)`` draws exactly the same order (and the same as the
    authors' in-place ``np.random.shuffle`` of the row array), without touching global state.
    """
    return np.random.RandomState(seed).permutation(n)


def paper_pool(y, seed: int = 0, n_pos: int = 19, n_neg: int = 74) -> tuple[np.ndarray, np.ndarray]:
    """(pool, hold-out) indices: after the paper's shuffle, the first ``n_pos`` superionic and
    first ``n_neg`` other compounds are the label pool; the rest (4 + 15 on the 112) are held out."""
    y = np.asarray(y).astype(int)
    perm = paper_permutation(len(y), seed)
    pos = perm[y[perm] == 1]
    neg = perm[y[perm] == 0]
    if len(pos) < n_pos or len(neg) < n_neg:
        raise ValueError(f"pool needs {n_pos} superionic + {n_neg} others, data has {len(pos)} + {len(neg)}")
    pool = np.concatenate([pos[:n_pos], neg[:n_neg]])
    hold = np.concatenate([pos[n_pos:], neg[n_neg:]])
    return pool, hold


def paper_label_draws(
    y, pool: np.ndarray, n_members: int, n_pos: int = 10, n_neg: int = 10, seed: int = 0
) -> list[np.ndarray]:
    """Each member's labelled set: ``n_pos`` superionic + ``n_neg`` others drawn from the pool
    without replacement (member m uses ``default_rng([seed, m])``)."""
    y = np.asarray(y).astype(int)
    pool = np.asarray(pool, dtype=int)
    pos, neg = pool[y[pool] == 1], pool[y[pool] == 0]
    if len(pos) < n_pos or len(neg) < n_neg:
        raise ValueError(f"pool has {len(pos)} superionic + {len(neg)} others, members need {n_pos} + {n_neg}")
    draws = []
    for m in range(n_members):
        rng = np.random.default_rng([seed, m])
        draws.append(np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])))
    return draws
