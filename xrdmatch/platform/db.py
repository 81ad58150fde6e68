"""SQLAlchemy plumbing shared by every store (queue, labels, campaign state).

The same code serves SQLite (embedded default, one machine) and PostgreSQL (a cluster).
Each store module declares its tables on :data:`Base` and calls :func:`connect`.
The schema is versioned in ``schema_version``; bump :data:`SCHEMA_VERSION` with a
migration step in :func:`_migrate` when a table changes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from functools import lru_cache

from sqlalchemy import Integer, String, create_engine, event, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, NoSuchModuleError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

SCHEMA_VERSION = 1
_lock = threading.Lock()


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    component: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


_BUSY_S = 30.0


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={int(_BUSY_S * 1000)}")
    _journal_mode_wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _journal_mode_wal(cur) -> None:
    """WAL is a property of the file, set by the first process that opens it. Switching a new
    file to WAL needs an exclusive lock, and SQLite answers "database is locked" at once, busy
    timeout or not, when other processes open the same new file at that moment (the campaign
    and its workers do): retry, as the busy timeout would."""
    t0, delay = time.monotonic(), 0.01
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() - t0 > _BUSY_S:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.5)


def server_engine(url: str, **kwargs) -> Engine:
    """``create_engine`` for a database server; a driver that is not installed is a SQLAlchemyError
    naming it (the CLI's ``store_errors`` prints it in one line), not an ImportError traceback."""
    try:
        return create_engine(url, **kwargs)
    except ImportError as e:
        raise NoSuchModuleError(f"the database driver of {make_url(url).drivername!r} is not installed "
                                f"({e}); install it into this environment") from None


@lru_cache(maxsize=16)
def engine_for(url: str) -> Engine:
    """One engine per URL per process. SQLite gets WAL + a busy timeout so several
    processes (workers, the campaign) can share the file."""
    if url.startswith("sqlite"):
        eng = create_engine(url, connect_args={"timeout": _BUSY_S}, future=True)
        event.listen(eng, "connect", _sqlite_pragmas)
    else:
        eng = server_engine(url, pool_pre_ping=True, future=True)
    return eng


def _migrate(engine: Engine, found: int | None) -> None:
    """Upgrade an older schema in place. Version 1 is the first; nothing to do yet."""


def connect(url: str) -> sessionmaker:
    """Create missing tables (all stores), check the schema version, return a session factory.

    Several processes may open a new store at the same moment (the campaign and its
    validation workers, workers on many nodes): ``create_all`` checks, then creates, so one
    of two racing processes finds the table (or the version row) created under it. That
    error means the schema now exists; the loser checks again.
    """
    engine = engine_for(url)
    with _lock:
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                _create_schema(engine, url)
                break
            except (OperationalError, ProgrammingError, IntegrityError) as e:
                if attempt == _CREATE_ATTEMPTS - 1 or not _lost_creation_race(e):
                    raise
                time.sleep(0.05 * (attempt + 1))
    return sessionmaker(bind=engine, expire_on_commit=False, future=True)


_CREATE_ATTEMPTS = 5


def _lost_creation_race(e: Exception) -> bool:
    msg = str(e).lower()
    return "already exists" in msg or "duplicate key" in msg or "unique constraint" in msg


def _create_schema(engine: Engine, url: str) -> None:
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        row = conn.execute(select(SchemaVersion.version).where(SchemaVersion.component == "xrdmatch")).first()
        found = row[0] if row else None
        if found is not None and found > SCHEMA_VERSION:
            raise RuntimeError(
                f"store {url} has schema version {found}, newer than this xrdmatch ({SCHEMA_VERSION}); upgrade xrdmatch"
            )
        _migrate(engine, found)
        if found is None:
            conn.execute(SchemaVersion.__table__.insert().values(component="xrdmatch", version=SCHEMA_VERSION))
        elif found < SCHEMA_VERSION:
            conn.execute(
                SchemaVersion.__table__.update()
                .where(SchemaVersion.component == "xrdmatch")
                .values(version=SCHEMA_VERSION)
            )


def shorten(text: str, n: int = 60) -> str:
    """A value as an error line shows it: an id too long for the store would be the whole line."""
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def too_long(table, values: dict) -> str | None:
    """Which of ``values`` would not fit its ``String(n)`` column, with its length and the limit, or
    None. Checked before an insert: PostgreSQL refuses the whole transaction, unnamed
    (StringDataRightTruncation), where SQLite stores the value whole."""
    for key, value in values.items():
        limit = getattr(table.c[key].type, "length", None)
        if limit is not None and isinstance(value, str) and len(value) > limit:
            return f"{key} is {len(value)} characters long, over the store's limit of {limit}"
    return None


def store_url(cfg) -> str:
    """The campaign store URL of a config: ``store.url`` or SQLite in the run directory."""
    from xrdmatch.platform.paths import RunPaths

    return cfg.store.url or RunPaths.of(cfg.run_dir).store_url
