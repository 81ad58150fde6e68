"""`xrdmatch xrd`: XRD patterns of a whole database (owner: XRD stage)."""
import typer


def xrd() -> None:
    """Compute XRD patterns of a whole structure database with Ray actors (Parquet shards)."""
    raise typer.Exit("not implemented yet")
