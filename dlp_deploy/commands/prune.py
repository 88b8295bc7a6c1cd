"""`dlp-deploy prune`: unstructured, N:M, mixed N:M or structured pruning into a reloadable HF folder."""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..progress import console, progress_bar, quiet_transformers
from ..prune.allocate import ALLOCATORS, OWL_LAMBDA, OWL_M, REDUCERS
from ..prune.masks import GRANULARITIES
from ..prune.pruners import PRUNERS
from ..prune.settings import auto_values, prune_settings
from ..prune.structured import DEFAULT_IMPORTANCE
from ..prune.to_folder import prune_to_folder
from .options import AutoDevice, DataDir, enum_value

Method = enum.Enum("Method", {k: k for k in PRUNERS}, type=str)
Reducer = enum.Enum("Reducer", {k: k for k in REDUCERS}, type=str)
Granularity = enum.Enum("Granularity", {k: k for k in GRANULARITIES}, type=str)


def prune_cmd(
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
    device: AutoDevice = "auto",
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
    alpha_value, owl_lambda_value, auto = auto_values(alpha, owl_lambda)
    settings = prune_settings(sparsity, enum_value(method), enum_value(allocation), alpha_value, enum_value(reducer),
                              enum_value(granularity), pattern, structure, importance, multiple, owl_m,
                              owl_lambda_value, auto, val_windows)
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


COMMANDS = {"prune": prune_cmd}
