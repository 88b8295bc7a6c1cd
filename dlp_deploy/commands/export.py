"""`dlp-deploy export`: a deployment folder (ONNX or GGUF) checked against PyTorch."""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # DeepSparse phones home on import otherwise

from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ..errors import UserError  # noqa: E402
from ..export.deployment import (VALIDATION_ENGINES, QualityCheck, QuantizeOptions, default_ppl_tolerance,  # noqa: E402
                                 engine_failures, export_deployment, export_gguf_deployment)
from ..export.gguf import gguf_quant  # noqa: E402

err = Console(stderr=True)


def export_cmd(
    model: Annotated[str, typer.Argument(help="HF causal LM folder (e.g. a pruned one), alias, or hub id")],
    out: Annotated[Path, typer.Option("--out", help="deployment folder to create")],
    seq_len: Annotated[int, typer.Option("--seq-len", help="KV-cache window (prompt + generated tokens)")] = 512,
    validate: Annotated[bool, typer.Option("--validate/--no-validate",
                                           help="check logits, greedy tokens and perplexity against PyTorch")] = True,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out folder")] = False,
    num_cores: Annotated[Optional[int], typer.Option("--num-cores", help="CPU cores for validation (default: all)")]
        = None,
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="int8: W8A8 (weights per channel, "
                        "activations per --act-scales); int4 / w8: 4- / 8-bit weights in blocks of --group-size along the input "
                        "(MatMulNBits: onnxruntime and openvino; w8 is q8_0's form, activations int8 per block at "
                        "run time)")] = None,
    quantize_head: Annotated[bool, typer.Option("--quantize-head", help="quantize lm_head too")] = False,
    smooth_alpha: Annotated[float, typer.Option("--smooth-alpha", help="SmoothQuant migration strength before "
                                                                       "INT8 (0 = off)")] = 0.5,
    calib_samples: Annotated[int, typer.Option("--calib-samples", min=1, help="INT8 calibration windows")] = 32,
    act_scales: Annotated[str, typer.Option("--act-scales", help="INT8 activation scales: auto (dynamic-token, or "
                          "static where --engines includes DeepSparse, which runs only that), static (C4 "
                          "calibration, per tensor), dynamic-token (per token, at run time) or dynamic-tensor")]
        = "auto",
    group_size: Annotated[int, typer.Option("--group-size", help="INT4 block along the input dimension: 32, 64 "
                                                                  "or 128")] = 32,
    int4_scheme: Annotated[str, typer.Option("--int4-scheme", help="INT4 blocks: sym (pruned zeros stay exact "
                           "zeros), asym (an integer zero point per block; zeros exact too) or minmax (Q4_1's grid, "
                           "a float zero point; the finest grid, zeros not exact)")] = "sym",
    accuracy_level: Annotated[Optional[int], typer.Option("--accuracy-level", help="MatMulNBits accuracy_level: 0 "
                              "(fp32 accumulation), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (default: 0 for "
                              "int4, 4 for w8)")] = None,
    weight_method: Annotated[str, typer.Option("--weight-method", help="INT8 weights: rtn (round to nearest) or "
                             "gptq (OBS error feedback on the calibration windows; pruned zeros stay zero)")] = "rtn",
    quality_budget: Annotated[bool, typer.Option("--quality-budget", help="INT8: make --ppl-tolerance a target: keep "
                              "the Linears most sensitive to INT8 in fp32 until perplexity on held-out C4 text is "
                              "within it")] = False,
    budget_unit: Annotated[str, typer.Option("--budget-unit", help="--quality-budget search unit: linear (one "
                           "evaluation per Linear), block or kind (coarser, for big models)")] = "linear",
    budget_windows: Annotated[int, typer.Option("--budget-windows", min=1, help="--quality-budget held-out C4 "
                              "windows (of the calibration length) per evaluation")] = 8,
    ppl_tolerance: Annotated[Optional[float], typer.Option("--ppl-tolerance", help="largest relative perplexity "
                             "rise over the PyTorch source (default 5%, 10% for --quantize int4; for GGUF one that "
                             "fits --quant)")] = None,
    ppl_seqlen: Annotated[Optional[int], typer.Option("--ppl-seqlen", min=2, help="perplexity window for "
                                                      "validation (default 256, or --seq-len minus one)")] = None,
    ppl_windows: Annotated[int, typer.Option("--ppl-windows", min=1, help="perplexity windows for validation")] = 4,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="offline corpora folder (else env "
                                                                        "DLP_DEPLOY_DATA, else the hub)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx (DeepSparse, ONNX Runtime, OpenVINO) or gguf "
                                                      "(llama.cpp)")] = "onnx",
    quant: Annotated[str, typer.Option("--quant", help="GGUF weight format: f32, f16, q8_0, q4_0, q4_1, q4_k_m "
                                                       "(--format gguf), or source: the GGUF file a model fetched "
                                                       "with `models fetch` came from, unchanged (the peer)")] = "q8_0",
    engines: Annotated[Optional[str], typer.Option("--engines", help="comma list of engines to validate on "
                       "(default: onnxruntime,deepsparse,deepsparse-external,openvino, those installed)")] = None,
    engine_timeout: Annotated[Optional[float], typer.Option("--engine-timeout", help="seconds one engine's "
                              "validation (compile and runs) may take before it is killed (default: no limit)")]
        = None,
) -> None:
    """Export a causal LM to a deployment folder checked against PyTorch: ONNX (fp32 or INT8) for DeepSparse,
    ONNX Runtime and OpenVINO, or GGUF for llama.cpp."""
    if engine_timeout is not None and not engine_timeout > 0:
        raise UserError(f"--engine-timeout {engine_timeout:g}: give a positive number of seconds, or leave it out")
    if fmt not in ("onnx", "gguf"):
        raise UserError(f"--format {fmt!r} is not one of onnx, gguf")
    if fmt == "gguf":
        if quantize or engines:
            raise UserError("--quantize and --engines apply to ONNX; GGUF is validated on llama.cpp and its weight "
                            "format picked with --quant")

        tolerance = ppl_tolerance if ppl_tolerance is not None else gguf_quant(quant).ppl_tolerance
        quality = QualityCheck(seqlen=ppl_seqlen, windows=ppl_windows, tolerance=tolerance)
        with err.status("exporting") as status:
            info = export_gguf_deployment(model, out, quant, seq_len=seq_len, validate=validate, force=force,
                                          progress=lambda step: status.update(step), num_cores=num_cores,
                                          quality=quality, data_root=str(data_dir) if data_dir else None,
                                          engine_timeout=engine_timeout)
        _print_summary(out, info)
        _refuse_engine_failures(out, info)
        return
    tolerance = default_ppl_tolerance(quantize) if ppl_tolerance is None else ppl_tolerance
    if (weight_method != "rtn" or quality_budget) and quantize != "int8":
        raise UserError("--weight-method and --quality-budget choose INT8 weights; add --quantize int8")
    options = QuantizeOptions(quantize, quantize_head, smooth_alpha, calib_samples, act_scales=act_scales,
                              group_size=group_size, int4_scheme=int4_scheme, accuracy_level=accuracy_level,
                              weight_method=weight_method, budget=tolerance if quality_budget else None,
                              budget_unit=budget_unit, budget_windows=budget_windows) \
        if quantize else None
    quality = QualityCheck(seqlen=ppl_seqlen, windows=ppl_windows, tolerance=tolerance)
    with err.status("exporting") as status:
        info = export_deployment(model, out, seq_len=seq_len, validate=validate, force=force,
                                 progress=lambda step: status.update(step), num_cores=num_cores, quantize=options,
                                 quality=quality, data_root=str(data_dir) if data_dir else None,
                                 engines=_validation_engines(engines), engine_timeout=engine_timeout)
    _print_summary(out, info)
    _print_budget((info.get("quantization") or {}).get("budget"))
    _refuse_engine_failures(out, info)


