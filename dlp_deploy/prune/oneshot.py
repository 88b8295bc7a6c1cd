"""Many allocations scored on one model (the allocation search, --alpha/--owl-lambda auto, the allocation table).

The dense model's activation statistics are collected once, in one calibration pass in which every block sees
the dense outputs of the blocks before it. A candidate then only allocates from them, prunes every Linear
one-shot from its dense weight with those statistics (Wanda's score with dense-model activations, not the
sequential re-calibration of `prune`), and is scored; restoring the dense weights costs nothing (the pruned
tensors replace `.data`; the dense ones are kept, not copied).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import decoder_layers, linear_modules
from .allocate import Allocation, allocate, get_allocator
from .masks import MaskSpec
from .pipeline import block_sizes, block_statistic, capture_block_inputs, collecting, run_block, \
    statistics_need_activations
from .pruners import PRUNERS, default_granularity
from .scores import ActivationNorms


@dataclass
class DenseSnapshot:
    model: nn.Module
    norms: list[dict[str, ActivationNorms]]  # per block, per Linear: ||X_j||^2 of the dense model's inputs
    dense: list[dict[str, torch.Tensor]]  # per block, per Linear: the dense weight tensor itself
    sizes: list[int]

    @classmethod
    @torch.no_grad()
    def collect(cls, model: nn.Module, windows: torch.Tensor, progress=None) -> "DenseSnapshot":
        inputs = capture_block_inputs(model, windows)
        blocks = decoder_layers(model)
        task = progress.add_task("dense statistics (once)", total=len(blocks)) if progress else None
        norms, dense = [], []
        for index, block in enumerate(blocks):
            modules = linear_modules(block)
            with collecting(modules, ActivationNorms) as stats:
                run_block(block, index, inputs)
            norms.append(stats)
            dense.append({n: m.weight.data for n, m in modules.items()})
            if progress:
                progress.advance(task)
        return cls(model, norms, dense, block_sizes(model))

    @torch.no_grad()
    def statistics(self, allocator_name: str, params: dict) -> list:
        """Every block's statistic for an allocator, as `prune` computes it on the dense model."""
        if get_allocator(allocator_name).layer_statistic is None:  # reads nothing from the model (uniform)
            return [0.0] * len(self.sizes)
        self.restore()
        activations = statistics_need_activations(allocator_name, params.get("method", "wanda"))
        return [block_statistic(allocator_name, linear_modules(block), norms if activations else None, params)
                for block, norms in zip(decoder_layers(self.model), self.norms)]

    def allocate(self, allocator_name: str, sparsity: float, params: dict, stats: list | None = None) -> Allocation:
        stats = self.statistics(allocator_name, params) if stats is None else stats
        return allocate(allocator_name, stats, self.sizes, sparsity, **params)

    @torch.no_grad()
    def apply(self, ratios: list[float], method: str = "wanda", granularity: str | None = None,
              m: int | None = None) -> None:
        """Prune every Linear of block i to ratios[i] from its dense weight, one-shot (in groups of m if given:
        ratios[i] * m weights pruned of every m)."""
        pruner = PRUNERS[method]
        if pruner.collector not in (None, ActivationNorms):
            raise ValueError(f"{method} needs its own calibration statistic; one-shot scoring supports "
                             "magnitude and wanda")
        spec = MaskSpec(granularity or default_granularity(method, "unstructured" if m is None else f"mixed:{m}"), m)
        for block, norms, dense, ratio in zip(decoder_layers(self.model), self.norms, self.dense, ratios):
            for name, m in linear_modules(block).items():
                m.weight.data = pruner.prune(dense[name], norms[name], ratio, spec)

    def restore(self) -> None:
        for block, dense in zip(decoder_layers(self.model), self.dense):
            for name, m in linear_modules(block).items():
                m.weight.data = dense[name]
