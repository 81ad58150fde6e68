"""`xrdmatch validate submit|work|status|requeue` (owner: MD validation queue)."""

from __future__ import annotations

from pathlib import Path

import typer

from xrdmatch.config import redact
from xrdmatch.platform.cli_common import (ConfigOpt, DirOpt, check_choices, check_store, print_table, require_run_dir,
                                          store_errors)
from xrdmatch.platform.cli_common import load_cfg as _config  # the same default config as every command

app = typer.Typer(help="MD validation queue: submit candidates, run workers, show status.", no_args_is_help=True)


@app.command()
def submit(
    items: list[str] = typer.Argument(..., help="database ids (e.g. mp-1185319) or structure files pymatgen reads"),
    priority: int = typer.Option(0, "--priority", "-p", help="higher runs first"),
    campaign_round: int | None = typer.Option(None, "--round", help="campaign round to record with the job"),
    config: Path = ConfigOpt,
    run_dir: Path | None = DirOpt,
) -> None:
    """Queue structures for MD validation under the config's protocol (idempotent)."""
    from xrdmatch.platform import queue
    from xrdmatch.platform.db import store_url

    cfg = _config(config, run_dir)
    url = store_url(cfg)
    with store_errors(url):  # an unusable store is said before the database is read
        seen = {j.id for j in queue.list_jobs(url)}
    files = [i for i in items if Path(i).is_file()]
    ids = [i for i in items if i not in files]
    structures: list[tuple[str, object, str | None]] = []  # (id, structure, the file it came from)
    errors: list[str] = []
    for f in files:
        from xrdmatch.platform.structure_files import StructureTooLarge, read_structure

        try:
            structures.append((Path(f).stem, read_structure(f), f))
        except StructureTooLarge as err:
            errors.append(f"{f}: refused before parsing: {err}")
        except Exception as err:
            errors.append(f"{f}: not a structure file pymatgen can read ({type(err).__name__}: {err})")
    if ids:
        from xrdmatch.platform.data import find_records

        found, problems = find_records(cfg.database.path, ids)
        for sid in ids:
            if sid in found:
                structures.append((sid, found[sid], None))
            elif sid in problems:
                errors.append(f"{sid}: not read from the database {cfg.database.path}: {problems[sid]}")
            else:
                errors.append(f"{sid}: neither a file nor an id of the database {cfg.database.path}")
    with store_errors(url):
        for sid, s, f in structures:
            try:
                jid = queue.submit(url, sid, s, cfg.validation, priority=priority, campaign_round=campaign_round)
            except queue.QueueError as err:
                errors.append(f"{f}: {err}" if f else str(err))  # a file's error names the file
                continue
            typer.echo(f"{sid}: job {jid}" + (" (already queued)" if jid in seen else ""))
            seen.add(jid)
    for e in errors:
        typer.echo(f"error: {e}", err=True)
    if errors:
        raise typer.Exit(1)


@app.command()
def work(
    workers: int | None = typer.Option(None, "--workers", "-n", min=1, help="Ray worker actors (default: validation.workers)"),
    until_empty: bool = typer.Option(True, "--until-empty/--forever", help="stop when no job is queued or running"),
    max_jobs: int | None = typer.Option(None, "--max-jobs", help="stop after this many finished jobs"),
    config: Path = ConfigOpt,
    run_dir: Path | None = DirOpt,
) -> None:
    """Run Ray validation workers that pull jobs from the queue."""
    from xrdmatch.actors.validation_workers import WorkersLost, run_workers

    cfg = _config(config, run_dir)
    check_store(cfg)

    def show(o) -> None:
        what = o.verdict if o.state in ("done", "inconclusive") else o.error
        typer.echo(f"job {o.job_id} {o.structure_id}: {o.state} ({what}) in {o.runtime_s:.1f} s", err=o.state == "failed")

    try:
        summary = run_workers(cfg, n=workers, until_empty=until_empty, max_jobs=max_jobs, on_outcome=show)
    except WorkersLost as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    states = ", ".join(f"{s} {summary.count(s)}" for s in ("done", "inconclusive", "failed") if summary.count(s))
    typer.echo(f"finished {len(summary.outcomes)} job(s){': ' + states if states else ''}")


def _eta(job, now: float) -> str:
    p = job.progress or {}
    f, f0 = float(p.get("fraction", 0.0)), float(p.get("fraction_at_claim", 0.0))
    if job.state != "running" or not job.started_at or f <= f0:
        return "-"
    secs = (now - job.started_at) * (1.0 - f) / (f - f0)
    return f"{secs / 60:.1f} min" if secs >= 90 else f"{secs:.0f} s"


@app.command()
def status(
    state: list[str] | None = typer.Option(None, "--state", help="only these states (repeatable)"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="at most this many jobs"),
    config: Path = ConfigOpt,
    run_dir: Path | None = DirOpt,
) -> None:
    """Table of validation jobs: state, progress, ETA, verdict, sigma(300 K), error."""
    from rich.console import Console

    from xrdmatch.platform import queue
    from xrdmatch.platform.db import store_url

    cfg = _config(config, run_dir)
    check_choices("--state", state, queue.STATES)
    require_run_dir(cfg)
    url = store_url(cfg)
    with store_errors(url):
        jobs = queue.list_jobs(url, states=state or None, limit=limit)
        now = queue.store_now(url)
        counts = queue.counts_by_state(url)
    columns = ["id", "structure", "formula", "state", "T done", "progress", "ETA", "verdict", "sigma_300 S/cm",
               "attempts", "error"]
    rows = []
    for j in jobs:
        p = j.progress or {}
        n_t = len(j.protocol.get("temperatures", []))
        done = ", ".join(f"{t:.0f}" for t in p.get("temperatures_done", [])) or "-"
        prog = "-"
        if j.state == "running" and p.get("temperature") is not None:
            prog = f"{p['temperature']:.0f} K {p.get('step', 0)}/{p.get('nsteps', 0)}"
            if j.lease_expires is not None and j.lease_expires < now:
                prog += " (lease expired)"
        rows.append([str(j.id), j.structure_id, j.formula, j.state, f"{done} ({len(p.get('temperatures_done', []))}/{n_t})",
                     prog, _eta(j, now), j.verdict or "-", f"{j.sigma_300:.2e}" if j.sigma_300 is not None else "-",
                     str(j.attempts), (j.error or "")[:200]])
    console = Console(width=200) if not Console().is_terminal else Console()
    colour = {"done": "green", "failed": "red", "running": "cyan", "inconclusive": "yellow"}
    print_table(console, f"validation jobs ({redact(url)})", columns, rows, colours={"state": colour})
    console.print("  ".join(f"{s}: {n}" for s, n in counts.items()), markup=False)


@app.command()
def requeue(
    state: list[str] = typer.Option(["failed"], "--state", help="states to put back in the queue (repeatable)"),
    config: Path = ConfigOpt,
    run_dir: Path | None = DirOpt,
) -> None:
    """Queue finished jobs again (e.g. failed ones after installing a missing calculator)."""
    from xrdmatch.platform import queue
    from xrdmatch.platform.db import store_url

    cfg = _config(config, run_dir)
    require_run_dir(cfg)  # (queue.requeue names a --state that is not a finished one)
    url = store_url(cfg)
    try:
        with store_errors(url):
            n = queue.requeue(url, tuple(state))
    except queue.QueueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"requeued {n} job(s)")
