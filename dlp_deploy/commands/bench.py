"""`dlp-deploy bench`, `dlp-deploy sweep`, `dlp-deploy report`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..prune.structured import DEFAULT_IMPORTANCE


def bench_cmd(
    deployments: Annotated[Optional[list[Path]], typer.Argument(help="deployment folders made by `dlp-deploy "
                                                                     "export` (not with --replicate)")] = None,
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
    from ..io import check_writable

    check_writable(json_out, force)
    if replicate is not None:  # the earlier run's options: the ones above are not read
        from ..bench.replicate import replicate_bench_options

        if deployments:
            raise UserError("give deployment folders or --replicate FILE, not both: a replication measures the "
                            "earlier run's deployments")
        source, earlier, options = replicate_bench_options(replicate)
    elif not deployments:
        raise UserError("give deployment folders, or --replicate FILE to re-measure an earlier bench run")
    else:
        source = earlier = None
        options = {"deployments": [str(d.resolve()) for d in deployments], "engines": engine or ["deepsparse",
                   "onnxruntime"], "cores": _cores(cores), "prompt_len": prompt_len, "gen_len": gen_len,
                   "batch": batch, "runs": runs, "warmup": warmup, "external_cache": external_cache,
                   "rounds": rounds, "order": _order(order), "order_seed": order_seed}
    _run_bench(options, json_out, force, source, earlier)


def _run_bench(o: dict, json_out: Path, force: bool, source: Path | None, earlier: dict | None) -> None:
    """Measure the options' pairs interleaved and write the results file (naming `source` when this run
    replicates it)."""
    from ..bench.harness import BenchSettings, bench_report, check_settings, core_counts, machine_block
    from ..bench.replicate import mark_replication
    from ..bench.schedule import merge_rounds, run_interleaved
    from ..bench.stats import attach_speedups
    from ..export.deployment import load_deployment
    from ..io import write_json_atomic
    from ..progress import console, progress_bar
    from ..provenance import provenance

    deployments, engines, counts, rounds = o["deployments"], o["engines"], o["cores"], o["rounds"]
    prompt_len, gen_len, batch, runs, warmup, external_cache = (o[k] for k in (
        "prompt_len", "gen_len", "batch", "runs", "warmup", "external_cache"))
    plan = [(load_deployment(d), BenchSettings(e, c, prompt_len, gen_len, batch, runs, warmup, external_cache))
            for d in deployments for e in engines for c in core_counts(counts)]
    for dep, settings in plan:
        check_settings(settings, dep.seq_len)
    measured_models = len(plan)
    plan += _aa_plan(plan) if len(deployments) > 1 else []
    with progress_bar() as progress:
        task = progress.add_task("benchmarking", total=len(plan) * rounds)
        measured = run_interleaved(len(plan), rounds, o["order"], o["order_seed"],
                                   lambda r, i: _measure(*plan[i]),
                                   on_done=lambda r, i: progress.advance(task))
    _mark_aa(measured[measured_models:])
    # a pair whose engine crashed in any round has no figures; it is named instead, as the sweep names it
    failed = [next((r["unmeasured"] for r in m if "unmeasured" in r), None) for m in measured]
    unmeasured = [f for f in failed if f is not None]
    results = [merge_rounds(m) for m, f in zip(measured, failed) if f is None]
    _unique_labels(results)
    attach_speedups(results)
    report = {**bench_report(results, machine_block(counts), unmeasured), "settings": o,
              "provenance": provenance(**({"replicates": str(source)} if source else {}))}
    if earlier is not None:
        report.update(replicates=str(source), replication=mark_replication(earlier["results"], results))
    write_json_atomic(json_out, report, force)
    console.print(results_table(results))
    if earlier is not None:
        r = report["replication"]
        console.print(f"replicates {source}: {r['replicated']} of the {r['earlier_wins']} speedups it called wins "
                      "replicated")
    for u in unmeasured:
        console.print(f"not measured: {u['label']} on {u['engine']} ({u['kv_cache']} KV cache): {u['reason']}",
                      markup=False)


def _measure(dep, settings) -> dict:
    """One round of one pair, or {"unmeasured": what names the pair and how its engine failed}."""
    from ..bench.harness import bench_pair_subprocess, pair_identity
    from ..runtime.worker import EngineFailure

    try:
        return bench_pair_subprocess(dep.folder, settings)
    except EngineFailure as exc:
        return {"unmeasured": {"label": dep.folder.name, "model": str(dep.folder), **pair_identity(settings),
                               "reason": str(exc), **exc.record}}


def _aa_plan(plan: list[tuple]) -> list[tuple]:
    """The A/A control: the first dense deployment measured again on every engine and core count, last in each
    round (ABBA then puts it at the other end from the dense pair it is compared with)."""
    from ..bench.stats import is_dense

    def dense(dep) -> bool:
        zeros = dep.info.get("weight_sparsity") or {}
        return is_dense({"source": dep.info.get("source"), "sparsity": zeros.get("global", 0.0),
                         "pytorch_sparsity": zeros.get("pytorch_global")})

    first = next((dep for dep, _ in plan if dense(dep)), None)
    return [(dep, settings) for dep, settings in plan if dep is first]


def _mark_aa(measured: list[list[dict]]) -> None:
    """Label the A/A pairs' rounds (and their unmeasured records) as the control, before they are merged."""
    from ..bench.stats import AA_SUFFIX

    for rounds in measured:
        for r in rounds:
            record = r.get("unmeasured", r)
            record["label"] = record["label"] + AA_SUFFIX
            r["aa_control"] = True


