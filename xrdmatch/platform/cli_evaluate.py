"""`xrdmatch evaluate` (owner: evaluation): the paper's protocol replayed, or honest grouped CV."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path

import typer

from xrdmatch.platform.cli_common import (ConfigOpt, check_data_paths, check_out_not_input, check_run_dir, input_errors,
                                          same_file)


class Protocol(str, Enum):
    paper = "paper"
    grouped_cv = "grouped-cv"


class Threshold(str, Enum):
    fixed = "fixed"
    inner = "inner"


def evaluate(
    protocol: Protocol = typer.Option(Protocol.grouped_cv, "--protocol", "-p", help="paper | grouped-cv"),
    config: Path = ConfigOpt,
    run_dir: Path | None = typer.Option(None, "--dir", help="run directory (overrides run_dir of the config)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="JSON result (default: RUN_DIR/evaluation/<protocol>.json)"),
    markdown: Path | None = typer.Option(None, "--markdown", help="also write the results table as markdown"),
    from_json: Path | None = typer.Option(
        None, "--from-json", help="render an existing result JSON (table / --markdown) without training"
    ),
    repeats: int | None = typer.Option(None, "--repeats", min=1, help="override evaluation.repeats"),
    folds: int | None = typer.Option(None, "--folds", min=2, help="override evaluation.folds"),
    threshold_selection: Threshold | None = typer.Option(
        None, "--threshold-selection", help="override evaluation.threshold_selection (fixed 0.5 | inner split)"
    ),
) -> None:
    """Evaluate methods with the paper's protocol or honest grouped CV; print a table, write JSON.

    Member predictions are cached in RUN_DIR/evaluation/<protocol>/members, so an interrupted
    evaluation resumes where it stopped, in the same MLflow run, when the same command is run
    again; a rerun of a finished evaluation writes the JSON again and logs no second run.
    """
    from rich.console import Console
    from rich.markup import escape  # paths and messages are not markup

    from xrdmatch.training.evaluation import results_markdown

    # a table written to a file or a pipe keeps one line per method (a terminal gets its own width)
    console = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=160)
    err = Console(stderr=True)
    if from_json is not None:
        try:
            result = json.loads(Path(from_json).read_text())
            _check_result_shape(result)
        except (OSError, ValueError, KeyError, TypeError) as e:
            err.print(f"[red]{escape(f'--from-json {from_json}: not an evaluation result ({e})')}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(2) from None
        if markdown is not None and same_file(markdown, from_json):
            err.print(f"[red]{escape(f'--markdown {markdown} is the --from-json file: give another file name')}",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        _check_writable(markdown, "--markdown", err)
    else:
        overrides: dict = {"evaluation": {}}
        if run_dir is not None:
            overrides["run_dir"] = str(run_dir)
        if repeats is not None:
            overrides["evaluation"]["repeats"] = repeats
        if folds is not None:
            overrides["evaluation"]["folds"] = folds
        if threshold_selection is not None:
            overrides["evaluation"]["threshold_selection"] = threshold_selection.value
        _check_writable(out, "--out", err)  # now, not after hours of training
        _check_writable(markdown, "--markdown", err)
        result = _run(protocol, config, overrides, err, out, markdown)
        out = Path(result["out"])
        err.print(f"wrote {out}; MLflow run {result['mlflow_run_id']}", markup=False)
    _print_table(console, result)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(results_markdown(result))
        err.print(f"wrote {markdown}", markup=False)


def _check_result_shape(result) -> None:
    """The least a result needs to be rendered: the issue's shape, {"protocol": ..., "results":
    [{"method": ..., metric: number, ...}, ...]}; every other key is optional."""
    if not isinstance(result, dict):
        raise TypeError(f"the top level is a {type(result).__name__}, not an object")
    if result.get("protocol") not in (p.value for p in Protocol):
        raise ValueError(f"'protocol' is {result.get('protocol')!r}, not one of paper, grouped-cv")
    rows = result.get("results")
    if not isinstance(rows, list) or not rows:
        raise ValueError("'results' is not a non-empty list")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("method"), str):
            raise ValueError(f"results[{i}] has no 'method' name")


def _check_writable(path: Path | None, option: str, err) -> None:
    """Exit 2 naming ``path`` if a result file cannot be written there (a directory, a parent that
    is a file, no permission)."""
    import tempfile

    from rich.markup import escape

    if path is None:
        return
    try:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        blocked = next((d for d in path.parents if d.exists() and not d.is_dir()), None)
        if blocked is not None:
            raise NotADirectoryError(f"{blocked} is a file, not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        why = e.args[0] if len(e.args) == 1 else (e.strerror or e)
        err.print(f"[red]{escape(f'{option} {path}: cannot be written there ({why})')}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _run(protocol: Protocol, config: Path | None, overrides: dict, err, out: Path | None,
         markdown: Path | None = None) -> dict:
    """Run the protocol inside an MLflow run: the config as params, every method's metrics,
    the JSON and its confusion-matrix / PR / calibration PNGs as artifacts."""
    from rich.markup import escape

    from xrdmatch.config import ConfigError, load_config
    from xrdmatch.platform.tracking import log_evaluation, mlflow_run
    from xrdmatch.training.evaluation import evaluate_grouped_cv, evaluate_paper, write_json

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        err.print(f"[red]{escape(str(e))}")
        raise typer.Exit(2) from None
    check_run_dir(cfg.run_dir)
    check_out_not_input(out, cfg, config)  # e.g. the labels file: the result would replace it
    check_out_not_input(markdown, cfg, config, "--markdown")
    check_data_paths(cfg)
    fn = evaluate_paper if protocol == Protocol.paper else evaluate_grouped_cv
    try:
        key = evaluation_key(cfg, protocol.value)
    except (ValueError, *input_errors()) as e:  # a labels file or database that cannot be read: named
        err.print(f"[red]evaluate --protocol {protocol.value}: {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    earlier = _evaluate_runs(cfg, key)
    finished = next((r for r in earlier if r.info.status == "FINISHED"), None)
    if finished is not None:  # every member is cached: rewrite the JSON, log no second run
        result = _evaluate(fn, cfg, protocol, err)
        result["run_dir"] = str(Path(cfg.run_dir).resolve())
        out = out or _default_out(result, protocol)
        write_json(result, out)
        err.print(f"already evaluated with these settings, data and code: MLflow run {finished.info.run_id} "
                  "(nothing logged again)", highlight=False, soft_wrap=True)
        return result | {"out": str(out), "mlflow_run_id": finished.info.run_id}
    resume = earlier[0] if earlier else None  # a killed or failed evaluation of this key: reopen it
    if resume is not None:
        err.print(f"resuming MLflow run {resume.info.run_id} ({resume.info.status.lower()})", highlight=False,
                  soft_wrap=True)
    with mlflow_run(cfg, f"evaluate-{protocol.value}", tags={"xrdmatch.kind": "evaluate",
                                                             "evaluation.protocol": protocol.value,
                                                             "xrdmatch.eval_key": key},
                    resume_run_id=resume.info.run_id if resume else None) as run:
        result = _evaluate(fn, cfg, protocol, err)
        result["run_dir"] = str(Path(cfg.run_dir).resolve())
        out = out or _default_out(result, protocol)
        write_json(result, out)
        log_evaluation(result, out)
        data = result.get("data", {})
        import mlflow

        mlflow.set_tags({"lineage.labelled_hash": data.get("labelled_hash", ""),
                         "lineage.labelled_count": str(data.get("n_labelled", "")),
                         "lineage.unlabelled_hash": data.get("unlabelled_hash", ""),
                         "lineage.label_sources": f"paper={data.get('n_labelled', '')}"})
        result["out"] = str(out)
        result["mlflow_run_id"] = run.info.run_id
    return result


def _evaluate(fn, cfg, protocol: Protocol, err) -> dict:
    from rich.markup import escape

    from xrdmatch.training.evaluation import MemberTrainingError

    try:
        return fn(cfg, log_fn=lambda s: err.print(s, highlight=False, markup=False))
    except MemberTrainingError as e:  # the run failed, not its input (a RayTaskError can be a ValueError too)
        err.print(f"[red]evaluate --protocol {protocol.value}: {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    except (ValueError, *input_errors()) as e:  # impossible split / unknown method / unusable data: named
        err.print(f"[red]evaluate --protocol {protocol.value}: {escape(str(e))}")
        raise typer.Exit(2) from None


def evaluation_key(cfg, protocol: str) -> str:
    """What decides an evaluation's numbers: protocol, code, seeds, the labels file's and the
    database's contents, every setting that trains or scores a member, and the run directory
    (tracking servers are shared). A rerun with the same key reopens the killed run, or logs nothing
    when one finished."""
    import hashlib

    from xrdmatch.training.evaluation import training_config
    from xrdmatch.training.fingerprint import code_fingerprint

    from xrdmatch.config import resolve_path
    from xrdmatch.platform.data import load_labelled
    from xrdmatch.platform.paths import database_key

    blob = json.dumps({"protocol": protocol, "code": code_fingerprint(), "seed": cfg.seed,
                       "training": training_config(cfg).result_settings(),
                       **{k: getattr(cfg, k).model_dump(mode="json") for k in ("evaluation", "labels", "database", "xrd")},
                       # the contents, not only the paths: a corrected label is another evaluation
                       "labelled": load_labelled(cfg.labels.path).hash(),
                       "db": database_key(resolve_path(cfg.database.path), cfg.database.limit),
                       "run_dir": str(Path(cfg.run_dir).expanduser().resolve())},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _evaluate_runs(cfg, key: str) -> list:
    """MLflow evaluate runs of this key, newest first."""
    from xrdmatch.platform.tracking import configure, runs_tagged

    configure(cfg)
    return runs_tagged(cfg, {"xrdmatch.eval_key": key})


def _default_out(result: dict, protocol: Protocol) -> Path:
    return Path(result["run_dir"]) / "evaluation" / f"{protocol.value}.json"


def _print_table(console, result: dict) -> None:
    """The results table at the console's width without cutting a number: one line per method
    where it fits, else each std under its mean, else methods as columns (the paper protocol's
    eight columns at 80)."""
    from rich.markup import escape
    from rich.measure import Measurement
    from rich.table import Table

    from xrdmatch.training.evaluation import table_rows

    head, rows = table_rows(result)
    title = f"xrdmatch evaluate --protocol {result['protocol']}  ({result.get('wall_time_s', 0) / 60:.1f} min)"
    rows = [[escape(c) for c in r] for r in rows]  # method names of a --from-json file are user text

    def table(head: list[str], rows: list[list[str]], sep: str) -> Table:
        t = Table(title=title)
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*(c.replace(" ± ", sep) for c in r))
        return t

    def width(t: Table) -> int:
        return Measurement.get(console, console.options.update_width(10_000), t).maximum

    transposed = ([""] + [r[0] for r in rows], [[h] + [r[i] for r in rows] for i, h in enumerate(head) if i])
    tables = [table(head, rows, " ± "), table(head, rows, "\n± "), table(*transposed, "\n± ")]
    console.print(next((t for t in tables if width(t) <= console.width), min(tables, key=width)))
