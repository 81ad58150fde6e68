"""Candidate selection for the active-learning loop: pure, vectorised functions on arrays.

A round picks ``n`` structures to validate by MD:

1. :func:`acquisition_score` ranks every structure by the configured strategy
   (``top``: mean probability; ``uncertain``: spread near the decision boundary;
   ``ucb``: mean + k * spread).
2. :func:`eligibility_mask` drops what must never be simulated or is useless to simulate:
   missing required elements, forbidden/radioactive elements, cells too large for MD,
   compositions already labelled (reduced formula), structures already picked before.
3. :func:`diverse_top` walks the eligible structures best first and skips any whose
   pattern is a near duplicate (cosine similarity above a threshold) of a pick, or whose
   composition was already picked this round.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("top", "uncertain", "ucb")


def acquisition_score(p_mean: np.ndarray, p_std: np.ndarray, strategy: str, k: float = 1.0) -> np.ndarray:
    """Higher is better. ``uncertain`` = spread x closeness to 0.5, so a wide spread far
    from the boundary (e.g. p = 0.95 +- 0.1) ranks below a moderate spread at p = 0.5."""
    p = np.asarray(p_mean, dtype=np.float64)
    s = np.asarray(p_std, dtype=np.float64)
    if p.shape != s.shape:
        raise ValueError(f"p_mean {p.shape} and p_std {s.shape} differ in shape")
    if strategy == "top":
        return p.copy()
    if strategy == "uncertain":
        return s * (1.0 - np.abs(2.0 * p - 1.0))
    if strategy == "ucb":
        return p + k * s
    raise ValueError(f"unknown acquisition strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def element_matrix(elements: Sequence[Iterable[str]]) -> tuple[np.ndarray, list[str]]:
    """Boolean presence matrix (n structures x vocabulary) and its vocabulary."""
    sets = [frozenset(e) for e in elements]
    vocab = sorted(set().union(*sets)) if sets else []
    col = {e: j for j, e in enumerate(vocab)}
    rows = np.fromiter((i for i, s in enumerate(sets) for _ in s), dtype=np.int64)
    cols = np.fromiter((col[e] for s in sets for e in s), dtype=np.int64)
    m = np.zeros((len(sets), len(vocab)), dtype=bool)
    m[rows, cols] = True
    return m, vocab


def radioactive_elements() -> set[str]:
    """Elements pymatgen marks radioactive (no stable isotope)."""
    from pymatgen.core.periodic_table import Element

    return {el.symbol for el in Element if el.is_radioactive}


def eligibility_mask(
    presence: np.ndarray,
    vocab: Sequence[str],
    n_sites: np.ndarray,
    groups: Sequence[str],
    *,
    required: Iterable[str] = (),
    forbidden: Iterable[str] = (),
    max_sites: int | None = None,
    labelled_groups: Iterable[str] = (),
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """True where a structure may be picked. ``groups`` are reduced formulas."""
    n = presence.shape[0]
    col = {e: j for j, e in enumerate(vocab)}
    ok = np.ones(n, dtype=bool)
    for el in required:
        j = col.get(el)
        if j is None:  # no structure has it
            return np.zeros(n, dtype=bool)
        ok &= presence[:, j]
    bad = [col[e] for e in set(forbidden) if e in col]
    if bad:
        ok &= ~presence[:, bad].any(axis=1)
    if max_sites is not None:
        ok &= np.asarray(n_sites) <= max_sites
    lab = set(labelled_groups)
    if lab:
        ok &= ~np.isin(np.asarray(groups, dtype=object), list(lab))
    if exclude is not None:
        ok &= ~np.asarray(exclude, dtype=bool)
    return ok


def diverse_top(
    score: np.ndarray,
    mask: np.ndarray,
    X: np.ndarray,
    groups: Sequence[str],
    n: int,
    similarity_threshold: float,
    pool: int = 512,
) -> np.ndarray:
    """Indices of up to ``n`` picks, best first, pairwise cosine similarity <= threshold and
    pairwise different compositions: greedy, best score first, each candidate compared only with
    the picks so far (at most ``n`` patterns), ``pool`` candidates per matrix product. Cost grows
    with the candidates walked, not their square (a composition with hundreds of polymorphs at
    the top of the ranking no longer forces an all-pairs matrix of the whole database)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    eligible = np.flatnonzero(mask & np.isfinite(score))
    order = eligible[np.argsort(-score[eligible], kind="stable")]
    g = np.asarray(groups, dtype=object)
    picks: list[int] = []
    taken: set = set()
    P = np.zeros((0, X.shape[1]), dtype=np.float32)  # unit vectors of the picks so far
    # float32 cosines of identical unit vectors reach 1 + 1e-7: a threshold of 1 must block nothing
    similarity_threshold = similarity_threshold + 1e-6 if similarity_threshold >= 1.0 else similarity_threshold
    for start in range(0, len(order), max(1, pool)):
        cand = order[start:start + pool]
        fresh = np.fromiter((grp not in taken for grp in g[cand]), dtype=bool, count=len(cand))
        if not fresh.any():
            continue
        cand = cand[fresh]
        V = np.asarray(X[cand], dtype=np.float32)
        V = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)
        blocked = (V @ P.T > similarity_threshold).any(axis=1) if len(P) else np.zeros(len(cand), dtype=bool)
        new: list[int] = []
        for i in np.flatnonzero(~blocked):
            if g[cand[i]] in taken or (new and (V[new] @ V[i] > similarity_threshold).any()):
                continue
            new.append(int(i))
            picks.append(int(cand[i]))
            taken.add(g[cand[i]])
            if len(picks) == n:
                return np.asarray(picks, dtype=np.int64)
        P = np.vstack([P, V[new]])
    return np.asarray(picks, dtype=np.int64)


@dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # into the screened arrays, best first
    scores: np.ndarray
    n_eligible: int


def select_candidates(
    p_mean: np.ndarray,
    p_std: np.ndarray,
    X: np.ndarray,
    presence: np.ndarray,
    vocab: Sequence[str],
    n_sites: np.ndarray,
    groups: Sequence[str],
    n: int,
    *,
    strategy: str = "top",
    k: float = 1.0,
    similarity_threshold: float = 0.95,
    required: Iterable[str] = (),
    forbidden: Iterable[str] = (),
    max_sites: int | None = None,
    labelled_groups: Iterable[str] = (),
    exclude: np.ndarray | None = None,
    pool: int = 512,
) -> Selection:
    """Score, filter, pick diverse: the whole acquisition step."""
    score = acquisition_score(p_mean, p_std, strategy, k)
    mask = eligibility_mask(
        presence, vocab, n_sites, groups, required=required, forbidden=forbidden,
        max_sites=max_sites, labelled_groups=labelled_groups, exclude=exclude,
    )
    mask &= np.isfinite(score)  # a NaN score (or spread, for ucb/uncertain) can never be picked: not eligible
    idx = diverse_top(score, mask, X, groups, n, similarity_threshold, pool=pool)
    return Selection(indices=idx, scores=score[idx], n_eligible=int(mask.sum()))
