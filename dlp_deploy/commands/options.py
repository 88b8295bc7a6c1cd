"""Option parsing that several commands share: comma lists, core counts, the measuring order, the data folder,
enum options."""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..bench.harness import check_cores
from ..bench.schedule import ORDERS
from ..errors import UserError

DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="offline corpora folder (else env "
                                                 "DLP_DEPLOY_DATA, else the hub)")]
AutoDevice = Annotated[str, typer.Option(help="torch device: auto (CUDA when present, else cpu), cpu, cuda, "
                                              "cuda:1 …")]


def enum_value(x):
    """An enum option's value (typer passes the member; a direct call may pass the string)."""
    return x.value if isinstance(x, enum.Enum) else x


def parse_floats(csv: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in csv.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {csv!r} is not a comma list of numbers, e.g. 0.1,0.5,0.9") from None


def parse_names(csv: str) -> list[str]:
    return [x.strip() for x in csv.split(",") if x.strip() and x.strip() != "none"]


def parse_cores(text: str | None) -> int | list[int] | None:
    """--cores N, or N,M,… to measure at every count; one distinct count stays an int, so sweep folders from
    before lists resume with the same settings. Checked against the usable cores before any work starts."""
    if text is None:
        return None
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--cores {text!r} is not a core count or a comma list of them, e.g. 2 or 1,2") from None
    if not counts:
        raise UserError(f"--cores {text!r} names no core count; give e.g. 2 or 1,2")
    cores = counts[0] if len(counts) == 1 else counts
    check_cores(cores)
    return cores


def parse_order(name: str) -> str:
    if name not in ORDERS:
        raise UserError(f"--order {name!r}: choose {' or '.join(ORDERS)}")
    return name
