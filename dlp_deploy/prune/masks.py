"""Masks from scores: True marks a weight to prune. Counts are exact: round(n * ratio) per row or per matrix, or
the M - N lowest of every M consecutive input weights of each output row (an N:M pattern keeps N).

The reference code floors; with layer-wise ratios flooring biases every module low (by up to 1/n), which on narrow
layers moves the global sparsity by a point, so the nearest count is used (identical to floor for p * n integral)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError

NM_GROUP_SIZES = (4, 8)


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


def nm_mask(scores: torch.Tensor, pruned: int, m: int) -> torch.Tensor:
    """In every group of m consecutive input columns of each output row, the `pruned` lowest-scoring weights."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not a multiple of {m}")
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool, device=scores.device)
    if pruned > 0:
        idx = torch.argsort(scores.reshape(rows, cols // m, m), dim=2, stable=True)[..., :pruned]
        mask.scatter_(2, idx, True)
    return mask.view(rows, cols)


def nm_group_zero_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Zeros in each group of m consecutive input weights of each row of an [out, in] matrix: [out, in/m]."""
    rows, cols = weight.shape
    return (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)


GRANULARITIES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "per-output": per_output_mask,
    "per-layer": per_layer_mask,
}


# ---------------------------------------------------------------- sparsity patterns

# What N counts in "N:M". The DLP paper (Table 15: "N refers to non-zero weights"), DominoSearch and NVIDIA's 2:4
# all count the weights kept; records written before schema 2 counted the weights pruned (see `pruning_record`).
NM_COUNTS = "kept"


@dataclass(frozen=True)
class Pattern:
    """What a mask may look like. `unstructured` (any count per row/matrix), `n:m` (n of every m kept, the same n in
    every layer: 1:4 is 75% sparse) or `mixed:m` (each layer its own n_l of every m kept, from the allocation)."""

    kind: str  # "unstructured" | "nm" | "mixed"
    n: int | None = None  # kept per group (nm only)
    m: int | None = None

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}", "mixed": f"mixed:{self.m}"}[self.kind]

    @property
    def fixed_sparsity(self) -> float | None:
        return (self.m - self.n) / self.m if self.kind == "nm" else None


def parse_pattern(text: str) -> Pattern:
    """'unstructured', 'N:M' (N kept of every M) or 'mixed:M'; M must be 4 or 8."""
    text = text.strip().lower()
    if text == "unstructured":
        return Pattern("unstructured")
    mixed = re.fullmatch(r"mixed:(\d+)", text)
    nm = re.fullmatch(r"(\d+):(\d+)", text)
    if not (mixed or nm):
        raise UserError(f"--pattern {text!r} is not understood; use unstructured, N:M (N kept of every M, e.g. 2:4, "
                        "1:4) or mixed:M")
    m = int((mixed or nm).group(1 if mixed else 2))
    if m not in NM_GROUP_SIZES:
        raise UserError(f"--pattern {text}: M={m} is not supported; M must be one of "
                        f"{', '.join(map(str, NM_GROUP_SIZES))}")
    if mixed:
        return Pattern("mixed", None, m)
    n = int(nm.group(1))
    if not 0 < n < m:
        raise UserError(f"--pattern {text}: N={n} must be between 1 and M-1={m - 1} (N counts the weights kept, "
                        "as in NVIDIA's 2:4: 1:4 keeps one weight in four)")
    return Pattern("nm", n, m)


@dataclass(frozen=True)
class MaskSpec:
    """How a layer's mask is chosen from scores: by granularity (unstructured) or in groups of m (N:M, where the
    layer's ratio is (m - n)/m: the share pruned)."""

    granularity: str = "per-output"
    m: int | None = None

    def pruned_of(self, ratio: float) -> int:
        return int(round(ratio * self.m))

    def select(self, scores: torch.Tensor, ratio: float) -> torch.Tensor:
        if self.m is None:
            return GRANULARITIES[self.granularity](scores, ratio)
        return nm_mask(scores, self.pruned_of(ratio), self.m)
