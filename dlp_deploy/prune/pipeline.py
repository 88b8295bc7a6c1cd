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
from ..models import check_prunable, decoder_layers, linear_modules
from .allocate import OWL_LAMBDA, OWL_M, Allocation, allocate, get_allocator, mixed_nm_counts
from .masks import MaskSpec, parse_pattern
from .pruners import PRUNERS, Pruner, default_granularity
from .scores import ActivationNorms, wanda_scores
from .structured import DEFAULT_IMPORTANCE


@dataclass
class PruneSettings:
    """What to prune and how. Three forms: `pattern` unstructured / N:M / mixed:M (zeros inside the weights), or
    `structure` heads and/or channels (whole units removed; `method` is then not used: `importance` scores units).
    `sparsity` is always the parameter-weighted share of decoder-Linear weights removed."""

    sparsity: float
    method: str = "wanda"
    allocation: str = "dlp"
    alpha: float | None = None
    reducer: str = "median"
    granularity: str | None = None  # None: the method's reference selection (pruners.default_granularity)
    pattern: str = "unstructured"
    structure: str | None = None  # "heads", "channels" or "heads,channels"
    importance: str = DEFAULT_IMPORTANCE  # structured only: taylor | activation
    multiple: int = 8  # structured only: MLP widths kept a multiple of this
    owl_m: float = OWL_M  # OWL only: a score is an outlier above owl_m times its layer's mean
    owl_lambda: float = OWL_LAMBDA  # OWL only: ratios span [p - owl_lambda, p + owl_lambda]
    # "alpha" or "owl_lambda": chosen on held-out C4 text over a grid before pruning (search.tune); the field
    # then holds the choice
    auto: str | None = None
    val_windows: int = 16  # auto only: held-out validation windows of the calibration length

    def __post_init__(self):
        # resolved here so that pruning.json (asdict) records the granularity actually used
        if self.granularity is None:
            self.granularity = default_granularity(self.method, self.pattern)

    @property
    def form(self) -> str:
        return "structured" if self.structure else str(parse_pattern(self.pattern))


@dataclass
class BlockInputs:
    """Hidden states entering a block, one tensor per calibration window, plus the keyword arguments the model
    passes each block (rotary position embeddings, masks, positions), kept as the model made them. Blocks may be
    called differently (sliding vs global attention layers, per-layer-type RoPE), so every block keeps its own."""

    hidden: list[torch.Tensor]
    block_kwargs: list[dict]


@dataclass
class PruneResult:
    allocation: Allocation
    realized: list[float]
    block_sizes: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


class _Captured(Exception):
    pass


def _call_kwargs(kw: dict) -> dict:
    out = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
    out["use_cache"] = False
    return out


def capture_block_inputs(model: nn.Module, windows: torch.Tensor, residency=None) -> BlockInputs:
    """Every window's hidden states entering the first block, and each block's own call (from one full forward:
    calls depend on the window length, which all windows share, not on the tokens)."""
    blocks = decoder_layers(model)
    device = next(model.parameters()).device
    block_kwargs: list[dict | None] = [None] * len(blocks)

    def record(index):
        def hook(_module, _args, kw):
            block_kwargs[index] = _call_kwargs(kw)
        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with residency.forward(model) if residency else contextlib.nullcontext():
            model(windows[0].unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, kw in enumerate(block_kwargs) if kw is None]
    if missing:
        raise UserError(f"{type(model).__name__}: decoder blocks {missing} were not called in a forward pass; "
                        "calibration cannot replay them")

    hidden: list[torch.Tensor] = []

    def first_hook(_module, args, kw):
        hidden.append(args[0] if args else kw["hidden_states"])
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(first_hook, with_kwargs=True)
    try:
        for window in windows:
            with contextlib.suppress(_Captured):
                model(window.unsqueeze(0).to(device), use_cache=False)
    finally:
        handle.remove()
    return BlockInputs(hidden, block_kwargs)


def run_block(block: nn.Module, index: int, inputs: BlockInputs, keep: bool = True) -> None:
    """Run every window through block `index` with that block's own call. keep=True replaces each hidden state
    with the block's output in place (only one copy alive); keep=False only feeds the block (a statistics pass)."""
    kwargs = inputs.block_kwargs[index]
    for i, h in enumerate(inputs.hidden):
        out = block(h, **kwargs)
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


def held(residency, index: int, phase: str):
    """Block `index`'s weights for the duration of a phase ("statistics" or "prune"). `residency` is None when the
    whole model is in memory; out of core (offload.StreamedModel) it loads the block, frees it after, and saves it
    after the prune phase."""
    return residency.block(index, phase) if residency else contextlib.nullcontext()


