"""`xrdmatch xrd`: XRD patterns of a whole database (owner: XRD stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from xrdmatch.platform.cli_common import ConfigOpt, check_run_dir


def xrd(
    db: Optional[str] = typer.Option(None, "--db", help="JSONL(.xz/.gz), folder of CIF/POSCAR, or ASE .db (default: config database.path)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: the run's patterns cache, run_dir/patterns/DBKEY, that later stages read)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Ray actors (default: config xrd.workers, else one per CPU)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="structures per Ray task and shard (default: config xrd.batch_size)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="only the first N entries (default: config database.limit)"),
    config: Path = ConfigOpt,
    restart: bool = typer.Option(False, "--restart", help="discard an --out made by another database/batch size/engine"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar with rate and ETA"),
) -> None:
    """Compute XRD patterns of a whole structure database with Ray actors (Parquet shards).

    Resumable: rerun the same command after an interruption (even kill -9) and only the unfinished batches are computed. RAY_ADDRESS joins a Ray cluster.
    """
    from xrdmatch.config import ConfigError, load_config, resolve_path
    from xrdmatch.platform.databases import DatabaseError
    from xrdmatch.platform.patterns import ERRORS, load_errors, patterns_dir_for
    from xrdmatch.platform.xrd_stage import StageError, run_xrd_stage

    try:
        cfg = load_config(config)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    check_run_dir(cfg.run_dir)
    if out is not None:
        check_run_dir(out, "--out")
    if db is not None:
        cfg.database.path = db
    if limit is not None:
        cfg.database.limit = limit
    out_dir = out if out is not None else patterns_dir_for(cfg) if resolve_path(cfg.database.path).exists() else None
    if out_dir is None:
        typer.echo(f"database not found: {cfg.database.path}", err=True)
        raise typer.Exit(2)
    try:
        summary = run_xrd_stage(
            resolve_path(cfg.database.path),
            out_dir,
            workers=workers or cfg.xrd.workers,
            batch_size=batch_size or cfg.xrd.batch_size,
            limit=cfg.database.limit,
            progress=progress,
            max_retries=cfg.xrd.max_retries,
            ray_address=cfg.ray.address,
            num_cpus=cfg.ray.num_cpus,
            restart_incompatible=restart,
        )
    except (DatabaseError, StageError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if summary.failures:
        errs = load_errors(summary.out_dir)
        typer.echo(f"{summary.failures} entries could not be used (see {Path(summary.out_dir) / ERRORS}), e.g.:", err=True)
        for row in errs.head(5).itertuples():
            # a reason names its entry already ('db.jsonl:2: not valid JSON'); name it once
            typer.echo(f"  {row.reason}" if str(row.reason).startswith(f"{row.id}:") else f"  {row.id}: {row.reason}",
                       err=True)
    for k, why in sorted(summary.failed_batches.items()):
        typer.echo(f"batch {k} failed after retries: {why}", err=True)
    if summary.duplicate_ids:
        ex = _duplicate_examples(Path(summary.out_dir))
        typer.echo(
            f"warning: {summary.duplicate_ids} entries (patterns or errors) repeat an id of an earlier entry of "
            f"{summary.source}"
            + (f", e.g. {', '.join(map(repr, ex))}" if ex else "")
            + "; ids should be unique, later stages cannot tell these apart",
            err=True,
        )
    typer.echo(summary.line())
    if not summary.done:
        raise typer.Exit(1)
    if summary.patterns == 0:
        why = (f"all {summary.failures} entries failed (see {Path(summary.out_dir) / ERRORS})" if summary.entries
               else f"{summary.source} has no entries")
        typer.echo(f"error: no pattern was computed: {why}", err=True)
        raise typer.Exit(1)


def _duplicate_examples(out: Path, n: int = 5) -> list[str]:
    """The first ``n`` ids that occur more than once in the shards and the errors table (read only
    when there are some)."""
    import pyarrow.parquet as pq

    from xrdmatch.platform.patterns import ERRORS, read_manifest

    man = read_manifest(out) or {}
    seen: set[str] = set()
    dups: list[str] = []
    for f in [s["file"] for s in man.get("shards", [])] + [ERRORS]:
        try:
            ids = pq.read_table(out / f, columns=["id"]).column("id").to_pylist()
        except Exception:  # noqa: BLE001 - examples only; the count is already printed
            return dups
        for i in ids:
            if i in seen and i not in dups:
                dups.append(i)
                if len(dups) >= n:
                    return dups
            seen.add(i)
    return dups
