"""Allocation expressions (DSA: Li et al., "Discovering Sparsity Allocation for Layer-wise Pruning of Large Language
Models", NeurIPS 2024; vocabulary from the authors' released engine, lliai/DSA lib/autolayer.py `LayerEngine`).

    --allocation 'expr:PRE[,PRE...]>REDUCE>POST[,POST...]'      e.g. expr:abslog>var>atan,asin

Per decoder block, over the block's Wanda scores |W|*||X|| (every Linear, flattened and concatenated: the input
DLP and OWL read):  pre-ops element-wise, in order;  one reduction to a number;  then post-ops, in order, on the
vector of the blocks' numbers.  `>` separates the three parts, `,` the ops of a part; both outer parts may be left
out (`median`, `abs>mean`, `var>atan`; with two parts the one that names a reduction is the reduction).  Tokens
are case-insensitive; DSA's spellings (MMS, FROBENIUS_NORM, L1_NORM, GEOMETRIC_MEAN, NO_OP) are accepted.

Statistic to ratio is DLP's and OWL's mapping: d = minmax(v) * 2*alpha, R = p + mean(d) - d (higher value, lower
sparsity; range 2*alpha, alpha from --alpha, default DLP's App. G value), then the clipping and parameter-weighted
correction every allocator shares. So:
    expr:outlier        is OWL (D = share of scores > M * mean, M from --owl-m) with lambda = --alpha;
    expr:median>neg     is DLP with the median reducer (DLP's I = 1 - S/sum(S) is a decreasing affine map of S,
                        and minmax(-S) = minmax(I)); other DLP reducers likewise (expr:mean>neg ...).

Domains.  DSA applies post-ops to each layer's number as is and maps NaN to 0 and inf to -1 (LayerEngine.
compute_importance). Here a post-op whose domain is limited first min-max scales the blocks' numbers into a safe
interval: asin, acos, tan -> [0, 1]; log, sqrt -> [1, 2] (then monotone and finite). Other ops run as they are; a
result that is not finite for some block (exp of a large value) is a UserError naming the blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from .allocate import EXPR_PREFIX, REDUCERS, Allocation, Allocator, owl_outlier_ratio, spread


# ---- pre-ops: element-wise over a block's score tensor (DSA `_STICK_OPS`) -------------------------------------

def _log(x: torch.Tensor) -> torch.Tensor:
    """DSA `element_wise_log_op`: non-positive entries become 1, then log(x + 1e-6)."""
    return torch.log(torch.where(x > 0, x, torch.ones_like(x)) + 1e-6)


def _abslog(x: torch.Tensor) -> torch.Tensor:
    """DSA `element_wise_abslog_op`: zeros become 1, then log|x|."""
    return torch.log(torch.where(x == 0, torch.ones_like(x), x).abs())


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """z-score (x - mean) / std; a constant tensor gives zeros (DSA maps its NaNs to 0)."""
    std = x.std()
    return torch.zeros_like(x) if not std > 0 else (x - x.mean()) / std


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """DSA `MMS`: (x - min) / (max - min + 1e-9)."""
    return (x - x.min()) / (x.max() - x.min() + 1e-9)


PRE_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "abs": torch.abs,
    "log": _log,
    "abslog": _abslog,
    "pow": lambda x: x.pow(2),
    "exp": torch.exp,
    "normalize": _normalize,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "minmax": _minmax,
}


# ---- reductions: a block's (pre-processed) scores -> one number (DSA `_DEFORM_OPS` that apply to a score tensor) --

def _entropy(x: torch.Tensor) -> float:
    """Shannon entropy (nats) of the normalised |x|: p = |x| / sum|x|, H = -sum p log p (0 log 0 = 0)."""
    a = x.double().abs()
    total = a.sum()
    if not total > 0:
        return 0.0
    p = a / total
    return float(-(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum())


def _gmean(x: torch.Tensor) -> float:
    """Geometric mean of |x|: exp(mean(log|x|)), 0 if any entry is 0 (DSA's prod(x)^(1/n) without underflow)."""
    a = x.double().abs()
    return 0.0 if bool((a == 0).any()) else float(torch.exp(torch.log(a).mean()))


@dataclass(frozen=True)
class Reduction:
    fn: Callable[[torch.Tensor, float | None, dict], float]
    takes_arg: bool = False  # outlier(M)


REDUCTIONS: dict[str, Reduction] = {
    # the reducers DLP already has (same code, so `expr:median>neg` reproduces --allocation dlp bit for bit in S)
    **{name: Reduction(lambda x, _a, _kw, f=f: f(x)) for name, f in REDUCERS.items()},
    "l1": Reduction(lambda x, _a, _kw: float(x.double().abs().mean())),  # DSA l1_norm_op: sum|x| / numel
    "fro": Reduction(lambda x, _a, _kw: float(torch.linalg.vector_norm(x.double()))),
    "entropy": Reduction(lambda x, _a, _kw: _entropy(x)),
    "gmean": Reduction(lambda x, _a, _kw: _gmean(x)),
    "min": Reduction(lambda x, _a, _kw: float(x.min())),
    # OWL's layer statistic: share of scores above M times their mean (M: outlier(M), else --owl-m)
    "outlier": Reduction(lambda x, a, kw: owl_outlier_ratio(x, kw.get("owl_m", 5.0) if a is None else a), True),
}


# ---- post-ops: on the vector of the blocks' numbers (DSA `_POST_OPS`, plus sqrt, sinh, cosh, neg) ----------------

@dataclass(frozen=True)
class PostOp:
    fn: Callable[[np.ndarray], np.ndarray]
    domain: tuple[float, float] | None = None  # inputs min-max scaled into this interval first


POST_OPS: dict[str, PostOp] = {
    "identity": PostOp(lambda v: v),
    "neg": PostOp(np.negative),
    "abs": PostOp(np.abs),
    "sin": PostOp(np.sin),
    "cos": PostOp(np.cos),
    "tan": PostOp(np.tan, (0.0, 1.0)),
    "asin": PostOp(np.arcsin, (0.0, 1.0)),
    "acos": PostOp(np.arccos, (0.0, 1.0)),
    "atan": PostOp(np.arctan),
    "sinh": PostOp(np.sinh),
    "cosh": PostOp(np.cosh),
    "tanh": PostOp(np.tanh),
    "exp": PostOp(np.exp),
    "log": PostOp(np.log, (1.0, 2.0)),
    "sqrt": PostOp(np.sqrt, (1.0, 2.0)),
    "sigmoid": PostOp(lambda v: 1 / (1 + np.exp(-v))),
    "softplus": PostOp(lambda v: np.logaddexp(0.0, v)),
}

ALIASES = {"mms": "minmax", "no_op": "identity", "frobenius_norm": "fro", "frobenius": "fro", "l1_norm": "l1",
           "geometric_mean": "gmean", "square": "pow", "zscore": "normalize"}


def _into(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = v.max() - v.min()
    return np.full_like(v, lo) if span == 0 else lo + (v - v.min()) / span * (hi - lo)


# ---- the expression ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expression:
    pre: tuple[str, ...]
    reduce: str
    reduce_arg: float | None
    post: tuple[str, ...]

    def __str__(self) -> str:
        red = self.reduce if self.reduce_arg is None else f"{self.reduce}({self.reduce_arg:g})"
        return ">".join(p for p in (",".join(self.pre), red, ",".join(self.post)) if p)

    def statistic(self, scores: torch.Tensor, params: dict) -> float:
        """One block: pre-ops, then the reduction."""
        x = scores
        for op in self.pre:
            x = PRE_OPS[op](x)
        return REDUCTIONS[self.reduce].fn(x, self.reduce_arg, params)

    def transform(self, values) -> np.ndarray:
        """All blocks: the post-ops on the vector of block statistics."""
        v = np.asarray(values, dtype=np.float64)
        for op in self.post:
            post = POST_OPS[op]
            with np.errstate(all="ignore"):
                v = post.fn(_into(v, *post.domain) if post.domain else v)
        bad = [i for i, x in enumerate(v) if not math.isfinite(x)]
        if bad:
            raise UserError(f"allocation expression {self} gives non-finite values for layers {bad}; drop or "
                            "replace the op that overflows (exp, sinh, cosh of large statistics)")
        return v

    def ratios(self, values, sparsity: float, alpha: float) -> Allocation:
        """DLP/OWL's mapping: d = minmax(v) * 2 alpha, R = p + mean(d) - d."""
        v = self.transform(values)
        d = spread(v, 2 * alpha)
        return Allocation(list(sparsity + d.mean() - d),
                          extras={"E": list(map(float, values)), "V": list(map(float, v))})


def _vocabulary() -> str:
    return (f"pre-ops: {', '.join(PRE_OPS)}; reductions: {', '.join(REDUCTIONS)} (outlier(M) takes M); "
            f"post-ops: {', '.join(POST_OPS)}")


def _token(raw: str, registry: dict, part: str, text: str) -> str:
    name = raw.strip().lower()
    name = ALIASES.get(name, name)
    if name not in registry:
        raise UserError(f"unknown {part} {raw.strip()!r} in allocation expression {text!r}; the grammar is "
                        f"PRE,..>REDUCE>POST,.. with {_vocabulary()}")
    return name


def _reduction(raw: str, text: str) -> tuple[str, float | None]:
    raw = raw.strip()
    arg = None
    if raw.endswith(")") and "(" in raw:
        raw, inner = raw[:-1].split("(", 1)
        try:
            arg = float(inner)
        except ValueError:
            raise UserError(f"reduction argument {inner!r} in {text!r} is not a number (e.g. outlier(5))") from None
    name = _token(raw, REDUCTIONS, "reduction", text)
    if arg is not None and not REDUCTIONS[name].takes_arg:
        raise UserError(f"reduction {name} in {text!r} takes no argument")
    if arg is not None and not arg > 0:
        raise UserError(f"outlier({arg:g}) in {text!r}: M must be positive")
    return name, arg


def _is_reduction(part: str) -> bool:
    name = part.strip().lower().split("(", 1)[0]
    return "," not in part and ALIASES.get(name, name) in REDUCTIONS


def parse(text: str) -> Expression:
    """`PRE,..>REDUCE>POST,..` (outer parts optional) -> Expression; a UserError names any unknown token."""
    parts = [p.strip() for p in text.strip().split(">")]
    if not text.strip() or len(parts) > 3 or any(not p for p in parts):
        raise UserError(f"allocation expression {text!r} is not PRE,..>REDUCE>POST,.. (e.g. abslog>var>atan,asin); "
                        f"{_vocabulary()}")
    if len(parts) == 1:
        pre, red, post = "", parts[0], ""
    elif len(parts) == 3:
        pre, red, post = parts
    elif _is_reduction(parts[0]) and not _is_reduction(parts[1]):
        pre, red, post = "", parts[0], parts[1]
    else:
        pre, red, post = parts[0], parts[1], ""
    name, arg = _reduction(red, text)
    return Expression(tuple(_token(t, PRE_OPS, "pre-op", text) for t in pre.split(",") if pre),
                      name, arg,
                      tuple(_token(t, POST_OPS, "post-op", text) for t in post.split(",") if post))


def expression_allocator(text: str) -> Allocator:
    """An Allocator for `--allocation expr:TEXT` (reads the dense Wanda scores like DLP; spread from --alpha)."""
    expr = parse(text)
    return Allocator(f"expr:{expr}", lambda scores, kw: expr.statistic(scores, kw),
                     lambda stats, p, kw: expr.ratios(stats, p, kw["alpha"]), "wanda", uses_alpha=True)


def saved_allocator(name: str) -> Allocator | None:
    """The best expression a `dlp-deploy search --name NAME` saved, with the alpha it was searched with (its own
    spread: --alpha does not apply)."""
    from .search import load_saved

    saved = load_saved(name)
    if saved is None:
        return None
    expr, alpha = parse(saved["expression"]), float(saved["alpha"])
    source = (f"{EXPR_PREFIX}{expr} with alpha {alpha:g}, saved by the search in {saved['search_dir']} "
              f"(validation ppl {saved['fitness']:.4g} at sparsity {saved['sparsity']:g})")
    return Allocator(name, lambda scores, kw: expr.statistic(scores, kw),
                     lambda stats, p, kw: expr.ratios(stats, p, alpha), "wanda", source=source)
