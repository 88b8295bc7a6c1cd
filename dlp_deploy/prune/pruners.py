"""The pruner registry: which calibration statistic a method collects and how it turns it into a pruned weight."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .masks import MaskSpec
from .scores import ActivationNorms, magnitude_scores, wanda_scores
from .sparsegpt import Hessian, sparsegpt_prune


@dataclass(frozen=True)
class Pruner:
    name: str
    collector: Callable[[int, torch.device], object] | None  # per-Linear statistic; None = needs no data
    prune: Callable[[torch.Tensor, object, float, MaskSpec], torch.Tensor]  # (weight, stat, ratio, mask) -> W'
    # the unstructured mask granularity used when --granularity is not given: the method's reference selection
    granularity: str = "per-output"


def _mask_and_zero(scores_fn):
    def prune(weight: torch.Tensor, stat, ratio: float, spec: MaskSpec) -> torch.Tensor:
        act = stat.sq_norm if stat is not None else None
        mask = spec.select(scores_fn(weight, act), ratio)
        return weight.masked_fill(mask, 0)

    return prune


def _sparsegpt(weight: torch.Tensor, stat: Hessian, ratio: float, spec: MaskSpec) -> torch.Tensor:
    nm = None if spec.m is None else (spec.pruned_of(ratio), spec.m)
    return sparsegpt_prune(weight, stat.H, ratio, spec.select, nm=nm)


PRUNERS: dict[str, Pruner] = {
    p.name: p
    for p in (
        Pruner("magnitude", None, _mask_and_zero(magnitude_scores)),
        # Wanda's reference compares weights per output row (its paper's App. D)
        Pruner("wanda", ActivationNorms, _mask_and_zero(wanda_scores), "per-output"),
        # SparseGPT's reference (fasterprune, prunen == 0) thresholds w^2/[H^-1]_jj^2 over each whole 128-column
        # block of the matrix; with sparsegpt_prune selecting inside each block, "per-layer" is exactly that
        Pruner("sparsegpt", Hessian, _sparsegpt, "per-layer"),
    )
}


def default_granularity(method: str, pattern: str) -> str:
    """The granularity used when the user gives none: the method's reference selection for unstructured masks;
    N:M patterns choose inside each row's groups, which is what per-output means for them."""
    if pattern.strip().lower() != "unstructured":
        return "per-output"
    pruner = PRUNERS.get(method)
    return pruner.granularity if pruner else "per-output"  # an unknown method is refused by validation
