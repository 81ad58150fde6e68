"""Fault injection for tests and benchmarks only: XRD entries that kill their worker or fail their batch.

A crash or an OOM kill in the engine ends the worker process, beyond any ``try``, and no input
does so on demand; nor does any input make a whole batch raise (the shard writer failing, a bug
outside the per-entry ``try``). ``runtime_env={"worker_process_setup_hook": faults(...)}``: in
every worker Ray starts, the XRD actors' parser SIGKILLs its own process when it reads
``kill_id``, and a batch holding ``raise_id`` raises while writing its shard, the first
``raise_times`` times over all workers (counted in the file ``raise_count``). ``fail_start``: no
worker can start at all (the hook raises, as a node with a broken image would).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

#: What the injected batch failure says: tests look for it in the stage's failed batches.
RAISED = "injected failure of the batch holding the marked entry"
FAILED_START = "injected failure of every worker's start"


def faults(kill_id: str | None = None, raise_id: str | None = None, raise_times: int = 0,
           raise_count: str | Path | None = None, fail_start: bool = False) -> Callable[[], None]:
    """A Ray worker setup hook (sent by value: it is a closure) that arms the marked ids."""
    count_path = None if raise_count is None else str(raise_count)

    def arm_marked_ids() -> None:
        if fail_start:
            raise RuntimeError(FAILED_START)
        import os
        import signal

        from xrdmatch.actors import xrd_actors

        parse, encode = xrd_actors.parse_raw, xrd_actors.encode_shard

        def parse_or_die(item):
            entry = parse(item)
            if kill_id is not None and entry.id == kill_id:
                os.kill(os.getpid(), signal.SIGKILL)
            return entry

        def encode_or_raise(ids, *args, **kwargs):
            if raise_id is not None and raise_id in ids and count_path is not None:
                with open(count_path, "a+b") as f:  # one byte per failure, across worker processes
                    f.seek(0, os.SEEK_END)
                    if f.tell() < raise_times:
                        f.write(b"x")
                        f.flush()
                        raise OSError(RAISED)
            return encode(ids, *args, **kwargs)

        xrd_actors.parse_raw = parse_or_die
        xrd_actors.encode_shard = encode_or_raise

    return arm_marked_ids


def kill_on_id(marked_id: str) -> Callable[[], None]:
    """The hook that only kills: the worker reading ``marked_id`` SIGKILLs itself."""
    return faults(kill_id=marked_id)
