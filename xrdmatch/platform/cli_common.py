"""What every ``xrdmatch`` sub-command shares: the --config / --dir options and loading the
config so that a bad file fails with exit status 2 and a message naming the key."""

from __future__ import annotations

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


def check_run_dir(run_dir: str | Path) -> None:
    """Exit 2 with one line when the run directory names an existing file (a mistyped --dir)."""
    p = Path(run_dir).expanduser()
    if p.exists() and not p.is_dir():
        typer.echo(f"run directory {run_dir} is a file, not a directory", err=True)
        raise typer.Exit(2)


def check_data_paths(cfg) -> None:
    """Exit 2 with one line naming the key when the database or the labels file is missing, before
    any work (a mistyped path would otherwise surface deep inside the pattern or training stage)."""
    from xrdmatch.config import resolve_path

    for key, value in (("database.path", cfg.database.path), ("labels.path", cfg.labels.path)):
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
