"""Replication of `dlp-deploy bench`: re-measure the deployments of an earlier bench results file on the same
machine kind, and mark each re-measured speedup as replicated or not (stats.replication). The machine-kind check
is shared with the sweep's replication (pipeline/replicate.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..provenance import machine_info
from .records import BENCH_SCHEMA, load_results
from .stats import is_aa_control, machine_kind, replication, sparsity_speedup


def check_machine_kind(earlier: dict, here: dict, what: str) -> None:
    """A speedup only replicates on the machine kind it was measured on; another CPU model or ISA is refused."""
    if machine_kind(earlier) != machine_kind(here):
        raise UserError(f"{what} was measured on {_kind_name(earlier)}; this machine is {_kind_name(here)}: "
                        "replicate it on a machine of the same kind")


def _kind_name(machine: dict) -> str:
    cpu, isa = machine_kind(machine)
    return f"{cpu} ({'/'.join(isa) or 'no ISA recorded'})"


# ---------------------------------------------------------------- `dlp-deploy bench --replicate`

# what `bench` was asked (results["settings"]); each row's own settings hold the BenchSettings of its pair
BENCH_OPTIONS = ("deployments", "engines", "cores", "prompt_len", "gen_len", "batch", "runs", "warmup",
                 "external_cache", "rounds", "order", "order_seed")


def bench_results_file(path: Path) -> Path:
    """An earlier `bench --json` file, or a folder holding exactly one."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in sorted(path.glob("*.json")) if _is_bench(p)]
        if len(found) != 1:
            raise UserError(f"{path} holds {len(found)} bench results files; give the one to replicate "
                            "(the --json file of `dlp-deploy bench`)")
        return found[0].resolve()
    if not _is_bench(path):
        raise UserError(f"{path} is not a results file of `dlp-deploy bench`; give the --json file it wrote")
    return path.resolve()


def _is_bench(path: Path) -> bool:
    try:
        return path.is_file() and json.loads(path.read_text()).get("schema") == BENCH_SCHEMA
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def replicate_bench_options(path: Path) -> tuple[Path, dict, dict]:
    """(the earlier file, its results, the bench options that measured them), after the machine-kind check."""
    source = bench_results_file(path)
    earlier = load_results(source, BENCH_SCHEMA)
    check_machine_kind(earlier["machine"], machine_info(), str(source))
    options = earlier.get("settings") or _options_from_rows(earlier)
    missing = [d for d in options["deployments"] if not (Path(d) / "export.json").is_file()]
    if missing:
        raise UserError(f"{source} measured {missing[0]}, which is no longer a deployment folder; restore it or "
                        "bench the deployments anew")
    return source, earlier, options


def _options_from_rows(earlier: dict) -> dict:
    """Files from before results["settings"]: the options read back from the rows (measured pairs carry their
    BenchSettings; rounds from the rows' processes; the default order)."""
    rows = [r for r in earlier["results"] if not is_aa_control(r)]
    if not rows:
        raise UserError("the earlier bench file has no measured pair to replicate; bench the deployments anew")
    pairs = rows + [u for u in earlier.get("unmeasured", []) if not is_aa_control(u)]
    first = rows[0]["settings"]
    cores = sorted({r["settings"]["cores"] for r in rows if r["settings"]["cores"]})
    return {"deployments": list(dict.fromkeys(str(Path(r["model"]).resolve()) for r in pairs)),
            "engines": list(dict.fromkeys(r["engine"] for r in pairs)),
            "cores": None if not cores else cores[0] if len(cores) == 1 else cores,
            **{k: first[k] for k in ("prompt_len", "gen_len", "batch", "runs", "warmup", "external_cache")},
            "rounds": max(len(r.get("rounds") or []) for r in rows) or 1,
            "order": "abba", "order_seed": 0}


def mark_replication(earlier: list[dict], results: list[dict]) -> dict:
    """Each re-measured speedup gets `replication` (the earlier figure and whether it replicated: stats.replication);
    the summary counts the earlier wins and how many held."""
    pairs = replication(earlier, results)
    for p in pairs:
        old = sparsity_speedup(p["old"])
        p["new"]["replication"] = {"earlier": {"decode": old["decode"], "decode_ci95": old.get("decode_ci95"),
                                               "win": bool(p["old"].get("win"))},
                                   "replicated": p["replicated"]}
    claimed = [p for p in pairs if p["old"].get("win")]
    return {"pairs": len(pairs), "earlier_wins": len(claimed), "replicated": sum(p["replicated"] for p in claimed)}
