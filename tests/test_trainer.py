"""Training loop, algorithms, resume, ensemble save/load, training set, Ray Train jobs."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from xrdmatch.config import TrainingConfig, load_config
from xrdmatch.training.ensemble import Ensemble, train_ensemble
from xrdmatch.training.trainer import (
    align_distribution,
    flexmatch_thresholds,
    sampling_probs,
    state_to_tensors,
    tensors_to_state,
    train_member,
)

L = 4501


def synthetic(n: int, seed: int = 0):
    """Class 1: peaks in bins 500-1500; class 0: peaks in 3000-4000 (separable under shifts)."""
    g = np.random.default_rng(seed)
    y = (np.arange(n) % 4 == 0).astype(np.int64)  # imbalanced like the paper (1 : 3)
    X = np.zeros((n, L), np.float32)
    for i in range(n):
        lo = 500 if y[i] else 3000
        X[i, g.integers(lo, lo + 1000, size=20)] = g.uniform(0.2, 1.0, size=20)
    return X, y


def tiny(**kw) -> TrainingConfig:
    base = dict(iterations=6, batch_labelled=16, batch_unlabelled=16, ensemble_size=1, checkpoint_every=2)
    return TrainingConfig(**{**base, **kw})


def test_flexmatch_thresholds_follow_the_paper():
    sel = torch.full((10,), -1)
    assert torch.equal(flexmatch_thresholds(sel, 0.95, True), torch.zeros(2))  # start: all unused
    sel[:4] = 0
    sel[4:6] = 1  # counts: -1: 4, 0: 4, 1: 2
    thr = flexmatch_thresholds(sel, 0.95, warmup=True)
    s = torch.tensor([4 / 4, 2 / 4])
    assert torch.allclose(thr, 0.95 * s / (2 - s))  # convex mapping of the learning effect
    sel[6:9] = 1
    sel[9] = -1  # counts: -1: 1, 0: 4, 1: 5 -> without warm-up the -1 count is left out
    assert torch.allclose(flexmatch_thresholds(sel, 0.95, False), 0.95 * torch.tensor([0.8 / 1.2, 1.0]))


def test_class_balanced_sampling_gives_each_class_half():
    y = torch.tensor([1] * 23 + [0] * 89)
    p = sampling_probs(y, torch.ones(112), balance=True)
    assert torch.isclose(p[y == 1].sum(), torch.tensor(0.5)) and torch.isclose(p.sum(), torch.tensor(1.0))
    w = torch.ones(112)
    w[:5] = 0  # a zero-weight source is never drawn
    assert (sampling_probs(y, w, balance=True)[:5] == 0).all()


def test_distribution_alignment_moves_predictions_to_the_labelled_ratio():
    probs = torch.tensor([[0.5, 0.5], [0.1, 0.9], [0.9, 0.1]])
    target = torch.tensor([0.8, 0.2])  # labelled class frequencies (~ the paper's 89 : 23)
    assert torch.allclose(align_distribution(probs, target, target), probs)  # already aligned: unchanged
    aligned = align_distribution(probs, torch.tensor([0.5, 0.5]), target)  # the balanced draw's prior
    assert torch.allclose(aligned.sum(-1), torch.ones(3))
    assert (aligned[:, 1] < probs[:, 1]).all()  # every superionic guess is scaled down ...
    assert torch.allclose(aligned[0], target)  # ... and an undecided row becomes the labelled ratio
    assert aligned[1].argmax() == 1  # a confident one keeps its class


def test_distribution_alignment_is_logged_and_resumes_exactly():
    """Off by default (the published FlexMatch); on, its running class frequencies are logged
    and checkpointed: 5 steps + checkpoint + 5 resumed steps == 10 straight steps."""
    X, y = synthetic(24)
    Xu, _ = synthetic(20, seed=2)
    assert "p_model_1" not in train_member(X, y, Xu, tiny(iterations=2), seed=3).history[-1]
    cfg = tiny(algorithm="fixmatch", threshold=0.5, iterations=10, checkpoint_every=5,
               distribution_alignment=True, da_momentum=0.5)
    saved = {}

    def keep(step, state):
        if step == 5:
            saved.update(zip(("t", "meta"), state_to_tensors(state)))

    straight = train_member(X, y, Xu, cfg, seed=3, checkpoint_fn=keep)
    assert all(0 < h["p_model_1"] < 1 for h in straight.history)
    assert sum(h["mask_rate"] for h in straight.history) > 0  # pseudo-labels were used
    resumed = train_member(X, y, Xu, cfg, seed=3, resume=tensors_to_state(saved["t"], saved["meta"]))
    assert [h["p_model_1"] for h in resumed.history] == [h["p_model_1"] for h in straight.history]
    for k, v in straight.state_dict.items():
        assert torch.allclose(v.float(), resumed.state_dict[k].float(), atol=1e-6), k


def test_supervised_member_learns_a_separable_task():
    X, y = synthetic(48)
    m = train_member(X, y, None, tiny(algorithm="supervised", iterations=60, lr=1e-3), seed=0)
    ens = Ensemble([m], network="fast")
    Xt, yt = synthetic(40, seed=1)
    acc = ((ens.predict_proba(Xt)["p_mean"] > 0.5) == yt).mean()
    assert acc >= 0.9
    assert m.history[0]["loss_s"] > m.history[-1]["loss_s"]


@pytest.mark.parametrize("algorithm", ["fixmatch", "flexmatch"])
def test_semi_supervised_step_logs_and_is_deterministic(algorithm):
    X, y = synthetic(32)
    Xu, _ = synthetic(40, seed=3)
    logged = []
    cfg = tiny(algorithm=algorithm, threshold=0.6)
    a = train_member(X, y, Xu, cfg, seed=1, log_fn=lambda s, m: logged.append((s, m)))
    b = train_member(X, y, Xu, cfg, seed=1)
    assert [s for s, _ in logged] == list(range(1, 7))
    for _, m in logged:
        assert {"loss_s", "loss_u", "mask_rate", "pseudo_0", "pseudo_1", "threshold_0"} <= set(m)
        assert 0.0 <= m["mask_rate"] <= 1.0
        assert m["pseudo_0"] + m["pseudo_1"] == round(m["mask_rate"] * 16)
    if algorithm == "flexmatch":
        assert logged[0][1]["mask_rate"] == 1.0  # FlexMatch starts with zero class thresholds
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


class _Spy(torch.nn.Module):
    """``wrap_model`` hook: records the logits of every training forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.logits = model, []

    def forward(self, x):
        out = self.model(x)
        self.logits.append(out.detach().clone())
        return out