def _print_budget(budget: dict | None) -> None:
    """What the quality budget kept fp32, most sensitive first, and why (its perplexity rise alone)."""
    if not budget:
        return

    err.print(f"quality budget ({budget['tolerance']:.1%}, {budget['validation_text']['source']}): fp32 ppl "
              f"{budget['fp32_ppl']:.3f}, all INT8 {budget['all_quantized_ppl']:.3f}, deployed mix "
              f"{budget['final_ppl']:.3f} ({'met' if budget['met'] else 'NOT met'}; {budget['evaluations']} "
              "evaluations)", highlight=False)
    if not budget["kept_fp32"]:
        err.print("  every Linear INT8: the all-INT8 model is within the tolerance")
        return
    table = Table(title=f"kept fp32 ({budget['unit']} units)")
    for column in ("unit", "ppl rise with only it INT8", "weights"):
        table.add_column(column)
    for row in budget["kept_fp32"]:
        table.add_row(row["unit"], f"{row['sensitivity']:+.3%}", str(len(row["weights"])))
    err.print(table)


def _validation_engines(engines: str | None) -> tuple[str, ...]:
    if engines is None:
        return VALIDATION_ENGINES
    names = tuple(e.strip() for e in engines.split(",") if e.strip())
    unknown = [e for e in names if e not in VALIDATION_ENGINES]
    if unknown or not names:
        raise UserError(f"--engines {engines!r}: choose among {', '.join(VALIDATION_ENGINES)} (comma-separated)")
    return names


def _refuse_engine_failures(out: Path, info: dict) -> None:
    """An engine that crashed in validation fails no check of the graph, so the folder stands; the command still
    ends in an error, so that nobody deploys on that engine unawares."""
    failures = engine_failures(info.get("validation"))
    if failures:
        raise UserError(f"{'; '.join(failures)}. {out} was published, validated on the other engines; its "
                        "export.json records the failure")


def _print_summary(out: Path, info: dict) -> None:
    sizes, sparsity = info["sizes"], info["weight_sparsity"]
    err.print(f"[green]wrote[/] {out}  ({sizes['folder_bytes'] / 2**20:.1f} MiB, "
              f"weight sparsity {sparsity['global']:.2%})", highlight=False)
    validation = info.get("validation")
    if not validation:
        err.print("validation skipped (--no-validate)")
        return

    for name in validation.get("engines", VALIDATION_ENGINES):
        entry = validation.get(name) or {}
        if "skipped" in entry:
            err.print(f"  {name}: skipped ({entry['skipped']})")
            continue
        if "failed" in entry:
            err.print(f"  {name}: {entry['failed']}" + (f" ({entry['signal']})" if entry["signal"] else ""))
            continue
        extra = (f", supported ops {entry['fraction_of_supported_ops']:.3f}"
                 if "fraction_of_supported_ops" in entry else "")
        if "ppl" in entry:
            extra += (f", agreement {entry['greedy_agreement']:.1%}, ppl {entry['ppl']:.3f} "
                      f"({entry['ppl_vs_reference']:+.2%} vs PyTorch)")
        err.print(f"  {name}: max |Δlogits| {entry['max_abs_logit_diff']:.2e}, "
                  f"greedy match {entry['greedy_match']}{extra}", highlight=False)


COMMANDS = {"export": export_cmd}
