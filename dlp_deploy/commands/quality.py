"""`dlp-deploy prune` and `dlp-deploy eval`."""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..prune.allocate import ALLOCATORS, OWL_LAMBDA, OWL_M, REDUCERS
from ..prune.masks import GRANULARITIES
from ..prune.pruners import PRUNERS
from ..prune.settings import auto_values, prune_settings
from ..prune.structured import DEFAULT_IMPORTANCE

Method = enum.Enum("Method", {k: k for k in PRUNERS}, type=str)
Reducer = enum.Enum("Reducer", {k: k for k in REDUCERS}, type=str)
Granularity = enum.Enum("Granularity", {k: k for k in GRANULARITIES}, type=str)

DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="offline corpora folder (else env "
                                                 "DLP_DEPLOY_DATA, else the hub)")]
Device = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1 …")]


def prune(
    model: Annotated[str, typer.Argument(help="HF folder, hub id or alias (smollm2-135m)")],
    out: Annotated[Path, typer.Option(help="output folder (must not exist unless --force)")],
    sparsity: Annotated[Optional[float], typer.Option(help="target share of decoder-Linear weights removed, in "
                                                           "[0, 1); an N:M pattern implies it")] = None,
    method: Annotated[Method, typer.Option(help="weight scores (unstructured and N:M forms)")] = "wanda",
    allocation: Annotated[Optional[str], typer.Option(
        help=f"per-layer ratios: {', '.join(ALLOCATORS)}, or an expression expr:PRE,..>REDUCE>POST,.. "
             "(README); default dlp (uniform for a fixed N:M pattern)")] = None,
    alpha: Annotated[Optional[str], typer.Option(help="DLP (and expr:) spread; default: the paper's App. G "
                                                      "value; auto: chosen on held-out C4 text")] = None,
    reducer: Annotated[Reducer, typer.Option(help="DLP layer statistic over Wanda scores")] = "median",
    granularity: Annotated[Optional[Granularity], typer.Option(
        help="mask comparison group (unstructured); default: the method's reference (wanda per-output, "
             "sparsegpt per-layer inside each 128-column block)")] = None,
    owl_m: Annotated[float, typer.Option("--owl-m", help="OWL: outliers are Wanda scores above M times their "
                                                         "layer's mean")] = OWL_M,
    owl_lambda: Annotated[str, typer.Option("--owl-lambda", help="OWL: layer ratios span target ± lambda; auto: "
                                                                 "chosen on held-out C4 text")] = str(OWL_LAMBDA),
    val_windows: Annotated[int, typer.Option(help="--alpha/--owl-lambda auto: held-out C4 windows (calibration "
                                                  "length) that score the grid")] = 16,
    pattern: Annotated[str, typer.Option(help="unstructured, N:M (N kept of every M inputs, as NVIDIA's 2:4: 1:4 is "
                                              "75% sparse) or mixed:M (per-layer N from the allocation), M in 4, 8"
                                         )] = "unstructured",
    structure: Annotated[Optional[str], typer.Option(help="structured pruning: remove whole heads and/or MLP "
                                                          "channels (heads,channels)")] = None,
    importance: Annotated[str, typer.Option(help="structured unit importance: taylor (LLM-Pruner's first order, "
                                                 "calibration-loss gradients) or activation (gradient-free)")] = \
        DEFAULT_IMPORTANCE,
    multiple: Annotated[int, typer.Option(help="structured: keep MLP widths a multiple of this")] = 8,
    calib: Annotated[str, typer.Option(help="calibration corpus: c4, wikitext2, ptb")] = "c4",
    nsamples: Annotated[int, typer.Option(min=1)] = 128,
    seqlen: Annotated[Optional[int], typer.Option(min=2, help="calibration window; default min(2048, the "
                                                              "model's context)")] = None,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="torch device: auto (CUDA when present, else cpu), cpu, cuda, "
                                             "cuda:1 …")] = "auto",
    dtype: Annotated[str, typer.Option(help="weights and activations while pruning: auto (the checkpoint's), "
                                            "bf16, fp16, fp32; statistics are fp32 and the output keeps the "
                                            "input's dtype")] = "auto",
    stream: Annotated[Optional[bool], typer.Option("--stream/--in-memory", help="read one decoder block at a "
                                                   "time from the safetensors shards (default where the input "
                                                   "and form allow it) or load the whole model")] = None,
    data_dir: DataDir = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """Prune MODEL to --sparsity and save a reloadable HF folder with pruning.json."""
    from ..progress import console, progress_bar, quiet_transformers
    from ..prune.to_folder import prune_to_folder

    alpha_value, owl_lambda_value, auto = auto_values(alpha, owl_lambda)
    settings = prune_settings(sparsity, _v(method), _v(allocation), alpha_value, _v(reducer), _v(granularity),
                              pattern, structure, importance, multiple, owl_m, owl_lambda_value, auto, val_windows)
    quiet_transformers()
    with progress_bar() as progress:
        report = prune_to_folder(model, out, settings, calib, nsamples, seqlen, seed, device,
                                 str(data_dir) if data_dir else None, force, progress, dtype.lower(), stream)
    if report["layers_clipped"]:
        console.print(f"[yellow]warning:[/] {report['layers_clipped']} layer ratios fell outside "
                      f"[0, {report['ratio_bounds'][1]}] and were clipped (correction "
                      f"{report['allocation_correction']:+.4f}); a smaller --alpha avoids it")
    short = (report.get("structure") or {}).get("layers_short")
    if short:
        console.print(f"[yellow]warning:[/] {short} layers were asked to lose more than one KV group, one head and "
                      f"{settings.multiple} channels allow; they keep that minimum (pruning.json: layers_short)")
    what = f"{settings.importance} structured" if settings.structure else f"{settings.method}, {settings.form}"
    console.print(f"pruned {model}: global sparsity {report['global_sparsity']:.4f} "
                  f"({what}, {settings.allocation}) -> {out}")
    loading, peak = report["loading"], report["memory"]["rss_peak_bytes"] / 2**30
    how = loading["mode"] + (f" ({loading['why_in_memory']})" if loading["why_in_memory"] else "")
    console.print(f"{how}, {report['dtype']['compute']} on {report['device']}, peak RSS {peak:.2f} GiB")


