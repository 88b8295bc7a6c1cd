"""Replication of a sweep: re-measure the pairs of an earlier sweep on the same machine kind, into a new run folder.

The new run reuses the earlier run's prepared models, evaluations and deployments (its folders are linked, not
copied, so nothing is pruned or exported again) and measures every pair afresh in bench/. Its results.json names
the earlier run (`replicates`), and the report marks each headline speedup as replicated or not
(stats.replication). `dlp-deploy bench --replicate` is bench/replicate.py's.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..bench.records import SWEEP_SCHEMA, load_results
from ..bench.replicate import check_machine_kind
from ..errors import UserError
from ..io import write_json_atomic
from ..provenance import machine_info
from .levels import FLAT, SweepSettings

PREPARED = ("models", "eval", "deploy")  # what the sweep's prepare steps leave; bench/ is measured anew


def earlier_results(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file() or not (Path(run_dir) / "run.json").is_file():
        raise UserError(f"{run_dir} holds no finished sweep (run.json and results.json); give a RUN_DIR written "
                        "by `dlp-deploy sweep`")
    return load_results(path, SWEEP_SCHEMA)


def replicate_sweep_settings(earlier: Path, out: Path):
    """The earlier sweep's settings, with `out` set up to re-measure them: the machine kind checked, the prepared
    folders linked, and replicates.json naming the earlier run."""
    earlier, out = Path(earlier).resolve(), Path(out)
    results = earlier_results(earlier)
    check_machine_kind(results["machine"], machine_info(), str(earlier))
    if out.resolve() == earlier:
        raise UserError(f"--out {out} is the run being replicated; choose a new folder")
    saved = json.loads((earlier / "run.json").read_text())["settings"]
    settings = SweepSettings.from_flat({k: v for k, v in saved.items() if k in FLAT})
    out.mkdir(parents=True, exist_ok=True)
    for name in PREPARED:
        link = out / name
        if not link.exists() and (earlier / name).is_dir():
            link.symlink_to(earlier / name, target_is_directory=True)
    write_json_atomic(out / "replicates.json", {"run": str(earlier)}, force=True)
    return settings
