"""A decoder block's prunable units, found by structure: the attention's q/k/v/o projections (separate Linears,
as every LLaMA-family block has them) and the MLP's Linears (those reading the hidden state feed the one
writing it back). Coupled slices: a query head is rows of q and columns of o; a KV group is rows of k and v plus
its query heads; an MLP channel is a row of every input Linear and a column of the output Linear."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UserError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class BlockGeometry:
    attention: str  # qualified name of the attention module inside the block
    mlp_in: tuple[str, ...]  # qualified names of the MLP Linears reading the hidden state (gate, up)
    mlp_out: str  # the MLP Linear writing back to the hidden state (down)
    hidden: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def attention_params(self, heads: int, kv_heads: int) -> int:
        return self.hidden * self.head_dim * (2 * heads + 2 * kv_heads)

    def mlp_params(self, channels: int) -> int:
        return self.hidden * channels * (len(self.mlp_in) + 1)

    def params(self) -> int:
        return self.attention_params(self.num_heads, self.num_kv_heads) + self.mlp_params(self.intermediate)

    def names(self) -> dict[str, str]:
        """Role -> qualified Linear name within the block."""
        out = {p: f"{self.attention}.{p}" for p in ATTENTION_PROJECTIONS}
        out.update({f"mlp_in{i}": n for i, n in enumerate(self.mlp_in)})
        out["mlp_out"] = self.mlp_out
        return out


def block_geometry(block: nn.Module, index: int, head_dim_hint: int | None = None) -> BlockGeometry:
    """Read one block's geometry from its modules' shapes, or refuse with a one-line reason."""
    attention = _attention(block, index)
    attn = block.get_submodule(attention)
    q, k, v, o = (getattr(attn, p) for p in ATTENTION_PROJECTIONS)
    hidden = q.in_features
    head_dim = int(getattr(attn, "head_dim", 0) or head_dim_hint or 0)
    if not head_dim or q.out_features % head_dim or k.out_features % head_dim or k.out_features != v.out_features:
        raise UserError(f"block {index}: cannot split q/k/v ({q.out_features}/{k.out_features}/{v.out_features}) "
                        f"into heads of size {head_dim}")
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if heads % kv_heads:
        raise UserError(f"block {index}: {heads} query heads do not split evenly over {kv_heads} KV heads")
    mlp_in, mlp_out, width = _mlp(block, attention, hidden, index)
    return BlockGeometry(attention, mlp_in, mlp_out, hidden, head_dim, heads, kv_heads, width)


def _attention(block: nn.Module, index: int) -> str:
    for name, module in block.named_modules():
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ATTENTION_PROJECTIONS):
            return name
    fused = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and "qkv" in n.rsplit(".", 1)[-1]]
    hint = f" (fused {fused[0]}: split it into q/k/v first)" if fused else ""
    raise UserError(f"block {index} ({type(block).__name__}): no attention with separate q_proj/k_proj/v_proj/o_proj "
                    f"Linears{hint}; structured pruning needs them to remove whole heads")


def _mlp(block: nn.Module, attention: str, hidden: int, index: int) -> tuple[tuple[str, ...], str, int]:
    """The MLP: Linears outside the attention whose inputs are the hidden state, all of one width, feeding one
    Linear that maps that width back to the hidden size."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and not n.startswith(attention + ".")}
    ins = [n for n, m in linears.items() if m.in_features == hidden and m.out_features != hidden]
    outs = [n for n, m in linears.items() if m.out_features == hidden and m.in_features != hidden]
    if not ins and not outs and len(linears) > 1 and all(m.in_features == m.out_features == hidden
                                                          for m in linears.values()):
        # a structured model can keep exactly `hidden` channels: shapes no longer tell the projections apart, so
        # take the MLP's own order (the one writing back is registered last in every LLaMA-family MLP)
        *ins, last = linears
        outs = [last]
    widths = {linears[n].out_features for n in ins}
    if len(outs) != 1 or not ins or len(widths) != 1 or linears[outs[0]].in_features not in widths:
        shapes = ", ".join(f"{n} {m.in_features}->{m.out_features}" for n, m in linears.items())
        raise UserError(f"block {index}: MLP wiring not understood ({shapes}); structured pruning needs Linears "
                        "hidden->width (gate/up, unfused) and one width->hidden (down)")
    return tuple(ins), outs[0], widths.pop()
