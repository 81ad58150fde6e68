"""The trainer's augmentation step: right rows into the right slices of its buffer; on a GPU, the
CUDA-graph replay is the same step (the GPU tests run only where CUDA is, e.g. the device tool)."""

from __future__ import annotations

import warnings

import pytest
import torch

from xrdmatch.config import AugmentConfig, TrainingConfig
from xrdmatch.training.augment import cat_peaks, strong_augment, to_peaks, weak_augment
from xrdmatch.training.augment_step import AugmentStep
from xrdmatch.training.preprocess import preprocess

IDENTITY = AugmentConfig(w_noise_prob=0, w_move_prob=0, s_scale_prob=0, s_delete_prob=0, s_gap_prob=0,
                         s_noise_prob=0)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def labelled():
    """The shipped labelled set, loaded here (not by conftest.py), so that the CUDA tests run with
    ``--noconftest`` on a GPU machine that has torch but not the whole platform."""
    from pathlib import Path

    from xrdmatch.platform.data import load_labelled

    return load_labelled(Path(__file__).resolve().parent.parent / "data" / "xrdmatch_lbs.csv")


def pools(labelled, device="cpu"):
    x = torch.as_tensor(preprocess(labelled.X), device=device)
    return x[:70], x[70:], to_peaks(x[:70]), to_peaks(x[70:])  # unlabelled: other patterns, other K


def draw(n_l, n_u, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(70, (n_l,), generator=g).to(device), torch.randint(42, (n_u,), generator=g).to(device)


def test_step_puts_each_drawn_row_in_its_slice_on_every_call(labelled):
    xl, xu, pl, pu = pools(labelled)
    buf = torch.full((8 + 2 * 12, xl.shape[1]), -1.0)
    step = AugmentStep(pl, pu, 8, 12, IDENTITY, torch.Generator().manual_seed(0), buf)
    for seed in (1, 2):  # the second call must read the new indices, not the first call's
        il, iu = draw(8, 12, seed)
        out = step(il, iu)
        assert out is buf
        assert torch.equal(out[:8], xl[il]) and torch.equal(out[8:20], xu[iu]) and torch.equal(out[20:], xu[iu])
    sup = AugmentStep(pl, None, 8, 0, IDENTITY, torch.Generator(), torch.zeros(8, xl.shape[1]))
    assert torch.equal(sup(il), xl[il])
    with pytest.raises(ValueError, match="out has 9 rows, the step writes 32"):
        AugmentStep(pl, pu, 8, 12, IDENTITY, torch.Generator(), torch.zeros(9, xl.shape[1]))


def test_step_draws_what_the_augmentations_draw_in_the_same_order(labelled):
    _, _, pl, pu = pools(labelled)
    il, iu = draw(8, 12, 3)
    step = AugmentStep(pl, pu, 8, 12, AugmentConfig(), torch.Generator().manual_seed(4), torch.zeros(32, 4501))
    g = torch.Generator().manual_seed(4)
    weak = weak_augment(cat_peaks(pl.take(il), pu.take(iu)), AugmentConfig(), g)
    strong = strong_augment(pu.take(iu), AugmentConfig(), g)
    assert torch.equal(step(il, iu), torch.cat([weak, strong]))


def test_the_graph_setting_is_not_part_of_the_result_key():
    assert TrainingConfig(cuda_graph_augment=False).result_settings() == TrainingConfig().result_settings()


@cuda
def test_graph_replay_is_the_same_step_with_fresh_draws(labelled):
    xl, xu, pl, pu = pools(labelled, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.zeros(8 + 2 * 12, xl.shape[1], device="cuda")
    with warnings.catch_warnings(record=True) as caught:  # a failed capture warns and falls back
        warnings.simplefilter("always")
        step = AugmentStep(pl, pu, 8, 12, AugmentConfig(), g, buf, cuda_graph=True)
    assert step.graph is not None, [str(w.message) for w in caught]
    eager = AugmentStep(pl, pu, 8, 12, AugmentConfig(), g, torch.zeros_like(buf))
    for seed in (1, 2):  # new indices reach the graph through its static index buffers
        il, iu = draw(8, 12, seed, "cuda")
        state = g.get_state()
        expected = eager(il, iu).clone()
        g.set_state(state)
        assert torch.equal(step(il, iu), expected)
    first = step(il, iu).clone()
    assert not torch.equal(step(il, iu), first)  # replays draw fresh numbers
    ident = AugmentStep(pl, pu, 8, 12, IDENTITY, g, buf, cuda_graph=True)
    assert torch.equal(ident(il, iu)[:8], xl[il]) and torch.equal(ident(il, iu)[20:], xu[iu])


@cuda
def test_a_member_trains_on_the_gpu_with_the_graph_and_across_a_pseudo_label_round(labelled):
    from xrdmatch.training.trainer import train_member

    cfg = TrainingConfig(iterations=4, pseudo_label_rounds=2, threshold=0.5, batch_unlabelled=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = train_member(labelled.X, labelled.y, labelled.X, cfg, seed=0, device="cuda")
    assert not [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    assert len(m.history) == 8 and all(torch.isfinite(torch.tensor(h["loss"])) for h in m.history)
    assert m.history[-1]["pool_pseudo"] > 0  # the second round's pool: a new step, captured again
