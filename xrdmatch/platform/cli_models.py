"""`xrdmatch models`, `predict`, `ui` (owner: MLflow registry)."""
import typer


def models() -> None:
    """List registered model versions with aliases, metrics and label counts."""
    raise typer.Exit("not implemented yet")


def predict() -> None:
    """Predict superionic probability for structures or measured patterns."""
    raise typer.Exit("not implemented yet")


def ui() -> None:
    """Start the MLflow UI on the run directory's store (127.0.0.1)."""
    raise typer.Exit("not implemented yet")
