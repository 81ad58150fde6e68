"""`xrdmatch train` (owner: training)."""
import typer


def train() -> None:
    """Train the XRDMatch ensemble (Ray Train) and save / register it."""
    raise typer.Exit("not implemented yet")

