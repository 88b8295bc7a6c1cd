"""`dlp-deploy bench`: deployments measured on engines in interleaved worker processes."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..bench.replicate import replicate_bench_options
from ..bench.run import run_bench, split_engine_suffix
from ..errors import UserError
from ..io import check_writable, write_json_atomic
from ..progress import console, progress_bar
from ..report.console import results_table
from .options import parse_cores, parse_order


def bench_cmd(
    deployments: Annotated[Optional[list[Path]], typer.Argument(help="deployment folders made by `dlp-deploy "
                                                                     "export` (not with --replicate); FOLDER@ENGINE "
                                                                     "measures it on that engine only")] = None,
    # `...`: required (a default only because the optional deployments come first)
    json_out: Annotated[Path, typer.Option("--json", help="results file (must not exist unless --force)")] = ...,
    engine: Annotated[list[str], typer.Option(help="deepsparse and/or onnxruntime (repeat the option)")] = None,
    cores: Annotated[Optional[str], typer.Option(help="cores for every engine (default: all usable), or a comma "
                                                      "list (1,2) to measure each at every count")] = None,
    prompt_len: int = 64,
    gen_len: int = 128,
    batch: int = 1,
    runs: int = 5,
    warmup: int = 1,
    external_cache: Annotated[bool, typer.Option(help="DeepSparse: carry the KV cache in Python, not inside "
                                                      "the engine")] = False,
    rounds: Annotated[int, typer.Option(min=1, help="worker processes per (deployment, engine), interleaved; the "
                                                    "bootstrap resamples processes")] = 3,
    order: Annotated[str, typer.Option(help="abba (every other round reversed) or shuffle")] = "abba",
    order_seed: int = 0,
    replicate: Annotated[Optional[Path], typer.Option(help="re-measure the deployments of this earlier bench "
                                                           "results file (same machine kind, its settings); the "
                                                           "new file names it and marks which speedups "
                                                           "replicated")] = None,
    force: bool = False,
) -> None:
    """Time generation (prefill, per-token decode, throughput) of each deployment on each engine, in interleaved
    rounds; speedups against the dense fp32 and dense INT8 deployments with bootstrap confidence intervals."""
    check_writable(json_out, force)
    if replicate is not None:  # the earlier run's options: the ones above are not read
        if deployments:
            raise UserError("give deployment folders or --replicate FILE, not both: a replication measures the "
                            "earlier run's deployments")
        source, earlier, options = replicate_bench_options(replicate)
    elif not deployments:
        raise UserError("give deployment folders, or --replicate FILE to re-measure an earlier bench run")
    else:
        source = earlier = None
        options = {"deployments": [_resolved(d) for d in deployments], "engines": engine or ["deepsparse",
                   "onnxruntime"], "cores": parse_cores(cores), "prompt_len": prompt_len, "gen_len": gen_len,
                   "batch": batch, "runs": runs, "warmup": warmup, "external_cache": external_cache,
                   "rounds": rounds, "order": parse_order(order), "order_seed": order_seed}
    with progress_bar() as progress:
        report = run_bench(options, source, earlier, progress)
    write_json_atomic(json_out, report, force)
    console.print(results_table(report["results"]))
    if earlier is not None:
        r = report["replication"]
        console.print(f"replicates {source}: {r['replicated']} of the {r['earlier_wins']} speedups it called wins "
                      "replicated")
    for u in report.get("not_run", []):
        console.print(f"not run: {u['label']} on {u['engine']}: {u['reason']}", markup=False)
    for u in report["unmeasured"]:
        console.print(f"not measured: {u['label']} on {u['engine']} ({u['kv_cache']} KV cache): {u['reason']}",
                      markup=False)


def _resolved(deployment: Path) -> str:
    """An absolute folder, keeping a FOLDER@ENGINE suffix."""
    folder, engine = split_engine_suffix(str(deployment))
    return str(Path(folder).resolve()) + (f"@{engine}" if engine else "")


COMMANDS = {"bench": bench_cmd}
