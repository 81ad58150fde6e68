"""What every ``xrdmatch`` sub-command shares: the --config / --dir options and loading the
config so that a bad file fails with exit status 2 and a message naming the key; checks of a
read-only command's run directory and filters, and one-line store errors."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import typer

ConfigOpt = typer.Option("configs/default.yaml", "--config", "-c", help="YAML config (validated on load)")
DirOpt = typer.Option(None, "--dir", "-d", help="run directory (default: the config's run_dir)")


def load_cfg(config: str | Path | None, run_dir: str | Path | None = None):
    """The validated config, ``run_dir`` overridden (as an absolute path) when given."""
    from xrdmatch.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    if run_dir:
        cfg = cfg.model_copy(update={"run_dir": str(Path(run_dir).expanduser().resolve())})
    check_run_dir(cfg.run_dir)
    return cfg


def check_run_dir(run_dir: str | Path, option: str | None = None) -> None:
    """Exit 2 with one line when the run directory (or the folder ``option`` names, e.g. xrd's
    --out) is an existing file or lies under one (a mistyped --dir), before any work."""
    p = Path(run_dir).expanduser()
    if p.exists() and not p.is_dir():
        why = "is a file, not a directory"
    elif blocked := next((d for d in p.parents if d.exists() and not d.is_dir()), None):
        why = f"cannot be created: {blocked} is a file, not a directory"
    else:
        return
    typer.echo(f"error: {option} {run_dir} {why}" if option else f"run directory {run_dir} {why}", err=True)
    raise typer.Exit(2)


def out_file_problem(out: Path, example: str = "") -> str | None:
    """Why a result file cannot be written at ``out`` (checked before any work), or None."""
    if out.is_dir():
        return "is a directory, give a file name" + (f" (e.g. {example})" if example else "")
    if out.exists():
        return None if os.access(out, os.W_OK) else "exists and is not writable"
    parent = out.parent
    while not parent.exists() and parent != parent.parent:  # nearest existing folder above it
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create it: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create it: {parent} is not writable"
    return None


def check_out_file(out: str | Path | None, option: str = "--out", example: str = "") -> None:
    """Exit 2 with one line naming ``out`` when the result file cannot be written there, so that
    a command fails now, not after its work (whose result would be lost)."""
    if out is not None and (why := out_file_problem(Path(out).expanduser(), example)):
        typer.echo(f"error: {option} {out}: {why}", err=True)
        raise typer.Exit(2)


def _sqlite_files(url: str | None) -> list[Path]:
    """The files of a SQLite store URL (the database, its journal and WAL); none for a server."""
    if not url or not url.startswith("sqlite"):
        return []
    from sqlalchemy.engine import make_url

    db = make_url(url).database
    return [Path(db + ext) for ext in ("", "-wal", "-shm", "-journal")] if db and db != ":memory:" else []


def same_file(a: str | Path, b: str | Path) -> bool:
    """``a`` and ``b`` name one file: the same path once resolved (symlinks, relative paths,
    ``~``), or, both existing, the same inode (hard links, bind mounts)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.resolve() == pb.resolve():
        return True
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def check_out_not_input(out: str | Path | None, cfg, config: str | Path | None, option: str = "--out",
                        also: dict[str, str | Path] | None = None) -> None:
    """Exit 2 with one line, before any work, when the result file ``out`` is one of the run's
    inputs: the config file, the configured database (or a file in a database folder), the labels
    file, the SQLite files of the store and of the MLflow store, or one of ``also`` ({what: path}).
    Writing the result there would replace the input (``screen --out`` once overwrote the database)."""
    from xrdmatch.config import resolve_path
    from xrdmatch.platform.paths import RunPaths

    if out is None:
        return
    run = RunPaths(Path(cfg.run_dir).expanduser().resolve())  # not .of(): that creates the folder
    mlflow = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or run.mlflow_tracking_uri
    inputs: list[tuple[str, str | Path]] = [("the config file", resolve_path(config))] if config else []
    inputs += [("database.path", resolve_path(cfg.database.path)), ("labels.path", resolve_path(cfg.labels.path))]
    inputs += [("a file of the store", f) for f in _sqlite_files(cfg.store.url or run.store_url)]
    inputs += [("a file of the MLflow store", f) for f in _sqlite_files(mlflow)]
    inputs += list((also or {}).items())
    target = Path(out).expanduser().resolve()
    for what, path in inputs:
        p = Path(path).expanduser()
        if same_file(target, p):
            why = f"is {what} ({p}): the result would replace it"
        elif p.is_dir() and p.resolve() in target.parents:
            why = f"is in the folder {what} ({p}): the result would become one of its entries"
        else:
            continue
        typer.echo(f"error: {option} {out} {why}; give another file name", err=True)
        raise typer.Exit(2)


