"""Importance of structured units, pure tensor math. Every kind first scores each weight (element scores, same
shape as the weight), then a unit's importance is the sum over its slices in every coupled Linear:

- activation: |W_ij| * ||X_j|| (Wanda's score; gradient-free; FLAP/Wanda-sp use the same per-unit sum);
- taylor: |W_ij * dL/dW_ij| with gradients of the calibration loss (LLM-Pruner's first-order `param_first`).
"""
from __future__ import annotations

import torch

from ...models.geometry import BlockGeometry


def taylor_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return (weight.float() * grad.float()).abs()


def query_head_scores(q: torch.Tensor, o: torch.Tensor, g: BlockGeometry) -> torch.Tensor:
    """[num_heads]: a query head's rows of q plus its columns of o."""
    return (q.reshape(g.num_heads, g.head_dim, -1).sum(dim=(1, 2))
            + o.reshape(o.shape[0], g.num_heads, g.head_dim).sum(dim=(0, 2)))


def kv_group_scores(k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor, g: BlockGeometry) -> torch.Tensor:
    """[num_kv_heads]: a KV head's rows of k and v plus the scores of the query heads that read it."""
    kv = (k + v).reshape(g.num_kv_heads, g.head_dim, -1).sum(dim=(1, 2))
    return kv + heads.reshape(g.num_kv_heads, g.group).sum(dim=1)


def channel_scores(ins: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """[width]: an MLP channel's row in every input Linear plus its column in the output Linear."""
    return sum(x.sum(dim=1) for x in ins) + out.sum(dim=0)


def unit_scores(elements: dict[str, torch.Tensor], g: BlockGeometry) -> dict[str, torch.Tensor]:
    """Per-unit importance from per-role element scores (roles as in BlockGeometry.names())."""
    heads = query_head_scores(elements["q_proj"], elements["o_proj"], g)
    return {
        "heads": heads,
        "kv_groups": kv_group_scores(elements["k_proj"], elements["v_proj"], heads, g),
        "channels": channel_scores([elements[f"mlp_in{i}"] for i in range(len(g.mlp_in))], elements["mlp_out"]),
    }
