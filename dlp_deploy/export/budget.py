"""Mixed precision by a quality budget: keep the decoder Linears whose INT8 quantization costs the most in fp32,
most sensitive first, until the quantized model's perplexity on held-out C4 text is within a relative tolerance
of fp32's; the graph writer then leaves those MatMuls as they are.

The quantized model is simulated in PyTorch, as the graph computes it: each quantized Linear's weight replaced by
its int8 codes times their scales (RTN or GPTQ, gptq.WeightPlan), its input rounded as the graph's activation
quantizer does (per token or per tensor at run time, or the static uint8 range observed on the calibration
windows). Sensitivity of a unit = the relative perplexity rise with only that unit quantized. One evaluation per
unit: `linear` (each Linear; 7 per LLaMA block), or the coarser `block` (a block's Linears together) and `kind`
(one Linear name across all blocks, e.g. every down_proj) for big models.

Text: data.validation_windows, the held-out C4 slice `search` uses (never an evaluation document, never one a
calibration window came from); the export's own check stays on the evaluation corpus.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from ..errors import UserError
from .gptq import WeightPlan, weight_plan
from .quantize import QMAX, QMIN, activation_qparams, linear_input_ranges


# ---------------------------------------------------------------- units of the search

def _block_linears(model) -> list[dict[str, str]]:
    """Per decoder block: Linear name within the block -> parameter name of its weight."""
    from ..models import decoder_layers, linear_modules

    names = {id(p): n for n, p in model.named_parameters()}
    return [{local: names[id(m.weight)] for local, m in linear_modules(b).items()} for b in decoder_layers(model)]


def _by_linear(model) -> dict[str, list[str]]:
    return {n.removesuffix(".weight"): [n] for block in _block_linears(model) for n in block.values()}


def _by_block(model) -> dict[str, list[str]]:
    return {f"block {i}": list(block.values()) for i, block in enumerate(_block_linears(model))}


def _by_kind(model) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for block in _block_linears(model):
        for local, name in block.items():
            groups.setdefault(local, []).append(name)
    return groups


BUDGET_UNITS = {"linear": _by_linear, "block": _by_block, "kind": _by_kind}


# ---------------------------------------------------------------- the graph's activation quantizers, in PyTorch

def _per_token(x: torch.Tensor, _name: str) -> torch.Tensor:
    return _symmetric(x, x.abs().amax(dim=-1, keepdim=True))


def _per_tensor(x: torch.Tensor, _name: str) -> torch.Tensor:
    return _symmetric(x, x.abs().amax())


def _symmetric(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = torch.clamp(amax, min=1e-8) / QMAX  # quantize.insert_dynamic_matmul_integer's Max(eps) and Div
    return torch.clamp(torch.round(x / scale), QMIN, QMAX) * scale


def _static(ranges: dict[str, tuple[float, float]]) -> Callable[[torch.Tensor, str], torch.Tensor]:
    def fake(x: torch.Tensor, name: str) -> torch.Tensor:
        scale, zp = activation_qparams(*ranges[name])  # QuantizeLinear: round half to even, saturate to uint8
        q = torch.clamp(torch.round(x / float(scale)) + int(zp), 0, 255)
        return (q - int(zp)) * float(scale)
    return fake


def observed_ranges(model, windows: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Min/max of each block Linear's input over the calibration windows (what the static graph is calibrated
    on)."""
    return linear_input_ranges(model, windows, {n for block in _block_linears(model) for n in block.values()})


def activation_quantizer(act_scales: str, model, windows: torch.Tensor) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """x, weight name -> x as the graph's activation quantizer for `act_scales` leaves it."""
    if act_scales == "dynamic-token":
        return _per_token
    if act_scales == "dynamic-tensor":
        return _per_tensor
    return _static(observed_ranges(model, windows))


