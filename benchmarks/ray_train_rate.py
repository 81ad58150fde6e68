"""Iteration rate of a config's training as the Ray Train job the platform runs.

Trains ``--members`` members of ``--config`` through :func:`xrdmatch.training.ray_train.fit_members`
(TorchTrainer, ``use_gpu`` from the config, safetensors checkpoints every
``training.checkpoint_every`` steps), then, as the reference in the same run, one member of
the same config in this process without Ray (``train_member`` on the same device, no
checkpoints) for ``--reference-iterations`` steps. Prints iterations/s of both and their ratio
(what Ray Train, its worker start-up and the checkpoints cost).

The unlabelled patterns are the first ``--unlabelled`` database structures, computed here with
the XRD engine (errors skipped). The rate does not depend on how many there are: a step draws
``batch_unlabelled`` of them.

    python benchmarks/ray_train_rate.py --config configs/paper.yaml [--members 2] [--iterations N] [--ray-poll-s 2,0.1]

``--ray-poll-s 2,0.1`` trains the same members once per controller poll interval (Ray's default,
then the platform's ``training.ray_poll_s``), after an untimed warm-up run, and prints the ratio
of their walls; give a value twice (``2,0.1,2,0.1``) to see the run-to-run spread.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from xrdmatch.config import load_config
from xrdmatch.platform.data import load_labelled
from xrdmatch.training.ensemble import member_seeds
from xrdmatch.training.trainer import train_member

from train_throughput import database_patterns  # benchmarks/ (run as `python benchmarks/ray_train_rate.py`)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/paper.yaml")
    ap.add_argument("--members", type=int, default=None, help="members to train (default: the config's ensemble_size)")
    ap.add_argument("--iterations", type=int, default=None, help="steps per member (default: the config's)")
    ap.add_argument("--gpus-per-worker", type=float, default=None, help="override training.gpus_per_worker")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="override training.checkpoint_every")
    ap.add_argument("--ray-poll-s", default=None, metavar="S[,S...]",
                    help="train the members once per value of training.ray_poll_s (Ray Train's controller "
                         "poll interval; Ray's own default is 2), e.g. 2,0.1 (default: the config's)")
    ap.add_argument("--unlabelled", type=int, default=5000)
    ap.add_argument("--reference-iterations", type=int, default=100)
    args = ap.parse_args()

    cfg = load_config(args.config)
    upd = {k: v for k, v in (("ensemble_size", args.members), ("iterations", args.iterations),
                             ("gpus_per_worker", args.gpus_per_worker), ("checkpoint_every", args.checkpoint_every))
           if v is not None}
    tcfg = cfg.training.model_copy(update=upd)
    ls = load_labelled(cfg.labels.path)
    t0 = time.perf_counter()
    X_unlab = database_patterns(args.unlabelled, cfg.database.path)
    print(f"{len(X_unlab)} unlabelled patterns computed in {time.perf_counter() - t0:.1f} s")

    import ray

    from xrdmatch.platform.ray_utils import init_ray
    from xrdmatch.training.ray_train import concurrent_members, fit_members, resolve_use_gpu

    init_ray()
    use_gpu = resolve_use_gpu(tcfg)
    device = "cuda" if use_gpu else "cpu"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    res = ray.cluster_resources()
    print(f"torch {torch.__version__}, ray {ray.__version__}, {gpu}; Ray cluster: {res.get('CPU', 0):.0f} CPUs, "
          f"{res.get('GPU', 0):.0f} GPUs; use_gpu={use_gpu}")
    print(f"config {args.config}: network {tcfg.network}, {tcfg.algorithm}, {tcfg.iterations} iterations x "
          f"{tcfg.pseudo_label_rounds} round(s), batch {tcfg.batch_labelled} + {tcfg.batch_unlabelled}, "
          f"{tcfg.ensemble_size} member(s), {tcfg.num_workers} worker(s) each"
          + (f" at {tcfg.gpus_per_worker:g} GPU" if use_gpu else "")
          + f", {concurrent_members(res, tcfg, use_gpu, tcfg.ensemble_size)} at once, checkpoint every "
          f"{tcfg.checkpoint_every} steps")

    steps = tcfg.iterations * tcfg.pseudo_label_rounds
    seeds = member_seeds(tcfg)
    draws = [np.arange(len(ls.y))] * len(seeds)
    polls = [float(v) for v in args.ray_poll_s.split(",")] if args.ray_poll_s else [tcfg.ray_poll_s]
    if len(polls) > 1:  # the first TorchTrainer run of a Ray session pays cold starts (~7 s here): not timed
        with tempfile.TemporaryDirectory(prefix="xrdmatch-rate-") as run_dir:
            warm = tcfg.model_copy(update={"iterations": 2, "pseudo_label_rounds": 1, "checkpoint_every": 2})
            fit_members(ls.X, ls.y, X_unlab, warm, seeds[:1], draws[:1], run_dir=run_dir, run_name="warm-up")
    walls = []
    for poll in polls:  # the same members each time: only the controller's pace differs
        pcfg = tcfg.model_copy(update={"ray_poll_s": poll})
        with tempfile.TemporaryDirectory(prefix="xrdmatch-rate-") as run_dir:
            t0 = time.perf_counter()
            members = fit_members(ls.X, ls.y, X_unlab, pcfg, seeds, draws, run_dir=run_dir, run_name="rate")
            wall = time.perf_counter() - t0
            walls.append(wall)
        assert all(len(m.history) == steps for m in members)
        losses = [m.history[-1]["loss"] for m in members]
        ray_rate = steps * len(members) / wall
        print(f"Ray Train (controller polls every {poll:g} s): {len(members)} member(s) x {steps} steps in "
              f"{wall:.1f} s (start-up and checkpoints included): {ray_rate:.2f} iterations/s, "
              f"{wall / len(members):.1f} s per member; final losses " + ", ".join(f"{x:.3f}" for x in losses))
    for poll, w in list(zip(polls, walls))[1:]:
        print(f"polling every {poll:g} s vs every {polls[0]:g} s: {walls[0] / w:.2f}x the speed, "
              f"{walls[0] - w:+.1f} s of wall saved")

    ref_cfg = tcfg.model_copy(update={"iterations": args.reference_iterations + 1, "pseudo_label_rounds": 1})
    stamps: list[float] = []

    def stamp(_step, _metrics):
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if device == "cpu":
        torch.set_num_threads(1)  # as a Ray Train CPU worker (OMP_NUM_THREADS=1)
    train_member(ls.X, ls.y, X_unlab, ref_cfg, seed=seeds[0], device=device, log_fn=stamp)
    ref_rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])  # the first step (warm-up) excluded
    print(f"reference, in-process train_member on {device}{' (1 thread)' if device == 'cpu' else ''} "
          f"(no Ray, no checkpoints; steady state over {len(stamps) - 1} steps): {ref_rate:.2f} iterations/s")
    print(f"Ray Train job / in-process: {ray_rate / ref_rate:.2f}x the in-process rate (one member); "
          f"{cfg.training.ensemble_size} members of {args.config} at the Ray rate: "
          f"{steps * cfg.training.ensemble_size / ray_rate / 60:.1f} min")


if __name__ == "__main__":
    main()