def test_unlabelled_loss_is_on_the_strong_view_with_weak_view_pseudo_labels():
    """L_u = CE(strong-view logits, pseudo-labels of the weak view) x mask, from the logits of
    the one forward pass [labelled weak | unlabelled weak | unlabelled strong]."""
    X, y = synthetic(24)
    Xu, _ = synthetic(30, seed=6)
    cfg = tiny(algorithm="flexmatch", iterations=3, threshold=0.6)
    spies = []
    m = train_member(X, y, Xu, cfg, seed=2, wrap_model=lambda net: spies.append(_Spy(net)) or spies[-1])
    B_l, B_u = cfg.batch_labelled, cfg.batch_unlabelled
    assert len(spies[0].logits) == 3
    for logits, h in zip(spies[0].logits, m.history):
        _, logits_w, logits_s = logits.split([B_l, B_u, B_u])
        conf, pseudo = logits_w.softmax(-1).max(-1)
        mask = (conf >= torch.tensor([h["threshold_0"], h["threshold_1"]])[pseudo]).float()
        on_strong = float((torch.nn.functional.cross_entropy(logits_s, pseudo, reduction="none") * mask).mean())
        on_weak = float((torch.nn.functional.cross_entropy(logits_w, pseudo, reduction="none") * mask).mean())
        assert abs(on_strong - on_weak) > 1e-3  # the views differ, so the test can tell them apart
        assert h["loss_u"] == pytest.approx(on_strong, rel=1e-5, abs=1e-6)


def test_flexmatch_thresholds_rise_from_the_confident_predictions_of_each_step():
    """FlexMatch records each confident unlabelled prediction (selected_label): starting from
    zero thresholds, they rise once predictions are recorded. At threshold 0.5 every 2-class
    prediction is confident, so after step 1 some class has a count and a threshold > 0."""
    X, y = synthetic(24)
    Xu, _ = synthetic(30, seed=6)
    m = train_member(X, y, Xu, tiny(algorithm="flexmatch", iterations=4, threshold=0.5), seed=2)
    thr = [(h["threshold_0"], h["threshold_1"]) for h in m.history]
    assert thr[0] == (0.0, 0.0)  # nothing recorded yet
    assert all(max(t) > 0 for t in thr[1:])


