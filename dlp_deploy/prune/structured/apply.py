"""Shrink a block to the kept units, and record / replay the per-layer shapes (structure.json) so that a pruned
model saves and reloads."""
from __future__ import annotations

from torch import nn

from ...errors import UserError
from ...models import STRUCTURE_FILE  # noqa: F401  (re-exported: the record lives beside the weights)
from .geometry import BlockGeometry, block_geometry
from .plan import Keep

SCHEMA = "dlp-deploy/structure/1"


def shrink_linear(linear: nn.Linear, out_idx: list[int] | None = None, in_idx: list[int] | None = None) -> nn.Linear:
    w = linear.weight.data
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data = w.contiguous()
    if linear.bias is not None:
        new.bias.data = (linear.bias.data if out_idx is None else linear.bias.data[out_idx]).contiguous()
    return new


def _rows(units: list[int], size: int) -> list[int]:
    return [u * size + j for u in units for j in range(size)]


def apply_keep(block: nn.Module, g: BlockGeometry, keep: Keep) -> None:
    """Replace the block's Linears by their kept slices and tell the attention its new head counts."""
    attn = block.get_submodule(g.attention)
    q_rows, kv_rows = _rows(keep.heads, g.head_dim), _rows(keep.kv_heads, g.head_dim)
    attn.q_proj = shrink_linear(attn.q_proj, out_idx=q_rows)
    attn.k_proj = shrink_linear(attn.k_proj, out_idx=kv_rows)
    attn.v_proj = shrink_linear(attn.v_proj, out_idx=kv_rows)
    attn.o_proj = shrink_linear(attn.o_proj, in_idx=q_rows)
    _set_head_counts(attn, len(keep.heads), len(keep.kv_heads))
    for name in g.mlp_in:
        _replace(block, name, shrink_linear(block.get_submodule(name), out_idx=keep.channels))
    _replace(block, g.mlp_out, shrink_linear(block.get_submodule(g.mlp_out), in_idx=keep.channels))


def _set_head_counts(attn: nn.Module, heads: int, kv_heads: int) -> None:
    # HF attention reshapes with -1 heads and repeats K/V by this attribute; older versions also keep counts
    attn.num_key_value_groups = heads // kv_heads
    for attr, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)


def _replace(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, leaf, module)


def layer_shape(g: BlockGeometry) -> dict:
    return {"num_attention_heads": g.num_heads, "num_key_value_heads": g.num_kv_heads,
            "intermediate_size": g.intermediate, "head_dim": g.head_dim}


def structure_record(blocks, head_dim_hint: int | None = None) -> dict:
    return {"schema": SCHEMA, "layers": [layer_shape(block_geometry(b, i, head_dim_hint)) for i, b in enumerate(blocks)]}


def apply_structure(blocks, record: dict, head_dim_hint: int | None = None) -> None:
    """Give freshly built full-size blocks the recorded shapes (weights are loaded afterwards)."""
    layers = record.get("layers") or []
    if record.get("schema") != SCHEMA or len(layers) != len(blocks):
        raise UserError(f"{STRUCTURE_FILE} does not describe this model ({len(layers)} layers recorded, "
                        f"{len(blocks)} in the model, schema {record.get('schema')!r})")
    for i, (block, shape) in enumerate(zip(blocks, layers)):
        g = block_geometry(block, i, head_dim_hint)
        heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        keep = Keep(list(range(kv)), list(range(heads)), list(range(shape["intermediate_size"])))
        if heads > g.num_heads or kv > g.num_kv_heads or heads % kv or shape["intermediate_size"] > g.intermediate:
            raise UserError(f"{STRUCTURE_FILE}: layer {i} shape {shape} does not fit the model's config")
        apply_keep(block, g, keep)