def block_sizes(model: nn.Module) -> list[int]:
    return [sum(m.weight.numel() for m in linear_modules(b).values()) for b in decoder_layers(model)]


def statistics_need_activations(allocator_name: str, method: str) -> bool:
    """Whether the allocator's dense statistics read calibration activations (Wanda scores): "wanda" inputs
    always, "score" inputs unless the method's score is |W| (magnitude)."""
    inputs = get_allocator(allocator_name).inputs
    return inputs == "wanda" or (inputs == "score" and method != "magnitude")


def block_statistic(allocator_name: str, modules: dict[str, nn.Linear], norms: dict | None, params: dict):
    """One block's statistic for an allocator, from what it reads (allocate.py): the block's Wanda scores
    flattened ("wanda"), the method's score per Linear ("score"), its fp32 weights ("weights") or its Linear shapes
    ("shapes"). `norms` (ActivationNorms per Linear, from the dense model) when the statistic reads activations."""
    allocator = get_allocator(allocator_name)
    statistic, kind = allocator.layer_statistic, allocator.inputs
    if kind == "shapes":
        return statistic({n: tuple(m.weight.shape) for n, m in modules.items()}, params)
    if norms is not None:
        mats = {n: wanda_scores(m.weight.float(), norms[n].sq_norm) for n, m in modules.items()}
    elif kind == "score":
        mats = {n: m.weight.float().abs() for n, m in modules.items()}
    else:
        mats = {n: m.weight.float() for n, m in modules.items()}
    if kind == "wanda":
        return statistic(torch.cat([x.flatten() for x in mats.values()]), params)
    return statistic(mats, params)


@torch.no_grad()
def dense_layer_statistics(model: nn.Module, inputs: BlockInputs | None, allocator_name: str, params: dict,
                           progress=None, residency=None) -> list:
    """The allocator's per-layer statistic over the dense model (every layer's is needed before any ratio is
    known), each block fed the dense outputs of the blocks before it."""
    activations = statistics_need_activations(allocator_name, params.get("method", "wanda"))
    reads_weights = get_allocator(allocator_name).inputs != "shapes"
    blocks = decoder_layers(model)
    task = progress.add_task("layer statistics (dense)", total=len(blocks)) if progress else None
    values = []
    for index, block in enumerate(blocks):
        # shapes only: the block's weights need not be read
        with held(residency, index, "statistics") if reads_weights else contextlib.nullcontext():
            modules = linear_modules(block)
            if activations:
                with collecting(modules, ActivationNorms) as norms:
                    run_block(block, index, inputs)
            values.append(block_statistic(allocator_name, modules, norms if activations else None, params))
        if progress:
            progress.advance(task)
    return values


@torch.no_grad()
def prune_blocks(model: nn.Module, inputs: BlockInputs | None, pruner: Pruner, ratios: list[float],
                 spec: MaskSpec, progress=None, residency=None) -> None:
    """Sequential pruning: each block's statistics come from the outputs of the blocks already pruned."""
    blocks = decoder_layers(model)
    task = progress.add_task(f"pruning ({pruner.name})", total=len(blocks)) if progress else None
    for index, (block, ratio) in enumerate(zip(blocks, ratios)):
        with held(residency, index, "prune"):
            modules = linear_modules(block)
            if pruner.collector is None:
                stats = dict.fromkeys(modules)
            else:
                with collecting(modules, pruner.collector) as stats:
                    run_block(block, index, inputs, keep=False)
            for name, m in modules.items():
                m.weight.data = pruner.prune(m.weight.data, stats[name], ratio, spec)
            del stats  # a block's Hessians are as large as its weights
            if inputs is not None:
                run_block(block, index, inputs)
        if progress:
            progress.advance(task)


def realized_sparsity(model: nn.Module) -> list[float]:
    out = []
    for block in decoder_layers(model):
        mods = linear_modules(block).values()
        out.append(sum(int((m.weight == 0).sum()) for m in mods) / sum(m.weight.numel() for m in mods))
    return out


def needs_calibration(settings: PruneSettings) -> bool:
    if settings.structure:
        return True  # activation norms or calibration-loss gradients
    return PRUNERS[settings.method].collector is not None or statistics_need_activations(settings.allocation,
                                                                                         settings.method)


