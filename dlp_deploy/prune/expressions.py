"""Allocation expressions (DSA: Li et al., "Discovering Sparsity Allocation for Layer-wise Pruning of Large Language
Models", NeurIPS 2024; vocabulary from the authors' released engine, lliai/DSA lib/autolayer.py `LayerEngine`).

    --allocation 'expr:PRE[,PRE...]>REDUCE>POST[,POST...][@owl][@raw]'      e.g. expr:abslog>var>atan,asin

Per decoder block, over the block's Wanda scores |W|*||X|| (every Linear, flattened and concatenated: the input
DLP and OWL read):  pre-ops element-wise, in order;  one reduction to a number;  then post-ops, in order, on the
vector of the blocks' numbers.  `>` separates the three parts, `,` the ops of a part; both outer parts may be left
out (`median`, `abs>mean`, `var>atan`; with two parts the one that names a reduction is the reduction).  Tokens
are case-insensitive; DSA's spellings (MMS, FROBENIUS_NORM, L1_NORM, GEOMETRIC_MEAN, NO_OP) are accepted.

Statistic to ratio: two named mappings (MAPPINGS; pruning.json records the one used as `allocation_mapping`):
    dsa (default)  the authors' (lliai/DSA lib/prune_all.py `test_prune_wanda_outlier_use_var`): min-max scale,
                   1 - x, spread over 2*lambda, density = that - mean + (1 - p): HIGHER value, MORE sparsity,
                   R = p + 2*lambda*(m - mean(m)), m = minmax(v).
    owl  (@owl)    OWL's and DLP's direction, this project's mapping before: d = minmax(v) * 2*alpha,
                   R = p + mean(d) - d: HIGHER value, LESS sparsity.
The spread (lambda or alpha, the same role) is --alpha (default DLP's App. G value); the authors' default is
lambda = 0.08 (their main.py --Lamda), which `--allocation dsa` uses. Then the clipping and parameter-weighted
correction every allocator shares. So, with the default mapping:
    expr:median         is DLP with the median reducer (DLP's I = 1 - S/sum(S) is a decreasing affine map of S
                        and DLP gives high I low sparsity; other DLP reducers likewise: expr:mean ...);
    expr:outlier>neg    is OWL (D = share of scores > M * mean, M from --owl-m) with lambda = --alpha
(with @owl: expr:median>neg and expr:outlier).

Domains of post-ops, two named handlings (POST_DOMAINS):
    scaled (default)  a post-op whose domain is limited first min-max scales the blocks' numbers into a safe
                      interval: asin, acos, tan -> [0, 1]; log, sqrt -> [1, 2] (then monotone and finite). Other
                      ops run as they are; a result that is not finite for some block (exp of a large value) is a
                      UserError naming the blocks.
    raw (@raw)        the authors': every post-op on each block's number as it is, then NaN -> 0 and +-inf -> -1
                      (LayerEngine.compute_importance), so e.g. asin of a value above 1 gives that block 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

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


def _dsa_special_values(v: np.ndarray) -> np.ndarray:
    """LayerEngine.compute_importance's handling of a layer's value: NaN -> 0, +-inf -> -1 ("denotes invalid")."""
    return np.where(np.isnan(v), 0.0, np.where(np.isinf(v), -1.0, v))


POST_DOMAINS = ("scaled", "raw")


# ---- statistic to ratios: the two directions (pure; `lam` is the spread, --alpha or DSA's lambda) ------------

def dsa_mapping(values, sparsity: float, lam: float) -> np.ndarray:
    """The authors' mapping (lliai/DSA lib/prune_all.py, test_prune_wanda_outlier_use_var, after the per-layer
    `lengine.compute_importance`): m = minmax(v); keep = minmax(1 - m) * 2 lam; density = keep - mean(keep) +
    (1 - p); ratio = 1 - density. Higher value, more sparsity. Equal values give p everywhere (their code divides
    0 by 0 there)."""
    m = spread(values, 1.0)
    keep = spread(1.0 - m, 2 * lam)
    return 1.0 - (keep - keep.mean() + (1.0 - sparsity))


def owl_mapping(values, sparsity: float, lam: float) -> np.ndarray:
    """OWL's and DLP's direction: d = minmax(v) * 2 lam, R = p + mean(d) - d. Higher value, less sparsity."""
    d = spread(values, 2 * lam)
    return sparsity + d.mean() - d


MAPPINGS: dict[str, Callable[[Sequence[float], float, float], np.ndarray]] = {"dsa": dsa_mapping,
                                                                              "owl": owl_mapping}
DEFAULT_MAPPING = "dsa"


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
    mapping: str = DEFAULT_MAPPING  # MAPPINGS: statistic -> ratios
    domains: str = "scaled"  # POST_DOMAINS: how post-ops treat values outside their domain

    def __str__(self) -> str:
        red = self.reduce if self.reduce_arg is None else f"{self.reduce}({self.reduce_arg:g})"
        text = ">".join(p for p in (",".join(self.pre), red, ",".join(self.post)) if p)
        # the defaults are left out so that a search's candidate keys do not depend on them
        return text + ("" if self.mapping == DEFAULT_MAPPING else f"@{self.mapping}") + \
            ("" if self.domains == "scaled" else f"@{self.domains}")

    def statistic(self, scores: torch.Tensor, params: dict) -> float:
        """One block: pre-ops, then the reduction."""
        x = scores
        for op in self.pre:
            x = PRE_OPS[op](x)
        return REDUCTIONS[self.reduce].fn(x, self.reduce_arg, params)

    def transform(self, values) -> np.ndarray:
        """All blocks: the post-ops on the vector of block statistics."""
        v = np.asarray(values, dtype=np.float64)
        if self.domains == "raw":  # the authors': ops as they are, then their special values
            with np.errstate(all="ignore"):
                for op in self.post:
                    v = POST_OPS[op].fn(v)
            return _dsa_special_values(v)
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
        """The post-ops, then the expression's mapping (MAPPINGS) with spread alpha."""
        v = self.transform(values)
        return Allocation(list(map(float, MAPPINGS[self.mapping](v, sparsity, alpha))),
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


def _suffixes(tokens: list[str], text: str) -> dict:
    """`@owl`, `@dsa` (a mapping) and `@raw`, `@scaled` (post-op domains) after the expression."""
    out: dict = {}
    for raw in tokens:
        name = raw.strip().lower()
        key = "mapping" if name in MAPPINGS else "domains" if name in POST_DOMAINS else None
        if key is None or key in out:
            raise UserError(f"@{raw.strip()} in allocation expression {text!r}: give at most one mapping "
                            f"({', '.join('@' + m for m in MAPPINGS)}) and one post-op handling "
                            f"({', '.join('@' + d for d in POST_DOMAINS)})")
        out[key] = name
    return out


def parse(text: str) -> Expression:
    """`PRE,..>REDUCE>POST,..[@MAPPING][@DOMAINS]` (outer parts optional) -> Expression; a UserError names any
    unknown token."""
    text, *tail = text.split("@")
    options = _suffixes(tail, text)
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
                      tuple(_token(t, POST_OPS, "post-op", text) for t in post.split(",") if post), **options)


