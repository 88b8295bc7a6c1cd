"""A decoder block as the exporter rewrites it: its attention geometry and features, read from the modules, and
its wiring (where the norms sit around attention and MLP), chosen from a registry by the norms the block has.

A block without self_attn (a depth-pruning replacement, e.g. LLM-Streamline's MLP block) is a residual MLP only:
it has no attention, so it gets no KV cache entry at all (the cache inputs are numbered over attention blocks).

Names alone do not prove wiring (Gemma-2's `post_attention_layernorm` normalises the attention output, LLaMA's
normalises the MLP input), so every choice made here is checked against the block's own forward by `proof.py`
before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import UserError

_SEPARATE_QKV = ("q_proj", "k_proj", "v_proj")
_FUSED_QKV = ("qkv_proj",)
_QK_NORMS = ("q_norm", "k_norm")


@dataclass
class LayerSpec:
    """One decoder block's attention geometry and features, read from its own modules (layers may differ)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    wiring: str = "pre-norm"
    fused_qkv: bool = False
    qk_norm: str | None = None  # "head": over each head (Qwen3, Gemma-3); "full": over the projection (OLMo-2)
    softcap: float | None = None  # tanh soft-capping of attention scores (Gemma-2)
    window: int | None = None  # sliding-window attention: keys at most window-1 slots back
    rope: int = 0  # index of this layer's rotary table (Gemma-3 has a local and a global one)

    @property
    def attention(self) -> bool:
        """False for an MLP-only block: no attention, no KV cache entry."""
        return WIRINGS[self.wiring].attention


def mlp_only_spec() -> LayerSpec:
    return LayerSpec(num_heads=0, num_kv_heads=0, head_dim=0, scaling=0.0, wiring="mlp-only")


# ---------------------------------------------------------------- wirings

def _pre_norm(block, attend, hidden):
    """LLaMA, Mistral, Qwen2/3, Phi-3: norm -> sublayer -> residual add."""
    hidden = hidden + attend(block.input_layernorm(hidden))
    return hidden + block.mlp(block.post_attention_layernorm(hidden))


def _sandwich(block, attend, hidden):
    """Gemma-2/3: each sublayer's input and output are normalised before the residual add."""
    hidden = hidden + block.post_attention_layernorm(attend(block.input_layernorm(hidden)))
    return hidden + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(hidden)))


def _post_norm(block, attend, hidden):
    """OLMo-2: the sublayer's output is normalised, its input is not."""
    hidden = hidden + block.post_attention_layernorm(attend(hidden))
    return hidden + block.post_feedforward_layernorm(block.mlp(hidden))


def _mlp_only(block, attend, hidden):
    """A depth-pruning replacement block with no attention: norm -> MLP -> residual add."""
    return hidden + block.mlp(block.norm(hidden))


@dataclass(frozen=True)
class Wiring:
    norms: frozenset[str]
    forward: Callable
    attention: bool = True


