"""Wiring: capture the first block's inputs, collect layer statistics on the dense model, allocate, then prune
block by block on the already-pruned model's activations."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..errors import UserError
from ..models import decoder_layers, linear_modules
from .allocate import ALLOCATORS, Allocation, allocate
from .pruners import PRUNERS, Pruner
from .scores import ActivationNorms, wanda_scores


@dataclass
class PruneSettings:
    sparsity: float
    method: str = "wanda"
    allocation: str = "dlp"
    alpha: float | None = None
    reducer: str = "median"
    granularity: str = "per-output"


@dataclass
class BlockInputs:
    """Hidden states entering a block, one tensor per calibration window, plus the keyword arguments the model
    passes its blocks (rotary position embeddings, masks, positions), kept as the model made them."""

    hidden: list[torch.Tensor]
    kwargs: dict


@dataclass
class PruneResult:
    allocation: Allocation
    realized: list[float]
    block_sizes: list[int]
    timings: dict[str, float] = field(default_factory=dict)


class _Captured(Exception):
    pass


def capture_block_inputs(model: nn.Module, windows: torch.Tensor) -> BlockInputs:
    """Run the model up to its first decoder block for every window and keep that block's full call."""
    first = decoder_layers(model)[0]
    hidden: list[torch.Tensor] = []
    kwargs: dict = {}

    def hook(_module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for window in windows:
            with contextlib.suppress(_Captured):
                model(window.unsqueeze(0).to(device), use_cache=False)
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return BlockInputs(hidden, kwargs)


def run_block(block: nn.Module, inputs: BlockInputs, keep: bool = True) -> None:
    """Run every window through the block. keep=True replaces each hidden state with the block's output in place
    (only one copy alive); keep=False only feeds the block (a statistics pass before pruning it)."""
    for i, h in enumerate(inputs.hidden):
        out = block(h, **inputs.kwargs)
        if keep:
            inputs.hidden[i] = out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def collecting(modules: dict[str, nn.Linear], factory) -> Iterator[dict[str, object]]:
    """Feed each Linear's input to a fresh statistic collector while the block runs."""
    stats = {name: factory(m.in_features, m.weight.device) for name, m in modules.items()}
    handles = [m.register_forward_hook(lambda _m, inp, _out, s=stats[name]: s.add_batch(inp[0].detach()))
               for name, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def block_sizes(model: nn.Module) -> list[int]:
    return [sum(m.weight.numel() for m in linear_modules(b).values()) for b in decoder_layers(model)]


@torch.inference_mode()
def dense_layer_statistics(model: nn.Module, inputs: BlockInputs, allocator_name: str, params: dict,
                           progress=None) -> list[float]:
    """The allocator's per-layer statistic over the dense model's Wanda scores (every layer's is needed before
    any ratio is known)."""
    statistic = ALLOCATORS[allocator_name].layer_statistic
    blocks = decoder_layers(model)
    task = progress.add_task("layer statistics (dense)", total=len(blocks)) if progress else None
    values = []
    for block in blocks:
        modules = linear_modules(block)
        with collecting(modules, ActivationNorms) as norms:
            run_block(block, inputs)
        scores = torch.cat([wanda_scores(m.weight.float(), norms[n].sq_norm).flatten() for n, m in modules.items()])
        values.append(statistic(scores, params))
        del scores
        if progress:
            progress.advance(task)
    return values


@torch.inference_mode()
def prune_blocks(model: nn.Module, inputs: BlockInputs | None, pruner: Pruner, ratios: list[float],
                 granularity: str, progress=None) -> None:
    """Sequential pruning: each block's statistics come from the outputs of the blocks already pruned."""
    blocks = decoder_layers(model)
    task = progress.add_task(f"pruning ({pruner.name})", total=len(blocks)) if progress else None
    for block, ratio in zip(blocks, ratios):
        modules = linear_modules(block)
        if pruner.collector is None:
            stats = dict.fromkeys(modules)
        else:
            with collecting(modules, pruner.collector) as stats:
                run_block(block, inputs, keep=False)
        for name, m in modules.items():
            m.weight.data = pruner.prune(m.weight.data, stats[name], ratio, granularity)
        if inputs is not None:
            run_block(block, inputs)
        if progress:
            progress.advance(task)


def realized_sparsity(model: nn.Module) -> list[float]:
    out = []
    for block in decoder_layers(model):
        mods = linear_modules(block).values()
        out.append(sum(int((m.weight == 0).sum()) for m in mods) / sum(m.weight.numel() for m in mods))
    return out


def needs_calibration(settings: PruneSettings) -> bool:
    return PRUNERS[settings.method].collector is not None or ALLOCATORS[settings.allocation].layer_statistic is not None


def prune_model(model: nn.Module, windows: torch.Tensor | None, settings: PruneSettings, progress=None) -> PruneResult:
    """Prune `model` in place. `windows` [n, seqlen] token ids may be None when nothing needs calibration."""
    validate_settings(settings)
    if needs_calibration(settings) and windows is None:
        raise UserError(f"{settings.method} with {settings.allocation} allocation needs calibration data")
    timings: dict[str, float] = {}
    params = {"alpha": settings.alpha, "reducer": settings.reducer}
    n_blocks = len(decoder_layers(model))

    t = time.perf_counter()
    if ALLOCATORS[settings.allocation].layer_statistic is not None:
        stats = dense_layer_statistics(model, capture_block_inputs(model, windows), settings.allocation, params,
                                       progress)
    else:
        stats = [0.0] * n_blocks
    timings["layer_statistics_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sizes = block_sizes(model)
    allocation = allocate(settings.allocation, stats, sizes, settings.sparsity, **params)
    timings["allocation_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pruner = PRUNERS[settings.method]
    inputs = capture_block_inputs(model, windows) if pruner.collector is not None else None
    prune_blocks(model, inputs, pruner, allocation.ratios, settings.granularity, progress)
    timings["prune_s"] = time.perf_counter() - t
    return PruneResult(allocation, realized_sparsity(model), sizes, timings)


def validate_settings(s: PruneSettings) -> None:
    from .allocate import REDUCERS
    from .masks import GRANULARITIES

    if not 0 <= s.sparsity < 1:
        raise UserError(f"--sparsity {s.sparsity} is outside [0, 1); give a fraction such as 0.5")
    for value, registry, flag in ((s.method, PRUNERS, "--method"), (s.allocation, ALLOCATORS, "--allocation"),
                                  (s.reducer, REDUCERS, "--reducer"), (s.granularity, GRANULARITIES, "--granularity")):
        if value not in registry:
            raise UserError(f"unknown {flag} {value!r}; choose from {', '.join(registry)}")
    if s.allocation == "dlp" and s.alpha is None:
        raise UserError("DLP needs --alpha (the CLI fills in the paper's default)")
    if s.alpha is not None and not 0 <= s.alpha < 0.5:
        raise UserError(f"--alpha {s.alpha} is outside [0, 0.5); the paper uses 0.02-0.15")