def search(
    model: Annotated[str, typer.Argument(help="HF folder, hub id or alias (smollm2-135m)")],
    out: Annotated[Path, typer.Option(help="search folder: search.json, history.jsonl, best.json; an existing "
                                           "one with the same settings is resumed")],
    sparsity: Annotated[float, typer.Option(help="target sparsity the expressions are scored at")],
    name: Annotated[Optional[str], typer.Option(help="save the best expression under this name for --allocation "
                                                     "NAME (default: the --out folder's name)")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="budget: candidates in all (a resumed search counts "
                                                        "those it has)")] = 100,
    time_budget: Annotated[Optional[float], typer.Option(help="budget: minutes of new scoring in this run")] = None,
    population: Annotated[int, typer.Option(help="DSA: population size")] = 20,
    top_k: Annotated[int, typer.Option(help="DSA: parents are the top k of each draw")] = 5,
    sample_ratio: Annotated[float, typer.Option(help="DSA: share of the population each draw takes")] = 0.9,
    alpha: Annotated[Optional[float], typer.Option(help="fixed spread (default: DLP's App. G value)")] = None,
    search_alpha: Annotated[bool, typer.Option(help="search alpha with the expression")] = False,
    mapping: Annotated[str, typer.Option(help="statistic to ratios: dsa (the authors': higher value, more "
                                              "sparsity) or owl (OWL's and DLP's direction; searches made "
                                              "before this option used it)")] = "dsa",
    method: Annotated[str, typer.Option(help="one-shot scores while searching: wanda or magnitude")] = "wanda",
    calib: str = "c4",
    nsamples: Annotated[int, typer.Option(min=1)] = 128,
    seqlen: Annotated[Optional[int], typer.Option(min=2, help="calibration and validation window")] = None,
    val_windows: Annotated[int, typer.Option(min=1, help="held-out C4 windows scoring each candidate")] = 16,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="torch device: auto (CUDA when present, else cpu), cpu, cuda …")]
    = "auto",
    data_dir: DataDir = None,
    force: Annotated[bool, typer.Option(help="start over (and replace a saved allocation of that name)")] = False,
) -> None:
    """Evolve DSA allocation expressions (seeded, resumable); fitness is the one-shot pruned model's perplexity on
    held-out C4 text disjoint from calibration and evaluation."""
    from ..progress import console, progress_bar, quiet_transformers
    from ..prune.search import SearchSettings, run_search

    settings = SearchSettings(model, sparsity, method, alpha, search_alpha, population, top_k, sample_ratio, seed,
                              calib, nsamples, seqlen, val_windows, mapping=mapping)
    quiet_transformers()
    with progress_bar() as progress:
        result = run_search(settings, out, name, candidates, time_budget * 60 if time_budget else None, device,
                            str(data_dir) if data_dir else None, force, progress)
    ref = result["references"]
    console.print(f"best: expr:{result['expression']} (alpha {result['alpha']:g}) validation ppl "
                  f"{result['fitness']:.3f} (uniform {ref['uniform']:.3f}, dense {ref['dense']:.3f}) after "
                  f"{result['candidates']} candidates ({result['candidates_per_hour']:.0f}/hour); saved as "
                  f"--allocation {result['name']}")


