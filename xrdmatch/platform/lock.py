"""One campaign process per run directory: an advisory ``flock`` on RUN_DIR/campaign.lock.

The kernel drops the lock when the holder dies (even on kill -9), so a crashed campaign
never leaves a stale lock behind; the pid/host written into the file only serve the
error message. Validation workers (``xrdmatch validate work --dir``) do not take it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RunDirLocked(RuntimeError):
    """Another process holds the run directory; the message says which one."""


class RunDirLock:
    """Context manager holding an exclusive, non-blocking flock for the process lifetime."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
            since = f" since {holder['started']}" if holder.get("started") else ""
            raise RunDirLocked(
                f"run directory {self.path.parent} is in use by {who}{since} ({self.path}); "
                "wait for it to finish or stop it. Extra validation workers may join with "
                f"`xrdmatch validate work --dir {self.path.parent}`."
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw.decode() or "{}")
    except (OSError, ValueError):
        return {}


def lock_holder(path: str | os.PathLike[str]) -> dict | None:
    """Who holds the lock ({pid, host, started}) or None if nobody does (e.g. a crashed run).

    Probes with a shared non-blocking flock released at once, so it never blocks a holder.
    """
    p = Path(path)
    if not p.exists():
        return None
    fd = os.open(p, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {"pid": "?", "host": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class DirectoryBusy(RuntimeError):
    """Another process kept a working directory for longer than we could wait."""


@contextmanager
def exclusive_file(lock_path: str | os.PathLike[str], timeout_s: float, poll_s: float = 0.5,
                   while_waiting=None) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` while the block runs: wait up to ``timeout_s``
    for another holder, calling ``while_waiting()`` between tries; the kernel drops the lock
    when its holder dies, so kill -9 leaves nothing to clean."""
    lp = Path(lock_path)
    lp.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > timeout_s:
                    raise DirectoryBusy(f"{lp.parent} is still in use by another process after {timeout_s:.0f} s "
                                        f"({lp})") from None
                if while_waiting is not None:
                    while_waiting()
                time.sleep(poll_s)
        yield
    finally:
        os.close(fd)  # releases the lock


def exclusive_dir(path: str | os.PathLike[str], timeout_s: float, poll_s: float = 0.5, while_waiting=None):
    """``exclusive_file`` on ``path/.lock`` (one MD job's folder, one writer): a worker that lost
    its lease stops at its next heartbeat, so the next one waits for it."""
    return exclusive_file(Path(path) / ".lock", timeout_s, poll_s, while_waiting)
