"""Wiring for structured pruning: geometry for every block, per-layer ratios from the allocation, unit counts per
layer (plan), then per block importance -> selection -> shrink.

`activation` importance runs sequentially like Wanda (each block scored on the outputs of the blocks already
pruned). `taylor` needs gradients of the calibration loss: one backward pass per calibration window over the dense
model, accumulating dL/dW for every decoder Linear (memory: one fp32 gradient per decoder weight, i.e. about 4 bytes
x decoder parameters on top of the model, plus one window's activations for backward)."""
from __future__ import annotations

import torch
from torch import nn

from ...models import decoder_layers
from ...models.geometry import BlockGeometry, block_geometry
from ...models.shapes import apply_keep
from ..scores import ActivationNorms, wanda_scores
from .importance import taylor_scores, unit_scores
from .plan import LayerPlan, select_units

IMPORTANCE = ("activation", "taylor")


def geometries(model: nn.Module) -> list[BlockGeometry]:
    hint = getattr(model.config, "head_dim", None)
    return [block_geometry(b, i, hint) for i, b in enumerate(decoder_layers(model))]


def calibration_gradients(model: nn.Module, windows: torch.Tensor, progress=None) -> dict[int, torch.Tensor]:
    """Summed dL/dW of next-token cross-entropy over the windows, for every decoder-block Linear weight
    (keyed by id(weight)); nothing else keeps gradients."""
    weights = [m.weight for b in decoder_layers(model) for m in b.modules() if isinstance(m, nn.Linear)]
    wanted = {id(w) for w in weights}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    device = next(model.parameters()).device
    task = progress.add_task("taylor: calibration gradients", total=len(windows)) if progress else None
    try:
        with torch.enable_grad():
            for window in windows:
                ids = window.unsqueeze(0).to(device)
                model(ids, labels=ids, use_cache=False).loss.backward()
                if progress:
                    progress.advance(task)
        return {id(w): w.grad.detach() for w in weights}
    finally:
        for p, flag in saved.items():
            p.grad = None
            p.requires_grad_(flag)


def element_scores(block: nn.Module, g: BlockGeometry, importance: str, norms: dict | None,
                   grads: dict | None) -> dict[str, torch.Tensor]:
    out = {}
    for role, name in g.names().items():
        w = block.get_submodule(name).weight
        if importance == "taylor":
            out[role] = taylor_scores(w, grads[id(w)])
        else:
            out[role] = wanda_scores(w.float(), norms[name].sq_norm)
    return out


@torch.no_grad()
def prune_structured_blocks(model: nn.Module, inputs, geoms: list[BlockGeometry], plans: list[LayerPlan],
                            importance: str, grads: dict | None, progress=None) -> list[dict]:
    """Shrink every block to its plan; returns each block's kept units (original indices) for the record."""
    from ..pipeline import collecting, run_block

    blocks = decoder_layers(model)
    task = progress.add_task(f"structured pruning ({importance})", total=len(blocks)) if progress else None
    kept = []
    for index, (block, g, plan) in enumerate(zip(blocks, geoms, plans)):
        norms = None
        if importance == "activation":
            modules = {name: block.get_submodule(name) for name in g.names().values()}
            with collecting(modules, ActivationNorms) as norms:
                run_block(block, index, inputs, keep=False)
        keep = select_units(unit_scores(element_scores(block, g, importance, norms, grads), g), g, plan)
        apply_keep(block, g, keep)
        kept.append({"kv_heads": keep.kv_heads, "heads": keep.heads, "channels": len(keep.channels)})
        if inputs is not None:
            run_block(block, index, inputs)
        if progress:
            progress.advance(task)
    return kept
