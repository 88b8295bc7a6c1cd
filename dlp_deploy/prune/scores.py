"""Pruning scores: pure functions of a weight matrix [out, in] and its input-activation statistic."""
from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """|W|."""
    return weight.abs()


def wanda_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, with act_sq_norm[j] = ||X_j||^2 as accumulated over the calibration tokens."""
    return weight.abs() * act_sq_norm.sqrt().reshape(1, -1)


class ActivationNorms:
    """Running ||X_j||^2 per input feature, averaged over calibration samples (Wanda's `scaler_row`)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sq_norm = torch.zeros(columns, device=device, dtype=torch.float32)
        self.samples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        batch = inp.shape[0] if inp.dim() == 3 else 1
        x = inp.reshape(-1, inp.shape[-1]).float()
        self.sq_norm *= self.samples / (self.samples + batch)
        self.samples += batch
        self.sq_norm += x.pow(2).sum(dim=0) / self.samples
