"""`xrdmatch evaluate` (owner: evaluation)."""
import typer


def evaluate() -> None:
    """Evaluate methods with the paper's protocol or honest grouped CV."""
    raise typer.Exit("not implemented yet")