def check_data_paths(cfg, labels: bool = True) -> None:
    """Exit 2 with one line naming the key when the database or (``labels``) the labels file is
    missing, before any work (a mistyped path would otherwise surface deep inside the pattern or
    training stage). Screening reads no labels: it checks the database only."""
    from xrdmatch.config import resolve_path

    keys = [("database.path", cfg.database.path)] + ([("labels.path", cfg.labels.path)] if labels else [])
    for key, value in keys:
        if not resolve_path(value).exists():
            typer.echo(f"error: {key} {value}: not found", err=True)
            raise typer.Exit(2)


def input_errors() -> tuple[type[Exception], ...]:
    """The errors that mean the user's data cannot be used (they name it), not a bug: a command
    prints them as one line, where a campaign has also recorded them on its stage."""
    from xrdmatch.platform.data import LabelledDataError
    from xrdmatch.platform.databases import DatabaseError
    from xrdmatch.platform.patterns import PatternsError

    return LabelledDataError, DatabaseError, PatternsError


def require_run_dir(cfg, *, tracking: bool = False) -> None:
    """Exit 2 when a read-only command would open the default store (SQLite under the run directory;
    ``tracking``: the MLflow one) of a run directory that does not exist: a mistyped --dir would
    create an empty run there and report nothing."""
    if tracking:
        elsewhere = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    else:
        elsewhere = cfg.store.url
    if not elsewhere and not Path(cfg.run_dir).expanduser().exists():
        typer.echo(f"run directory {cfg.run_dir} does not exist", err=True)
        raise typer.Exit(2)


def check_choices(option: str, given: list[str] | None, allowed) -> None:
    """Exit 2 naming a filter value that is none of ``allowed``: a typo would match nothing and
    look like an empty result."""
    bad = [v for v in given or () if v not in allowed]
    if bad:
        typer.echo(f"error: {option} {', '.join(map(repr, bad))}: not one of {', '.join(allowed)}", err=True)
        raise typer.Exit(2)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), passwords masked."""
    from xrdmatch.config import redact

    text = str(e).strip()
    return redact(text.splitlines()[0]) if text else type(e).__name__


@contextmanager
def store_errors(url: str, *, tracking: bool = False):
    """A store that cannot be opened or read (unreachable, corrupt, refused) ends the command with
    one line naming it (password masked) and exit 1, not a traceback. ``tracking``: the MLflow
    store, whose errors are also MlflowException."""
    from sqlalchemy.exc import SQLAlchemyError

    from xrdmatch.config import redact

    errors: tuple[type[BaseException], ...] = (SQLAlchemyError,)
    if tracking:
        from mlflow.exceptions import MlflowException

        errors += (MlflowException,)
    try:
        yield
    except errors as e:
        typer.echo(f"error: {'tracking store' if tracking else 'store'} {redact(url)}: {first_line(e)}", err=True)
        raise typer.Exit(1) from None


def check_store(cfg) -> None:
    """Open the run's store once before a long command starts: unusable, it is one line now
    (``store_errors``), not a traceback from a worker or a stage later."""
    from xrdmatch.platform import queue
    from xrdmatch.platform.db import store_url

    url = store_url(cfg)
    with store_errors(url):
        queue.counts_by_state(url)


def print_table(console, title: str, columns: list[str], rows: list[list[str]], *, caption: str | None = None,
                headers: dict[str, str] | None = None, right: tuple[str, ...] = (),
                colours: dict[str, dict[str, str]] | None = None) -> None:
    """Rows of plain text as a table where every word fits its column; on a terminal too narrow
    for that, one block per row (``column: value`` lines). A squeezed table cuts words to
    "vers…" or one letter per line, and says nothing.

    ``headers``: shorter table headers for some columns, ``caption`` the table's note on them
    (the blocks keep the full names); ``colours``: per column, a style per value (a job's state).
    """
    from rich.markup import escape
    from rich.table import Table

    headers, colours = headers or {}, colours or {}
    shown = [headers.get(c, c) for c in columns]

    def longest_word(text: str) -> int:
        return max((len(w) for w in text.split()), default=0)

    need = sum(max([longest_word(h), *(longest_word(r[i]) for r in rows)]) + 3 for i, h in enumerate(shown)) + 1
    if need > console.width:
        console.print(title, markup=False)
        for row in rows:
            console.print(f"{columns[0]} {row[0]}", markup=False)
            for name, cell in zip(columns[1:], row[1:]):
                if cell not in ("", "-"):  # nothing to say
                    console.print(f"    {name}: {cell}", markup=False)
        return
    table = Table(title=escape(title), caption=escape(caption) if caption else None)
    for c, h in zip(columns, shown):
        table.add_column(escape(h), justify="right" if c in right else "left", overflow="fold")
    for row in rows:
        cells = []
        for c, cell in zip(columns, row):
            style = colours.get(c, {}).get(cell)
            cells.append(f"[{style}]{escape(cell)}[/]" if style else escape(cell))
        table.add_row(*cells)
    console.print(table)
