"""`dlp-deploy models …`: built-in model aliases, local GGUF files, random-weight shapes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..io import atomic_dir, check_writable
from ..models import ALIASES, GGUF_SOURCE_FILE, fetch_gguf, models_dir
from ..progress import console, quiet_transformers
from ..testing import RANDOM_DTYPES, RANDOM_SHAPES, random_llama_folder

app = typer.Typer(no_args_is_help=True, help="Built-in model aliases and local GGUF files, dequantized into the "
                                             "cache dir as plain HF folders.")


@app.command("fetch")
def fetch(
    model: Annotated[str, typer.Argument(help=f"alias ({', '.join(ALIASES)}) or the path of a local .gguf file")],
    name: Annotated[Optional[str], typer.Option("--name", help="GGUF only: the name later commands take as MODEL "
                                                               "(default: the file stem, lower case)")] = None,
    force: Annotated[bool, typer.Option("--force", help="GGUF only: replace a folder already fetched under this "
                                                        "name from another file")] = False,
) -> None:
    """Dequantize an alias's or a local GGUF into a plain HF folder in the cache dir; print the folder."""
    is_alias = model in ALIASES
    if not is_alias and not (model.lower().endswith(".gguf") or Path(model).expanduser().is_file()):
        raise UserError(f"unknown model alias {model!r}; choose from {', '.join(ALIASES)}, or give the path of a "
                        "local .gguf file")
    if is_alias and (name is not None or force):
        raise UserError(f"--name and --force apply to local GGUF files; the alias {model!r} is always fetched "
                        f"as {model}")
    quiet_transformers()
    with console.status(f"fetching {model}"):
        folder = ALIASES[model].fetch() if is_alias else fetch_gguf(model, name, force)
    typer.echo(folder)


@app.command("list")
def list_aliases() -> None:
    """Show each alias and whether it is fetched, then every name fetched from a local GGUF."""
    for name, alias in ALIASES.items():
        state = "fetched" if (alias.folder() / "config.json").is_file() else "not fetched"
        typer.echo(f"{name}\t{state}\t{alias.folder()}")
    for record in sorted(models_dir().glob(f"*/{GGUF_SOURCE_FILE}")):
        if record.parent.name in ALIASES:  # an alias records its GGUF too; it is listed above
            continue
        typer.echo(f"{record.parent.name}\tfrom {json.loads(record.read_text())['gguf']}\t{record.parent}")


@app.command("random")
def random_model(
    shape: Annotated[str, typer.Argument(help="a LLaMA shape: llama-1b (TinyLlama-1.1B's), llama-350m, llama-1.5b")],
    out: Annotated[str, typer.Option("--out", help="HF folder to create")],
    seed: Annotated[int, typer.Option(help="weight seed")] = 0,
    dtype: Annotated[str, typer.Option(help="stored dtype: fp32, bf16, fp16")] = "fp32",
    max_shard_size: Annotated[Optional[str], typer.Option(help="shard the weights, e.g. 500MB (default: "
                                                                "transformers' own)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """Save a random-weight LLaMA of a real model's shape with a byte-level tokenizer: for speed measurements in
    the regime where weights stream from DRAM (its perplexity means nothing)."""
    if shape not in RANDOM_SHAPES:
        raise UserError(f"unknown shape {shape!r}; choose from {', '.join(RANDOM_SHAPES)}")
    if dtype not in RANDOM_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose from {', '.join(RANDOM_DTYPES)}")
    check_writable(Path(out), force)
    with atomic_dir(Path(out), force) as tmp:
        random_llama_folder(tmp, shape, seed, dtype, max_shard_size)
    typer.echo(out)
