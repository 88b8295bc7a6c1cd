"""Masks from scores: True marks a weight to prune. Counts are exact: round(n * ratio) per row or per matrix.

The reference code floors; with layer-wise ratios flooring biases every module low (by up to 1/n), which on narrow
layers moves the global sparsity by a point, so the nearest count is used (identical to floor for p * n integral)."""
from __future__ import annotations

from typing import Callable

import torch


def pruned_count(n: int, ratio: float) -> int:
    return min(n, int(n * ratio + 0.5))


def per_output_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Each output row loses its round(columns * ratio) lowest-scoring weights (Wanda's comparison group)."""
    k = pruned_count(scores.shape[1], ratio)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.argsort(scores, dim=1, stable=True)[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def per_layer_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The whole matrix loses its round(numel * ratio) lowest-scoring weights."""
    k = pruned_count(scores.numel(), ratio)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.argsort(scores.flatten(), stable=True)[:k]] = True
    return mask.view_as(scores)


GRANULARITIES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "per-output": per_output_mask,
    "per-layer": per_layer_mask,
}
