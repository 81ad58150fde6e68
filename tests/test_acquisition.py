"""Candidate selection: strategies, filters, diversity (pure functions, real shipped patterns)."""

from __future__ import annotations

import numpy as np
import pytest

from xrdmatch.platform.acquisition import (
    acquisition_score,
    diverse_top,
    eligibility_mask,
    element_matrix,
    radioactive_elements,
    select_candidates,
)


def test_strategies_rank_as_documented():
    p = np.array([0.95, 0.55, 0.50, 0.10, 0.80])
    s = np.array([0.01, 0.20, 0.05, 0.30, 0.15])
    assert np.argmax(acquisition_score(p, s, "top")) == 0
    # uncertain: spread near the boundary wins over a larger spread far from it
    u = acquisition_score(p, s, "uncertain")
    assert np.argmax(u) == 1
    assert u[3] < u[1]  # spread 0.30 but p = 0.1 is confidently negative
    np.testing.assert_allclose(acquisition_score(p, s, "ucb", k=2.0), p + 2.0 * s)
    assert np.argmax(acquisition_score(p, s, "ucb", k=0.0)) == 0
    assert np.argmax(acquisition_score(p, s, "ucb", k=10.0)) == 3  # spread dominates
    with pytest.raises(ValueError, match="unknown acquisition strategy 'greedy'"):
        acquisition_score(p, s, "greedy")
    with pytest.raises(ValueError, match="differ in shape"):
        acquisition_score(p, s[:2], "top")


def test_filters():
    elements = [["Li", "O"], ["Li", "U", "O"], ["Na", "Cl"], ["Li", "P", "S"], ["Li", "Tc", "O"], ["Li", "Ge", "P", "S"]]
    groups = ["Li2O", "LiUO3", "NaCl", "Li3PS4", "LiTcO4", "Li10GeP2S12"]
    n_sites = np.array([12, 10, 8, 16, 24, 100])
    presence, vocab = element_matrix(elements)
    assert presence.shape == (6, len(vocab)) and presence.sum() == sum(len(e) for e in elements)
    assert {"Tc", "U", "Pm"} <= radioactive_elements() and "Li" not in radioactive_elements()
    ok = eligibility_mask(presence, vocab, n_sites, groups, required=["Li"], forbidden=radioactive_elements(),
                          max_sites=60, labelled_groups={"Li3PS4"})
    # NaCl: no Li; LiUO3/LiTcO4: radioactive; Li3PS4: labelled; LGPS: too large for MD
    assert ok.tolist() == [True, False, False, False, False, False]
    ok2 = eligibility_mask(presence, vocab, n_sites, groups, required=["Li", "S"])
    assert ok2.tolist() == [False, False, False, True, False, True]
    assert not eligibility_mask(presence, vocab, n_sites, groups, required=["Xe"]).any()
    excl = np.array([True, False, False, False, False, False])
    assert not eligibility_mask(presence, vocab, n_sites, groups, exclude=excl)[0]


def test_diversity_skips_near_duplicates_and_repeated_compositions(labelled):
    X = labelled.X[:6].astype(np.float64)
    # row 1: a near copy of row 0 (cosine ~ 1); row 2: same composition as row 3
    X = np.vstack([X[0], X[0] * 1.01 + 1e-4, X[2], X[3], X[4], X[5]])
    groups = ["A", "B", "C", "C", "E", "F"]
    score = np.array([0.9, 0.89, 0.8, 0.7, 0.6, 0.5])
    mask = np.ones(6, dtype=bool)
    cos01 = X[0] @ X[1] / np.linalg.norm(X[0]) / np.linalg.norm(X[1])
    assert cos01 > 0.99
    picks = diverse_top(score, mask, X, groups, 3, similarity_threshold=0.95)
    assert picks.tolist()[:2] == [0, 2]
    assert 1 not in picks and 3 not in picks
    # pairwise similarity of the picks respects the threshold
    V = X[picks] / np.linalg.norm(X[picks], axis=1, keepdims=True)
    S = V @ V.T
    assert (S[~np.eye(len(picks), dtype=bool)] <= 0.95).all()
    # threshold 1.0 lets the near duplicate through, and exact copies too (float32 cosines of
    # identical patterns can come out a hair above 1)
    assert diverse_top(score, mask, X, groups, 2, similarity_threshold=1.0).tolist() == [0, 1]
    twins = np.random.default_rng(3).random((300, 1, 4501)).repeat(2, axis=1)
    blocked = sum(len(diverse_top(np.array([1.0, 0.5]), np.ones(2, bool), t, ["A", "B"], 2, 1.0)) < 2 for t in twins)
    assert blocked == 0
    # a small pool grows when duplicates exhaust it
    assert len(diverse_top(score, mask, X, groups, 4, similarity_threshold=0.95, pool=1)) == 4
    assert len(diverse_top(score, ~mask, X, groups, 2, 0.95)) == 0


