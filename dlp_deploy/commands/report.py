"""`dlp-deploy report`: Markdown and HTML from sweep results, or a report regenerated in place."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..report.render import make_report, rewrite_report


def report_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders written by `dlp-deploy sweep`, or with "
                                                        "--rewrite one report folder")],
    out: Annotated[Optional[Path], typer.Option(help="report folder (report.md, report.html, PNG plots)")] = None,
    force: bool = False,
    rewrite: Annotated[bool, typer.Option(help="regenerate the report in RUN_DIR from its own results.json, in "
                                               "place (files it does not write stay)")] = False,
) -> None:
    """Markdown + self-contained HTML speedup report with plots and Table-5-style rows."""
    if rewrite:
        if out is not None or len(run_dirs) != 1:
            raise UserError("--rewrite regenerates one report folder in place: give that folder alone, no --out")
        folder = rewrite_report(run_dirs[0])
    elif out is None:
        raise UserError("give --out REPORT_DIR, or --rewrite to regenerate a report folder in place")
    else:
        folder = make_report(run_dirs, out, force)
    typer.echo(folder / "report.md")


COMMANDS = {"report": report_cmd}
