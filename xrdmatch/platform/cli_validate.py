"""`xrdmatch validate submit|work|status` (owner: MD validation queue)."""
import typer

app = typer.Typer(help="MD validation queue: submit candidates, run workers, show status.", no_args_is_help=True)