def test_select_candidates_end_to_end_on_shipped_patterns(labelled):
    n = len(labelled)
    rng = np.random.default_rng(0)
    p = rng.uniform(size=n)
    s = rng.uniform(0, 0.2, size=n)
    from pymatgen.core import Composition

    elements = [sorted(el.symbol for el in Composition(g).elements) for g in labelled.groups]
    presence, vocab = element_matrix(elements)
    n_sites = np.full(n, 20)
    already = set(labelled.groups[:10])
    sel = select_candidates(p, s, labelled.X, presence, vocab, n_sites, labelled.groups, 5, strategy="ucb", k=1.0,
                            similarity_threshold=0.9, required=["Li"], forbidden={"U"}, max_sites=60,
                            labelled_groups=already)
    assert len(sel.indices) == 5
    assert sel.n_eligible <= n
    picked_groups = [labelled.groups[i] for i in sel.indices]
    assert len(set(picked_groups)) == 5 and not set(picked_groups) & already
    assert all("Li" in elements[i] for i in sel.indices)
    # best first, and nothing eligible left out that scores higher than the best pick
    assert np.all(np.diff(sel.scores) <= 0)
    ucb = p + s
    mask = eligibility_mask(presence, vocab, n_sites, labelled.groups, required=["Li"], forbidden={"U"},
                            max_sites=60, labelled_groups=already)
    assert sel.scores[0] == pytest.approx(ucb[mask].max())


def test_greedy_diverse_top_equals_the_all_pairs_rule():
    """The greedy walk picks exactly what the all-pairs definition picks (best first, no pick
    more similar than the threshold to, or of the composition of, a better pick), including when
    one composition crowds the top of the ranking and the picks need most of the list."""
    rng = np.random.default_rng(3)
    base = rng.random((40, 4501)).astype(np.float32) ** 8
    rows, groups = [], []
    for k in range(3000):  # 40 prototypes with noisy copies; group 0 has 2000 members at the top
        j = 0 if k < 2000 else int(rng.integers(1, 40))
        rows.append(base[j] + 0.05 * rng.random(4501).astype(np.float32))
        groups.append(f"g{j}" if j else "crowd")
    X = np.stack(rows)
    score = np.concatenate([np.linspace(1.0, 0.9, 2000), rng.random(1000) * 0.8])
    mask = rng.random(3000) > 0.1

    def all_pairs(n, thr):
        order = [i for i in np.argsort(-score, kind="stable") if mask[i]]
        V = X[order] / np.linalg.norm(X[order], axis=1, keepdims=True)
        S = V @ V.T
        picks = []
        for a in range(len(order)):
            if all(S[a, b] <= thr and groups[order[a]] != groups[order[b]] for b in picks):
                picks.append(a)
                if len(picks) == n:
                    break
        return [order[a] for a in picks]

    for n, thr in ((5, 0.95), (30, 0.99), (60, 0.999)):
        want = all_pairs(n, thr)
        assert diverse_top(score, mask, X, groups, n, thr).tolist() == want
        assert diverse_top(score, mask, X, groups, n, thr, pool=7).tolist() == want


def test_a_structure_without_a_finite_score_is_not_eligible():
    """NaN scores (or spreads, for ucb/uncertain) can never be picked: they are not counted as
    eligible, so "0 picks, N eligible" never hides them."""
    n = 5
    X = np.eye(n, 4501, dtype=np.float32)
    presence, vocab = element_matrix([["Li", "O"]] * n)
    p_mean = np.array([0.9, 0.8, np.nan, 0.6, 0.5])
    p_std = np.array([0.1, np.nan, 0.1, 0.1, 0.1])
    for strategy, eligible in (("top", 4), ("ucb", 3), ("uncertain", 3)):
        sel = select_candidates(p_mean, p_std, X, presence, vocab, np.full(n, 4), [f"g{i}" for i in range(n)], n,
                                strategy=strategy, k=1.0, similarity_threshold=0.99)
        assert sel.n_eligible == eligible == len(sel.indices), strategy
