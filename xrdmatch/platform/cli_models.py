"""`xrdmatch models`, `promote`, `predict`, `ui` (owner: MLflow registry).

Heavy libraries (mlflow, pandas, pymatgen) are imported inside the commands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from xrdmatch.config import redact
from xrdmatch.platform.cli_common import (ConfigOpt, DirOpt, check_out_file, check_out_not_input, first_line,
                                          print_table, require_run_dir, store_errors)
from xrdmatch.platform.cli_common import load_cfg as _load


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def models(config: str = ConfigOpt, run_dir: Optional[str] = DirOpt) -> None:
    """List registered model versions with aliases, metrics and label counts."""
    from datetime import datetime

    from rich.console import Console

    from xrdmatch.platform.registry import list_versions
    from xrdmatch.platform.tracking import tracking_uri
    from xrdmatch.training.metrics import metric_text

    _quiet_mlflow()
    cfg = _load(config, run_dir)
    require_run_dir(cfg, tracking=True)
    console = Console(highlight=False)
    try:
        versions = list_versions(cfg)
    except Exception as e:  # noqa: BLE001 - an unreachable or unreadable store is not "nothing registered"
        typer.echo(f"error: tracking store {redact(tracking_uri(cfg))}: {first_line(e)}", err=True)
        raise typer.Exit(1) from None
    if not versions:
        console.print(f"no registered versions of {cfg.tracking.registry_name} in {redact(tracking_uri(cfg))}", markup=False)
        return
    metric_names = sorted({m for v in versions for m in v.metrics})
    pm = cfg.tracking.promotion_metric
    # the promotion metric, then the evaluation's headline metrics before counts and the rest
    rank = {m: i for i, m in enumerate(("f1_superionic", "pr_auc", "precision", "recall", "macro_f1"))}
    others = sorted((m for m in metric_names if m != pm),
                    key=lambda m: min((r for k, r in rank.items() if m == k or m.endswith(f"_{k}")), default=len(rank)))
    metric_names = ([pm] if pm in metric_names else []) + others[:3]
    # the metrics' shared prefix (grouped_cv_) goes to the caption: shorter headers, a table
    # that fits more terminals
    prefix = os.path.commonprefix(metric_names) if len(metric_names) > 1 else ""
    prefix = prefix[: prefix.rfind("_") + 1]
    columns = ["version", "aliases", "created", *metric_names, "labelled (sources)", "unlabelled", "run"]
    rows = []
    for v in versions:
        lab = v.lineage.get("lineage.labelled_count", "?")
        srcs = v.lineage.get("lineage.label_sources", "")
        created = datetime.fromtimestamp(v.created_ms / 1000).strftime("%Y-%m-%d %H:%M") if v.created_ms else ""
        aliases = ", ".join(f"{a} (by hand)" if f"promotion.by_hand.{a}" in v.tags else a  # `xrdmatch promote`
                            for a in v.aliases)
        rows.append([v.version, aliases, created, *[metric_text(m, v.metrics.get(m)) for m in metric_names],
                     f"{lab} ({srcs})", v.lineage.get("lineage.unlabelled_count", "?"), (v.run_id or "")[:8]])
    print_table(console, f"{cfg.tracking.registry_name} ({redact(tracking_uri(cfg))})", columns, rows,
                caption=f"metrics: {prefix}*" if prefix else None, right=tuple(metric_names),
                headers={m: m.removeprefix(prefix) for m in metric_names})
    console.print(f"promotion rule: {versions[0].tags.get('promotion.rule', '-')}", markup=False)


def promote(
    version: int = typer.Argument(..., min=1, help="the registered version that gets the alias, e.g. 3"),
    alias: str = typer.Option("champion", "--alias", "-a", help="champion or challenger"),
    reason: str = typer.Option("", "--reason", "-r", help="why, kept in the version's promotion.by_hand.<alias> tag"),
    config: str = ConfigOpt,
    run_dir: Optional[str] = DirOpt,
) -> None:
    """Give a registered version an alias by hand: roll the champion back to an earlier version."""
    from xrdmatch.platform.registry import CHALLENGER, CHAMPION, UnknownVersion
    from xrdmatch.platform.registry import promote as move_alias
    from xrdmatch.platform.registry_lock import RegistryBusy
    from xrdmatch.platform.tracking import tracking_uri

    _quiet_mlflow()
    if alias not in (CHAMPION, CHALLENGER):
        typer.echo(f"error: --alias {alias!r}: one of {CHAMPION}, {CHALLENGER}", err=True)
        raise typer.Exit(2)
    cfg = _load(config, run_dir)
    require_run_dir(cfg, tracking=True)
    try:
        with store_errors(tracking_uri(cfg), tracking=True):
            before = move_alias(cfg, version, alias, reason)
    except (UnknownVersion, RegistryBusy) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2 if isinstance(e, UnknownVersion) else 1) from None
    if before == str(version):
        typer.echo(f"{cfg.tracking.registry_name}@{alias} is v{version} already; nothing changed")
        return
    was = f"v{before}" if before else "unset"
    typer.echo(f"{cfg.tracking.registry_name}@{alias}: {was} -> v{version}"
               + ("" if alias != CHAMPION else "; `xrdmatch predict` and `screen` use it from now on"))


def predict(
    inputs: list[str] = typer.Argument(..., help="structure files (CIF, POSCAR, extxyz...), folders, JSONL databases, "
                                                 "or measured scans (.xy .xye .csv .txt .dat: 2-theta, intensity)"),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="model URI [models:/<tracking.registry_name>@champion]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="CSV file [stdout]"),
    wavelength: Optional[str] = typer.Option(None, "--wavelength", "-w",
                                             help="wavelength of measured scans: Angstrom or anode (CuKa, MoKa, Co...) [CuKa]"),
    config: str = ConfigOpt,
    run_dir: Optional[str] = DirOpt,
) -> None:
    """Predict superionic probability for structures or measured patterns.

    CSV columns: source, id, p_superionic, p_std, superionic (1 = superionic), error. A bad input
    gets a row with ``error`` and no probability; exit status 1 only if every input failed (or the
    CSV could not be written to ``--out``: it then goes to stdout); 2 for an unusable ``--out`` (one
    of the inputs, the config, database, labels file or store included), ``--wavelength`` or model,
    found before any input is read.
    """
    import sys

    from xrdmatch.platform.measured import MeasuredPatternError, wavelength_angstrom
    from xrdmatch.platform.predict import collect_items, load_model, predict_items
    from xrdmatch.platform.registry import default_model_uri
    from xrdmatch.platform.tracking import configure, tracking_uri

    _quiet_mlflow()
    cfg = _load(config, run_dir)
    try:
        lam = wavelength_angstrom(wavelength)
    except MeasuredPatternError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if out is not None and _is_an_input(out, inputs):
        typer.echo(f"error: --out {out} is one of the inputs: give another file name", err=True)
        raise typer.Exit(2)  # it would be overwritten by its own predictions
    check_out_not_input(out, cfg, config)
    check_out_file(out, "--out", example="predictions.csv")
    with store_errors(tracking_uri(cfg), tracking=True):
        configure(cfg)
    uri = model or default_model_uri(cfg)
    try:
        mdl = load_model(uri, cfg)
    except Exception as e:
        typer.echo(redact(f"error: cannot load model {uri}: {type(e).__name__}: {e}"), err=True)
        raise typer.Exit(2) from None
    items = collect_items(inputs, lam, cfg.tracking.measured, skip=out)
    rows = predict_items(mdl, items)
    write_failed = False
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            rows.to_csv(out, index=False)
        except OSError as e:  # e.g. disk full: the results go to stdout instead of being lost
            typer.echo(f"error: cannot write --out {out}: {type(e).__name__}: {e}; writing the CSV to stdout",
                       err=True)
            rows.to_csv(sys.stdout, index=False)
            write_failed, out = True, None
    else:
        rows.to_csv(sys.stdout, index=False)
    failed = rows["error"].astype(bool)
    for _, r in rows[failed].iterrows():
        typer.echo(f"error: {r['source']} [{r['id']}]: {r['error']}", err=True)
    where = f" -> {out}" if out is not None else ""
    typer.echo(f"predicted {int((~failed).sum())} of {len(rows)} inputs with {redact(uri)}{where}"
               + (f"; {int(failed.sum())} failed (see the error column)" if failed.any() else ""), err=True)
    if len(rows) == 0 or failed.all() or write_failed:
        raise typer.Exit(1)


def _is_an_input(out: Path, inputs: list[str]) -> bool:
    """``out`` names an input file, or a file in an input folder that is not the CSV of an earlier
    predict (the folder walk leaves ``out`` out, so writing there would replace a scan unread)."""
    from xrdmatch.platform.predict import CSV_COLUMNS

    target = out.expanduser().resolve()
    for inp in inputs:
        p = Path(inp).expanduser().resolve()
        if p == target:
            return True
        if p.is_dir() and p in target.parents and target.is_file() and not target.name.startswith("."):
            try:
                with open(target, encoding="utf-8", errors="replace") as fh:
                    if fh.readline().strip() != ",".join(CSV_COLUMNS):
                        return True
            except OSError:
                return True
    return False


def ui(
    config: str = ConfigOpt,
    run_dir: Optional[str] = DirOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (127.0.0.1: this machine only)"),
    port: int = typer.Option(5000, "--port", "-p", min=1, max=65535),
) -> None:
    """Start the MLflow UI on the run directory's store (127.0.0.1 by default).

    Runs ``mlflow server`` with the run's backend store and artifact root in place of this
    process (Ctrl-C stops it).
    """
    import sys

    from xrdmatch.platform.paths import RunPaths
    from xrdmatch.platform.tracking import configure, tracking_uri

    _quiet_mlflow()
    cfg = _load(config, run_dir)
    with store_errors(tracking_uri(cfg), tracking=True):
        uri = configure(cfg)  # creates the store and experiment if the run dir is new
    if uri.startswith(("http://", "https://", "databricks")):
        typer.echo(f"tracking server already at {redact(uri)}: open it in a browser")
        return
    _check_listen(host, port)
    paths = RunPaths.of(cfg.run_dir)
    paths.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    cmd, env = _server_command(uri, paths.mlflow_artifacts.as_uri(), host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: --host {host} serves the MLflow UI to other machines, without authentication: "
                   "anyone who can reach this port can read and change runs and models", err=True)
    typer.echo(f"MLflow UI: http://{host}:{port}  (store {redact(uri)})", err=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def _server_command(uri: str, artifact_root: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """argv and environment of ``mlflow server``: the store URI goes in the environment
    (MLFLOW_BACKEND_STORE_URI, which mlflow reads), as argv shows its password to every local user."""
    import shutil
    import sys

    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    cmd = [exe or sys.executable, *([] if exe else ["-m", "mlflow"]), "server",
           "--default-artifact-root", artifact_root, "--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    # the server's background job runner (GenAI scorers: a pool of huey workers) is not needed here
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return cmd, env


def _check_listen(host: str, port: int) -> None:
    """Exit 2 naming the address when the server could not listen there (port taken, host that
    does not resolve): after the exec the server's failure would follow a printed URL."""
    import socket

    try:
        family, kind, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
            s.bind(addr)
    except OSError as e:
        typer.echo(f"error: cannot listen on {host}:{port}: {e.strerror or e}", err=True)
        raise typer.Exit(2) from None
