"""Train member jobs exported by ``benchmarks/network_accuracy.py --export-jobs`` in-process.

For a machine with torch but without Ray or pymatgen (the device tool's GPU machine): each job
is one ``train_member`` + prediction, exactly as an evaluation's Ray task runs it
(``xrdmatch.training.evaluation.train_predict``), written under OUT in the cache layout of the
evaluation's --dir, so copying OUT into it makes the evaluation read these members.

    python scripts/train_member_jobs.py DIR --out OUT [--device cuda] [--workers 4]

Jobs already in OUT are skipped: a killed run resumes. ``--workers N`` runs N processes, each
taking every N-th job (several small trainings share one GPU better than one at a time).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from xrdmatch.training.evaluation import save_member_prediction, train_predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", type=Path, help="folder written by network_accuracy.py --export-jobs")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)  # k/n: this process's share
    args = ap.parse_args()
    if args.workers > 1:
        argv = [sys.executable, __file__, str(args.jobs), "--out", str(args.out), "--device", args.device]
        procs = [subprocess.Popen([*argv, "--shard", f"{k}/{args.workers}"]) for k in range(args.workers)]

        def stop(signum, _frame):  # e.g. `timeout`: the workers stop too (finished members are on disk)
            for p in procs:
                p.terminate()
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        sys.exit(max(p.wait() for p in procs))

    if args.device == "cpu":
        torch.set_num_threads(1)  # one thread per process, as in the evaluation's Ray workers
    k, n = (int(v) for v in args.shard.split("/"))
    # sorted by algorithm before dealing out: each process gets its share of the costly kind
    jobs = sorted(json.loads((args.jobs / "jobs.json").read_text()), key=lambda j: (j["algorithm"], j["key"]))[k::n]
    with np.load(args.jobs / "data.npz", allow_pickle=False) as z:
        X, y, U = z["X"], z["y"], z["X_unlab"]
    t_all = time.time()
    for i, j in enumerate(jobs, 1):
        dest = args.out / j["cache_dir"] / j["cache_name"]
        if dest.is_file():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        train, predict = np.asarray(j["train"], np.int64), np.asarray(j["predict"], np.int64)
        sw = None if j["sample_weight"] is None else np.asarray(j["sample_weight"])
        p, dt = train_predict(X, y, U, j["training"], j["algorithm"], j["seed"], train, predict, sw, args.device)
        save_member_prediction(dest, p, predict, j["seed"])
        print(f"[{k}/{n}] {i}/{len(jobs)} {j['network']} {j['key']}: {dt:.1f} s on {args.device}", flush=True)
    print(f"[{k}/{n}] {len(jobs)} jobs in {time.time() - t_all:.0f} s", flush=True)


if __name__ == "__main__":
    main()
