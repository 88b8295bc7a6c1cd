"""Layer-wise sparsity allocation: pure functions from per-layer statistics to per-layer ratios.

Every allocator's ratios are clipped to [0, MAX_RATIO] and then shifted by one constant so that the
parameter-weighted mean equals the target sparsity exactly (layers of unequal size would otherwise move the
global figure); the shift is reported as `correction`.

A "layer" is a decoder block: one ratio per block, applied to each of its Linears (the pipeline's unit). Each
allocator declares what it reads from the dense model (`Allocator.inputs`):
  - "wanda":   the block's Wanda scores |W|*||X||, all Linears flattened and concatenated (dlp, owl, expr:...);
  - "score":   the method's score per Linear (|W| for magnitude, the Wanda score otherwise; SparseGPT's own score
               exists only inside its sweep, so it uses Wanda's as DLP does) (global, lamp);
  - "weights": the block's fp32 weight matrices (alphapruning);
  - "shapes":  the block's Linear shapes (out, in) (er, er-plus); no calibration, no weights read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import UserError

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


# ---------------------------------------------------------------------------------------------------------------
# Global threshold and LAMP: a per-layer summary of sorted scores, then one threshold across all layers.

SUMMARY_POINTS = 1 << 18  # per layer; exact (every score kept) when a layer has no more scores than this


@dataclass(frozen=True)
class ScoreSummary:
    """A layer's scores, sorted: all of them when the layer has at most SUMMARY_POINTS, else SUMMARY_POINTS order
    statistics at evenly spaced ranks floor((j + 1/2) n / K), each standing for n/K scores. Counting a threshold's
    scores on the summary is then exact for small layers and off by at most n/K scores (a share of 1/K, 4e-6 at
    the default K) for large ones, while the memory kept is K values per layer whatever the model's size."""

    values: np.ndarray  # sorted ascending, float64
    n: int  # scores the layer really has

    @property
    def weight(self) -> float:
        return self.n / len(self.values)


def summarize_scores(scores: torch.Tensor, points: int = SUMMARY_POINTS) -> ScoreSummary:
    """Sort a layer's scores (any shape) into a ScoreSummary."""
    flat = torch.sort(scores.detach().flatten().double()).values
    n = flat.numel()
    if n > points:
        ranks = ((torch.arange(points, dtype=torch.float64, device=flat.device) + 0.5) * n / points).long()
        flat = flat[ranks.clamp_(max=n - 1)]
    return ScoreSummary(flat.cpu().numpy(), n)


