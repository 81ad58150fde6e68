"""The ``xrdmatch`` command line. Each stage keeps its commands in its own module
(``xrdmatch/platform/cli_*.py``); heavy libraries are imported inside the commands so
that ``xrdmatch --help`` stays fast."""

from __future__ import annotations

import importlib

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


def _register() -> None:
    for module, attr, name in _COMMANDS:
        obj = getattr(importlib.import_module(module), attr)
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