def test_empty_unlabelled_falls_back_to_supervised():
    X, y = synthetic(16)
    with pytest.warns(UserWarning, match="supervised"):
        m = train_member(X, y, np.zeros((0, L), np.float32), tiny(iterations=2), seed=0)
    assert all(h["loss_u"] == 0 for h in m.history)


def test_pseudo_label_rounds_add_confident_unlabelled():
    X, y = synthetic(32)
    Xu, _ = synthetic(30, seed=4)
    m = train_member(X, y, Xu, tiny(algorithm="supervised", iterations=30, lr=1e-3, pseudo_label_rounds=2,
                                    threshold=0.6), seed=0)
    assert len(m.history) == 60
    assert m.history[29]["pool_pseudo"] == 0 and m.history[30]["pool_pseudo"] > 0


def test_resume_from_a_state_continues_exactly():
    """5 steps + checkpoint + 5 resumed steps == 10 straight steps (CPU, seeded)."""
    X, y = synthetic(24)
    Xu, _ = synthetic(20, seed=2)
    cfg = tiny(iterations=10, checkpoint_every=5)
    saved = {}

    def keep(step, state):
        if step == 5:
            saved.update(zip(("t", "meta"), state_to_tensors(state)))

    straight = train_member(X, y, Xu, cfg, seed=3, checkpoint_fn=keep)
    resumed = train_member(X, y, Xu, cfg, seed=3, resume=tensors_to_state(saved["t"], saved["meta"]))
    assert [h["step"] for h in resumed.history] == list(range(1, 11))
    assert resumed.history[-1]["attempt_start"] == 5
    for k, v in straight.state_dict.items():
        assert torch.allclose(v.float(), resumed.state_dict[k].float(), atol=1e-6), k


def test_ensemble_save_load_roundtrip_without_pickle(tmp_path):
    X, y = synthetic(24)
    ens = train_ensemble(X, y, None, tiny(algorithm="supervised", iterations=3, ensemble_size=2), use_ray=False)
    assert ens.members[0].seed != ens.members[1].seed
    out = ens.save(tmp_path / "ens")
    assert sorted(p.suffix for p in out.iterdir()) == [".json"] * 3 + [".safetensors"] * 2
    back = Ensemble.load(out)
    a, b = ens.predict_proba(X), back.predict_proba(X)
    np.testing.assert_allclose(a["p_mean"], b["p_mean"], rtol=1e-6)
    assert set(a) >= {"p_mean", "p_std", "votes"} and a["votes"].max() <= 2
    assert (a["p_std"] > 0).any()  # members differ
    assert len(back.members[1].history) == 3
    with pytest.raises(FileNotFoundError):
        Ensemble.load(tmp_path)


def _constant_member(p_superionic_logit: float, seed: int = 0):
    """A `fast` member whose output ignores the input: logits (0, p_superionic_logit)."""
    from xrdmatch.training.networks import build_network
    from xrdmatch.training.trainer import Member

    net = build_network("fast")
    last = net.classifier[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, p_superionic_logit]))
    return Member(network="fast", state_dict={k: v.clone() for k, v in net.state_dict().items()}, seed=seed)


def test_ensemble_majority_is_the_evaluated_and_served_vote_rule():
    """"majority" = at least ceil(vote_fraction x members) votes (``pyfunc_model.decide``, as the
    evaluation scores and the registered model serves): 5 of 10, 1 of 2; not "more than half"."""
    from xrdmatch.platform.pyfunc_model import decide

    X, _ = synthetic(3)
    for yes, no in ((1, 1), (5, 5), (1, 2), (2, 2), (0, 2), (3, 1)):
        ens = Ensemble([_constant_member(4.0)] * yes + [_constant_member(-4.0)] * no, network="fast")
        pr = ens.predict_proba(X)
        assert (pr["votes"] == yes).all()
        expected = int(yes >= math.ceil(0.5 * (yes + no)) and yes > 0)
        assert (pr["majority"] == expected).all(), (yes, no)
        np.testing.assert_array_equal(pr["majority"], decide(pr, 0.5, 0.5))
    ens = Ensemble([_constant_member(4.0)] + [_constant_member(-4.0)] * 2, network="fast")
    assert (ens.predict_proba(X, vote_fraction=0.3)["majority"] == 1).all()  # ceil(0.9) = 1 of 3


