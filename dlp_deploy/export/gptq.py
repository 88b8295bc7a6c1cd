"""Weights of the INT8 graph chosen in PyTorch before export: round-to-nearest (RTN) or GPTQ (Frantar et al.,
2022), on the same per-output-channel symmetric int8 grid as quantize.quantize_weight, so the ONNX writer takes
the codes as they are (quantize._quantize_weight_initializer) and the INT8 zero check still applies.

GPTQ quantizes a Linear column by column and spreads each column's rounding error over the columns not yet
quantized with the inverse calibration Hessian (an OBS update), in lazy batches of `block` columns. Masked: a
pruned weight (an exact zero of the input model) quantizes to 0 and receives no update, so the mask survives bit
for bit. The scales are fixed before the loop (max|W_row| / 127 of the weight as given), which keeps the grid
RTN's and the codes within [-127, 127].

Calibration is sequential over blocks, as the reference code runs it: block l's Hessians are collected on the
outputs of blocks < l computed with their quantized weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .quantize import QMAX, QMIN, quantize_weight

GPTQ_BLOCK = 128  # lazy batch width (the reference's blocksize)
GPTQ_DAMP = 0.01  # dampening: this fraction of the Hessian's mean diagonal is added to it


@dataclass
class WeightPlan:
    """int8 codes [out, in] and per-output scales by parameter name (None: the writer's own RTN), the parameter
    names kept fp32, and what export.json records about both."""

    codes: dict[str, tuple[np.ndarray, np.ndarray]] | None
    keep_fp32: set[str] = field(default_factory=set)
    record: dict = field(default_factory=dict)

    def dequantized(self, name: str) -> torch.Tensor:
        q, scale = self.codes[name]
        return torch.from_numpy(q.astype(np.float32) * scale[:, None])

    def onnx_codes(self, initializers: dict[str, tuple[int, ...]]) -> dict | None:
        """Codes by initializer name in the MatMul's [in, out] layout (`initializers`: name -> shape of the
        quantized weights; `{param}.T` is the exporter's transposed copy of `param`)."""
        if self.codes is None:
            return None
        out = {}
        for init, shape in initializers.items():
            name = init.removesuffix(".T")
            if name in self.codes:
                q, scale = self.codes[name]
                if tuple(shape) != q.T.shape:
                    raise ValueError(f"{init}: ONNX weight {tuple(shape)} is not the transposed PyTorch one {q.shape}")
                out[init] = (np.ascontiguousarray(q.T), scale)
        return out


def rtn_codes(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] codes and scales exactly as the ONNX writer rounds the transposed weight."""
    q, scale = quantize_weight(weight.detach().float().cpu().numpy().T)
    return np.ascontiguousarray(q.T), scale


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, block: int = GPTQ_BLOCK, damp: float = GPTQ_DAMP
                  ) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of one Linear weight [out, in] with its input Hessian H [in, in]; returns int8 codes [out, in] and the
    per-output scales (RTN's). Exact zeros of `weight` stay zero codes and take no error feedback."""
    from ..prune.sparsegpt import _inverse_hessian_cholesky

    _, scale_np = rtn_codes(weight)
    W = weight.detach().clone().float().cpu()
    mask = W == 0
    scale = torch.from_numpy(scale_np)[:, None]
    H = H.detach().clone().float().cpu()
    dead = torch.diag(H) == 0  # inputs never seen: no feedback into or out of them (H row/column stays zero)
    H[dead, dead] = 1
    Hinv = _inverse_hessian_cholesky(H, damp)
    codes = torch.zeros_like(W)
    columns = W.shape[1]
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        W1, Hinv1, M1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], mask[:, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            c = torch.clamp(torch.round(w / scale[:, 0]), QMIN, QMAX)
            c[M1[:, i]] = 0
            codes[:, i1 + i] = c
            err = (w - c * scale[:, 0]) / Hinv1[i, i]
            update = err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i:] -= update.masked_fill_(M1[:, i:], 0)
            Err1[:, i] = err
        update = Err1 @ Hinv[i1:i2, i2:]
        W[:, i2:] -= update.masked_fill_(mask[:, i2:], 0)
    return codes.to(torch.int8).numpy(), scale_np