WIRINGS: dict[str, Wiring] = {
    "pre-norm": Wiring(frozenset({"input_layernorm", "post_attention_layernorm"}), _pre_norm),
    "sandwich": Wiring(frozenset({"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                  "post_feedforward_layernorm"}), _sandwich),
    "post-norm": Wiring(frozenset({"post_attention_layernorm", "post_feedforward_layernorm"}), _post_norm),
    "mlp-only": Wiring(frozenset({"norm"}), _mlp_only, attention=False),
}


def is_norm_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (not list(module.children()) and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and not isinstance(module, (nn.Embedding, nn.Linear)))


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def block_wiring(block: nn.Module, index: int, arch: str) -> str:
    """The registered wiring whose norms are exactly the block's norms (among the wirings with attention, or
    without it for a block with no self_attn); any other weighted part is refused."""
    if not isinstance(getattr(block, "mlp", None), nn.Module):
        raise UserError(f"{arch}: decoder block {index} ({type(block).__name__}) has no mlp; export "
                        "supports blocks of one self_attn (or none), one mlp and RMS/LayerNorms")
    has_attention = isinstance(getattr(block, "self_attn", None), nn.Module)
    norms = {name for name, child in block.named_children() if is_norm_like(child)}
    others = [name for name, child in block.named_children()
              if name not in norms and name not in ("self_attn", "mlp") and _has_weights(child)]
    others += [name for name, _ in block.named_parameters(recurse=False)]
    if others:
        raise UserError(f"{arch}: decoder block {index} has weighted parts the exporter does not implement "
                        f"({', '.join(others)})")
    candidates = {k: w for k, w in WIRINGS.items() if w.attention == has_attention}
    for name, wiring in candidates.items():
        if wiring.norms == norms:
            return name
    raise UserError(f"{arch}: decoder block {index} has norms {sorted(norms)}, which match no known wiring "
                    f"({'; '.join(f'{k}: {sorted(w.norms)}' for k, w in candidates.items())})")


# ---------------------------------------------------------------- attention geometry and features

def _check_attention(attn: nn.Module, index: int, arch: str) -> bool:
    """True for a fused qkv_proj; refuses any weighted part the rewritten attention would silently drop."""
    has = lambda name: isinstance(getattr(attn, name, None), nn.Linear)  # noqa: E731
    fused = has("qkv_proj") and not any(has(n) for n in _SEPARATE_QKV)
    if not (fused or all(has(n) for n in _SEPARATE_QKV)) or not has("o_proj"):
        raise UserError(f"{arch}: attention of block {index} ({type(attn).__name__}) needs nn.Linear q_proj, "
                        "k_proj, v_proj (or one fused qkv_proj) and o_proj")
    known = {*(_FUSED_QKV if fused else _SEPARATE_QKV), "o_proj"}
    extra = [name for name, child in attn.named_children()
             if name not in known and _has_weights(child) and not (name in _QK_NORMS and is_norm_like(child))]
    extra += [name for name, _ in attn.named_parameters(recurse=False)]
    if extra:
        raise UserError(f"{arch}: attention of block {index} has weighted parts the exporter does not implement "
                        f"({', '.join(extra)})")
    return fused


def _head_dim(attn: nn.Module, config, index: int, arch: str) -> int:
    head_dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    if not head_dim and config is not None:
        head_dim = config.hidden_size // config.num_attention_heads
    if not head_dim:
        raise UserError(f"{arch}: cannot tell the attention head size of block {index} (no head_dim)")
    return int(head_dim)


def _head_counts(attn: nn.Module, fused: bool, head_dim: int, config, index: int, arch: str) -> tuple[int, int]:
    o_in = attn.o_proj.in_features
    if fused:  # q, k, v stacked along the output rows: heads from o_proj, KV heads from what remains
        heads = o_in // head_dim
        kv_heads = (attn.qkv_proj.out_features - o_in) // (2 * head_dim)
    else:
        q, k, v = (getattr(attn, n) for n in _SEPARATE_QKV)
        if q.out_features % head_dim or k.out_features % head_dim or k.out_features != v.out_features:
            raise UserError(f"{arch}: block {index} projections q={q.out_features}, k={k.out_features}, "
                            f"v={v.out_features} are not whole heads of size {head_dim}")
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
        if o_in != q.out_features:
            raise UserError(f"{arch}: block {index} o_proj takes {o_in} features but attention yields "
                            f"{q.out_features}")
    if kv_heads <= 0 or heads % kv_heads:
        raise UserError(f"{arch}: block {index} has {heads} query heads for {kv_heads} KV heads; "
                        "grouped-query attention needs a whole number of query heads per KV head")
    return heads, kv_heads


def _qk_norm(attn: nn.Module, heads: int, kv_heads: int, head_dim: int, index: int, arch: str) -> str | None:
    present = [n for n in _QK_NORMS if isinstance(getattr(attn, n, None), nn.Module)]
    if not present:
        return None
    if len(present) == 1:
        raise UserError(f"{arch}: attention of block {index} has {present[0]} without its pair")
    q_size, k_size = attn.q_norm.weight.numel(), attn.k_norm.weight.numel()
    if q_size == k_size == head_dim:
        return "head"
    if (q_size, k_size) == (heads * head_dim, kv_heads * head_dim):
        return "full"
    raise UserError(f"{arch}: q/k norms of block {index} have sizes {q_size}/{k_size}, neither per head "
                    f"({head_dim}) nor per projection ({heads * head_dim}/{kv_heads * head_dim})")


def sliding_window(attn: nn.Module, config) -> int | None:
    """The layer's own window where its attention declares one (None there means full attention, as in Qwen2's
    full layers); otherwise the model-wide window that Mistral-style models apply in their mask."""
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    else:
        window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def layer_spec(block: nn.Module, config, index: int, arch: str, rope: int = 0) -> LayerSpec:
    wiring = block_wiring(block, index, arch)
    if not WIRINGS[wiring].attention:
        return mlp_only_spec()
    attn = block.self_attn
    fused = _check_attention(attn, index, arch)
    head_dim = _head_dim(attn, config, index, arch)
    heads, kv_heads = _head_counts(attn, fused, head_dim, config, index, arch)
    cap = getattr(attn, "attn_logit_softcapping", None)
    return LayerSpec(heads, kv_heads, head_dim, float(getattr(attn, "scaling", head_dim ** -0.5)), wiring, fused,
                     _qk_norm(attn, heads, kv_heads, head_dim, index, arch), float(cap) if cap else None,
                     sliding_window(attn, config), rope)


# ---------------------------------------------------------------- the rewritten forward

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _project(attn: nn.Module, layer: LayerSpec, x: torch.Tensor):
    if not layer.fused_qkv:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    qkv = attn.qkv_proj(x)
    q_size, kv_size = layer.num_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
    return qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]


def attention(attn: nn.Module, layer: LayerSpec, x, cos, sin, mask_bias, past_key, past_value):
    """GQA without repeating K/V: each KV head attends for its `group` query heads stacked along the rows.

    Keeping Concat(past, new) -> MatMul free of Expand/Reshape is what DeepSparse's internal KV cache needs
    (its cached-concat fusion asserts otherwise), and it avoids materialising repeated keys.
    """
    batch, length = x.shape[0], x.shape[1]
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = _project(attn, layer, x)
    if layer.qk_norm == "full":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q.reshape(batch, length, heads, dim)
    k = k.reshape(batch, length, kv_heads, dim)
    if layer.qk_norm == "head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.reshape(batch, length, kv_heads, dim).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    key = torch.cat((past_key, k), dim=2)
    value = torch.cat((past_value, v), dim=2)
    group = heads // kv_heads
    if group == 1:
        scores = softcap(torch.matmul(q, key.transpose(2, 3)) * layer.scaling, layer.softcap) + mask_bias
        probs = torch.softmax(scores, dim=-1)
    else:
        # query head h uses KV head h // group, so heads of one group are contiguous: fold them into rows, and
        # add the mask in 5-D (tiling it with Concat instead makes DeepSparse's compiler assert)
        q = q.reshape(batch, kv_heads, group * length, dim)
        scores = softcap(torch.matmul(q, key.transpose(2, 3)) * layer.scaling, layer.softcap)
        scores = scores.reshape(batch, kv_heads, group, length, -1) + mask_bias[:, :, None]
        probs = torch.softmax(scores, dim=-1).reshape(batch, kv_heads, group * length, -1)
    out = torch.matmul(probs, value).reshape(batch, heads, length, dim)
    out = out.transpose(1, 2).reshape(batch, length, heads * dim)
    return attn.o_proj(out), key, value


def softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else torch.tanh(scores / cap) * cap


def block_forward(block: nn.Module, layer: LayerSpec, hidden, cos, sin, mask_bias, past_key, past_value,
                  on_attention: Callable | None = None):
    """(hidden out, key, value) of one block; `on_attention` sees the attention output (the proof names the module
    that differs with it). An MLP-only block returns no key and value (None)."""
    cache = {"key": None, "value": None}

    def attend(x):
        out, cache["key"], cache["value"] = attention(block.self_attn, layer, x, cos, sin, mask_bias, past_key,
                                                      past_value)
        if on_attention is not None:
            on_attention(out)
        return out

    hidden = WIRINGS[layer.wiring].forward(block, attend, hidden)
    return hidden, cache["key"], cache["value"]