def test_build_training_set_adds_validated_labels_with_source_weights(tmp_path):
    from xrdmatch.platform.labels import LabelRecord, add_label
    from xrdmatch.platform.patterns import PatternTable
    from xrdmatch.training.dataset import build_training_set

    cfg = load_config(overrides={"run_dir": str(tmp_path), "labels": {"source_weights": {
        "paper": 1.0, "aimd": 2.0, "mlip-md": 0.0}}})
    from xrdmatch.platform.db import store_url

    url = store_url(cfg)
    add_label(url, LabelRecord("mp-1", "Li2O", "aimd", 1, "h"))
    add_label(url, LabelRecord("mp-2", "LiCl", "mlip-md", 0, "h"))  # weight 0: excluded
    add_label(url, LabelRecord("mp-3", "LiF", "aimd", 0, "h"))  # no pattern: skipped
    pt = PatternTable(ids=["mp-2", "mp-1"], formulas=["LiCl", "Li2O"], X=np.eye(2, L, dtype=np.float32))
    ls, w = build_training_set(cfg, pt)
    assert len(ls) == 113 and ls.ids[-1] == "mp-1" and ls.sources[-1] == "aimd" and ls.y[-1] == 1
    assert ls.X[-1, 1] == 1.0 and w[-1] == 2.0 and (w[:-1] == 1.0).all()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_ray_train_two_workers_checkpoints_and_resumes_after_a_fault(ray_local, tmp_path):
    """TorchTrainer with 2 CPU workers (DDP); the loop raises once after the checkpoint at step 4;
    Ray restarts it and it continues from a checkpoint, not step 0, each rank from its own state:
    the result is the uninterrupted run's, bit for bit."""
    X, y = synthetic(24)
    Xu, _ = synthetic(20, seed=5)
    cfg = tiny(num_workers=2, iterations=6, checkpoint_every=2, algorithm="flexmatch")
    ens = train_ensemble(X, y, Xu, cfg, run_dir=tmp_path, run_name="t", fault_after_step=4)
    hist = ens.members[0].history
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]
    # resumed at the step-4 checkpoint, or at step 2 where Ray Train ended the attempt before it
    # had recorded step 4 (its controller takes one report per worker per poll; CI saw it)
    resumed_at = hist[-1]["attempt_start"]
    assert resumed_at in (2, 4)
    assert [h["attempt_start"] for h in hist] == [0] * resumed_at + [resumed_at] * (6 - resumed_at)
    (ckpt,) = [p for p in sorted((tmp_path / "ray_results").glob("t-member0-*/checkpoint_*")) if p.is_dir()][-1:]
    assert {p.name for p in ckpt.glob("state*.safetensors")} == {"state.safetensors", "state.rank1.safetensors"}
    assert ens.predict_proba(X[:3])["p_mean"].shape == (3,)
    whole = train_ensemble(X, y, Xu, cfg, run_dir=tmp_path, run_name="u").members[0]
    assert [h["attempt_start"] for h in whole.history] == [0] * 6
    assert all(torch.equal(whole.state_dict[k], ens.members[0].state_dict[k]) for k in whole.state_dict)
    strip = [{k: v for k, v in h.items() if k != "attempt_start"} for h in whole.history]
    assert strip == [{k: v for k, v in h.items() if k != "attempt_start"} for h in hist]