def output_mse(weight: torch.Tensor, dequantized: torch.Tensor, H: torch.Tensor, tokens_per_sample: int) -> float:
    """Mean squared error of the Linear's outputs on its calibration inputs, from the Hessian alone:
    H = 2/n sum_windows X^T X, so sum over tokens of |D x|^2 = n/2 tr(D H D^T), D = W - W_q."""
    D = weight.detach().float().cpu() - dequantized
    return float(0.5 * ((D @ H.float().cpu()) * D).sum() / (tokens_per_sample * D.shape[0]))


def _rtn_plan(model, windows, progress, **_) -> WeightPlan:
    from ..models import decoder_layers, linear_modules

    names = _parameter_names(model)
    codes = {names[id(m.weight)]: rtn_codes(m.weight) for b in decoder_layers(model)
             for m in linear_modules(b).values()}
    return WeightPlan(codes, record={"weight_method": "rtn"})


@torch.no_grad()
def _gptq_plan(model, windows, progress, block: int = GPTQ_BLOCK, damp: float = GPTQ_DAMP) -> WeightPlan:
    """GPTQ codes of every decoder-block Linear, sequentially over blocks on the calibration windows; the model's
    weights are left as they were."""
    from ..models import decoder_layers, linear_modules
    from ..prune.pipeline import capture_block_inputs, collecting, run_block
    from ..prune.sparsegpt import Hessian

    started = time.perf_counter()
    names = _parameter_names(model)
    inputs = capture_block_inputs(model, windows)
    codes, layers = {}, []
    for index, blk in enumerate(decoder_layers(model)):
        progress(f"GPTQ block {index}")
        modules = linear_modules(blk)
        with collecting(modules, Hessian) as stats:
            run_block(blk, index, inputs, keep=False)
        originals = {}
        for local, m in modules.items():
            name = names[id(m.weight)]
            codes[name] = gptq_quantize(m.weight, stats[local].H, block, damp)
            layers.append(_layer_errors(name, m.weight, codes[name], stats[local].H, windows.shape[1]))
            originals[local] = m.weight.data
            m.weight.data = WeightPlan(codes).dequantized(name).to(m.weight.dtype).to(m.weight.device)
        del stats
        run_block(blk, index, inputs)  # the next block sees this one quantized
        for local, m in modules.items():
            m.weight.data = originals[local]
    record = {"damp": damp, "block_size": block,
              "calibration_windows": int(windows.shape[0]), "calibration_seqlen": int(windows.shape[1]),
              "sequential": "blocks < l quantized when block l's Hessians are collected",
              "masked": "exact zeros stay zero codes and receive no error feedback",
              "layers": layers, "mean_mse_ratio": float(np.mean([x["gptq_over_rtn"] for x in layers])),
              "time_s": round(time.perf_counter() - started, 3)}
    return WeightPlan(codes, record={"weight_method": "gptq", "gptq": record})


def _layer_errors(name: str, weight: torch.Tensor, gptq: tuple[np.ndarray, np.ndarray], H: torch.Tensor,
                  tokens: int) -> dict:
    rtn = rtn_codes(weight)
    deq = [torch.from_numpy(q.astype(np.float32) * s[:, None]) for q, s in (rtn, gptq)]
    rtn_mse, gptq_mse = (output_mse(weight, d, H, tokens) for d in deq)
    return {"weight": name, "rtn_mse": rtn_mse, "gptq_mse": gptq_mse,
            "gptq_over_rtn": gptq_mse / rtn_mse if rtn_mse > 0 else 1.0}


def _parameter_names(model) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


WEIGHT_METHODS = {"rtn": _rtn_plan, "gptq": _gptq_plan}


def weight_plan(method: str, model, windows: torch.Tensor, progress, **params) -> WeightPlan:
    """The decoder-block Linears' int8 codes by `method` (WEIGHT_METHODS) on calibration `windows` [n, seqlen]."""
    from ..errors import UserError

    if method not in WEIGHT_METHODS:
        raise UserError(f"--weight-method {method!r} is not one of {', '.join(WEIGHT_METHODS)}")
    return WEIGHT_METHODS[method](model, windows, progress, **params)
