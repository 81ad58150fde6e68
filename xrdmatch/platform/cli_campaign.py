"""`xrdmatch campaign run|status|report` (owner: campaign)."""
import typer

app = typer.Typer(help="Active-learning campaign: screen, select, validate, relabel, retrain.", no_args_is_help=True)
