"""`xrdmatch labels import|list` (owner: label store): measured or computed labels from outside
the campaign go into the same store the MD verdicts land in, so the next training uses them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from xrdmatch.config import redact
from xrdmatch.platform.cli_common import ConfigOpt, DirOpt, check_choices, require_run_dir, store_errors
from xrdmatch.platform.cli_common import load_cfg as _config

app = typer.Typer(help="Label store: import labels from a CSV, list the stored labels.", no_args_is_help=True)


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="CSV: structure_id (or id), formula, label (1 = superionic) and/or "
                                          "sigma_300 (S/cm at 300 K); optional method per row"),
    method: str = typer.Option("experiment", "--method", "-m", help="method of rows without one"),
    replace: bool = typer.Option(False, "--replace", help="replace stored labels whose values differ"),
    config: Path = ConfigOpt,
    run_dir: Path | None = DirOpt,
) -> None:
    """Import labels into the run's store (all rows or none; idempotent).

    A row with only sigma_300 is labelled by the config's validation.sigma_threshold, and a
    label that contradicts its own sigma_300 under that threshold is refused."""
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.labels import LabelInputError, import_labels

    cfg = _config(config, run_dir)
    url = store_url(cfg)
    try:
        with store_errors(url):
            counts = import_labels(url, file, method, cfg.validation.sigma_threshold, replace=replace)
    except LabelInputError as e:
        typer.echo(f"error: {e}".replace("pass replace=True", "pass --replace"), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{file}: {counts.added} added, {counts.present} already stored, {counts.replaced} replaced "
               f"(store {redact(url)})")
    _note_ids_without_patterns(cfg, file)
    ignored = sorted(m for m, w in cfg.labels.source_weights.items() if w == 0)
    if ignored:
        typer.echo(f"note: labels.source_weights gives {', '.join(ignored)} weight 0: training ignores those labels",
                   err=True)


@app.command("list")
def list_(
    method: list[str] = typer.Option(None, "--method", "-m", help="only these methods (repeatable)"),
    config: Path = ConfigOpt,
    run_dir: Path | None = DirOpt,
) -> None:
    """The stored labels, oldest first (tab-separated), and counts per method."""
    from xrdmatch.platform.db import store_url
    from xrdmatch.platform.labels import METHODS, list_labels

    cfg = _config(config, run_dir)
    check_choices("--method", method, METHODS)
    require_run_dir(cfg)
    url = store_url(cfg)
    with store_errors(url):
        labels = list_labels(url, list(method) if method else None)
    typer.echo("structure_id\tformula\tmethod\tlabel\tsigma_300\tround\tsource")
    for lab in labels:
        sigma = "" if lab.sigma_300 is None else f"{lab.sigma_300:.3g}"
        rnd = "" if lab.campaign_round is None else str(lab.campaign_round)
        typer.echo(f"{lab.structure_id}\t{lab.formula}\t{lab.method}\t{lab.label}\t{sigma}\t{rnd}\t{lab.source or ''}")
    by = Counter((lab.method, lab.label) for lab in labels)
    summary = ", ".join(f"{m}: {by[m, 1]} superionic / {by[m, 0] + by[m, 1]}" for m in sorted({m for m, _ in by}))
    typer.echo(f"{len(labels)} labels" + (f" ({summary})" if summary else ""), err=True)


def _note_ids_without_patterns(cfg, file: Path) -> None:
    """Say which imported ids training will skip: an imported label has no structure, so it needs
    the database's pattern under its id (or is one of the labels file's compounds). Said only
    when the run already holds the database's patterns (reading them here would cost a whole
    XRD stage)."""
    import csv

    from xrdmatch.platform.data import load_labelled
    from xrdmatch.platform.patterns import PatternsError, load_ids, patterns_dir_for

    try:
        known = set(load_ids(patterns_dir_for(cfg))) | set(load_labelled(cfg.labels.path).ids)
    except (PatternsError, OSError, ValueError):  # no finished patterns yet, or no labels file
        return
    with open(file, newline="", encoding="utf-8-sig") as fh:
        ids = [(r.get("structure_id") or r.get("id") or "").strip() for r in csv.DictReader(fh)]
    unknown = sorted({i for i in ids if i and i not in known})
    if unknown:
        typer.echo(f"note: {len(unknown)} imported id(s) are neither in the database's patterns ({cfg.database.path}) "
                   f"nor in the labels file, e.g. {', '.join(unknown[:3])}: training skips them", err=True)
