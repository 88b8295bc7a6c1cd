"""Layer-wise sparsity allocation: pure functions from per-layer statistics to per-layer ratios.

Every allocator's ratios are clipped to [0, MAX_RATIO] and then shifted by one constant so that the
parameter-weighted mean equals the target sparsity exactly (layers of unequal size would otherwise move the
global figure); the shift is reported as `correction`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

MAX_RATIO = 0.99

# DLP paper, Appendix G: alpha per target sparsity for LLaMA-family models.
DLP_ALPHA = {0.1: 0.06, 0.2: 0.02, 0.3: 0.04, 0.4: 0.02, 0.5: 0.04, 0.6: 0.10, 0.7: 0.15, 0.8: 0.12}
OWL_M, OWL_LAMBDA = 5.0, 0.08


def default_dlp_alpha(sparsity: float) -> float:
    """Appendix G's value at the nearest listed sparsity (ties go to the lower level; 90% uses 80%'s 0.12)."""
    levels = sorted(DLP_ALPHA)
    return DLP_ALPHA[min(levels, key=lambda lv: (round(abs(lv - sparsity), 9), lv))]


REDUCERS: dict[str, Callable[[torch.Tensor], float]] = {
    "median": lambda x: float(torch.median(x)),
    "mean": lambda x: float(x.mean()),
    "sum": lambda x: float(x.sum(dtype=torch.float64)),
    "max": lambda x: float(x.max()),
    "std": lambda x: float(x.std()),
    "var": lambda x: float(x.var()),
}


def owl_outlier_ratio(scores: torch.Tensor, m: float = OWL_M) -> float:
    """OWL's layer statistic D: share of scores above m times their mean."""
    return float((scores > m * scores.mean()).float().mean())


@dataclass
class Allocation:
    ratios: list[float]
    correction: float = 0.0
    clipped: int = 0
    extras: dict[str, list[float]] = field(default_factory=dict)  # per-layer inputs, e.g. {"S": ..., "I": ...}


def spread(values: Sequence[float], width: float) -> np.ndarray:
    """Min-max scale `values` onto [0, width] (all zeros when the values are all equal)."""
    v = np.asarray(values, dtype=np.float64)
    span = v.max() - v.min()
    return np.zeros_like(v) if span == 0 else (v - v.min()) / span * width


def uniform_ratios(n_layers: int, sparsity: float) -> Allocation:
    return Allocation([sparsity] * n_layers)


def owl_ratios(outlier_ratios: Sequence[float], sparsity: float, lam: float = OWL_LAMBDA) -> Allocation:
    """More outliers, less sparsity: R = p + mean(d) - d, d = D min-max scaled to [0, 2*lambda]."""
    d = spread(outlier_ratios, 2 * lam)
    return Allocation(list(sparsity + d.mean() - d), extras={"D": list(map(float, outlier_ratios))})


def dlp_ratios(layer_scores: Sequence[float], sparsity: float, alpha: float) -> Allocation:
    """DLP, Alg. 1: I = 1 - S/sum(S); d = I min-max scaled to [0, 2*alpha]; R = p + mean(d) - d."""
    s = np.asarray(layer_scores, dtype=np.float64)
    importance = 1 - s / s.sum()
    d = spread(importance, 2 * alpha)
    return Allocation(list(sparsity + d.mean() - d), extras={"S": list(map(float, s)), "I": list(map(float, importance))})


def match_weighted_mean(ratios: Sequence[float], sizes: Sequence[int], target: float,
                        hi: float = MAX_RATIO) -> tuple[np.ndarray, float, int]:
    """Clip to [0, hi] and add the one shift c making sum(n_i * clip(r_i + c)) / sum(n_i) == target."""
    r, n = np.asarray(ratios, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    clipped = int(((r < 0) | (r > hi)).sum())

    def weighted(c: float) -> float:
        return float((np.clip(r + c, 0, hi) * n).sum() / n.sum())

    lo_c, hi_c = -1.0 - r.max(), 1.0 - r.min()
    for _ in range(100):  # bisection: weighted() is monotone in c
        mid = (lo_c + hi_c) / 2
        lo_c, hi_c = (mid, hi_c) if weighted(mid) < target else (lo_c, mid)
    c = (lo_c + hi_c) / 2
    c = 0.0 if abs(weighted(0.0) - target) < 1e-12 else c
    return np.clip(r + c, 0, hi), c, clipped


@dataclass(frozen=True)
class Allocator:
    name: str
    layer_statistic: Callable[[torch.Tensor, dict], float] | None  # over a layer's flattened Wanda scores
    ratios: Callable[[list[float], float, dict], Allocation]


ALLOCATORS: dict[str, Allocator] = {
    a.name: a
    for a in (
        Allocator("uniform", None, lambda stats, p, kw: uniform_ratios(len(stats), p)),
        Allocator("owl", lambda scores, kw: owl_outlier_ratio(scores, kw.get("owl_m", OWL_M)),
                  lambda stats, p, kw: owl_ratios(stats, p, kw.get("owl_lambda", OWL_LAMBDA))),
        Allocator("dlp", lambda scores, kw: REDUCERS[kw.get("reducer", "median")](scores),
                  lambda stats, p, kw: dlp_ratios(stats, p, kw["alpha"])),
    )
}


def allocate(name: str, stats: list[float], sizes: list[int], sparsity: float, **params) -> Allocation:
    alloc = ALLOCATORS[name].ratios(stats, sparsity, params)
    ratios, correction, clipped = match_weighted_mean(alloc.ratios, sizes, sparsity)
    alloc.ratios, alloc.correction, alloc.clipped = [float(x) for x in ratios], float(correction), clipped
    return alloc




def round_and_repair(ideal: Sequence[float], unit_params: Sequence[float], lo: Sequence[int], hi: Sequence[int],
                     target: float) -> np.ndarray:
    """Integers x_i in [lo_i, hi_i] near `ideal` whose weighted total sum(unit_params_i * x_i) comes closest to
    `target`: round each, then move one unit at a time where the rounding was furthest off (largest residual),
    while that brings the total closer. With equal unit sizes the order of `ideal` is kept (ties aside)."""
    ideal = np.asarray(ideal, dtype=np.float64)
    w = np.asarray(unit_params, dtype=np.float64)
    lo, hi = np.asarray(lo), np.asarray(hi)
    x = np.clip(np.rint(ideal), lo, hi).astype(np.int64)
    while True:
        gap = target - float((w * x).sum())
        step = 1 if gap > 0 else -1
        movable = (x < hi) if step > 0 else (x > lo)
        if gap == 0 or not movable.any():
            return x
        residual = (ideal - x) * step  # how far each layer's rounding went against the needed direction
        residual[~movable] = -np.inf
        i = int(np.argmax(residual))
        if abs(gap - step * w[i]) >= abs(gap):
            return x
        x[i] += step


def mixed_nm_counts(ratios: Sequence[float], sizes: Sequence[int], target: float, m: int) -> list[int]:
    """Mixed N:M: each layer's pruned-per-group n_l in [0, m-1] from its ratio, repaired so that the
    parameter-weighted sparsity sum(n_l/m * size_l)/sum(size_l) is within one rounding step of `target`."""
    sizes = np.asarray(sizes, dtype=np.float64)
    n = round_and_repair(np.asarray(ratios) * m, sizes / m, [0] * len(sizes), [m - 1] * len(sizes),
                         target * sizes.sum())
    return [int(v) for v in n]
