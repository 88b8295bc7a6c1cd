"""One short forward pass of the HF model with hooks: what each block received and returned, what its attention
returned, and every call of a rotary module. The exporter reads per-layer RoPE tables from it and proves its
rewritten blocks against it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError


@dataclass
class Trace:
    ids: torch.Tensor
    logits: torch.Tensor | None = None
    block_inputs: list[torch.Tensor] = field(default_factory=list)
    block_outputs: list[torch.Tensor] = field(default_factory=list)
    attention_outputs: list[torch.Tensor] = field(default_factory=list)
    position_embeddings: list[tuple | None] = field(default_factory=list)
    rotary_calls: list[tuple] = field(default_factory=list)  # (module, args, kwargs, (cos, sin))


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Modules holding RoPE inverse frequencies (inv_freq, or one per layer type as Gemma-3's <type>_inv_freq)."""
    return [m for m in model.modules()
            if any(name.endswith("inv_freq") and "original" not in name for name, _ in m.named_buffers(recurse=False))]


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def trace_model(model: nn.Module, blocks: nn.ModuleList, length: int, seed: int = 0) -> Trace:
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    trace = Trace(torch.randint(0, vocab, (1, length), generator=generator).to(device))
    n = len(blocks)
    trace.block_inputs, trace.block_outputs = [None] * n, [None] * n
    trace.attention_outputs, trace.position_embeddings = [None] * n, [None] * n
    handles = []

    def on_block_input(i):
        def hook(_module, args, kwargs):
            trace.block_inputs[i] = args[0] if args else kwargs["hidden_states"]
            trace.position_embeddings[i] = kwargs.get("position_embeddings")
        return hook

    def on_output(store, i):
        def hook(_module, _args, output):
            store[i] = _first_tensor(output)
        return hook

    def on_rotary(module, args, kwargs, output):
        trace.rotary_calls.append((module, args, kwargs, output))

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(on_block_input(i), with_kwargs=True))
        handles.append(block.register_forward_hook(on_output(trace.block_outputs, i)))
        if isinstance(getattr(block, "self_attn", None), nn.Module):  # MLP-only blocks have none
            handles.append(block.self_attn.register_forward_hook(on_output(trace.attention_outputs, i)))
    for rotary in rotary_modules(model):
        handles.append(rotary.register_forward_hook(on_rotary, with_kwargs=True))
    try:
        with torch.no_grad():
            trace.logits = model(trace.ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return trace


def rope_tables(model: nn.Module, trace: Trace, max_positions: int, arch: str):
    """(tables, index per layer): each layer's cos/sin for every position 0..max_positions-1, made by re-calling the
    rotary call that produced the layer's own position_embeddings with all positions (so RoPE scaling variants
    and per-layer-type bases hold)."""
    tables: list[tuple[torch.Tensor, torch.Tensor]] = []
    index = []
    for i, pe in enumerate(trace.position_embeddings):
        if pe is None:
            raise UserError(f"{arch}: decoder block {i} is not given position_embeddings (cos, sin); the exporter "
                            "supports RoPE decoders whose model computes the rotary tables once per forward")
        call = next((c for c in trace.rotary_calls if _same(c[3][0], pe[0]) and _same(c[3][1], pe[1])), None)
        if call is None:
            raise UserError(f"{arch}: the rotary tables of block {i} come from no rotary module (inv_freq) the "
                            "exporter can re-run")
        cos, sin = _full_range(call, trace.ids.shape[1], max_positions, arch)
        found = next((j for j, (c, s) in enumerate(tables) if torch.equal(c, cos) and torch.equal(s, sin)), None)
        if found is None:
            tables.append((cos, sin))
            found = len(tables) - 1
        index.append(found)
    return tables, index


def _same(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _full_range(call, length: int, max_positions: int, arch: str):
    module, args, kwargs, _ = call
    traced = torch.arange(length)[None]
    positions = torch.arange(max_positions, dtype=torch.long)[None]

    def swap(value):
        if isinstance(value, torch.Tensor) and value.shape == traced.shape and torch.equal(value.cpu(), traced):
            return positions.to(value.device)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return torch.zeros(1, dtype=torch.float32, device=value.device)  # only its dtype/device are read
        return value

    args = tuple(swap(a) for a in args)
    kwargs = {k: swap(v) for k, v in kwargs.items()}
    if not any(v is positions or (isinstance(v, torch.Tensor) and v.shape == positions.shape)
               for v in (*args, *kwargs.values())):
        raise UserError(f"{arch}: cannot find the position ids among the rotary module's arguments")
    with torch.no_grad():
        cos, sin = module(*args, **kwargs)
    return cos[0].float().cpu().contiguous(), sin[0].float().cpu().contiguous()