@contextlib.contextmanager
def simulated(model, quantized: set[str], plan: WeightPlan, act: Callable[[torch.Tensor, str], torch.Tensor]):
    """The model with the Linears whose weights are named in `quantized` computing as the INT8 graph does."""
    modules = {n.removesuffix(".weight"): m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    swapped, handles = {}, []
    try:
        for name in quantized:
            m = modules[name.removesuffix(".weight")]
            swapped[name] = m.weight.data
            m.weight.data = plan.dequantized(name).to(m.weight.dtype).to(m.weight.device)
            handles.append(m.register_forward_pre_hook(
                lambda _m, args, n=name: (act(args[0], n), *args[1:])))
        yield model
    finally:
        for h in handles:
            h.remove()
        for name, weight in swapped.items():
            modules[name.removesuffix(".weight")].weight.data = weight


# ---------------------------------------------------------------- the search

def fit_budget(model, plan: WeightPlan, act, ids: torch.Tensor, tolerance: float, unit: str = "linear",
               progress=None) -> tuple[set[str], dict]:
    """The weight names to keep fp32 and the record of the search: perplexity on `ids` [windows, seqlen] of fp32
    and of everything quantized; if that exceeds fp32 * (1 + tolerance), every unit's sensitivity, then units kept
    fp32 most sensitive first until the rest is within it."""
    from ..eval.perplexity import perplexity

    progress = progress or (lambda _: None)
    started = time.perf_counter()
    groups = BUDGET_UNITS[unit](model)
    every = {n for names in groups.values() for n in names}
    evaluations = 0

    def ppl(quantized: set[str]) -> float:
        nonlocal evaluations
        evaluations += 1
        with simulated(model, quantized, plan, act), torch.no_grad():
            return perplexity(model, ids.reshape(-1), ids.shape[1])["ppl"]

    fp32 = ppl(set())
    target = fp32 * (1 + tolerance)
    current = ppl(every)
    record = {"tolerance": tolerance, "unit": unit, "units": len(groups), "fp32_ppl": fp32, "target_ppl": target,
              "all_quantized_ppl": current, "sensitivity": None, "steps": []}
    kept: list[str] = []
    if current > target:
        progress(f"quality budget: sensitivity of {len(groups)} units")
        sensitivity = {g: ppl(set(names)) / fp32 - 1 for g, names in groups.items()}
        record["sensitivity"] = dict(sorted(sensitivity.items(), key=lambda kv: -kv[1]))
        for g in record["sensitivity"]:
            if current <= target:
                break
            kept.append(g)
            progress(f"quality budget: {len(kept)} kept fp32")
            current = ppl(every - {n for k in kept for n in groups[k]})
            record["steps"].append({"kept": g, "ppl": current})
    record.update({"final_ppl": current, "met": current <= target, "evaluations": evaluations,
                   "kept_fp32": [{"unit": g, "weights": groups[g], "sensitivity": record["sensitivity"][g]}
                                 for g in kept],
                   "time_s": round(time.perf_counter() - started, 3)})
    return {n for g in kept for n in groups[g]}, record


def plan_weights(model, tokenizer, calibration, options, root, progress) -> WeightPlan:
    """The INT8 graph's weights for `options` (deployment.QuantizeOptions): the writer's own RTN when nothing is
    asked of them, else codes by options.weight_method, and the Linears kept fp32 by options.budget."""
    from .. import data

    _check_budget_options(options)
    if options.weight_method == "rtn" and options.budget is None:
        return WeightPlan(None, record={"weight_method": "rtn"})
    params = {"block": options.gptq_block, "damp": options.gptq_damp} if options.weight_method == "gptq" else {}
    plan = weight_plan(options.weight_method, model, calibration.windows, progress, **params)
    if options.budget is not None:
        seqlen = int(calibration.windows.shape[1])
        val = data.validation_windows(tokenizer, calibration, options.budget_windows, seqlen, root,
                                      flag="--budget-windows")
        act = activation_quantizer(options.act_scales, model, calibration.windows)
        plan.keep_fp32, record = fit_budget(model, plan, act, val.ids, options.budget, options.budget_unit, progress)
        record["validation_text"] = {"source": val.source, "windows": int(val.ids.shape[0]), "seqlen": seqlen,
                                     "documents": len(val.docs)}
        record["lm_head"] = "not simulated" if options.head else "fp32"
        plan.record["budget"] = record
    return plan


def _check_budget_options(options) -> None:
    if options.budget is None:
        return
    if not options.budget >= 0:
        raise UserError(f"quality budget {options.budget} must be a non-negative fraction, e.g. 0.03")
    if options.budget_unit not in BUDGET_UNITS:
        raise UserError(f"--budget-unit {options.budget_unit!r} is not one of {', '.join(BUDGET_UNITS)}")
    if options.budget_windows < 1:
        raise UserError(f"--budget-windows {options.budget_windows} must be at least 1")