def test_ray_rerun_resumes_only_the_same_member(ray_local, tmp_path):
    """Same run dir and run name: the same member restores its finished run; a member with other
    settings (lr, seed) starts fresh instead of returning the first one's weights."""
    X, y = synthetic(24)
    a_cfg = tiny(algorithm="supervised", iterations=4, lr=3e-4)
    A = train_ensemble(X, y, None, a_cfg, run_dir=tmp_path, run_name="r").members[0]
    (run_folder,) = (tmp_path / "ray_results").glob("r-member0-*")
    files = {p: p.stat().st_mtime_ns for p in run_folder.rglob("*")}

    class NoRayTrain:  # a tripwire: the finished member must not start a Ray Train run to be read back
        def __init__(self, *args, **kwargs):
            raise AssertionError("a finished member started a Ray Train run")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ray.train.torch.TorchTrainer", NoRayTrain)
        again = train_ensemble(X, y, None, a_cfg, run_dir=tmp_path, run_name="r").members[0]
    assert all(torch.equal(A.state_dict[k], again.state_dict[k]) for k in A.state_dict)
    assert again.history == A.history  # restored from its final checkpoint, not retrained
    assert {p: p.stat().st_mtime_ns for p in run_folder.rglob("*")} == files  # nothing written
    from xrdmatch.training.ray_train import FINISHED_FILE, finished_state

    assert finished_state(run_folder, 4)["step"] == 4
    assert finished_state(run_folder, 5) is None  # not the end of a 5-step member
    record = (run_folder / FINISHED_FILE).read_text()
    (run_folder / FINISHED_FILE).write_text(record[:-3])  # a torn record is not trusted
    assert finished_state(run_folder, 4) is None
    import json
    import shutil

    shutil.copytree(run_folder / json.loads(record)["checkpoint"], tmp_path / "elsewhere")
    (run_folder / FINISHED_FILE).write_text(json.dumps({"checkpoint": "../../elsewhere", "step": 4}))
    assert finished_state(run_folder, 4) is None  # only a checkpoint folder of this run
    (run_folder / FINISHED_FILE).write_text(record)
    B = train_ensemble(X, y, None, a_cfg.model_copy(update={"lr": 3e-2, "seed": 7}),
                       run_dir=tmp_path, run_name="r").members[0]
    assert B.seed == 7000 and B.history[0]["attempt_start"] == 0
    assert not all(torch.equal(A.state_dict[k], B.state_dict[k]) for k in A.state_dict)
    assert len(list((tmp_path / "ray_results").glob("r-member0-*"))) == 2


def test_member_identity_covers_settings_seed_and_every_input():
    from xrdmatch.training.ray_train import array_digest, member_identity

    X, y = synthetic(8)
    w = np.ones(8, np.float32)
    U = array_digest(synthetic(4, seed=1)[0])
    base = member_identity(tiny(), 0, X, y, w, U)
    assert member_identity(tiny(), 0, X.copy(), y.copy(), w.copy(), U) == base  # content, not object
    X2 = X.copy()
    X2[3, 7] += 0.1
    w2 = w.copy()
    w2[0] = 2.0
    changed = [member_identity(tiny(lr=3e-2), 0, X, y, w, U), member_identity(tiny(seed=7), 0, X, y, w, U),
               member_identity(tiny(), 1, X, y, w, U), member_identity(tiny(), 0, X2, y, w, U),
               member_identity(tiny(), 0, X, 1 - y, w, U), member_identity(tiny(), 0, X, y, w2, U),
               member_identity(tiny(), 0, X, y, None, U), member_identity(tiny(), 0, X, y, w, array_digest(X))]
    assert base not in changed and len(set(changed)) == len(changed)
    # packing onto GPUs or pacing Ray Train's controller decides nothing a member learns: a resume may change them
    assert member_identity(tiny(gpus_per_worker=0.5), 0, X, y, w, U) == base
    assert member_identity(tiny(ray_poll_s=2.0), 0, X, y, w, U) == base
    # nor how often it is saved, which device string asked for it, or how many members the
    # ensemble has: a finished member is reused, not retrained from step 0
    for same in (tiny(checkpoint_every=3), tiny(use_gpu="false"), tiny(ensemble_size=9)):
        assert member_identity(same, 0, X, y, w, U) == base


