"""One XRDMatch member: supervised / FixMatch / FlexMatch training loop with an EMA model.

Read it top to bottom like nanoGPT: set-up, then one loop whose every step is
  sample a class-balanced labelled batch + an unlabelled batch -> weak / strong views ->
  one forward pass -> L = L_s + alpha * L_u -> AdamW step -> EMA update -> log.
The EMA weights are what a Member keeps (and what is saved and predicts).

Class imbalance (23 superionic vs 89): labelled indices are drawn with probability
proportional to sample_weight / count(class), so each class fills half of the labelled batch
in expectation (``balance_classes``; the source weights of the label store still scale how
often a pattern is drawn). The loss itself is then plain cross-entropy.

Distribution alignment (``distribution_alignment``, off by default: not in the paper): that
balanced draw teaches the model a class prior of 1/2, which its unlabelled predictions inherit;
aligning scales them by (labelled class frequencies / the model's running class frequencies on
unlabelled batches) so that pseudo-labels follow the labelled ratio instead.

Pseudo-label rounds: with ``pseudo_label_rounds = R`` the loop runs R * iterations steps; at the
start of every round after the first, the EMA model labels the whole unlabelled set and the
confident ones (>= threshold) join the labelled pool with weight ``pseudo_label_weight``,
replacing the previous round's pseudo-labels (refinement).

Resumable: :func:`train_member` takes ``resume`` (a state from :func:`state_to_tensors` /
:func:`tensors_to_state`) and calls ``checkpoint_fn(step, state)`` every ``checkpoint_every``
steps and at the end; Ray Train (ray_train.py) stores those states as checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from xrdmatch.config import TrainingConfig
from xrdmatch.training.augment import to_peaks
from xrdmatch.training.augment_step import AugmentStep
from xrdmatch.training.networks import build_network
from xrdmatch.training.preprocess import preprocess

NUM_CLASSES = 2


@dataclass
class Member:
    """One trained ensemble member: the EMA weights plus its per-step training log."""

    network: str
    state_dict: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    seed: int = 0


# ---------------------------------------------------------------- pieces of the algorithm


def flexmatch_thresholds(selected: torch.Tensor, base: float, warmup: bool) -> torch.Tensor:
    """FlexMatch class-wise thresholds from the counts of confident predictions per class.

    ``selected[i]`` is the class that unlabelled sample i was last predicted with confidence
    >= base, or -1. sigma_c = count_c / max(counts) (the max includes the unused -1 count when
    warming up), beta_c = sigma_c / (2 - sigma_c) (the convex mapping), threshold = base * beta_c.
    While every sample is still unused the learning effects are 0 (FlexMatch's start). Stateless:
    where the reference code freezes the effects (every sample in one class) we apply the formula.
    """
    counts = torch.bincount(selected + 1, minlength=NUM_CLASSES + 1).float()  # [-1, 0, 1]
    denom = counts.max() if warmup else counts[1:].max()
    acc = counts[1:] / denom.clamp_min(1.0)
    return base * acc / (2.0 - acc)


def align_distribution(probs: torch.Tensor, p_model: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """ReMixMatch's distribution alignment: probs * p_target / p_model, renormalised per row."""
    p = probs * (p_target / p_model.clamp_min(1e-6))
    return p / p.sum(-1, keepdim=True)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """EMA of every float parameter/buffer; integer buffers (BN counters) are copied."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1.0 - decay)
        else:
            e.copy_(m)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    out = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, NUM_CLASSES, device=x.device)


def sampling_probs(y: torch.Tensor, w: torch.Tensor, balance: bool) -> torch.Tensor:
    """Labelled draw probabilities: weight / class count (balanced) or weight alone."""
    p = w.clone()
    if balance:
        counts = torch.bincount(y, weights=w, minlength=NUM_CLASSES)
        p = p / counts[y].clamp_min(1e-12)
    return p / p.sum()


# ---------------------------------------------------------------- checkpoint state <-> tensors


def state_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten a training state into safetensors-ready tensors + string metadata (no pickle)."""
    t: dict[str, torch.Tensor] = {}
    for k, v in state["model"].items():
        t[f"model.{k}"] = v
    for k, v in state["ema"].items():
        t[f"ema.{k}"] = v
    opt = state["opt"]
    for pid, st in opt["state"].items():
        for k, v in st.items():
            t[f"opt.{pid}.{k}"] = torch.as_tensor(v)
    for k in ("selected", "pl_idx", "pl_y", "gen", "torch_rng", "p_model"):
        t[k] = state[k]
    meta = {
        "step": str(state["step"]),
        "param_groups": json.dumps(opt["param_groups"]),
        "history": json.dumps(state["history"]),
    }
    return {k: v.detach().cpu().clone().contiguous() for k, v in t.items()}, meta


def tensors_to_state(t: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    state: dict = {"model": {}, "ema": {}, "opt": {"state": {}, "param_groups": json.loads(meta["param_groups"])}}
    for k, v in t.items():
        head, _, rest = k.partition(".")
        if head in ("model", "ema"):
            state[head][rest] = v
        elif head == "opt":
            pid, _, name = rest.partition(".")
            state["opt"]["state"].setdefault(int(pid), {})[name] = v
        else:
            state[k] = v
    state["step"] = int(meta["step"])
    state["history"] = json.loads(meta["history"])
    return state


# ---------------------------------------------------------------- the training loop


@dataclass
class UnlabelledState:
    """What the unlabelled side carries from step to step; its fields are checkpoint keys too
    (:func:`state_to_tensors` lists them)."""

    selected: torch.Tensor  # FlexMatch's selected_label: the class last predicted >= threshold, or -1
    pl_idx: torch.Tensor  # this round's pseudo-labelled pool (pseudo_label_rounds), indices into xu
    pl_y: torch.Tensor
    p_model: torch.Tensor  # distribution alignment's running class frequencies (empty: not yet set)


def load_tensors(X_lab, y_lab, X_unlab, sample_weight, threshold: float, device: torch.device):
    """Preprocess the patterns once and keep everything on the training device."""
    xl = torch.as_tensor(preprocess(np.asarray(X_lab, dtype=np.float32), threshold), device=device)
    # copies (torch.tensor): labels and weights arrive read-only from Ray's object store
    yl = torch.tensor(np.asarray(y_lab), dtype=torch.long, device=device)
    wl = torch.ones(len(yl), device=device) if sample_weight is None else torch.tensor(
        np.asarray(sample_weight, dtype=np.float32), device=device
    )
    if len(yl) == 0 or float(wl.sum()) <= 0:
        raise ValueError("train_member: the labelled set is empty (or every sample weight is 0)")
    X_unlab = np.zeros((0, xl.shape[1]), np.float32) if X_unlab is None else np.asarray(X_unlab, np.float32)
    xu = torch.as_tensor(preprocess(X_unlab, threshold) if len(X_unlab) else X_unlab, device=device)
    return xl, yl, wl, xu


def restore(resume: dict, model, ema, opt, gen: torch.Generator, seed: int, rank: int,
            device: torch.device) -> tuple[UnlabelledState, list[dict], int]:
    """Load a checkpoint state into the model, EMA and optimiser; return the rest of the loop's state."""
    model.load_state_dict(resume["model"])
    ema.load_state_dict(resume["ema"])
    opt.load_state_dict(resume["opt"])
    u = UnlabelledState(*(resume[k].to(device) for k in ("selected", "pl_idx", "pl_y")),
                        p_model=resume.get("p_model", torch.zeros(0)).to(device))  # absent in older states
    start = int(resume["step"])
    torch.set_rng_state(resume["torch_rng"])  # dropout draws from torch's global generator
    if device.type == "cpu" and (rank == 0 or resume.get("own_rank_state", False)):
        gen.set_state(resume["gen"])
    else:  # CUDA generators (not saved), or a rank resuming from rank 0's state: a fresh stream
        gen.manual_seed(seed + 7919 * rank + 104729 * start)
    return u, list(resume["history"]), start


def labelled_pool(xl, yl, wl, xu, u: UnlabelledState, peaks_l, pseudo_label_weight: float):
    """The labels plus this round's pseudo-labels: (peak lists, labels, sample weights)."""
    if not len(u.pl_idx):
        return peaks_l, yl, wl
    pseudo_w = torch.full((len(u.pl_idx),), pseudo_label_weight, device=wl.device)
    return to_peaks(torch.cat([xl, xu[u.pl_idx]])), torch.cat([yl, u.pl_y]), torch.cat([wl, pseudo_w])


def unlabelled_loss(cfg: TrainingConfig, algorithm: str, logits_w, logits_s, uidx, u: UnlabelledState,
                    p_target: torch.Tensor, metrics: dict):
    """L_u: the weak view's confident hard predictions are the targets of the strong view.

    Updates ``u`` (FlexMatch's selected labels, the alignment's running frequencies) and logs the
    class thresholds into ``metrics``; returns (L_u, mask, pseudo-labels).
    """
    probs_w = logits_w.detach().softmax(-1)
    if cfg.distribution_alignment:
        batch_freq = probs_w.mean(0)
        u.p_model = batch_freq if len(u.p_model) == 0 else u.p_model.lerp(batch_freq, 1.0 - cfg.da_momentum)
        probs_w = align_distribution(probs_w, u.p_model, p_target)
        metrics.update({f"p_model_{c}": float(u.p_model[c]) for c in range(NUM_CLASSES)})
    conf, pseudo = probs_w.max(-1)
    if algorithm == "fixmatch":
        thr = torch.full((NUM_CLASSES,), cfg.threshold, device=conf.device)
    else:
        thr = flexmatch_thresholds(u.selected, cfg.threshold, cfg.flexmatch_warmup)
        sure = conf >= cfg.threshold
        u.selected[uidx[sure]] = pseudo[sure]
    mask = (conf >= thr[pseudo]).float()
    loss_u = (F.cross_entropy(logits_s, pseudo, reduction="none") * mask).mean()
    metrics.update({f"threshold_{c}": float(thr[c]) for c in range(NUM_CLASSES)})
    return loss_u, mask, pseudo


def train_member(
    X_lab,
    y_lab,
    X_unlab,
    cfg: TrainingConfig,
    seed: int,
    sample_weight=None,
    device: str | torch.device = "cpu",
    log_fn: Callable[[int, dict], None] | None = None,
    *,
    resume: dict | None = None,
    checkpoint_fn: Callable[[int, dict], None] | None = None,
    checkpoint_every: int | None = None,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    rank: int = 0,
) -> Member:
    """Train one member in this process and return its EMA weights and history.

    ``wrap_model`` lets Ray Train wrap the network in DDP; ``rank`` decorrelates the batches of
    data-parallel workers.
    """
    device = torch.device(device)
    aug = cfg.augment
    torch.manual_seed(seed)  # same initial weights on every rank
    gen = torch.Generator(device=device).manual_seed(seed + 7919 * rank)
    xl, yl, wl, xu = load_tensors(X_lab, y_lab, X_unlab, sample_weight, aug.threshold, device)
    n_u = len(xu)
    algorithm = cfg.algorithm
    if algorithm != "supervised" and (n_u == 0 or cfg.batch_unlabelled == 0):
        warnings.warn(f"{algorithm}: no unlabelled patterns, training supervised only", stacklevel=2)
        algorithm = "supervised"

    # model, EMA copy, optimiser; then the loop's own state, fresh or from a checkpoint
    model = build_network(cfg.network).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.iterations * cfg.pseudo_label_rounds
    empty = torch.zeros(0, dtype=torch.long, device=device)
    u = UnlabelledState(torch.full((n_u,), -1, dtype=torch.long, device=device), empty, empty,
                        torch.zeros(0, device=device))
    history: list[dict] = []
    start = 0
    if resume is not None:
        u, history, start = restore(resume, model, ema, opt, gen, seed, rank, device)
    net = wrap_model(model) if wrap_model is not None else model
    # augmentations work on peak lists: convert the pools once; one reused input buffer per step
    B_l, B_u = cfg.batch_labelled, (cfg.batch_unlabelled if algorithm != "supervised" else 0)
    peaks_l = to_peaks(xl)
    peaks_u = to_peaks(xu) if n_u else None
    buf = torch.zeros((B_l + 2 * B_u, xl.shape[1]), device=device)

    def snapshot(step: int) -> dict:
        return {
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
            **vars(u), "history": history,
            "gen": gen.get_state() if device.type == "cpu" else torch.zeros(0, dtype=torch.uint8),
            "torch_rng": torch.get_rng_state(),
        }

    for step in range(start, total):
        # a new pseudo-label round: the EMA model relabels the unlabelled set
        new_round = step > 0 and step % cfg.iterations == 0 and n_u > 0
        if new_round:
            conf, pred = predict_logits(ema, xu).softmax(-1).max(-1)
            keep = conf >= cfg.threshold
            u.pl_idx, u.pl_y = keep.nonzero().flatten(), pred[keep]
        if new_round or step == start:  # the labelled pool: labels + this round's pseudo-labels
            pool_x, pool_y, pool_w = labelled_pool(xl, yl, wl, xu, u, peaks_l, cfg.pseudo_label_weight)
            p_target = torch.bincount(pool_y, weights=pool_w, minlength=NUM_CLASSES)
            p_target = p_target / p_target.sum()  # the pool's class frequencies, not the balanced draw's
            augment = AugmentStep(pool_x, peaks_u, B_l, B_u, aug, gen, buf, cuda_graph=cfg.cuda_graph_augment)

        # labelled batch (class-balanced draw) and its weak view; unlabelled weak + strong views
        net.train()
        idx = torch.multinomial(sampling_probs(pool_y, pool_w, cfg.balance_classes), cfg.batch_labelled,
                                replacement=True, generator=gen)
        metrics: dict = {"step": step + 1, "attempt_start": start}
        if algorithm == "supervised":
            logits_l = net(augment(idx))
            loss_u, mask, pseudo = torch.zeros((), device=device), torch.zeros(0, device=device), empty
        else:
            uidx = torch.randint(n_u, (B_u,), generator=gen, device=device)
            logits = net(augment(idx, uidx))  # one pass: [labelled weak | unlabelled weak | strong]
            logits_l, logits_w, logits_s = logits.split([B_l, B_u, B_u])
            loss_u, mask, pseudo = unlabelled_loss(cfg, algorithm, logits_w, logits_s, uidx, u, p_target, metrics)
        loss_s = F.cross_entropy(logits_l, pool_y[idx])
        loss = loss_s + cfg.alpha * loss_u

        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, min(cfg.ema_decay, (1.0 + step) / (10.0 + step)))  # EMA warm-up

        metrics.update({
            "loss": loss.item(), "loss_s": loss_s.item(), "loss_u": loss_u.item(),
            "mask_rate": float(mask.mean()) if len(mask) else 0.0,
            **{f"pseudo_{c}": int(((pseudo == c).float() * mask).sum()) if len(mask) else 0
               for c in range(NUM_CLASSES)},
            "pool_pseudo": int(len(u.pl_idx)),
        })
        history.append(metrics)
        if log_fn is not None:
            log_fn(step + 1, metrics)
        if checkpoint_fn is not None and ((step + 1) % (checkpoint_every or cfg.checkpoint_every) == 0 or step + 1 == total):
            checkpoint_fn(step + 1, snapshot(step + 1))

    if history and math.isnan(history[-1]["loss"]):
        raise FloatingPointError("train_member: the loss became NaN")
    state = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
    return Member(network=cfg.network, state_dict=state, history=history, seed=seed)
