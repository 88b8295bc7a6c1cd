"""`dlp-deploy sweep`: prune -> eval -> export -> bench at every level and form, one results.json for `report`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..pipeline.executors import get_executor
from ..bench.harness import BenchSettings
from ..eval.evaluate import EvalSettings
from ..export.deployment import ExportSettings
from ..pipeline.levels import FLAT, SweepSettings, precision_format, resolve_windows
from ..pipeline.replicate import replicate_sweep_settings
from ..pipeline.sweep import apply_recipe, read_recipe, run_sweep
from ..progress import console, progress_bar, quiet_transformers
from ..prune.allocate import split_allocations
from ..prune.depth import REPLACEMENTS
from ..prune.settings import Calibration, SweepPrune
from ..prune.structured import DEFAULT_IMPORTANCE
from ..report.console import results_table
from .options import parse_cores, parse_floats, parse_names, parse_order


def sweep_cmd(
    ctx: typer.Context,
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
    recipe: Annotated[Optional[Path], typer.Option(help="the settings of this recipe: a sweep's run.json, or a "
                                                        ".toml file with the same [settings] table; options given "
                                                        "here override its values")] = None,
) -> None:
    """prune -> eval -> export -> bench at each sparsity and form (and dense), one results.json for `report`."""
    if data_dir:
        os.environ["DLP_DEPLOY_DATA"] = str(data_dir)
    get_executor(executor)  # an unknown name answers before any work
    allocations = parse_allocations(allocation)
    settings = SweepSettings(
        model=model,
        prune=SweepPrune(
            sparsities=parse_floats(sparsities, "--sparsities"), method=method,
            allocations=allocations + [b for b in parse_allocations(baseline) if b not in allocations],
            patterns=parse_names(pattern), structure=structure,
            structure_sparsities=parse_floats(structure_sparsities, "--structure-sparsities")
            if structure_sparsities else None,
            structure_allocations=parse_allocations(structure_allocations) if structure_allocations else None,
            importances=parse_names(importance), multiple=multiple, alpha=alpha, depth=parse_depth(depth),
            depth_ratio=depth_ratio, recover=parse_names(recover) if recover else [], recover_steps=recover_steps),
        calibration=Calibration(corpus=calib, nsamples=nsamples, seqlen=calib_seqlen, seed=seed),
        eval=EvalSettings(ppl=parse_names(ppl), seqlen=eval_seqlen, max_windows=max_windows),
        export=ExportSettings(seq_len=seq_len, validate=validate),
        bench=BenchSettings(prompt_len=prompt_len, gen_len=gen_len, runs=runs, warmup=warmup,
                            external_cache=external_cache),
        engines=parse_names(engines), precisions=parse_precisions(precision), cores=parse_cores(cores),
        rounds=rounds, order=parse_order(order), order_seed=order_seed, device=device, bench_timeout=bench_timeout)
    recipe_record = None
    if recipe is not None and replicate is not None:
        raise UserError("give --recipe FILE or --replicate RUN_DIR, not both: a replication re-measures the earlier "
                        "run with its own settings")
    if replicate is not None:  # the earlier run's settings: the options above are not read
        settings = replicate_sweep_settings(replicate, out)
    elif recipe is not None:
        given = typed_fields(ctx)
        settings = apply_recipe(settings, read_recipe(recipe), given)
        if settings.model is None:
            raise UserError(f"--recipe {recipe} names no model; give MODEL, or model in its [settings]")
        settings = resolve_windows(settings)
        recipe_record = {"file": str(recipe.resolve()), "overridden": sorted(given)}
    elif model is None:
        raise UserError("give MODEL, or --replicate RUN_DIR to re-measure an earlier sweep")
    else:
        settings = resolve_windows(settings)  # after the option checks, which answer before any work
    quiet_transformers()
    with progress_bar() as progress:
        # markup=False: the log's "[label] ..." would otherwise be read as a style tag and vanish
        report = run_sweep(settings, out, progress, log=lambda message: console.print(message, markup=False),
                           prepare_only=prepare_only, recipe=recipe_record,
                           executor=executor, executor_options={"address": address, "prune_gpus": prune_gpus,
                                                                "prepare_cpus": prepare_cpus, "retries": retries})
    if report is None:
        return
    console.print(results_table(report["results"]))
    for u in report["unmeasured"]:
        console.print(f"not measured: {u['label']} ({u['precision']}) on {u['engine']} ({u['kv_cache']} KV "
                      f"cache): {u['reason']}", markup=False)
    console.print(f"results: {out / 'results.json'}  (next: dlp-deploy report {out} --out REPORT_DIR)")


# the options that set a flat setting (pipeline/levels.FLAT) of another name (--allocation and --baseline together
# set allocations); every other option named after a setting sets it, and the rest (--out, --executor, ...) none
OPTION_FIELDS = {"allocation": "allocations", "baseline": "allocations", "pattern": "patterns",
                 "importance": "importances", "precision": "precisions"}


def typed_fields(ctx: typer.Context) -> set[str]:
    """The SweepSettings fields set by options the user typed (not left at their defaults): they override a
    recipe's values."""
    names = set(FLAT)
    typed = [p for p in ctx.params if ctx.get_parameter_source(p).name in ("COMMANDLINE", "ENVIRONMENT")]
    return {OPTION_FIELDS.get(p, p) for p in typed} & names


def parse_precisions(csv: str) -> list[str]:
    names = parse_names(csv)
    if not names:
        raise UserError(f"--precision {csv!r}: give fp32, int8, a GGUF format (q4_1, q8_0, ...) or a comma list")
    for name in names:
        precision_format(name)
    return names


def parse_allocations(csv: str) -> list[str]:
    """Like parse_names, but an allocation expression keeps its own commas (expr:abslog>var>atan,asin)."""
    return split_allocations(csv)


def parse_depth(csv: str | None) -> list[str]:
    names = [x.strip() for x in (csv or "").split(",") if x.strip()]  # "none" is a replacement here
    unknown = [n for n in names if n not in REPLACEMENTS]
    if unknown:
        raise UserError(f"--depth {','.join(unknown)}: choose replacements from {', '.join(REPLACEMENTS)}")
    return names


COMMANDS = {"sweep": sweep_cmd}
