"""Models whose blocks differ from their config, rebuilt: a structured-pruned block shrunk to its kept heads and MLP
channels (structure.json records and replays the per-layer shapes), and a depth-pruned stack (streamline.json) with
its MLP-only replacement block. Pruning writes these shapes (prune/structured, prune/depth); loading replays them
(models/load.py)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .geometry import BlockGeometry, block_geometry

# transformers is imported inside the functions that use it: it takes about 3 s to import, which `dlp-deploy --help`
# and the one-line refusals before any loading should not pay

STRUCTURE_FILE = "structure.json"
STREAMLINE_FILE = "streamline.json"
SCHEMA = "dlp-deploy/structure/1"
MLP_KINDS = ("ffn", "swiglu")  # depth replacements with no attention: h + mlp(norm(h))


@dataclass(frozen=True)
class Keep:
    """The units a structured-pruned block keeps (prune/structured/plan.py chooses them)."""

    kv_heads: list[int]
    heads: list[int]  # original query-head indices, grouped by kept KV head (group-major, ascending)
    channels: list[int]


# ---------------------------------------------------------------- structured: shrunk blocks

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


# ---------------------------------------------------------------- depth: a shortened stack, its replacement block

class FFN(nn.Module):
    """A plain two-layer MLP: down(act(up(x)))."""
    def __init__(self, hidden: int, width: int, act: str):
        from transformers.activations import ACT2FN

        super().__init__()
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.act_fn = ACT2FN[act]
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class SwiGLU(nn.Module):
    """A gated MLP as LLaMA's: down(silu(gate(x)) * up(x))."""
    def __init__(self, hidden: int, width: int, act: str = "silu"):
        from transformers.activations import ACT2FN

        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MLPBlock(nn.Module):
    """A residual MLP-only block, h + mlp(norm(h)), that stands in the decoder stack in place of a span: it takes
    a decoder layer's call (hidden states, then keyword arguments it ignores) and returns the hidden states, as
    decoder layers do in this transformers version. It has no attention and so no keys or values."""
    STREAMLINE_REPLACEMENT = True  # models.decoder_layers accepts it beside the model's own decoder layers

    def __init__(self, norm: nn.Module, mlp: nn.Module, layer_idx: int):
        super().__init__()
        self.norm = norm
        self.mlp = mlp
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, past_key_values=None, use_cache=False, **kwargs):
        if use_cache and past_key_values is not None and hasattr(past_key_values, "update"):
            # HF reads the cache length from one layer's slot (layer 0 by default) to place new positions; one
            # 1-wide zero entry per token keeps this block's slot in step with the others wherever the block sits
            mark = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            past_key_values.update(mark, mark, self.layer_idx)
        return hidden_states + self.mlp(self.norm(hidden_states))


def first_norm(block: nn.Module) -> nn.Module:
    """A fresh copy of the block's first norm (its class and eps; the weights come from the block): the replacement
    normalises its input as the model does."""
    for child in block.children():
        weight = getattr(child, "weight", None)
        if (not list(child.children()) and isinstance(weight, torch.Tensor) and weight.dim() == 1
                and not isinstance(child, (nn.Linear, nn.Embedding))):
            return copy.deepcopy(child)
    raise UserError(f"{type(block).__name__}: no norm among the decoder layer's modules to copy into an MLP "
                    "replacement; use --replacement none or layer")


def mlp_block(kind: str, norm: nn.Module, hidden: int, width: int, act: str, layer_idx: int,
              identity: bool = True) -> MLPBlock:
    """An `ffn` or `swiglu` replacement. identity=True zeroes the down projection, so before training the block
    is exactly "drop the span" and training starts from that baseline rather than from noise."""
    mlp = FFN(hidden, width, act) if kind == "ffn" else SwiGLU(hidden, width, act)
    for m in mlp.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    if identity:
        nn.init.zeros_(mlp.down_proj.weight)
    return MLPBlock(norm, mlp, layer_idx)


def renumber(blocks: nn.ModuleList) -> None:
    """Each layer's modules index the KV cache by `layer_idx`: after a cut the layers behind it move up."""
    for i, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i


def shorten_config(config, start: int, n: int, replacement: str) -> list[str]:
    """Set the layer count and cut every per-layer list of the config (layer_types and the like: any list as
    long as the old stack) the same way as the stack: the replacement keeps the span's first layer's entry.
    Returns the names of the lists cut."""
    old = config.num_hidden_layers
    keep = list(range(start)) + ([start] if replacement != "none" else []) + list(range(start + n, old))
    cut = []
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == old and not name.startswith("_"):
            setattr(config, name, type(value)(value[i] for i in keep))
            cut.append(name)
    config.num_hidden_layers = len(keep)
    return cut


def rebuild(model: nn.Module, blocks: nn.ModuleList, record: dict) -> None:
    """Give a model built from a streamlined folder's config its MLP-only replacement block (weights are loaded
    afterwards); `none` and `layer` folders hold ordinary decoder layers and need nothing."""
    rep = record.get("replacement") or {}
    kind = rep.get("kind")
    if kind not in MLP_KINDS:
        return
    index = rep["index"]
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") \
        else model.config.hidden_size
    blocks[index] = mlp_block(kind, first_norm(blocks[index]), hidden, rep["width"], rep["act"], index)
