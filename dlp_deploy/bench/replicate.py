"""Replication: re-measure the pairs of an earlier sweep on the same machine kind, into a new run folder.

The new run reuses the earlier run's prepared models, evaluations and deployments (its folders are linked, not
copied, so nothing is pruned or exported again) and measures every pair afresh in bench/. Its results.json names
the earlier run (`replicates`), and the report marks each headline speedup as replicated or not
(stats.replication).
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from ..errors import UserError
from ..io import write_json_atomic
from .stats import machine_kind

PREPARED = ("models", "eval", "deploy")  # what the sweep's prepare steps leave; bench/ is measured anew


def check_machine_kind(earlier: dict, here: dict, what: str) -> None:
    """A speedup only replicates on the machine kind it was measured on; another CPU model or ISA is refused."""
    if machine_kind(earlier) != machine_kind(here):
        raise UserError(f"{what} was measured on {_kind_name(earlier)}; this machine is {_kind_name(here)}: "
                        "replicate it on a machine of the same kind")


def _kind_name(machine: dict) -> str:
    cpu, isa = machine_kind(machine)
    return f"{cpu} ({'/'.join(isa) or 'no ISA recorded'})"


def earlier_results(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file() or not (Path(run_dir) / "run.json").is_file():
        raise UserError(f"{run_dir} holds no finished sweep (run.json and results.json); give a RUN_DIR written "
                        "by `dlp-deploy sweep`")
    return json.loads(path.read_text())


def replicate_sweep_settings(earlier: Path, out: Path):
    """The earlier sweep's settings, with `out` set up to re-measure them: the machine kind checked, the prepared
    folders linked, and replicates.json naming the earlier run."""
    from ..provenance import machine_info
    from .sweep import SweepSettings

    earlier, out = Path(earlier).resolve(), Path(out)
    results = earlier_results(earlier)
    check_machine_kind(results["machine"], machine_info(), str(earlier))
    if out.resolve() == earlier:
        raise UserError(f"--out {out} is the run being replicated; choose a new folder")
    saved = json.loads((earlier / "run.json").read_text())["settings"]
    known = {f.name for f in fields(SweepSettings)}
    settings = SweepSettings(**{k: v for k, v in saved.items() if k in known})
    out.mkdir(parents=True, exist_ok=True)
    for name in PREPARED:
        link = out / name
        if not link.exists() and (earlier / name).is_dir():
            link.symlink_to(earlier / name, target_is_directory=True)
    write_json_atomic(out / "replicates.json", {"run": str(earlier)}, force=True)
    return settings
