"""`xrdmatch train` and `xrdmatch evaluate` (owner: training)."""
import typer


def train() -> None:
    """Train the XRDMatch ensemble (Ray Train) and save / register it."""
    raise typer.Exit("not implemented yet")


def evaluate() -> None:
    """Evaluate methods with the paper's protocol or honest grouped CV."""
    raise typer.Exit("not implemented yet")
