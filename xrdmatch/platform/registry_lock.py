"""One promotion decision at a time per model registry, across processes and hosts.

Settling a version reads the champion, decides, then moves the aliases: a handful of MLflow
calls that MLflow does not make atomic. Two registrations settling at once (a campaign round and
an ``xrdmatch train``, two campaigns on one cluster registry) both read the same old champion,
both win against it, and the last to write keeps ``champion`` even when it is the worse model.
This lock makes the read-decide-write one step. It lives where the registry lives:

- an SQLite registry (the default, in the run directory): an flock beside its file;
- a PostgreSQL registry: a session advisory lock in that database;
- anything else (an MLflow server over HTTP, a file store): the platform's own store
  (``store.url``), by the same two rules; a cluster shares one PostgreSQL store, so every driver
  on it takes the same lock. Run directories that share only an MLflow server but keep separate
  SQLite stores are not serialised against each other, nor is a store on another database
  (a warning says so).

A holder that dies (kill -9, a lost node) releases it: the kernel drops the flock, PostgreSQL
ends the session's advisory locks with its connection.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from xrdmatch.config import Config, redact

log = logging.getLogger(__name__)


class RegistryBusy(RuntimeError):
    """Another process held the registry's promotion lock for longer than we could wait."""


def lock_target(cfg: Config) -> str:
    """The database URL whose lock serialises this config's registry decisions."""
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.tracking import tracking_uri

    uri = tracking_uri(cfg)
    if _scheme(uri) in ("sqlite", "postgresql"):
        return uri
    return store_url(cfg)


@contextmanager
def registry_lock(cfg: Config, timeout_s: float | None = None, poll_s: float = 0.2) -> Iterator[None]:
    """Hold the promotion lock of ``cfg``'s registry while the block runs (waits up to
    ``tracking.registry_lock_timeout_s``, then raises :class:`RegistryBusy`)."""
    target = lock_target(cfg)
    timeout = cfg.tracking.registry_lock_timeout_s if timeout_s is None else timeout_s
    name = cfg.tracking.registry_name
    if _scheme(target) == "postgresql":
        with _advisory_lock(target, name, timeout, poll_s):
            yield
        return
    from sqlalchemy.engine import make_url

    from xrdmatch.platform.lock import DirectoryBusy, exclusive_file

    db = make_url(target).database if _scheme(target) == "sqlite" else None
    if not db or db == ":memory:":  # e.g. a MySQL store: as before this lock existed, with a warning
        log.warning("registry %r: promotion decisions are not serialised across processes (no lock for %s; "
                    "store.url on SQLite or PostgreSQL has one)", name, redact(target))
        yield
        return
    lock_file = Path(db).with_name(Path(db).name + ".registry.lock")
    with ExitStack() as held:
        try:
            held.enter_context(exclusive_file(lock_file, timeout, poll_s))
        except DirectoryBusy:  # waiting for the lock only, not anything the block raises
            raise RegistryBusy(f"registry {name!r}: another registration held its promotion lock ({lock_file}) "
                               f"for more than {timeout:g} s (tracking.registry_lock_timeout_s)") from None
        yield


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def _key(name: str) -> int:
    """A signed 64-bit advisory-lock key per registered model name."""
    return int.from_bytes(hashlib.sha256(f"xrdmatch-registry:{name}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def _advisory_lock(url: str, name: str, timeout_s: float, poll_s: float) -> Iterator[None]:
    from sqlalchemy import text
    from sqlalchemy.pool import NullPool

    from xrdmatch.platform.db import server_engine

    key = _key(name)
    eng = server_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})  # libpq waits forever
    try:
        with eng.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")  # a session lock, no open transaction
            t0 = time.monotonic()
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                if time.monotonic() - t0 > timeout_s:
                    raise RegistryBusy(f"registry {name!r}: another registration held its promotion lock "
                                       f"(PostgreSQL advisory lock {key}) for more than {timeout_s:g} s "
                                       "(tracking.registry_lock_timeout_s)")
                time.sleep(poll_s)
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        eng.dispose()