def _unique_labels(results: list[dict]) -> None:
    """Folder names label results; where two deployments share a name, their paths do."""
    paths: dict[str, set] = {}
    for r in results:
        paths.setdefault(r["label"], set()).add(r["model"])
    for r in results:
        if len(paths[r["label"]]) > 1:
            r["label"] = r["model"]


def results_table(results: list[dict]):
    """The figures a person compares; p90/p99, RSS and compile time are in the JSON and the report."""
    from rich.table import Table

    from ..bench.stats import core_counts_in, cores_of, removed_share, sparsity_speedup

    several = len(core_counts_in(results)) > 1
    table = Table("model", "engine", *(["cores"] if several else []), "removed", "prefill ms", "decode ms", "tok/s",
                  "speedup (95% CI)", caption="decode speedups against the dense deployment in the same precision "
                  "on the same engine" + (" and cores" if several else ""))
    for r in results:
        speed = sparsity_speedup(r)
        ci = (speed or {}).get("decode_ci95")
        table.add_row(r["label"], f"{r['engine']}/{r['kv_cache'][:3]} {r.get('precision', 'fp32')}",
                      *([str(cores_of(r))] if several else []), f"{removed_share(r):.0%}",
                      f"{r['prefill_ms']:.1f}", f"{r['decode_ms']['median']:.2f}", f"{r['decode_tokens_per_s']:.1f}",
                      "—" if not speed else f"{speed['decode']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
    return table


def _floats(csv: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in csv.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {csv!r} is not a comma list of numbers, e.g. 0.1,0.5,0.9") from None


def _cores(text: str | None) -> int | list[int] | None:
    """--cores N, or N,M,… to measure at every count; one distinct count stays an int, so sweep folders from
    before lists resume with the same settings. Checked against the usable cores before any work starts."""
    from ..bench.harness import check_cores

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


def _precisions(csv: str) -> list[str]:
    from ..bench.sweep import precision_format

    names = _names(csv)
    if not names:
        raise UserError(f"--precision {csv!r}: give fp32, int8, a GGUF format (q4_1, q8_0, ...) or a comma list")
    for name in names:
        precision_format(name)
    return names


def _order(name: str) -> str:
    from ..bench.schedule import ORDERS

    if name not in ORDERS:
        raise UserError(f"--order {name!r}: choose {' or '.join(ORDERS)}")
    return name


def _names(csv: str) -> list[str]:
    return [x.strip() for x in csv.split(",") if x.strip() and x.strip() != "none"]


def _allocations(csv: str) -> list[str]:
    """Like _names, but an allocation expression keeps its own commas (expr:abslog>var>atan,asin)."""
    from ..prune.allocate import split_allocations

    return split_allocations(csv)


def _depth(csv: str | None) -> list[str]:
    from ..prune.depth import REPLACEMENTS

    names = [x.strip() for x in (csv or "").split(",") if x.strip()]  # "none" is a replacement here
    unknown = [n for n in names if n not in REPLACEMENTS]
    if unknown:
        raise UserError(f"--depth {','.join(unknown)}: choose replacements from {', '.join(REPLACEMENTS)}")
    return names


def sweep_cmd(
    out: Annotated[Path, typer.Option(help="run folder; an interrupted sweep resumes from it")],
    model: Annotated[Optional[str], typer.Argument(help="HF folder, hub id or alias (smollm2-135m); not with "
                                                        "--replicate")] = None,
    sparsities: str = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
    method: str = "wanda",
    allocation: str = "dlp",
    baseline: Annotated[str, typer.Option(help="comparison allocations, comma list, or none")] = "uniform",
    engines: str = "deepsparse,onnxruntime",
    calib: str = "c4",
    nsamples: int = 128,
    calib_seqlen: Annotated[Optional[int], typer.Option(help="calibration window; default min(2048, the model's "
                                                             "context)")] = None,
    seed: int = 0,
    ppl: str = "wikitext2",
    eval_seqlen: Annotated[Optional[int], typer.Option(help="perplexity window; default min(2048, the model's "
                                                            "context)")] = None,
    max_windows: Optional[int] = None,
    seq_len: Annotated[int, typer.Option(help="export window (prompt + generated tokens)")] = 512,
    validate: Annotated[bool, typer.Option(help="check each export against PyTorch")] = True,
    cores: Annotated[Optional[str], typer.Option(help="cores (default: all usable), or a comma list (1,2): every "
                                                      "pair measured at each count")] = None,
    prompt_len: int = 64,
    gen_len: int = 128,
    runs: int = 5,
    warmup: int = 1,
    external_cache: bool = False,
    device: str = "cpu",
    data_dir: Optional[Path] = None,
    pattern: Annotated[str, typer.Option(help="comma list of forms: unstructured, N:M (N kept of every M; once, "
                                                         "uniform), mixed:M")]
    = "unstructured",
    structure: Annotated[Optional[str], typer.Option(help="also structured pruning of heads,channels")] = None,
    structure_sparsities: Annotated[Optional[str], typer.Option(help="structured levels (default: --sparsities)")]
    = None,
    structure_allocations: Annotated[Optional[str], typer.Option(help="structured allocations (default: "
                                                                      "--allocation and --baseline)")] = None,
    importance: Annotated[str, typer.Option(help="structured importances, comma list: taylor, activation")]
    = DEFAULT_IMPORTANCE,
    multiple: Annotated[int, typer.Option(help="structured: MLP widths a multiple of this")] = 8,
    precision: Annotated[str, typer.Option(help="comma list: fp32, int8 (ONNX), f16, q8_0, q4_0, q4_1, q4_k_m "
                                                "(GGUF for --engines llamacpp); each level exported in each")] = "fp32",
    rounds: Annotated[int, typer.Option(min=1, help="worker processes per measured pair, interleaved; the "
                                                    "bootstrap resamples processes")] = 3,
    order: Annotated[str, typer.Option(help="abba or shuffle")] = "abba",
    order_seed: int = 0,
    alpha: Annotated[Optional[float], typer.Option(help="DLP spread for every DLP level (default: the paper's "
                                                        "App. G value per sparsity)")] = None,
    depth: Annotated[Optional[str], typer.Option(help="also depth pruning (LLM-Streamline) with these "
                                                      "replacements, comma list: none, ffn, swiglu, layer")] = None,
    depth_ratio: Annotated[float, typer.Option(help="share of decoder layers the depth levels cut")] = 0.25,
    recover: Annotated[Optional[str], typer.Option(help="also a LoRA-recovered twin (label+recovery) of every "
                                                        "level whose label matches, comma list of patterns "
                                                        "(wanda-dlp-0.70, streamline-*)")] = None,
    recover_steps: Annotated[int, typer.Option(min=1, help="recovery optimizer steps (4 windows each)")] = 100,
    bench_timeout: Annotated[Optional[float], typer.Option(help="seconds one benchmark (compile and runs) may "
                                                                "take; a pair past it is reported as not measured "
                                                                "and the sweep goes on (default: no limit)")] = None,
    prepare_only: Annotated[bool, typer.Option("--prepare-only", help="prune, evaluate and export, then stop "
                                               "before measuring (e.g. while another benchmark runs)")] = False,
    executor: Annotated[str, typer.Option(help="where the work runs: local (this process) or ray (a Ray cluster; "
                                               "needs dlp-deploy[ray] and a run folder every node sees)")] = "local",
    address: Annotated[Optional[str], typer.Option(help="ray: the cluster (auto, or ray://HOST:10001); default: "
                                                        "start a local Ray cluster for this sweep")] = None,
    prune_gpus: Annotated[Optional[float], typer.Option(help="ray: GPUs per prepare task, whose prune then runs "
                                                             "on cuda (default 0: CPUs only)")] = None,
    prepare_cpus: Annotated[Optional[float], typer.Option(help="ray: CPUs per prepare task (default 1)")] = None,
    retries: Annotated[Optional[int], typer.Option(help="ray: retries of a task whose worker dies or fails "
                                                        "(default 2; an input error is never retried)")] = None,
    replicate: Annotated[Optional[Path], typer.Option(help="re-measure the pairs of this earlier sweep (same "
                                                           "machine kind; its settings and prepared folders) into "
                                                           "--out; the report marks which speedups replicated")]
    = None,
) -> None:
    """prune -> eval -> export -> bench at each sparsity and form (and dense), one results.json for `report`."""
    import os

    from ..bench.executors import get_executor
    from ..bench.sweep import SweepSettings, run_sweep
    from ..progress import console, progress_bar, quiet_transformers

    if data_dir:
        os.environ["DLP_DEPLOY_DATA"] = str(data_dir)
    get_executor(executor)  # an unknown name answers before any work
    settings = SweepSettings(model, _floats(sparsities, "--sparsities"), method,
                             _allocations(allocation)
                             + [b for b in _allocations(baseline) if b not in _allocations(allocation)],
                             _names(engines), calib, nsamples, calib_seqlen, seed, _names(ppl), eval_seqlen,
                             max_windows, seq_len, validate, _cores(cores), prompt_len, gen_len, runs, warmup,
                             external_cache, device, _names(pattern), structure,
                             _floats(structure_sparsities, "--structure-sparsities") if structure_sparsities else None,
                             _allocations(structure_allocations) if structure_allocations else None,
                             _names(importance),
                             multiple, _precisions(precision), rounds, _order(order), order_seed, alpha,
                             _depth(depth), depth_ratio, _names(recover) if recover else [], recover_steps,
                             bench_timeout)
    if replicate is not None:  # the earlier run's settings: the options above are not read
        from ..bench.replicate import replicate_sweep_settings

        settings = replicate_sweep_settings(replicate, out)
    elif model is None:
        raise UserError("give MODEL, or --replicate RUN_DIR to re-measure an earlier sweep")
    elif calib_seqlen is None or eval_seqlen is None:
        # min(2048, the model's context), resolved now (after the option checks, which answer before any work)
        # so that run.json and the report hold the number
        from dataclasses import replace

        from ..data import default_seqlen
        from ..models import load_config

        window = default_seqlen(load_config(model)[1])
        settings = replace(settings, calib_seqlen=calib_seqlen or window, eval_seqlen=eval_seqlen or window)
    quiet_transformers()
    with progress_bar() as progress:
        # markup=False: the log's "[label] ..." would otherwise be read as a style tag and vanish
        report = run_sweep(settings, out, progress, log=lambda message: console.print(message, markup=False),
                           prepare_only=prepare_only,
                           executor=executor, executor_options={"address": address, "prune_gpus": prune_gpus,
                                                                "prepare_cpus": prepare_cpus, "retries": retries})
    if report is None:
        return
    console.print(results_table(report["results"]))
    for u in report["unmeasured"]:
        console.print(f"not measured: {u['label']} ({u['precision']}) on {u['engine']} ({u['kv_cache']} KV "
                      f"cache): {u['reason']}", markup=False)
    console.print(f"results: {out / 'results.json'}  (next: dlp-deploy report {out} --out REPORT_DIR)")


def report_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders written by `dlp-deploy sweep`, or with "
                                                        "--rewrite one report folder")],
    out: Annotated[Optional[Path], typer.Option(help="report folder (report.md, report.html, PNG plots)")] = None,
    force: bool = False,
    rewrite: Annotated[bool, typer.Option(help="regenerate the report in RUN_DIR from its own results.json, in "
                                               "place (files it does not write stay)")] = False,
) -> None:
    """Markdown + self-contained HTML speedup report with plots and Table-5-style rows."""
    from ..report.render import make_report, rewrite_report

    if rewrite:
        if out is not None or len(run_dirs) != 1:
            raise UserError("--rewrite regenerates one report folder in place: give that folder alone, no --out")
        folder = rewrite_report(run_dirs[0])
    elif out is None:
        raise UserError("give --out REPORT_DIR, or --rewrite to regenerate a report folder in place")
    else:
        folder = make_report(run_dirs, out, force)
    typer.echo(folder / "report.md")


COMMANDS = {"bench": bench_cmd, "sweep": sweep_cmd, "report": report_cmd}
