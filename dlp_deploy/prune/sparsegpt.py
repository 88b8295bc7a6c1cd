"""SparseGPT (Frantar & Alistarh, 2023): prune with an OBS update of the remaining weights, column block by block."""
from __future__ import annotations

from typing import Callable

import torch

from .masks import nm_mask


class Hessian:
    """H = 2/N * sum X X^T over calibration samples, accumulated as the reference code does."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.samples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        batch = inp.shape[0] if inp.dim() == 3 else 1
        x = inp.reshape(-1, inp.shape[-1]).t().float()
        self.H *= self.samples / (self.samples + batch)
        self.samples += batch
        x = (2 / self.samples) ** 0.5 * x
        self.H += x @ x.t()


def _inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    H = H.clone()
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, ratio: float,
                    select_mask: Callable[[torch.Tensor, float], torch.Tensor],
                    blocksize: int = 128, percdamp: float = 0.01, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Return the pruned and OBS-updated copy of `weight`; `select_mask` picks the mask inside each column block
    from the saliency w^2 / [H^-1]_jj^2 (per-output: per row of the block; per-layer: over the whole block, which
    is the reference's selection and the default, see pruners.PRUNERS).
    With nm=(pruned, m) the mask is chosen as the reference's prunen/prunem does instead: `pruned` of every m columns, each
    group from the saliency of the weights as updated when the sweep reaches it."""
    W = weight.detach().clone().float()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_hessian_cholesky(H, percdamp)
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        if nm is None:
            mask1 = select_mask(W1.pow(2) / torch.diag(Hinv1).reshape(1, -1).pow(2), ratio)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            if nm is not None and nm[0] > 0 and i % nm[1] == 0:
                sal = W1[:, i:i + nm[1]].pow(2) / torch.diag(Hinv1)[i:i + nm[1]].reshape(1, -1).pow(2)
                mask1[:, i:i + nm[1]] = nm_mask(sal, nm[0], nm[1])
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)