def expression_allocator(text: str) -> Allocator:
    """An Allocator for `--allocation expr:TEXT` (reads the dense Wanda scores like DLP; spread from --alpha)."""
    expr = parse(text)
    return Allocator(f"expr:{expr}", lambda scores, kw: expr.statistic(scores, kw),
                     lambda stats, p, kw: expr.ratios(stats, p, kw["alpha"]), "wanda", uses_alpha=True,
                     mapping=expr.mapping)


def saved_allocator(name: str) -> Allocator | None:
    """The best expression a `dlp-deploy search --name NAME` saved, with the alpha it was searched with (its own
    spread: --alpha does not apply) and the mapping it was searched with (searches saved before the mapping was
    recorded used the owl one)."""
    from .search import load_saved

    saved = load_saved(name)
    if saved is None:
        return None
    expr = replace(parse(saved["expression"]), mapping=saved.get("mapping", "owl"))
    alpha = float(saved["alpha"])
    source = (f"{EXPR_PREFIX}{expr} with alpha {alpha:g}, saved by the search in {saved['search_dir']} "
              f"(validation ppl {saved['fitness']:.4g} at sparsity {saved['sparsity']:g})")
    return Allocator(name, lambda scores, kw: expr.statistic(scores, kw),
                     lambda stats, p, kw: expr.ratios(stats, p, alpha), "wanda", source=source,
                     mapping=expr.mapping)


# ---- `--allocation dsa`: the authors' published LLaMA expression, as their code computes it --------------------

DSA_LAMBDA = 0.08  # lliai/DSA main.py: --Lamda default 0.08 (the README command does not set it)
DSA_LLAMA = Expression(("abslog",), "var", None, ("atan", "asin"), mapping="dsa", domains="raw")
DSA_SOURCE = ("lliai/DSA README.md (LLaMA-1-7B, --prune_method wanda_owl_search): --graph_string "
              "'W:(ABSLOG)-(VAR)-(ATAN,ASIN)-(7)', lambda 0.08 (main.py --Lamda); here expr:abslog>var>atan,asin@raw "
              "with --alpha 0.08 and the dsa mapping")


def dsa_statistic(scores: torch.Tensor, params: dict) -> float:
    """A block's number before post-ops: var(log|Wanda scores|), zeros taken as 1 (DSA's ABSLOG, VAR)."""
    return DSA_LLAMA.statistic(scores, params)


def dsa_ratios(stats, sparsity: float, params: dict) -> Allocation:
    """`--allocation dsa`: DSA's published expression for LLaMA, W:(ABSLOG)-(VAR)-(ATAN,ASIN)-(7), from the
    command in the authors' README (lliai/DSA README.md, section "DSA": `main.py --prune_method wanda_owl_search
    --graph_string "W:(ABSLOG)-(VAR)-(ATAN,ASIN)-(7)" --sparsity_ratio 0.7`, LLaMA-1-7B). It is the only
    expression the repository publishes: the paper states none in closed form, main.py's other built-in
    (`wanda_owl_var`: "W:(ABS)-(VAR)-(9)") does not parse in their own engine (its third part is taken as the
    post-ops, and "9" is no op), and the trailing (7) is LayerEngine.LAMBDA, which nothing reads.
    Computed as their code does: per block, var(log|s|) over its Wanda scores s, atan then asin on that number as
    it is (a block whose atan exceeds 1, i.e. var > tan(1) = 1.557, gets NaN and so 0), then their mapping with
    lambda = 0.08 (their main.py default): higher value, more sparsity, within p +- 0.08."""
    return DSA_LLAMA.ratios(stats, sparsity, DSA_LAMBDA)