def test_fit_members_uses_the_config_ray_and_shares_one_unlabelled_object(ray_local, monkeypatch, tmp_path):
    """The config's ray section reaches init_ray, training.ray_poll_s Ray Train; the unlabelled
    pool is put once for all members."""
    import ray

    import xrdmatch.platform.ray_utils as ray_utils
    import xrdmatch.training.ray_train as rt
    from xrdmatch.config import RayConfig
    from xrdmatch.training.trainer import Member

    inits, puts, seen = [], [], []
    monkeypatch.setattr(ray_utils, "init_ray", lambda address=None, num_cpus=None: inits.append((address, num_cpus)))
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda v, **kw: puts.append(v) or real_put(v, **kw))

    def fake_fit_member(data_ref, cfg, seed, storage, name, use_gpu, fault_after_step=None):
        # Ray Train reads its controller's poll interval from the driver's environment at fit()
        assert os.environ[rt.POLL_ENV] == "0.25"
        seen.append((ray.get(data_ref)["X_unlab"], name))
        return Member(network=cfg.network, state_dict={}, seed=seed)

    monkeypatch.setattr(rt, "fit_member", fake_fit_member)
    X, y = synthetic(12)
    Xu, _ = synthetic(10, seed=3)
    monkeypatch.setenv(rt.POLL_ENV, "2")  # the config decides, not a leftover of the environment
    train_ensemble(X, y, Xu, tiny(ensemble_size=3, ray_poll_s=0.25), run_dir=tmp_path, run_name="s",
                   ray_cfg=RayConfig(address="10.0.0.1:6379", num_cpus=1))
    assert inits == [("10.0.0.1:6379", 1)]
    assert sum(isinstance(v, np.ndarray) and v.shape == Xu.shape for v in puts) == 1
    assert len({ref.hex() for ref, _ in seen}) == 1  # every member reads the same object
    np.testing.assert_array_equal(ray.get(seen[0][0]), Xu)
    assert sorted(n.rsplit("-", 1)[0] for _, n in seen) == ["s-member0", "s-member1", "s-member2"]


def test_train_run_passes_the_config_ray_section(monkeypatch, tmp_path):
    """`xrdmatch train` with patterns already cached (nothing started Ray): cfg.ray decides."""
    from types import SimpleNamespace

    import xrdmatch.platform.patterns as patterns
    import xrdmatch.platform.ray_utils as ray_utils
    import xrdmatch.training.dataset as dataset
    from xrdmatch.platform.cli_train import train_run

    X, y = synthetic(8)
    Xu, _ = synthetic(4, seed=1)
    monkeypatch.setattr(patterns, "ensure_patterns", lambda cfg: SimpleNamespace(ids=[f"u{i}" for i in range(4)], X=Xu))
    monkeypatch.setattr(dataset, "build_training_set",
                        lambda cfg, pt: (SimpleNamespace(ids=[f"l{i}" for i in range(8)], X=X, y=y), np.ones(8)))

    class Called(Exception):
        pass

    def fake_init_ray(address=None, num_cpus=None):
        raise Called(address, num_cpus)

    monkeypatch.setattr(ray_utils, "init_ray", fake_init_ray)
    cfg = load_config(overrides={"run_dir": str(tmp_path), "ray": {"address": "10.0.0.1:6379", "num_cpus": 1}})
    with pytest.raises(Called) as e:
        train_run(cfg)
    assert e.value.args == ("10.0.0.1:6379", 1)


def test_members_share_a_gpu_at_gpus_per_worker_and_the_config_bounds_it():
    from xrdmatch.config import ConfigError
    from xrdmatch.training.ray_train import concurrent_members

    one_gpu, eight_cpus = {"GPU": 1.0, "CPU": 16.0}, {"CPU": 8.0}
    assert concurrent_members(one_gpu, tiny(), use_gpu=True, n_members=10) == 1
    assert concurrent_members(one_gpu, tiny(gpus_per_worker=0.25), use_gpu=True, n_members=10) == 4
    assert concurrent_members(one_gpu, tiny(gpus_per_worker=0.1), use_gpu=True, n_members=20) == 10  # not 9
    assert concurrent_members(one_gpu, tiny(gpus_per_worker=0.25, num_workers=2), use_gpu=True, n_members=10) == 2
    assert concurrent_members(one_gpu, tiny(gpus_per_worker=0.25), use_gpu=True, n_members=3) == 3
    assert concurrent_members({"GPU": 0.0}, tiny(), use_gpu=True, n_members=2) == 1  # never 0
    assert concurrent_members(eight_cpus, tiny(gpus_per_worker=0.25), use_gpu=False, n_members=10) == 8
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="gpus_per_worker"):
            load_config(overrides={"training": {"gpus_per_worker": bad}})
    assert load_config("configs/paper.yaml").training.gpus_per_worker == 0.25


