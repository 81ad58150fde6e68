"""What one database entry that kills its XRD worker costs the XRD stage, on a whole database.

    python benchmarks/xrd_killer_entry.py [--database PATH] [--at INDEX] [--workers N] [--batch-size B]

Writes the database twice as plain JSONL (same size): as it is (the reference), and with entry
``--at``'s id replaced by a marked id. A Ray worker setup hook (``xrdmatch.actors.xrd_faults``)
makes the XRD actors SIGKILL their own process when they read that id, as a crash or an OOM
kill in the engine would (no input does so on demand). Both run through the stage in one Ray
session, into fresh folders, with the default config's batch size and retries. Prints both summaries, the killer's error row, whether
every other entry got the same pattern as in the reference run, and the wall-time ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KILLER_ID = "benchmark-entry-that-kills-its-worker"


def _run_both(dbs: dict[str, Path], tmp: Path, workers: int | None, batch_size: int, max_retries: int, out) -> dict:
    """The stage over each database in one Ray session: {name: (StageSummary, wall s)}."""
    import ray

    from xrdmatch.actors.xrd_faults import kill_on_id
    from xrdmatch.platform.ray_utils import WORKER_ENV
    from xrdmatch.platform.xrd_stage import run_xrd_stage

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": dict(WORKER_ENV), "worker_process_setup_hook": kill_on_id(KILLER_ID)})
    runs = {}
    for name, db in dbs.items():
        t0 = time.perf_counter()
        s = run_xrd_stage(db, tmp / f"out-{name}", workers=workers, batch_size=batch_size, max_retries=max_retries,
                          progress=False)
        runs[name] = (s, time.perf_counter() - t0)
        print(f"{name:9s} {s.line().replace(str(tmp), '<tmp>')}", file=out, flush=True)
    ray.shutdown()
    return runs


def main(argv: list[str] | None = None) -> int:
    from xrdmatch.config import load_config

    cfg = load_config("configs/default.yaml")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database", default="data/mp_li_structures.jsonl.xz")
    ap.add_argument("--at", type=int, default=10_000, help="index of the entry that kills its worker")
    ap.add_argument("--workers", type=int, default=None, help="XRD actors (default: the machine's CPUs)")
    ap.add_argument("--batch-size", type=int, default=cfg.xrd.batch_size)
    args = ap.parse_args(argv)

    from xrdmatch.platform.data import iter_jsonl_lines
    from xrdmatch.platform.patterns import load_errors, load_patterns

    lines = [line if isinstance(line, str) else line.decode() for _, line in iter_jsonl_lines(args.database)]
    if not 0 <= args.at < len(lines):
        sys.exit(f"--at {args.at}: the database has {len(lines)} entries")
    rec = json.loads(lines[args.at])
    victim = rec["id"]
    rec["id"] = KILLER_ID
    with tempfile.TemporaryDirectory(prefix="xrdmatch-killer-") as tmp:
        tmp = Path(tmp)
        clean, killer = tmp / "clean.jsonl", tmp / "killer.jsonl"
        clean.write_text("".join(ln.rstrip("\n") + "\n" for ln in lines))
        lines[args.at] = json.dumps(rec)
        killer.write_text("".join(ln.rstrip("\n") + "\n" for ln in lines))

        print(f"database: {len(lines)} entries ({args.database}); entry {args.at} ({victim}) kills its worker: "
              f"batch {args.at // args.batch_size} of {-(-len(lines) // args.batch_size)} ({args.batch_size} "
              f"per batch), xrd.max_retries {cfg.xrd.max_retries}, {args.workers or 'all'} workers", flush=True)
        out = sys.stdout  # Ray prints its own notes of the deaths to sys.stdout: those go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            runs = _run_both({"reference": clean, "killer": killer}, tmp, args.workers, args.batch_size,
                             cfg.xrd.max_retries, out)

        ref, kil = (load_patterns(tmp / f"out-{n}") for n in ("reference", "killer"))
        keep = [i for i, sid in enumerate(ref.ids) if sid != victim]
        same = kil.ids == [ref.ids[i] for i in keep] and np.array_equal(kil.X, ref.X[keep])
        err = load_errors(tmp / "out-killer")
    print(f"killer's error row: {err['id'].tolist()} {err['reason'].tolist()}")
    print(f"every other entry: same id order and bit-identical pattern as the reference run: {same}")
    (s_ref, w_ref), (s_kil, w_kil) = runs["reference"], runs["killer"]
    print(f"wall time killer / reference: {w_kil / w_ref:.2f}x ({w_kil - w_ref:+.1f} s, "
          f"{s_kil.replaced_actors - s_ref.replaced_actors} actors replaced)")
    return 0 if s_kil.done and same and len(err) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