def prune_model(model: nn.Module, windows: torch.Tensor | None, settings: PruneSettings, progress=None,
                residency=None) -> PruneResult:
    """Prune `model` in place. `windows` [n, seqlen] token ids may be None when nothing needs calibration.
    `residency` (offload.StreamedModel) prunes out of core: blocks are loaded one at a time and saved as pruned."""
    if residency is not None and settings.structure:
        raise UserError("structured pruning changes tensor shapes; it cannot stream, prune it in memory")
    validate_settings(settings)
    validate_for_model(settings, model)
    if needs_calibration(settings) and windows is None:
        raise UserError(f"{settings.form} pruning with {settings.allocation} allocation needs calibration data")
    timings: dict[str, float] = {}
    params = allocation_params(settings)
    n_blocks = len(decoder_layers(model))

    t = time.perf_counter()
    if get_allocator(settings.allocation).layer_statistic is not None:
        inputs = capture_block_inputs(model, windows, residency) \
            if statistics_need_activations(settings.allocation, settings.method) else None
        stats = dense_layer_statistics(model, inputs, settings.allocation, params, progress, residency)
    else:
        stats = [0.0] * n_blocks
    timings["layer_statistics_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sizes = block_sizes(model)
    allocation = allocate(settings.allocation, stats, sizes, settings.sparsity, **params)
    timings["allocation_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if settings.structure:
        extras = _prune_structured(model, windows, settings, allocation, progress, timings)
    else:
        extras = _prune_weights(model, windows, settings, allocation, sizes, progress, residency)
    timings["prune_s"] = time.perf_counter() - t
    if settings.structure:
        realized = [1 - now / before for now, before in zip(block_sizes(model), sizes)]
    else:  # out of core each block's figure was taken while it was resident
        realized = list(residency.realized) if residency else realized_sparsity(model)
    return PruneResult(allocation, realized, sizes, timings, extras)


def allocation_params(settings: PruneSettings) -> dict:
    """What an allocator may read besides the layer statistics."""
    return {"alpha": settings.alpha, "reducer": settings.reducer, "owl_m": settings.owl_m,
            "owl_lambda": settings.owl_lambda, "method": settings.method}


def _prune_weights(model, windows, settings: PruneSettings, allocation: Allocation, sizes, progress,
                   residency=None) -> dict:
    """Unstructured, N:M and mixed N:M: zeros inside the weights. For N:M patterns the layer ratio is
    (m - n_l) / m, n_l the weights kept of every m."""
    pattern = parse_pattern(settings.pattern)
    extras: dict = {"pattern": str(pattern)}
    if pattern.kind == "mixed":
        extras["continuous_ratios"] = list(allocation.ratios)
    allocation.ratios, kept = pattern_ratios(pattern, allocation.ratios, sizes, settings.sparsity)
    if kept is not None:
        extras["n_per_layer"] = kept
    spec = MaskSpec(settings.granularity, pattern.m)
    pruner = PRUNERS[settings.method]
    inputs = capture_block_inputs(model, windows, residency) if pruner.collector is not None else None
    prune_blocks(model, inputs, pruner, allocation.ratios, spec, progress, residency)
    if pattern.m:
        extras["m"] = pattern.m
    return extras


def pattern_ratios(pattern, ratios: list[float], sizes, sparsity: float) -> tuple[list[float], list[int] | None]:
    """The ratios a pattern can realise, and the weights kept of every m per layer (None when unstructured): a
    fixed N:M gives every layer (m - n)/m; mixed:M rounds each layer's allocated ratio to a whole count."""
    if pattern.kind == "unstructured":
        return list(ratios), None
    kept = [pattern.n] * len(sizes) if pattern.kind == "nm" else mixed_nm_counts(ratios, sizes, sparsity, pattern.m)
    return [(pattern.m - n) / pattern.m for n in kept], kept


def _prune_structured(model, windows, settings: PruneSettings, allocation: Allocation, progress, timings) -> dict:
    from .structured.plan import parse_units, plan_layers
    from .structured.run import calibration_gradients, geometries, prune_structured_blocks

    geoms = geometries(model)
    units = parse_units(settings.structure)
    plans = plan_layers(geoms, allocation.ratios, units, settings.multiple)
    grads, inputs = None, None
    t = time.perf_counter()
    if settings.importance == "taylor":
        grads = calibration_gradients(model, windows, progress)
    else:
        inputs = capture_block_inputs(model, windows)
    timings["importance_pass_s"] = time.perf_counter() - t
    kept = prune_structured_blocks(model, inputs, geoms, plans, settings.importance, grads, progress)
    return {"units": list(units), "multiple": settings.multiple, "importance": settings.importance,
            "layers_short": sum(p.clipped for p in plans),
            "shapes": [{"num_attention_heads": p.heads, "num_key_value_heads": p.kv_heads,
                        "intermediate_size": p.channels, "kept_kv_heads": k["kv_heads"], "kept_heads": k["heads"]}
                       for p, k in zip(plans, kept)]}


def validate_settings(settings: PruneSettings) -> None:
    from .allocate import REDUCERS
    from .masks import GRANULARITIES
    from .structured.plan import parse_units
    from .structured.run import IMPORTANCE

    if not 0 <= settings.sparsity < 1:
        raise UserError(f"--sparsity {settings.sparsity} is outside [0, 1); give a fraction such as 0.5")
    for value, registry, flag in ((settings.method, PRUNERS, "--method"),
                                  (settings.reducer, REDUCERS, "--reducer"),
                                  (settings.granularity, GRANULARITIES, "--granularity"),
                                  (settings.importance, IMPORTANCE, "--importance")):
        if value not in registry:
            raise UserError(f"unknown {flag} {value!r}; choose from {', '.join(registry)}")
    allocator = get_allocator(settings.allocation)  # a registry name or expr:...; a UserError names the valid ones
    if allocator.uses_alpha and settings.alpha is None:
        raise UserError(f"{settings.allocation} needs --alpha (the CLI fills in DLP's App. G default)")
    if settings.alpha is not None and not 0 <= settings.alpha < 0.5:
        raise UserError(f"--alpha {settings.alpha} is outside [0, 0.5); the paper uses 0.02-0.15")
    if not settings.owl_m > 0:
        raise UserError(f"--owl-m {settings.owl_m} must be positive (outliers are scores above M times the layer mean; "
                        f"OWL uses {OWL_M:g})")
    if not 0 <= settings.owl_lambda < 0.5:
        raise UserError(f"--owl-lambda {settings.owl_lambda} is outside [0, 0.5); OWL uses {OWL_LAMBDA:g}")
    if settings.auto is not None:
        _validate_auto(settings, allocator)
    pattern = parse_pattern(settings.pattern)
    if settings.structure:
        parse_units(settings.structure)
        if pattern.kind != "unstructured":
            raise UserError("--structure and an N:M --pattern are two different forms; choose one")
        if settings.multiple < 1:
            raise UserError(f"--multiple {settings.multiple} must be a positive number of channels")
    if pattern.kind != "unstructured" and settings.granularity != "per-output":
        raise UserError(f"--pattern {pattern} picks n of every m weights in each row; it cannot be combined with "
                        f"--granularity {settings.granularity}")
    if pattern.kind == "nm":
        if abs(settings.sparsity - pattern.fixed_sparsity) > 1e-9:
            raise UserError(f"--pattern {pattern} means sparsity {pattern.fixed_sparsity:g}, but --sparsity is "
                            f"{settings.sparsity:g}; leave --sparsity out or use mixed:{pattern.m} for another level")
        if settings.allocation != "uniform":
            raise UserError(f"--pattern {pattern} prunes every layer alike; use --allocation uniform, or "
                            f"--pattern mixed:{pattern.m} for per-layer ({settings.allocation}) ratios")


def _validate_auto(settings: PruneSettings, allocator) -> None:
    if settings.auto == "alpha" and not allocator.uses_alpha:
        raise UserError(f"--alpha auto tunes the spread of dlp and expr: allocations; {settings.allocation} has "
                        "no alpha")
    if settings.auto == "owl_lambda" and settings.allocation != "owl":
        raise UserError(f"--owl-lambda auto tunes OWL's range; use it with --allocation owl, not {settings.allocation}")
    if settings.auto not in ("alpha", "owl_lambda"):
        raise UserError(f"auto tuning of {settings.auto!r} is not available; alpha and owl_lambda are")
    if settings.structure or parse_pattern(settings.pattern).kind == "nm":
        raise UserError("--alpha/--owl-lambda auto tune unstructured or mixed N:M allocations")
    if settings.method not in ("wanda", "magnitude", "sparsegpt"):
        raise UserError(f"unknown --method {settings.method!r}")
    if settings.val_windows < 1:
        raise UserError(f"--val-windows {settings.val_windows} must be at least 1")


def validate_for_model(settings: PruneSettings, model: nn.Module) -> None:
    """Checks that need the model: every block weight must be prunable (no MoE experts outside nn.Linear), and an
    N:M group size must divide every prunable layer's input width."""
    check_prunable(model)
    pattern = parse_pattern(settings.pattern)
    if pattern.m is None:
        return
    for i, block in enumerate(decoder_layers(model)):
        for name, m in linear_modules(block).items():
            if m.in_features % pattern.m:
                raise UserError(f"--pattern {pattern}: layer {i} {name} has {m.in_features} inputs, not a multiple "
                                f"of {pattern.m}; choose another M or --pattern unstructured")