def eval_(
    model: Annotated[str, typer.Argument(help="HF folder (e.g. a pruned one), hub id or alias, or a deployment "
                                              "folder (with --engine)")],
    json_out: Annotated[Path, typer.Option("--json", help="result file (must not exist unless --force)")],
    ppl: Annotated[str, typer.Option(help="comma list of wikitext2, ptb, c4; empty for none")] = "wikitext2",
    seqlen: Annotated[Optional[int], typer.Option(min=2, help="window; default min(2048, the model's context), "
                                                              "for a deployment min(2048, its "
                                                              "--seq-len minus one")] = None,
    engine: Annotated[Optional[str], typer.Option(help="score a deployment folder's ONNX graph on this engine "
                                                       "(onnxruntime, deepsparse-external, openvino)")] = None,
    cores: Annotated[Optional[int], typer.Option(help="engine threads (default: all)")] = None,
    max_windows: Annotated[Optional[int], typer.Option(min=1, help="score only the first N windows")] = None,
    zeroshot: Annotated[str, typer.Option(help="comma list of tasks, e.g. boolq,arc_easy")] = "",
    limit: Annotated[Optional[int], typer.Option(min=1, help="first N docs per zero-shot task")] = None,
    device: Device = "cpu",
    data_dir: DataDir = None,
    force: bool = False,
) -> None:
    """Perplexity (non-overlapping windows) and zero-shot accuracy of MODEL, written to --json."""
    from rich.table import Table

    from ..eval.evaluate import evaluate
    from ..io import check_writable, write_json_atomic
    from ..progress import console, progress_bar, quiet_transformers

    from ..eval.evaluate import evaluate_deployment, is_deployment

    check_writable(json_out, force)
    quiet_transformers()
    root = str(data_dir) if data_dir else None
    if engine is None and is_deployment(model):
        raise UserError(f"{model} is a deployment folder; give --engine to score its ONNX graph "
                        "(onnxruntime, deepsparse-external, openvino)")
    with progress_bar() as progress:
        if engine is not None:
            if zeroshot:
                raise UserError("--zeroshot runs on PyTorch models only; drop it or give an HF model folder")
            result = evaluate_deployment(model, engine, _split(ppl), seqlen, max_windows, cores, root, progress)
        else:
            result = evaluate(model, _split(ppl), seqlen, max_windows, _split(zeroshot), limit, device,
                              root, progress)
    write_json_atomic(json_out, result, force)
    table = Table("metric", "value", title=f"{model}")
    for name, value in result["perplexity"].items():
        table.add_row(f"ppl {name}", f"{value:.3f}")
    for task, scores in result.get("zeroshot", {}).items():
        table.add_row(f"{task} acc / acc_norm", " / ".join("—" if scores.get(k) is None else f"{scores[k]:.4f}"
                                                           for k in ("acc", "acc_norm")))
    console.print(table)


def _v(x):
    return x.value if isinstance(x, enum.Enum) else x


def _split(csv: str) -> list[str]:
    return [s.strip() for s in csv.split(",") if s.strip()]


COMMANDS = {"prune": prune, "eval": eval_, "search": search}
