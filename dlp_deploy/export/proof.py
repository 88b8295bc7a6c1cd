"""Before an ONNX file is written, the rewritten graph (in PyTorch) is proved against the model's own forward on a
random input: block by block (naming the module that differs) and end to end. It runs on every export, with or
without --validate, so a block the exporter wires wrongly is refused instead of published.

Each block is replayed in two chunks, the second reading the first's keys and values as the past, so the KV path
(concat, RoPE positions, masks over cached slots) is proved as well as the prefill.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..runtime.decode import step_inputs


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12))


def _step(wrapper, total: int, filled: int, length: int):
    mask, positions, causal = (torch.from_numpy(a) for a in step_inputs(total, filled, length))
    return wrapper.mask_biases(mask, causal, positions), positions


def _empty_past(layer, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros((like.shape[0], layer.num_kv_heads, 0, layer.head_dim))


def replay_block(wrapper, index: int, hidden: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output, block output) of the rewritten block over `hidden`, in two cached chunks (an MLP-only
    block: no attention output, None, and one pass since it has no cache)."""
    from .blocks import block_forward

    block, layer = wrapper.spec.blocks[index], wrapper.spec.layers[index]
    if not layer.attention:
        return None, block_forward(block, layer, hidden, None, None, None, None, None)[0]
    total = hidden.shape[1]
    key = value = _empty_past(layer, hidden)
    attention, outputs = [], []
    for start, end in ((0, split), (split, total)):
        biases, positions = _step(wrapper, end, start, end - start)
        cos, sin = wrapper.rope_at(layer, positions)
        out, key, value = block_forward(block, layer, hidden[:, start:end], cos, sin, biases[layer.window], key,
                                        value, on_attention=attention.append)
        outputs.append(out)
    return torch.cat(attention, dim=1), torch.cat(outputs, dim=1)


def prove(model: nn.Module, wrapper, tolerance: float) -> dict:
    """Raise UserError naming the first module whose rewritten output differs; else the errors measured."""
    spec, trace = wrapper.spec, wrapper.spec.trace
    arch = type(model).__name__
    names = {id(m): name for name, m in model.named_modules()}
    length = trace.ids.shape[1]
    split = max(1, length // 2)
    worst = 0.0
    with torch.no_grad():
        for i, block in enumerate(spec.blocks):
            attention, output = replay_block(wrapper, i, trace.block_inputs[i], split)
            err = 0.0 if attention is None else relative_error(attention, trace.attention_outputs[i])
            if err > tolerance:
                raise UserError(f"{arch}: the exported attention of block {i} ({names.get(id(block.self_attn))}) "
                                f"differs from its forward by {err:.1e} (relative); the exporter does not "
                                "implement this attention, so nothing was written")
            err_block = relative_error(output, trace.block_outputs[i])
            if err_block > tolerance:
                raise UserError(f"{arch}: the exported block {i} ({names.get(id(block))}) differs from its forward "
                                f"by {err_block:.1e} (relative) with {spec.layers[i].wiring} wiring, though its "
                                "attention matches: norms, residual scaling or MLP are wired in a way the exporter "
                                "does not implement, so nothing was written")
            worst = max(worst, err, err_block)
        past = []
        for layer in spec.cache_layers:
            past += [_empty_past(layer, trace.block_inputs[0])] * 2
        mask, positions, causal = (torch.from_numpy(a) for a in step_inputs(length, 0, length))
        logits = wrapper(trace.ids, mask, positions, causal, *past)[0]
    err_logits = relative_error(logits, trace.logits)
    if err_logits > tolerance:
        raise UserError(f"{arch}: the exported graph's logits differ from the model's forward by {err_logits:.1e} "
                        "(relative) although every block matches: embedding or logit scaling the exporter does not "
                        "implement, so nothing was written")
    windows = sorted({s.window for s in spec.layers if s.window})
    return {"tokens": length, "cached_split": split, "tolerance": tolerance, "max_block_error": worst,
            "logits_error": err_logits, "sliding_windows": windows,
            "windows_exercised": all(w < length for w in windows)}