def global_threshold_ratios(summaries: Sequence[ScoreSummary], sparsity: float) -> Allocation:
    """One threshold across all layers: t = the k-th smallest of all N scores, k = ceil(p * N) (as counted on the
    summaries); each layer's ratio is the share of its scores <= t. Sorting every score of the model at once is
    what global magnitude pruning does (e.g. Liu et al. 2022's `global_magnitude` init); the per-layer summaries
    make it exact on small models and memory-bounded on large ones."""
    if sparsity <= 0:
        return Allocation([0.0] * len(summaries), extras={"threshold": [float("-inf")] * len(summaries)})
    values = np.concatenate([s.values for s in summaries])
    weights = np.concatenate([np.full(len(s.values), s.weight) for s in summaries])
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    total = cumulative[-1]
    k = sparsity * total
    at = min(int(np.searchsorted(cumulative, k - 1e-9 * total, side="left")), len(order) - 1)
    threshold = float(values[order[at]])
    ratios = [float(np.searchsorted(s.values, threshold, side="right")) * s.weight / s.n for s in summaries]
    return Allocation(ratios, extras={"threshold": [threshold] * len(summaries)})


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al., "Layer-adaptive sparsity for the magnitude-based pruning", ICLR 2021, Eq. 2): with one
    matrix's scores sorted so that |w_1| <= ... <= |w_n|, score(u) = w_u^2 / sum_{v >= u} w_v^2. Returned in that
    ascending order (LAMP is increasing along it: the numerator grows and the tail sum shrinks); the largest weight
    of every matrix scores 1. float64."""
    sq = torch.sort(scores.detach().flatten().double().abs()).values.pow(2)
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])
    return torch.where(tail > 0, sq / tail.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(sq))


def lamp_statistic(matrices: dict[str, torch.Tensor], params: dict) -> ScoreSummary:
    """A block's LAMP scores, computed per matrix (LAMP's own normalisation unit), summarised together."""
    return summarize_scores(torch.cat([lamp_scores(m) for m in matrices.values()]))


def global_statistic(matrices: dict[str, torch.Tensor], params: dict) -> ScoreSummary:
    return summarize_scores(torch.cat([m.detach().flatten() for m in matrices.values()]))


# ---------------------------------------------------------------------------------------------------------------
# Erdos-Renyi (ER) and ER-plus: densities from matrix shapes only.

def er_densities(shapes: Sequence[tuple[int, int]], sparsity: float, fixed: dict[int, float] | None = None,
                 power: float = 1.0) -> np.ndarray:
    """Erdos-Renyi density per matrix (Mocanu et al. 2018, SET; Evci et al. 2020, RigL, "ERK" without the kernel
    terms): d_m = eps * ((n_in + n_out) / (n_in * n_out))^power, eps chosen so that sum(n_m d_m) = (1 - p) sum(n_m).
    A matrix whose d_m would exceed 1 is made dense and eps is solved again over the rest (RigL's loop, as in
    Liu et al. 2022's Random_Pruning code). `fixed` {index: density} holds matrices out of the solve at a given
    density (ER-plus); the budget is unchanged."""
    sizes = np.array([o * i for o, i in shapes], dtype=np.float64)
    raw = np.array([((o + i) / (o * i)) ** power for o, i in shapes], dtype=np.float64)
    density = np.full(len(shapes), np.nan)
    budget = (1 - sparsity) * sizes.sum()
    for index, d in (fixed or {}).items():
        density[index] = d
    while True:
        free = np.isnan(density)
        if not free.any():
            return density
        rest = budget - float((density[~free] * sizes[~free]).sum())
        eps = max(rest, 0.0) / float((raw[free] * sizes[free]).sum())
        trial = np.where(free, eps * raw, density)
        over = free & (trial > 1)
        if not over.any():
            return trial
        density[over & (raw == raw[free].max())] = 1.0  # the densest-wanting matrices become dense, then re-solve


def _block_densities(shape_blocks: Sequence[Sequence[tuple[int, int]]], densities: np.ndarray) -> list[float]:
    out, at = [], 0
    for shapes in shape_blocks:
        sizes = np.array([o * i for o, i in shapes], dtype=np.float64)
        out.append(float((densities[at:at + len(shapes)] * sizes).sum() / sizes.sum()))
        at += len(shapes)
    return out


def er_ratios(shape_blocks: Sequence[Sequence[tuple[int, int]]], sparsity: float, plus: bool = False) -> Allocation:
    """ER per matrix (er_densities), then each block's ratio = 1 - its parameter-weighted density (one ratio per
    block is what the pipeline applies). In a model whose blocks all have the same shapes ER is therefore uniform
    across blocks: its non-uniformity is between a block's matrices, which a per-block ratio averages out.

    ER-plus (Liu et al., "The Unreasonable Effectiveness of Random Pruning", ICLR 2022, `ERK_plus` in their
    Random_Pruning code; the baseline OWL and the DLP paper's Table 9 cite): ER with the network's last layer kept
    dense at the same total budget. Here the last prunable matrix (the last Linear of the last block, e.g.
    mlp.down_proj; lm_head is never pruned) is held at density 1 and ER spreads the rest."""
    shapes = [tuple(s) for block in shape_blocks for s in block]
    fixed = None
    if plus:
        last = len(shapes) - 1
        total = sum(o * i for o, i in shapes)
        fixed = {last: min(1.0, (1 - sparsity) * total / (shapes[last][0] * shapes[last][1]))}
    density = _block_densities(shape_blocks, er_densities(shapes, sparsity, fixed))
    return Allocation([1 - d for d in density], extras={"density": density})


def shapes_statistic(shapes: dict[str, tuple[int, int]], params: dict) -> list[tuple[int, int]]:
    return [tuple(s) for s in shapes.values()]


# ---------------------------------------------------------------------------------------------------------------
# AlphaPruning: heavy-tail exponent of each weight matrix's eigenspectrum.

ALPHAPRUNING_EPSILON = 0.2  # AlphaPruning's main.py default (--epsilon 0.2; its README's Wanda LLaMA-7B command)


def hill_alpha(weight: torch.Tensor) -> float:
    """PL_Alpha_Hill of W's empirical spectral density (AlphaPruning, Lu et al., NeurIPS 2024, Eq. 3, with the
    `xmin_mid` fix-finger of their esd_utils.net_esd_estimator, the metric of their cached `alpha_mid.npy`): the
    eigenvalues of W^T W (squared singular values) sorted ascending, lambda_1..lambda_N, i = floor(N/2),
    k = N - i tail eigenvalues from lambda_i up:  alpha = 1 + k / (sum_{j >= i} ln lambda_j - k ln lambda_i).
    (Their CLI default metric `alpha_peak` instead searches xmin near the histogram peak by a KS fit.)
    Eigenvalues <= 1e-5 are dropped first if the median one is that small (their `filter_zeros`), so a rank-
    deficient matrix does not divide by log 0. A tail that is flat (all k eigenvalues equal, always so when k = 1)
    has no power law: alpha = inf, the lightest tail there is."""
    eigs = torch.sort(torch.linalg.svdvals(weight.detach().double()).pow(2)).values
    if eigs[len(eigs) // 2] <= 1e-5 and (eigs > 1e-5).any():
        eigs = eigs[eigs > 1e-5]
    i = len(eigs) // 2
    k = len(eigs) - i
    logs = torch.log(eigs)
    denom = float(logs[i:].sum() - k * logs[i])
    return float("inf") if denom <= 0 else 1 + k / denom


def alpha_statistic(weights: dict[str, torch.Tensor], params: dict) -> float:
    """A block's alpha: the mean over its matrices (AlphaPruning's block-wise mapping; its code sums, which min-max
    scaling makes the same when every block has the same number of matrices). Matrices whose alpha is infinite
    (flat tail) are left out of the mean; a block with no finite alpha is inf."""
    alphas = [a for a in (hill_alpha(w) for w in weights.values()) if math.isfinite(a)]
    return float(np.mean(alphas)) if alphas else float("inf")


def alphapruning_ratios(alphas: Sequence[float], sparsity: float, sizes: Sequence[int] | None = None,
                        epsilon: float = ALPHAPRUNING_EPSILON) -> Allocation:
    """AlphaPruning (lib/prune.py ww_sparsity): r_l = p * (s1 + (s2 - s1) * minmax(alpha)_l) with s1 = 1 - eps,
    s2 = 1 + eps, then one scale factor so that sum(n_l r_l) = p sum(n_l). Higher alpha (a lighter tail, a less
    trained layer) is pruned more; the ratios span p(1 - eps) .. p(1 + eps) before that rescale."""
    a = np.asarray(alphas, dtype=np.float64)
    finite = np.isfinite(a)
    # an infinite alpha (no tail at all) is the lightest: it takes the top of the range; none finite -> uniform
    a = np.where(finite, a, a[finite].max() if finite.any() else 0.0)
    r = sparsity * ((1 - epsilon) + 2 * epsilon * spread(a, 1.0))
    n = np.ones_like(r) if sizes is None else np.asarray(sizes, dtype=np.float64)
    weighted = float((n * r).sum())
    if weighted > 0:
        r = r * (sparsity * float(n.sum()) / weighted)
    return Allocation(list(map(float, r)), extras={"alpha_hill": list(map(float, a))})


# ---------------------------------------------------------------------------------------------------------------
# The registry.

@dataclass(frozen=True)
class Allocator:
    """`layer_statistic(x, params)` turns one block's inputs (per `inputs`, see the module docstring) into what
    `ratios(stats, sparsity, params)` needs; `params` also carries `sizes` (parameters per block) and `method`.
    None as layer_statistic: the allocator reads nothing from the model (uniform)."""

    name: str
    layer_statistic: Callable[[object, dict], object] | None
    ratios: Callable[[list, float, dict], Allocation]
    inputs: str = "wanda"  # wanda | score | weights | shapes
    uses_alpha: bool = False  # spread from --alpha (DLP's range 2*alpha)
    source: str = ""  # for a saved search or dsa: what it stands for (recorded in pruning.json)
    mapping: str = ""  # expressions, dsa, saved searches: the statistic-to-ratio mapping (expressions.MAPPINGS)


def _expressions():
    from . import expressions

    return expressions


ALLOCATORS: dict[str, Allocator] = {
    a.name: a
    for a in (
        Allocator("uniform", None, lambda stats, p, kw: uniform_ratios(len(stats), p)),
        Allocator("owl", lambda scores, kw: owl_outlier_ratio(scores, kw.get("owl_m", OWL_M)),
                  lambda stats, p, kw: owl_ratios(stats, p, kw.get("owl_lambda", OWL_LAMBDA))),
        Allocator("dlp", lambda scores, kw: REDUCERS[kw.get("reducer", "median")](scores),
                  lambda stats, p, kw: dlp_ratios(stats, p, kw["alpha"]), uses_alpha=True),
        Allocator("global", global_statistic, lambda stats, p, kw: global_threshold_ratios(stats, p), "score"),
        Allocator("er", shapes_statistic, lambda stats, p, kw: er_ratios(stats, p), "shapes"),
        Allocator("er-plus", shapes_statistic, lambda stats, p, kw: er_ratios(stats, p, plus=True), "shapes"),
        Allocator("lamp", lamp_statistic, lambda stats, p, kw: global_threshold_ratios(stats, p), "score"),
        Allocator("alphapruning", alpha_statistic,
                  lambda stats, p, kw: alphapruning_ratios(stats, p, kw.get("sizes"),
                                                           kw.get("epsilon", ALPHAPRUNING_EPSILON)), "weights"),
        # DSA's published LLaMA expression; defined in expressions.py, which imports this module (hence late)
        Allocator("dsa", lambda scores, kw: _expressions().dsa_statistic(scores, kw),
                  lambda stats, p, kw: _expressions().dsa_ratios(stats, p, kw), mapping="dsa",
                  source="DSA's published LLaMA expression (lliai/DSA README.md): W:(ABSLOG)-(VAR)-(ATAN,ASIN), "
                         "lambda 0.08 = expr:abslog>var>atan,asin@raw --alpha 0.08"),
    )
}

EXPR_PREFIX = "expr:"


def get_allocator(name: str) -> Allocator:
    """A registry allocator by name, or an allocation expression `expr:PRE,..>REDUCE>POST,..` (expressions.py)."""
    if name in ALLOCATORS:
        return ALLOCATORS[name]
    if name.lower().startswith(EXPR_PREFIX):
        from .expressions import expression_allocator

        return expression_allocator(name[len(EXPR_PREFIX):])
    from .expressions import saved_allocator

    saved = saved_allocator(name)
    if saved is not None:
        return saved
    raise UserError(f"unknown --allocation {name!r}; choose from {', '.join(ALLOCATORS)}, an expression "
                    f"{EXPR_PREFIX}PRE,..>REDUCE>POST,.. (e.g. {EXPR_PREFIX}abslog>var>atan,asin), or the name of "
                    "a saved search (dlp-deploy search --name)")


def split_allocations(csv: str) -> list[str]:
    """A comma list of allocations in which an expression may itself hold commas (expr:abs,log>var>atan,asin): a
    piece that is neither a registry name nor a new expression continues the expression before it."""
    out: list[str] = []
    for piece in (x.strip() for x in csv.split(",")):
        if not piece or piece == "none":
            continue
        if out and out[-1].lower().startswith(EXPR_PREFIX) and piece not in ALLOCATORS \
                and not piece.lower().startswith(EXPR_PREFIX):
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def allocate(name: str, stats: list, sizes: list[int], sparsity: float, **params) -> Allocation:
    alloc = get_allocator(name).ratios(stats, sparsity, {**params, "sizes": list(sizes)})
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
    """Mixed N:M: each layer's weights kept of every m, n_l in [0, m], from its ratio, repaired so that the
    parameter-weighted sparsity sum((m - n_l)/m * size_l)/sum(size_l) is within one rounding step of `target`.
    n_l = 0 (a layer's Linears emptied) is allowed: at 1:4 on average no layer could otherwise keep more than one
    in four without another going below it, and mixed 1:4 would be uniform 1:4 (DLP Table 15 has them differ)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    pruned = round_and_repair(np.asarray(ratios) * m, sizes / m, [0] * len(sizes), [m] * len(sizes),
                              target * sizes.sum())
    return [m - int(v) for v in pruned]
