"""The ``xrdmatch`` command line. Each stage keeps its commands in its own module
(``xrdmatch/platform/cli_*.py``); heavy libraries are imported inside the commands so
that ``xrdmatch --help`` stays fast."""

from __future__ import annotations

import importlib
import inspect

import typer

app = typer.Typer(
    name="xrdmatch",
    help="Find lithium superionic conductors: XRD patterns -> XRDMatch -> MD validation -> new labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (module, attribute, command name); a Typer attribute becomes a command group.
_COMMANDS = [
    ("xrdmatch.platform.cli_xrd", "xrd", "xrd"),
    ("xrdmatch.platform.cli_train", "train", "train"),
    ("xrdmatch.platform.cli_evaluate", "evaluate", "evaluate"),
    ("xrdmatch.platform.cli_screen", "screen", "screen"),
    ("xrdmatch.platform.cli_models", "models", "models"),
    ("xrdmatch.platform.cli_models", "promote", "promote"),
    ("xrdmatch.platform.cli_models", "predict", "predict"),
    ("xrdmatch.platform.cli_models", "ui", "ui"),
    ("xrdmatch.platform.cli_validate", "app", "validate"),
    ("xrdmatch.platform.cli_labels", "app", "labels"),
    ("xrdmatch.platform.cli_campaign", "app", "campaign"),
]


def _reflow(doc: str | None) -> str | None:
    """A docstring's paragraphs as single lines: typer's rich help keeps each source line break,
    and a terminal narrower than the source wraps every line again (a ragged help text).
    Paragraphs with indented or bulleted lines keep their lines."""
    if not doc:
        return doc
    paras = inspect.cleandoc(doc).replace("``", "`").split("\n\n")  # reST literals read as markdown ones
    keep = [any(ln[:1].isspace() or ln.lstrip().startswith(("- ", "* ", "\b")) for ln in p.splitlines()) for p in paras]
    return "\n\n".join(p if k else " ".join(ln.strip() for ln in p.splitlines()) for p, k in zip(paras, keep))


def _reflow_help(t: typer.Typer) -> None:
    for info in t.registered_commands:
        info.help = _reflow(info.help or (info.callback.__doc__ if info.callback else None))
    for group in t.registered_groups:
        _reflow_help(group.typer_instance)


def _register() -> None:
    for module, attr, name in _COMMANDS:
        obj = getattr(importlib.import_module(module), attr)
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)
    _reflow_help(app)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
