"""`xrdmatch campaign run|status|report` (owner: campaign).

Heavy libraries are imported inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Active-learning campaign: screen, select, validate, relabel, retrain.", no_args_is_help=True)

from xrdmatch.platform.cli_common import (ConfigOpt, DirOpt, check_data_paths, check_out_file, check_out_not_input,
                                          check_store, input_errors)
from xrdmatch.platform.cli_common import load_cfg as _load


@app.command()
def run(config: str = ConfigOpt, run_dir: str | None = DirOpt,
        progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars")) -> None:
    """Run the campaign, or resume it at the first unfinished stage."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from xrdmatch.platform.campaign import CampaignError, run_campaign
    from xrdmatch.platform.lock import RunDirLocked

    cfg = _load(config, run_dir)
    check_data_paths(cfg)
    check_store(cfg)
    console = Console(highlight=False, soft_wrap=True)
    try:
        timings = run_campaign(cfg, echo=lambda s: console.print(s, markup=False), progress=progress)
    except RunDirLocked as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from None
    except CampaignError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except input_errors() as e:  # the failed stage has recorded it too (campaign status shows it)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    table = Table(title=f"stage timings ({escape(str(cfg.run_dir))})")  # a path is not markup
    table.add_column("stage")
    table.add_column("seconds (all rounds)", justify="right")
    for stage, s in timings["per_stage"].items():
        table.add_row(stage, f"{s:.1f}")
    table.add_row("total", f"{timings['total_s']:.1f}")
    console.print(table)


@app.command()
def status(config: str = ConfigOpt, run_dir: str | None = DirOpt) -> None:
    """Rounds, current stage, queue by state, labels by source, champion version and metrics."""
    from rich.console import Console

    from xrdmatch.platform.campaign import CampaignError
    from xrdmatch.platform.report import campaign_status

    cfg = _load(config, run_dir)
    console = Console(highlight=False, soft_wrap=True)
    try:
        lines = campaign_status(cfg)
    except (FileNotFoundError, CampaignError) as e:  # no campaign.json, or one that cannot be used
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    for line in lines:
        console.print(line, markup=False)


@app.command()
def report(config: str = ConfigOpt, run_dir: str | None = DirOpt,
           out: str | None = typer.Option(None, "--out", "-o", help="HTML file (default RUN_DIR/report.html)")) -> None:
    """Write a self-contained HTML report (images inlined) of the campaign."""
    from xrdmatch.platform.campaign import CampaignError
    from xrdmatch.platform.report import write_report

    cfg = _load(config, run_dir)
    check_out_not_input(out, cfg, config, also={"the campaign's id file": Path(cfg.run_dir) / "campaign.json"})
    check_out_file(out, "--out", example="report.html")  # before the report is built
    try:
        path = write_report(cfg, out)
    except (FileNotFoundError, CampaignError) as e:  # no campaign.json, or one that cannot be used
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"report written to {path}")
