"""Why do vgg16_paper's FlexMatch members call nearly everything superionic? One member per network, watched.

Under FlexMatch's warm-up the superionic threshold stays near zero, so early on nearly every
unlabelled pattern the model leans superionic on becomes a superionic pseudo-label
(benchmarks/flexmatch_warmup.py). In the grouped CV (benchmarks/network_accuracy.py --calls)
`fast` survives that and `vgg16_paper` does not. The README guessed why: the bigger network fits
those pseudo-labels faster. This measures it: one member per network and method, trained on all
112 labels with the same seed, labels, unlabelled sample and iterations; every `--every` steps it
prints the class thresholds, the superionic share of the pseudo-labels, the unlabelled loss (mean
over the window: how well the strong views fit the pseudo-labels), and what the member's EMA
weights (the weights it ships) call superionic on a fixed sample of unlabelled patterns and on
the labelled set. Nothing is chosen from it.

    python benchmarks/flexmatch_lean.py [--networks fast,vgg16_paper] [--methods flexmatch,supervised] [--iterations 200]

A machine without Ray or pymatgen (a lent GPU) trains from a file: ``--export-data FILE.npz``
here writes the labelled and unlabelled patterns, ``--data FILE.npz --device cuda`` there trains
from them into its own --dir (scripts/gpu_check.sh does both), and its JSON files copied into
this --dir are read as the cache (the device is printed with each block).

Each finished (network, method) is cached as JSON in --dir: a killed run resumes. The cache is
keyed by the training settings, the data and the trainer's code (as the evaluation's member
cache), so a changed config or trainer trains again instead of printing an old run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from xrdmatch.config import load_config
from xrdmatch.training.evaluation import load_eval_data, training_config
from xrdmatch.training.fingerprint import code_fingerprint
from xrdmatch.training.networks import build_network
from xrdmatch.training.preprocess import preprocess
from xrdmatch.training.trainer import predict_logits, train_member


def superionic_share(net: torch.nn.Module, x: torch.Tensor) -> float:
    """Share of patterns whose P(superionic) > 0.5 (the evaluation's threshold)."""
    with torch.no_grad():
        return float((predict_logits(net.eval(), x, batch_size=256).softmax(-1)[:, 1] > 0.5).float().mean())


def member_config(cfg, network: str, method: str):
    return training_config(cfg).model_copy(update={"network": network, "algorithm": method})


def cache_key(cfg, data, network: str, method: str, every: int, n_probe: int) -> str:
    """What decides a cached result: settings, seed, data, probe, window and the trainer's code."""
    key = {"settings": member_config(cfg, network, method).result_settings(), "seed": cfg.seed,
           "data": data.data_hash, "unlabelled": data.unlab_hash, "every": every, "probe": n_probe,
           "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def watch(cfg, data, network: str, method: str, every: int, n_probe: int, device: str) -> dict:
    """Train one member; at every checkpoint score its EMA weights on the probe sets."""
    tcfg = member_config(cfg, network, method)
    rng = np.random.default_rng(cfg.seed)
    probe_u = torch.as_tensor(preprocess(data.X_unlab[rng.choice(len(data.X_unlab), n_probe, replace=False)],
                                         tcfg.augment.threshold), device=device)
    probe_l = torch.as_tensor(preprocess(data.X, tcfg.augment.threshold), device=device)
    ema = build_network(network).to(device)
    shares: dict[int, tuple[float, float]] = {}

    def at_checkpoint(step: int, state: dict) -> None:
        ema.load_state_dict(state["ema"])
        shares[step] = (superionic_share(ema, probe_u), superionic_share(ema, probe_l))

    t0 = time.time()
    m = train_member(data.X, data.y, data.X_unlab, tcfg, seed=cfg.seed, device=device,
                     checkpoint_fn=at_checkpoint, checkpoint_every=every)
    rows = []
    for step in sorted(shares):
        window = m.history[max(0, step - every):step]
        rows.append({
            "step": step,
            "thr_0": window[-1].get("threshold_0"), "thr_1": window[-1].get("threshold_1"),
            "pseudo_si": sum(h["pseudo_1"] for h in window), "pseudo": sum(h["pseudo_0"] + h["pseudo_1"] for h in window),
            "loss_u": float(np.mean([h["loss_u"] for h in window])),
            "loss_s": float(np.mean([h["loss_s"] for h in window])),
            "called_unlab": shares[step][0], "called_lab": shares[step][1],
        })
    return {"network": network, "method": method, "iterations": tcfg.iterations, "seed": cfg.seed,
            "n_probe": n_probe, "wall_s": time.time() - t0, "rows": rows, "device": describe(device)}


def describe(device: str) -> str:
    return f"cuda ({torch.cuda.get_device_name(torch.device(device))})" if device.startswith("cuda") else "cpu"


def load_data(path: str) -> SimpleNamespace:
    """The patterns --export-data wrote, with the hashes the cache key uses."""
    with np.load(path) as z:
        d = SimpleNamespace(**{k: z[k] for k in ("X", "y", "X_unlab")},
                            data_hash=str(z["data_hash"]), unlab_hash=str(z["unlab_hash"]))
    print(f"labelled: {len(d.y)} ({int(d.y.sum())} superionic); unlabelled: {len(d.X_unlab)} patterns (from {path})")
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--networks", default="fast,vgg16_paper")
    ap.add_argument("--methods", default="flexmatch,supervised")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--every", type=int, default=25, help="steps per printed row")
    ap.add_argument("--probe", type=int, default=1000, help="unlabelled patterns the EMA weights are scored on")
    ap.add_argument("--dir", default="runs/bench/flexmatch-lean")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--export-data", metavar="FILE.npz", help="write the patterns for --data elsewhere; train nothing")
    ap.add_argument("--data", metavar="FILE.npz", help="train from --export-data's file (no Ray, no pymatgen)")
    args = ap.parse_args()

    cfg = load_config(args.config, {"run_dir": args.dir, "evaluation": {"iterations": args.iterations}})
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.data) if args.data else load_eval_data(cfg, training_config(cfg), print)
    if args.export_data:
        np.savez_compressed(args.export_data, X=data.X, y=data.y, X_unlab=data.X_unlab,
                            data_hash=data.data_hash, unlab_hash=data.unlab_hash)
        print(f"wrote {args.export_data}: train there with --data {args.export_data}")
        return
    print(f"one member per row block: all {len(data.y)} labels ({int(data.y.sum())} superionic, "
          f"{data.y.mean():.0%}), seed {cfg.seed}, {args.iterations} iterations; 'called' = EMA weights' "
          f"P(superionic) > 0.5 on {args.probe} unlabelled patterns / on the {len(data.y)} labelled")
    t0, trained = time.time(), 0
    for net in args.networks.split(","):
        for method in args.methods.split(","):
            path = out / f"{net}-{method}-{args.iterations}-s{cfg.seed}-p{args.probe}-e{args.every}.json"
            key = cache_key(cfg, data, net, method, args.every, args.probe)
            res = json.loads(path.read_text()) if path.exists() else None
            cached = res is not None and res.get("key") == key
            if not cached:
                print(f"training {net} {method} ...", file=sys.stderr, flush=True)
                res = watch(cfg, data, net, method, args.every, args.probe, args.device) | {"key": key}
                path.with_suffix(".tmp").write_text(json.dumps(res))
                path.with_suffix(".tmp").replace(path)  # atomic: a killed run leaves no half file
                trained += 1
            print(f"\n{net}, {method} ({res['wall_s']:.0f} s to train and score on {res.get('device', 'cpu')}"
                  f"{', read from the cache' if cached else ''})")
            print(f"{'step':>5s} {'thr not-SI':>10s} {'thr SI':>7s} {'pseudo SI/all':>14s} {'loss_u':>7s} "
                  f"{'loss_s':>7s} {'called unlab':>12s} {'called lab':>10s}")
            for r in res["rows"]:
                thr = (f"{r['thr_0']:10.3f} {r['thr_1']:7.3f}" if r["thr_0"] is not None else f"{'-':>10s} {'-':>7s}")
                pl = (f"{r['pseudo_si']:>6d}/{r['pseudo']:<7d} {r['loss_u']:7.3f}" if r["thr_0"] is not None
                      else f"{'-':>6s} {'':7s} {'-':>7s}")  # supervised: no pseudo-labels
                print(f"{r['step']:5d} {thr} {pl} {r['loss_s']:7.3f} {r['called_unlab']:12.1%} {r['called_lab']:10.1%}")
    print(f"\nwall: {time.time() - t0:.0f} s, {trained} member(s) trained in this run (cached JSON in {out})")


if __name__ == "__main__":
    main()
