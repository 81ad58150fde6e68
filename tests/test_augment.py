"""Each augmentation keeps the promise its docstring makes (batched torch, seeded generator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xrdmatch.config import AugmentConfig
from xrdmatch.training import augment as A
from xrdmatch.training.preprocess import preprocess

B, L = 64, 4501


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def real(labelled) -> torch.Tensor:
    return torch.as_tensor(preprocess(labelled.X[:B]))


@pytest.fixture(scope="module")
def middle() -> torch.Tensor:
    """Synthetic patterns whose peaks all lie in bins 1000..3000 (nothing can fall off an end)."""
    g = np.random.default_rng(1)
    x = np.zeros((B, L), np.float32)
    for i in range(B):
        pos = g.choice(np.arange(1000, 3000), size=g.integers(5, 40), replace=False)
        x[i, pos] = g.uniform(0.2, 1.0, size=len(pos))
        x[i, pos[0]] = 1.0
    return torch.as_tensor(x)



def run(op, x: torch.Tensor, *args, seed: int = 0) -> torch.Tensor:
    """Apply one peak-list operation to every row of dense ``x``; dense result, not renormalised."""
    return A.to_dense(op(A.to_peaks(x), torch.ones(len(x), 1, dtype=torch.bool), *args, gen(seed)),
                      normalise=False)


def test_peak_lists_roundtrip(real):
    p = A.to_peaks(real)
    assert p.pos.shape[1] == int((real > 0).sum(1).max())
    assert torch.equal(A.to_dense(p, normalise=False), real)
    assert torch.equal(A.to_dense(p.take(torch.tensor([3, 1])), normalise=False), real[[3, 1]])


def test_preprocess_minmax_threshold_and_zero_rows():
    x = np.array([[2.0, 4.0, 2.1, 12.0], [0, 0, 0, 0], [5, 5, 5, 5]], np.float32)
    out = preprocess(x, threshold=0.1)
    np.testing.assert_allclose(out[0], [0.0, 0.2, 0.0, 1.0])  # 0.01 < 0.1 zeroed
    assert (out[1:] == 0).all() and np.isfinite(out).all()
    assert preprocess(x[0]).shape == (4,)
    assert isinstance(preprocess(torch.as_tensor(x)), torch.Tensor)
    with pytest.raises(ValueError, match="NaN"):
        preprocess(np.array([[np.nan, 1.0]]))


def test_shift_moves_every_peak_by_the_same_bins_and_zero_fills(middle):
    cfg = AugmentConfig(w_move_min=50, w_move_gap=200)
    out = run(A.shift, middle, cfg.w_move_min, cfg.w_move_gap)
    signs = set()
    for i in range(B):
        p_in, p_out = middle[i].nonzero().flatten(), out[i].nonzero().flatten()
        assert len(p_in) == len(p_out)
        s = int(p_out[0] - p_in[0])
        assert 50 <= abs(s) <= 200
        assert torch.equal(p_out - p_in, torch.full_like(p_in, s))  # rigid shift
        assert torch.equal(out[i, p_out], middle[i, p_in])  # heights kept
        signs.add(s > 0)
    assert signs == {True, False}  # both directions occur
    # zero fill at the edge: a peak in the first bin shifted right leaves zeros behind
    edge = torch.zeros(1, L)
    edge[0, :10] = 1.0
    for seed in range(6):  # both directions: right -> peaks at 60..69; left -> they fall off
        moved = run(A.shift, edge, 60, 60, seed=seed)
        assert moved[0, :60].sum() == 0 and moved[0, -60:].sum() == 0  # zero-filled, never wrapped
        assert moved.sum() in (0.0, 10.0) and (moved.sum() == 0 or (moved[0, 60:70] == 1).all())


def test_weak_noise_only_fills_empty_bins_with_small_peaks(real):
    cfg = AugmentConfig(w_noise_prob=1.0, w_move_prob=0.0, w_noise_frac=0.05, w_noise_peak=0.1)
    out = A.weak_augment(real, cfg, gen())
    peaks = real > 0
    assert torch.allclose(out[peaks], real[peaks])  # existing peaks untouched
    new = (out > 0) & ~peaks
    assert new.any()
    assert out[new].max() <= 0.1 + 1e-6


def test_delete_removes_only_existing_peaks_within_fraction(real):
    out = run(A.delete_peaks, real, 0.18)
    assert not ((out > 0) & (real == 0)).any()  # nothing new appears
    kept = out > 0
    assert torch.equal(out[kept], real[kept])
    n_in, n_out = (real > 0).sum(1), kept.sum(1)
    assert ((n_in - n_out) <= torch.floor(n_in * 0.18)).all()
    assert (n_out < n_in).any()


def test_scale_touches_only_peaks_by_factor_1_to_max(real):
    out = run(A.scale_peaks, real, 0.16, 3.0)
    assert torch.equal(out[real == 0], real[real == 0])
    ratio = out[real > 0] / real[real > 0]
    assert ratio.min() >= 1.0 - 1e-6 and ratio.max() <= 3.0 + 1e-5
    changed = (out != real).sum(1)
    assert (changed <= torch.floor((real > 0).sum(1) * 0.16)).all() and changed.sum() > 0


def test_gap_inserts_or_removes_zeros_only_between_peaks(real):
    out = run(A.gap, real, 550)
    kinds = set()
    for i in range(B):
        p_in, p_out = real[i].nonzero().flatten(), out[i].nonzero().flatten()
        assert torch.equal(real[i, p_in], out[i, p_out])  # same peaks, same order: only zeros moved
        assert p_in[0] == p_out[0]  # the part before the gap never moves
        d = torch.diff(p_out) - torch.diff(p_in)
        assert (d != 0).sum() <= 1  # exactly one gap changed (or none)
        assert d.abs().max() <= 550
        assert (torch.diff(p_out) >= 1).all()
        if d.any():
            kinds.add(int(d[d != 0][0] > 0))
    assert kinds == {0, 1}  # both cut and insert happened


@pytest.mark.parametrize("fn", [A.weak_augment, A.strong_augment])
def test_outputs_normalised_no_nan_and_deterministic(real, fn):
    cfg = AugmentConfig(w_noise_prob=1.0, w_move_prob=1.0, s_scale_prob=1.0, s_delete_prob=1.0,
                        s_gap_prob=1.0, s_noise_prob=1.0)
    x = torch.cat([real, torch.zeros(3, L)])
    out = fn(x, cfg, gen(5))
    assert torch.isfinite(out).all() and out.min() >= 0
    assert torch.allclose(out[:B].amax(1), torch.ones(B))
    assert (out[B:] == 0).all()  # all-zero rows stay all zero
    assert torch.equal(out, fn(x, cfg, gen(5)))
    assert not torch.equal(out, fn(x, cfg, gen(6)))


def test_probabilities_zero_means_identity(real):
    cfg = AugmentConfig(w_noise_prob=0, w_move_prob=0, s_scale_prob=0, s_delete_prob=0, s_gap_prob=0, s_noise_prob=0)
    assert torch.allclose(A.weak_augment(real, cfg, gen()), real)
    assert torch.allclose(A.strong_augment(real, cfg, gen()), real)


def test_noise_never_lands_on_a_peak_after_deletions_and_a_gap(real):
    """Strong noise comes after delete and gap, whose peak lists have holes and moved peaks."""
    g, every = gen(3), torch.ones(len(real), 1, dtype=torch.bool)
    p = A.gap(A.delete_peaks(A.to_peaks(real), every, 0.5, g), every, 550, g)
    q = A.add_noise(p, every, 0.2, 1.0, g)  # ~900 candidates a row: many would hit a peak
    K = p.pos.shape[1]
    for i in range(len(real)):
        peaks = set(p.pos[i][p.ok[i]].tolist())
        noise = q.pos[i, K:][q.ok[i, K:]].tolist()
        assert noise and not peaks & set(noise)
    assert torch.equal(q.pos[:, :K], p.pos) and torch.equal(q.ok[:, :K], p.ok)  # peaks untouched
