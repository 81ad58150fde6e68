"""Fault injection for tests and benchmarks only: an XRD entry that kills its worker.

A crash or an OOM kill in the engine ends the worker process, beyond any ``try``, and no input
does so on demand. ``runtime_env={"worker_process_setup_hook": kill_on_id(marked_id)}``: in
every worker Ray starts, the XRD actors' parser SIGKILLs its own process when it reads the
marked id.
"""

from __future__ import annotations

from collections.abc import Callable


def kill_on_id(marked_id: str) -> Callable[[], None]:
    """A Ray worker setup hook (sent by value: it is a closure) that arms the marked id."""

    def kill_on_marked_id() -> None:
        import os
        import signal

        from xrdmatch.actors import xrd_actors

        parse = xrd_actors.parse_raw

        def parse_or_die(item):
            entry = parse(item)
            if entry.id == marked_id:
                os.kill(os.getpid(), signal.SIGKILL)
            return entry

        xrd_actors.parse_raw = parse_or_die

    return kill_on_marked_id
