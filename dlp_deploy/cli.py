"""The `dlp-deploy` command line. Each stage module owns its commands; this file only mounts them and turns
UserError into a one-line message (exit 2) instead of a traceback."""
from __future__ import annotations

import errno
import os
import signal
import sys

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # DeepSparse phones home on import otherwise

import typer
from rich.console import Console
from rich.markup import escape

from .commands import (bench, evaluate, export, generate, models, plan, prune, recover, report, search, streamline,
                       sweep)
from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune causal LMs with DLP and baselines, export them to ONNX with a KV cache, "
                       "and measure what the sparsity buys on CPU engines.")
err = Console(stderr=True)


def _mount() -> None:
    app.add_typer(models.app, name="models")
    # the order --help lists them in: a model's way from pruning to a measured deployment
    for module in (prune, evaluate, search, streamline, recover, export, generate, bench, sweep, report, plan):
        for name, fn in module.COMMANDS.items():
            app.command(name)(fn)


def main() -> None:
    # a killed run unwinds like Ctrl-C, so atomic writers remove their temp folders
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _mount()
    try:
        app()  # standalone: click reports usage errors itself and exits 2
    except UserError as exc:
        # escaped: a message may hold brackets (pip install 'dlp-deploy[ray]', a [label]) that are no markup
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        # a full disk is the machine's state, not a bug: say where, and what to do (the temp output is gone)
        where = exc.filename2 or exc.filename or "the output"
        err.print(f"[bold red]error:[/] no space left on the device while writing {escape(str(where))}; free space "
                  "there (a 1B+ model folder takes 4 bytes per parameter in fp32) or write to another --out",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