def test_gpu_use_follows_what_the_ray_cluster_offers_and_cv_members_ask_for_their_share():
    from xrdmatch.training.ray_train import member_task_options, resolve_use_gpu

    gpu, cpu_only = {"CPU": 16.0, "GPU": 1.0}, {"CPU": 2.0, "memory": 1e9}
    assert resolve_use_gpu(tiny(), gpu) is True and resolve_use_gpu(tiny(), cpu_only) is False
    assert resolve_use_gpu(tiny(use_gpu="false"), gpu) is False
    with pytest.raises(RuntimeError, match="use_gpu is 'true' but the Ray cluster has no GPU.*CPU 2"):
        resolve_use_gpu(tiny(use_gpu="true"), cpu_only)
    # evaluation members are Ray tasks: they ask for their GPU share (4 per GPU here), not nothing
    assert member_task_options(tiny(gpus_per_worker=0.25), gpu) == ({"num_cpus": 1, "num_gpus": 0.25}, "cuda")
    assert member_task_options(tiny(gpus_per_worker=0.25), cpu_only) == ({"num_cpus": 1}, "cpu")
    # packing is not a training setting: cached members and campaign models stay valid across it
    assert tiny(gpus_per_worker=0.25).result_settings() == tiny().result_settings()
    assert tiny(iterations=7).result_settings() != tiny().result_settings()


def test_in_process_members_train_on_one_thread_as_ray_workers_do():
    """`--no-ray` trains with one torch thread, as a Ray Train CPU worker does: with the driver's
    thread count the sums split differently and the weights would differ from Ray's."""
    from xrdmatch.training.ensemble import train_ensemble

    X, y = synthetic(24)
    Xu = synthetic(32, seed=1)[0]
    cfg = tiny(iterations=4, algorithm="fixmatch")
    import xrdmatch.training.ensemble as ensemble

    seen = []

    def spy(*args, **kwargs):  # the real train_member, noting the thread count it trains with
        seen.append(torch.get_num_threads())
        return train_member(*args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train_member(X, y, Xu, cfg, seed=0)
        torch.set_num_threads(2)
        two = train_member(X, y, Xu, cfg, seed=0)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ensemble, "train_member", spy)
            ens = train_ensemble(X, y, Xu, cfg, use_ray=False)
        assert torch.get_num_threads() == 2  # the caller's setting is given back
    finally:
        torch.set_num_threads(before)
    assert seen == [1] * cfg.ensemble_size
    assert all(torch.equal(one.state_dict[k], ens.members[0].state_dict[k]) for k in one.state_dict)
    # whether two threads split the sums differently depends on the CPU (they did on the machines
    # this test was written on, not on an AVX2-only one): where they do, the weights show why
    if not all(torch.equal(one.state_dict[k], two.state_dict[k]) for k in one.state_dict):
        assert not all(torch.equal(two.state_dict[k], ens.members[0].state_dict[k]) for k in two.state_dict)


def test_a_controller_error_starts_the_member_run_again_and_a_training_error_does_not():
    """Ray Train's controller can fail on a loaded machine with nothing wrong in the training (its
    placement-group cleaner takes a slow state query for a dead controller): that run is started
    again, from its checkpoint. A failing training is not. (The race cannot be produced at will,
    so stand-in trainers raise the two errors.)"""
    from ray.train import ControllerError, WorkerGroupError

    from xrdmatch.training.ray_train import CONTROLLER_RETRIES, _fit

    starts = []

    def flaky(fails: int, err):
        def make():
            class T:
                def fit(self):
                    starts.append(1)
                    if len(starts) <= fails:
                        raise err
                    return "result"
            return T()
        return make

    assert _fit(flaky(CONTROLLER_RETRIES, ControllerError(RuntimeError("placement group removed"))), "m") == "result"
    assert len(starts) == CONTROLLER_RETRIES + 1
    starts.clear()
    with pytest.raises(ControllerError):
        _fit(flaky(CONTROLLER_RETRIES + 1, ControllerError(RuntimeError("x"))), "m")
    starts.clear()
    with pytest.raises(WorkerGroupError):
        _fit(flaky(1, WorkerGroupError("loss is NaN", {0: RuntimeError("NaN")})), "m")
    assert len(starts) == 1
