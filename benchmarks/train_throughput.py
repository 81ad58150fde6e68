"""Training throughput per network and the batched-augmentation speed-up.

One iteration = 32 labelled (weak view) + 96 unlabelled (weak + strong views), one forward /
backward pass over all 224 views, AdamW step (FlexMatch, the default algorithm). Also times the
augmentation step (weak on 32 labelled + 96 database patterns, strong on the 96) batched in torch
vs a straightforward per-sample numpy implementation of the same operations, measured in the same
run, and again at 8x the rows (how the batched cost splits into a fixed and a per-row part).

    python benchmarks/train_throughput.py [--networks fast,vgg16_paper] [--iterations 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from xrdmatch.config import AugmentConfig, TrainingConfig
from xrdmatch.platform.data import load_labelled
from xrdmatch.training.augment import to_peaks
from xrdmatch.training.augment_step import AugmentStep
from xrdmatch.training.networks import build_network, count_flops, count_params
from xrdmatch.training.preprocess import preprocess
from xrdmatch.training.trainer import train_member


# ----------------------------------------------------------------- per-sample numpy reference
def _norm(x):
    rng = x.max() - x.min()
    return (x - x.min()) / rng if rng > 0 else np.zeros_like(x)


def _noise(x, frac, peak, rng):
    empty = np.flatnonzero(x == 0)
    n = int(len(empty) * frac * rng.random())
    pick = rng.permutation(empty)[:n]
    x[pick] = rng.random(n) * peak
    return x


def _pick(x, frac, rng):
    peaks = np.flatnonzero(x > 0)
    return rng.permutation(peaks)[: int(len(peaks) * frac * rng.random())]


def weak_numpy(x, c: AugmentConfig, rng):
    x = x.copy()
    if rng.random() < c.w_noise_prob:
        x = _noise(x, c.w_noise_frac, c.w_noise_peak, rng)
    if rng.random() < c.w_move_prob:
        s = rng.integers(c.w_move_min, c.w_move_gap + 1) * (1 if rng.random() < 0.5 else -1)
        x = np.concatenate([np.zeros(s), x[:-s]]) if s > 0 else np.concatenate([x[-s:], np.zeros(-s)])
    return _norm(x)


def strong_numpy(x, c: AugmentConfig, rng):
    x = x.copy()
    if rng.random() < c.s_scale_prob:
        i = _pick(x, c.s_scale_frac, rng)
        x[i] *= 1 + (c.s_scale_max - 1) * rng.random(len(i))
    if rng.random() < c.s_delete_prob:
        x[_pick(x, c.s_delete_frac, rng)] = 0
    if rng.random() < c.s_gap_prob:
        p = np.flatnonzero(x > 0)
        gaps = [(a, b) for a, b in zip(p[:-1], p[1:]) if b - a > 1]
        if gaps:
            a, b = gaps[rng.integers(len(gaps))]
            n = int(rng.integers(1, c.s_gap_max + 1))
            if rng.random() < 0.5:
                n = min(n, len(x) - 1 - p[-1])
                x = np.concatenate([x[: a + 1], np.zeros(n), x[a + 1 : len(x) - n]])
            else:
                n = min(n, b - a - 1)
                x = np.concatenate([x[: a + 1], x[a + 1 + n :], np.zeros(n)])
    if rng.random() < c.s_noise_prob:
        x = _noise(x, c.s_noise_frac, c.s_noise_peak, rng)
    return _norm(x)


def database_patterns(n: int, database: str = "data/mp_li_structures.jsonl.xz") -> np.ndarray:
    """Patterns of the first ``n`` structures of the crystal database (the unlabelled rows a
    training step sees); structures the XRD engine refuses are skipped."""
    import json
    from itertools import islice

    from xrdmatch.platform.data import iter_jsonl_lines
    from xrdmatch.simulation.xrd import XRDError, xrd_pattern_arrays

    rows = []
    for _, line in islice(iter_jsonl_lines(database), n):
        r = json.loads(line)
        try:
            rows.append(xrd_pattern_arrays(r["lattice"], r["species"], r["frac_coords"]))
        except XRDError:
            continue
    return np.stack(rows)


def augment_step(pools: tuple, c: AugmentConfig, device: str, cuda_graph: bool = False):
    """The trainer's augmentation step (:class:`AugmentStep`) on the rows ``li`` / ``ui`` of the
    labelled / unlabelled peak-list ``pools``, gathers included. Returns (step, AugmentStep)."""
    (lab_pool, li), (unl_pool, ui) = pools
    li_t, ui_t = torch.as_tensor(li, device=device), torch.as_tensor(ui, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    buf = torch.zeros(len(li) + 2 * len(ui), lab_pool.n_bins, device=device)
    aug = AugmentStep(lab_pool.to(device), unl_pool.to(device), len(li), len(ui), c, g, buf, cuda_graph)
    return (lambda: aug(li_t, ui_t)), aug


def time_augment(lab: np.ndarray, unl: np.ndarray, pools: tuple, c: AugmentConfig,
                 repeats: int, device: str = "cpu") -> tuple[float, float]:
    """Seconds per training step's augmentations (weak on lab + unl, strong on unl): torch, numpy.

    ``lab`` / ``unl`` are rows of the labelled / unlabelled ``pools``; as in the trainer, the
    pools are converted to peak lists once and the step's rows taken from them, so the rows
    keep the pool's padded width K (its largest peak count), not their own.
    """
    step, _ = augment_step(pools, c, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rng = np.random.default_rng(0)

    def torch_step():
        step()
        sync()

    def numpy_step():
        [weak_numpy(x, c, rng) for x in lab]
        [weak_numpy(x, c, rng) for x in unl]
        [strong_numpy(x, c, rng) for x in unl]

    torch_step(), numpy_step()  # warm-up
    # alternate blocks of each and take the medians: the machine's noise drifts over seconds
    t_torch, t_numpy = [], []
    for _ in range(7):
        t_torch.append(_block(torch_step, max(1, repeats // 7)))
        t_numpy.append(_block(numpy_step, max(1, repeats // 35)))
    return float(np.median(t_torch)), float(np.median(t_numpy))


def time_augment_cuda_graph(pools: tuple, c: AugmentConfig, repeats: int, device: str) -> tuple[float, bool]:
    """Seconds per augmentation step replayed from the trainer's CUDA graph (captured once: the
    ~300 kernel launches of a step become one), and whether two replays drew different numbers."""
    step, aug = augment_step(pools, c, device, cuda_graph=True)
    if aug.graph is None:
        raise RuntimeError("the capture fell back to op by op (see the warning)")
    first = step().clone()
    fresh = not torch.equal(first, step())

    def replay():
        step()
        torch.cuda.synchronize()

    replay()
    return float(np.median([_block(replay, max(1, repeats // 7)) for _ in range(7)])), fresh


def _block(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def fast_v0(num_classes: int = 2) -> torch.nn.Module:
    """The first ``fast`` design (MaxPool1d(4) first, MaxPool1d(2) inside): the 'before' of the
    current one (PeakPool(8) first, reshape + amax pools), timed in the same run."""
    from torch import nn

    from xrdmatch.training.networks import XRDNet, _cbr

    layers: list[nn.Module] = [nn.MaxPool1d(4)]
    cin = 1
    for cout, k in ((16, 7), (32, 5), (64, 5), (64, 3)):
        layers += _cbr(cin, cout, k, padding=k // 2) + [nn.MaxPool1d(2)]
        cin = cout
    layers.append(nn.AdaptiveMaxPool1d(8))
    head = nn.Sequential(nn.Dropout(0.3), nn.Linear(64 * 8, 64), nn.ReLU(), nn.Linear(64, num_classes))
    return XRDNet(nn.Sequential(*layers), head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", default="fast_v0,fast,vgg16_paper,vgg11")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray Train worker on CPU uses 1)")
    ap.add_argument("--aug-repeats", type=int, default=200)
    ap.add_argument("--patterns", metavar="FILE.npz",
                    help="the database patterns (array X), saved beforehand by scripts/gpu_check.sh prepare, for "
                         "a machine without pymatgen; default: computed here from the database")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from xrdmatch.training import networks

    networks._BUILDERS.setdefault("fast_v0", fast_v0)  # benchmark-only reference, not a config choice

    ls = load_labelled("data/xrdmatch_lbs.csv")
    X = preprocess(ls.X)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"{'network':12s} {'params':>11s} {'MFLOP/sample':>13s} {'s/iter':>8s} {'samples/s':>10s}")
    rates = {}
    for name in args.networks.split(","):
        cfg = TrainingConfig.model_construct(**{**TrainingConfig().model_dump(), "augment": AugmentConfig(),
                                                "network": name, "algorithm": "flexmatch",
                                                "iterations": args.iterations + 1})
        # warm-up iteration included in train_member; time the rest via its own clock
        stamps: list[float] = []
        train_member(ls.X, ls.y, ls.X, cfg, seed=0, device=args.device,
                     log_fn=lambda s, m: (torch.cuda.synchronize() if args.device == "cuda" else None,
                                          stamps.append(time.perf_counter())))
        per_iter = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        print(f"{name:12s} {count_params(build_network(name)):>11,d} {count_flops(name) / 1e6:>13.1f} "
              f"{per_iter:>8.3f} {128 / per_iter:>10.1f}")
        rates[name] = per_iter
    if "fast_v0" in rates and "fast" in rates:
        print(f"fast vs fast_v0 (before this design): {rates['fast_v0'] / rates['fast']:.2f}x faster per iteration")
    if "vgg16_paper" in rates and "fast" in rates:
        print(f"fast vs vgg16_paper: {rates['vgg16_paper'] / rates['fast']:.1f}x faster per iteration")
    c = AugmentConfig()
    # pools: the 112 labelled and 768 database patterns; a step's rows: 32 + 96 drawn from them
    if args.patterns:
        with np.load(args.patterns, allow_pickle=False) as z:
            raw = z["X"]
    else:
        raw = database_patterns(8 * 96)
    unl_all = preprocess(raw)
    lab_pool, unl_pool = to_peaks(torch.as_tensor(X)), to_peaks(torch.as_tensor(unl_all))
    pick = np.random.default_rng(0)
    li, ui = pick.integers(0, len(X), 32), pick.integers(0, len(unl_all), 96)
    t_torch, t_numpy = time_augment(X[li], unl_all[ui], ((lab_pool, li), (unl_pool, ui)), c, args.aug_repeats)
    med = [int(p.count().median()) for p in (lab_pool, unl_pool)]
    print(f"augmentation step (weak 128 + strong 96 patterns, peak lists padded to K = "
          f"{lab_pool.pos.shape[1]} / {unl_pool.pos.shape[1]}, median peaks {med[0]} / {med[1]}): "
          f"torch batched {t_torch * 1e3:.2f} ms, "
          f"numpy per-sample {t_numpy * 1e3:.1f} ms, speed-up {t_numpy / t_torch:.1f}x")
    # the same rows 8 times over (same K): splits the batched cost into a fixed part (its tensor
    # calls, a few microseconds each on one thread) and a part per row
    li8, ui8 = np.tile(li, 8), np.tile(ui, 8)
    t8, n8 = time_augment(X[li8], unl_all[ui8], ((lab_pool, li8), (unl_pool, ui8)), c,
                          max(5, args.aug_repeats // 4))
    rows = len(li) + 2 * len(ui)
    per_row, n_per_row = (t8 - t_torch) / (7 * rows), n8 / (8 * rows)
    print(f"at 8x the rows (weak 1024 + strong 768): torch batched {t8 * 1e3:.2f} ms, numpy per-sample "
          f"{n8 * 1e3:.1f} ms, speed-up {n8 / t8:.1f}x; batched cost = {(t_torch - rows * per_row) * 1e3:.2f} ms "
          f"fixed + {per_row * 1e6:.1f} us per row")
    print(f"numpy per-sample: {n_per_row * 1e6:.0f} us per row, so no batch size takes this layout past "
          f"{n_per_row / per_row:.1f}x (numpy per row / batched per row)")
    if args.device.startswith("cuda"):  # the trainer augments on its training device
        g_torch, g_numpy = time_augment(X[li], unl_all[ui], ((lab_pool, li), (unl_pool, ui)), c,
                                        args.aug_repeats, device=args.device)
        print(f"augmentation step on {args.device} (same rows): torch batched {g_torch * 1e3:.2f} ms, numpy "
              f"per-sample (CPU) {g_numpy * 1e3:.1f} ms, speed-up {g_numpy / g_torch:.1f}x")
        try:
            g_graph, fresh = time_augment_cuda_graph(((lab_pool, li), (unl_pool, ui)), c, args.aug_repeats,
                                                     args.device)
            print(f"the same step replayed from a CUDA graph: {g_graph * 1e3:.3f} ms, speed-up vs numpy "
                  f"{g_numpy / g_graph:.1f}x (replays draw fresh random numbers: {fresh})")
        except Exception as err:  # noqa: BLE001 - graph capture is a beta API: report, don't abort
            print(f"CUDA graph capture of the augmentation step failed: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
