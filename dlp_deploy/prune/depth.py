"""Depth pruning with LLM-Streamline (Chen et al., ICLR 2025, "Streamlining Redundant Layers to Compress Large
Language Models"): on calibration text, find the contiguous span of n decoder layers whose output hidden state is
most similar (cosine, averaged over tokens) to its input, cut it, and put one lightweight module in its place,
trained with MSE to map the span's input hidden states to its output hidden states.

Three parts, top to bottom: pure math (span scores, the span choice, layer counts), the replacement blocks
(`ffn`, `swiglu`: a residual MLP-only block, whose modules models/shapes.py defines and rebuilds on load; `layer`: a
copy of the span's first decoder layer), and the wiring (running calibration windows through the model, training,
rebuilding the layer stack and config, the job).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import data, models
from ..errors import UserError
from ..io import atomic_dir, check_writable, write_json_atomic
from ..models import decoder_layers
from ..models.shapes import MLP_KINDS, first_norm, mlp_block, renumber, shorten_config
from ..provenance import provenance

SCHEMA = "dlp-deploy/streamline/1"
REPLACEMENTS = ("none", "ffn", "swiglu", "layer")
# The paper's training settings (Chen et al., ICLR 2025, "Experiment Setup"): AdamW learning rate and weight decay
# per replacement kind, 32 samples per batch, 20 epochs, 500 samples to choose the span, and for a replaced layer one
# epoch of post-training at lr 5e-5, weight decay 1e-3, batch 32. A "sample" here is one calibration window.
PAPER_OPTIMIZER = {"ffn": (1e-3, 1e-4), "swiglu": (1e-3, 1e-4), "layer": (1e-5, 1e-3)}  # kind: (lr, weight decay)
BATCH = 32
EPOCHS = 20
NSAMPLES = 500
POST_LR, POST_WEIGHT_DECAY, POST_EPOCHS = 5e-5, 1e-3, 1
# Not from the paper. It trains on 30,000 samples; a CPU job keeps the span's input/output for a token budget
# instead (whole windows; 65,536 tokens = one batch of 32 windows of 2048). The paper states no schedule: ours
# decays on a cosine to a quarter of the peak.
TOKENS = 65_536  # span input/output pairs kept for training: 8 * TOKENS * hidden bytes (fp32 input + target)
MIN_LR_FRACTION = 0.25


# ---------------------------------------------------------------- pure math

def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token's hidden state in `a` and `b` ([..., hidden] -> [tokens]), in fp32."""
    return F.cosine_similarity(a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1]), dim=-1)


def span_cosine_sums(states: list[torch.Tensor], n: int) -> torch.Tensor:
    """Summed per-token cosines between the hidden state entering each span of n layers and the one leaving it.
    `states` are the L+1 hidden states of one batch: entering block 0..L-1, then leaving block L-1 (raw, before
    the final norm). Entry i is the span of layers i..i+n-1."""
    return torch.stack([token_cosines(states[i], states[i + n]).sum() for i in range(len(states) - n)])


class SpanScores:
    """Mean per-token cosine of every candidate span over all calibration tokens, accumulated window by window so
    that only one window's hidden states exist at a time."""

    def __init__(self, num_layers: int, n: int):
        self.n = n
        self.sums = torch.zeros(num_layers - n + 1, dtype=torch.float64)
        self.tokens = 0

    def add(self, states: list[torch.Tensor]) -> None:
        self.sums += span_cosine_sums(states, self.n).double().cpu()
        self.tokens += states[0].reshape(-1, states[0].shape[-1]).shape[0]

    def mean(self) -> list[float]:
        return (self.sums / max(self.tokens, 1)).tolist()


def choose_span(scores: list[float]) -> int:
    """The start of the most redundant span: the highest cosine (the earliest on a tie)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def layers_to_remove(num_layers: int, remove_layers: int | None, ratio: float | None) -> int:
    """n from --remove-layers N or --ratio R (R of the layers, rounded), refused unless 1 <= n < num_layers."""
    if (remove_layers is None) == (ratio is None):
        raise UserError("give exactly one of --remove-layers N or --ratio R (share of decoder layers to remove)")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise UserError(f"--ratio {ratio} is outside (0, 1); give the share of decoder layers to remove, "
                            "e.g. 0.25")
        remove_layers = round(ratio * num_layers)
        if remove_layers < 1:
            raise UserError(f"--ratio {ratio} removes no layer of {num_layers}; give a larger ratio or "
                            "--remove-layers 1")
    if remove_layers < 1:
        raise UserError(f"--remove-layers {remove_layers}: remove at least one layer")
    if remove_layers >= num_layers:
        raise UserError(f"--remove-layers {remove_layers} would remove every one of the model's {num_layers} "
                        f"decoder layers; give at most {num_layers - 1}")
    return remove_layers


def new_layer_count(num_layers: int, n: int, replacement: str) -> int:
    return num_layers - n + (replacement != "none")


def cosine_lr(step: int, total: int, lr: float, floor: float = MIN_LR_FRACTION) -> float:
    """Cosine decay from lr to floor*lr over `total` steps."""
    progress = min(step / max(total - 1, 1), 1.0)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- replacement blocks (their modules: models/shapes.py)

def mlp_width(block: nn.Module, hidden: int) -> int:
    """The block's MLP width (the replacement takes it), read off the down projection: the widest input of a
    Linear back to the hidden size. Not the widest output from it: a fused gate/up projection is twice as wide."""
    widths = [m.in_features for m in block.modules() if isinstance(m, nn.Linear) and m.out_features == hidden
              and m.in_features != hidden]
    return max(widths) if widths else 4 * hidden


def output_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


# ---------------------------------------------------------------- training

def mse_sum(module: nn.Module, item: tuple[torch.Tensor, torch.Tensor, dict]) -> tuple[torch.Tensor, int]:
    """Summed squared error of module(input) against the target, and the number of values it sums."""
    x, y, kw = item
    return F.mse_loss(output_hidden(module(x, **kw)).float(), y.float(), reduction="sum"), y.numel()


def mse(module: nn.Module, items: Iterable[tuple[torch.Tensor, torch.Tensor, dict]]) -> float:
    """Mean squared error of module(input) against the target over all items (value-weighted)."""
    total = count = 0.0
    with torch.no_grad():
        for item in items:
            err, n = mse_sum(module, item)
            total, count = total + float(err), count + n
    return total / max(count, 1)


def fit(params: list[nn.Parameter], steps: Callable[[int], Iterator[list]], loss: Callable, steps_per_epoch: int,
        epochs: int, lr: float, weight_decay: float, on_step: Callable | None = None) -> list[float]:
    """AdamW over `params`. `steps(epoch)` yields one optimizer step at a time as a list of micro-batches, and
    `loss(micro)` gives (summed loss, count). Summed gradients are accumulated over the step's micro-batches and
    divided by the step's count, so a step follows the mean over its whole batch while memory holds one
    micro-batch's activations. Returns every step's mean loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total_steps, curve = steps_per_epoch * epochs, []
    with torch.enable_grad():
        for epoch in range(epochs):
            for micro in steps(epoch):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(len(curve), total_steps, lr)
                opt.zero_grad(set_to_none=True)
                total, count = 0.0, 0
                for m in micro:
                    value, n = loss(m)
                    value.backward()
                    total, count = total + value.item(), count + n
                for p in params:
                    if p.grad is not None:
                        p.grad /= count
                opt.step()
                curve.append(total / count)
                if on_step:
                    on_step()
    return curve


def epoch_means(curve: list[float], steps_per_epoch: int) -> list[float]:
    return [sum(curve[i:i + steps_per_epoch]) / len(curve[i:i + steps_per_epoch])
            for i in range(0, len(curve), steps_per_epoch)]


def batch_steps(items: list, batch: int, seed: int) -> Callable[[int], Iterator[list]]:
    """Optimizer steps of `batch` items (windows) each, in a fresh shuffled order every epoch."""
    def steps(epoch: int):
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in range(0, len(order), batch):
            yield [items[j] for j in order[i:i + batch]]
    return steps


# ---------------------------------------------------------------- wiring: hidden states from the model

class _Stop(Exception):
    """Raised by a hook once the states needed are captured: the rest of the forward is not run."""


def _call_kwargs(kw: dict) -> dict:
    out = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
    out["use_cache"] = False
    return out


def _run(model: nn.Module, window: torch.Tensor) -> None:
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(window.reshape(1, -1).to(device), use_cache=False)
    except _Stop:
        pass


def score_spans(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, n: int, progress=None) -> list:
    """Mean cosine of every span of n layers over all calibration tokens, one window in memory at a time."""
    scores = SpanScores(len(blocks), n)
    states: list[torch.Tensor] = []

    def on_input(_m, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach())

    def on_last(_m, _args, output):
        states.append(output_hidden(output).detach())
        raise _Stop  # the final norm and lm_head are not needed

    handles = [b.register_forward_pre_hook(on_input, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(on_last))
    task = progress.add_task(f"scoring spans of {n} layers", total=len(windows)) if progress else None
    try:
        for window in windows:
            states.clear()
            _run(model, window)
            scores.add(states)
            if progress:
                progress.advance(task)
    finally:
        for h in handles:
            h.remove()
    return scores.mean()


@dataclass
class SpanData:
    """Hidden states entering and leaving the chosen span, per window (each [1, tokens, hidden], fp32 on CPU), and
    the call the model makes to the span's first layer (what a `layer` replacement is trained with)."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    call: dict

    @property
    def tokens(self) -> int:
        return sum(x.shape[1] for x in self.inputs)


def training_windows(windows: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """The first calibration windows, whole (a `layer` replacement attends over them, and a batch counts windows),
    until `max_tokens` tokens are reached."""
    return windows[:max(1, math.ceil(max_tokens / windows.shape[1]))]


def collect_span(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, start: int, n: int,
                 progress=None) -> SpanData:
    """The span's input and output for every window (only these two states are kept, and the forward stops after
    the span)."""
    data = SpanData([], [], {})
    current: dict = {}

    def on_input(_m, args, kwargs):
        current["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
        data.call = data.call or _call_kwargs(kwargs)

    def on_output(_m, _args, output):
        current["y"] = output_hidden(output).detach()
        raise _Stop

    handles = [blocks[start].register_forward_pre_hook(on_input, with_kwargs=True),
               blocks[start + n - 1].register_forward_hook(on_output)]
    task = progress.add_task("collecting span input/output", total=len(windows)) if progress else None
    try:
        for window in windows:
            _run(model, window)
            data.inputs.append(current["x"].float().cpu())
            data.outputs.append(current["y"].float().cpu())
            if progress:
                progress.advance(task)
    finally:
        for h in handles:
            h.remove()
    return data


# ---------------------------------------------------------------- wiring: the new layer stack

def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is target:
                return parent, name
    raise UserError(f"{type(model).__name__}: cannot find the module holding the decoder layers")


def replace_span(model: nn.Module, blocks: nn.ModuleList, start: int, n: int, replacement: nn.Module | None,
                 kind: str) -> tuple[nn.ModuleList, list[str]]:
    """Put the stack blocks[:start] + [replacement] + blocks[start+n:] in the model and fix the config."""
    parent, name = _parent_of(model, blocks)
    kept = list(blocks[:start]) + ([replacement] if replacement is not None else []) + list(blocks[start + n:])
    new = nn.ModuleList(kept)
    setattr(parent, name, new)
    renumber(new)
    configs = {id(model.config): model.config}
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    configs[id(text)] = text
    cut = []
    for config in configs.values():
        if getattr(config, "num_hidden_layers", None) == len(blocks):
            cut = shorten_config(config, start, n, kind)
    return new, cut


# ---------------------------------------------------------------- wiring: the job

@dataclass
class StreamlineSettings:
    """Defaults are the paper's (see PAPER_OPTIMIZER); lr and weight_decay left None take the replacement kind's."""

    remove_layers: int | None = None
    ratio: float | None = None
    replacement: str = "ffn"
    calib: str = "c4"
    nsamples: int = NSAMPLES
    seqlen: int | None = None
    seed: int = 0
    tokens: int = TOKENS
    epochs: int = EPOCHS
    lr: float | None = None
    weight_decay: float | None = None
    batch: int = BATCH
    post_train: bool = False
    post_lr: float = POST_LR
    post_weight_decay: float = POST_WEIGHT_DECAY
    post_epochs: int = POST_EPOCHS


def resolve_settings(settings: StreamlineSettings) -> StreamlineSettings:
    """The settings with the replacement kind's paper lr and weight decay wherever none was given (`none` trains
    nothing and keeps None)."""
    lr, weight_decay = PAPER_OPTIMIZER.get(settings.replacement, (None, None))
    return replace(settings, lr=lr if settings.lr is None else settings.lr,
                   weight_decay=weight_decay if settings.weight_decay is None else settings.weight_decay)


def validate_settings(settings: StreamlineSettings) -> None:
    if (settings.remove_layers is None) == (settings.ratio is None):
        raise UserError("give exactly one of --remove-layers N or --ratio R (share of decoder layers to remove)")
    if settings.replacement not in REPLACEMENTS:
        raise UserError(f"--replacement {settings.replacement!r}: choose from {', '.join(REPLACEMENTS)}")
    for flag, value in (("--tokens", settings.tokens), ("--epochs", settings.epochs), ("--nsamples", settings.nsamples),
                        ("--batch", settings.batch), ("--post-epochs", settings.post_epochs)):
        if value < 1:
            raise UserError(f"{flag} {value}: give a positive number")
    for flag, value in (("--lr", settings.lr), ("--post-lr", settings.post_lr)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{flag} {value}: give a positive learning rate, e.g. {PAPER_OPTIMIZER['ffn'][0]}")
    for flag, value in (("--weight-decay", settings.weight_decay), ("--post-weight-decay", settings.post_weight_decay)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise UserError(f"{flag} {value}: give a weight decay of 0 or more")
    if settings.post_train and settings.replacement == "none":
        raise UserError("--post-train trains the replacement, and --replacement none has none; choose ffn, swiglu "
                        "or layer")


def make_replacement(model: nn.Module, blocks: nn.ModuleList, start: int, kind: str) -> nn.Module | None:
    if kind == "none":
        return None
    first = blocks[start]
    if kind == "layer":
        return copy.deepcopy(first)  # the paper's transformer-layer replacement starts from the span's first layer
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = config.hidden_size
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"
    return mlp_block(kind, first_norm(first), hidden, mlp_width(first, hidden), act, start).to(
        next(first.parameters()).device)


def train(replacement: nn.Module, data: SpanData, kind: str, settings: StreamlineSettings, progress=None) -> dict:
    """Fit the replacement to the span and report the loss curve and the MSE before, after, and of dropping the
    span (the identity), all on the training windows. One window is one micro-batch, `settings.batch` windows one
    step."""
    device = next(replacement.parameters()).device
    replacement.float()
    kwargs = data.call if kind == "layer" else {}  # an MLP block ignores the layer call
    items = [(x.to(device), y.to(device), kwargs) for x, y in zip(data.inputs, data.outputs)]
    identity = mse(nn.Identity(), [(x, y, {}) for x, y, _ in items])
    before = mse(replacement, items)
    steps = math.ceil(len(items) / settings.batch)
    task = progress.add_task(f"training {kind} replacement", total=steps * settings.epochs) if progress else None
    t0 = time.perf_counter()
    curve = fit(list(replacement.parameters()), batch_steps(items, settings.batch, settings.seed),
                lambda item: mse_sum(replacement, item), steps, settings.epochs, settings.lr, settings.weight_decay,
                (lambda: progress.advance(task)) if progress else None)
    seconds = time.perf_counter() - t0
    return {"tokens": data.tokens, "windows": len(items), "epochs": settings.epochs, "steps": steps * settings.epochs,
            "batch": f"{settings.batch} windows per step (one window per micro-batch, gradients accumulated)",
            "optimizer": "AdamW", "lr": settings.lr, "lr_schedule": f"cosine to {MIN_LR_FRACTION} x lr",
            "weight_decay": settings.weight_decay, "loss": "MSE(replacement(span input), span output)",
            "loss_curve": epoch_means(curve, steps), "mse_before": before, "mse_after": mse(replacement, items),
            "mse_drop_span": identity, "seconds": seconds}


def lm_loss_sum(model: nn.Module, window: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of one window, and the number of tokens predicted."""
    ids = window.reshape(1, -1).to(next(model.parameters()).device)
    return model(input_ids=ids, labels=ids, use_cache=False).loss * (ids.shape[1] - 1), ids.shape[1] - 1


def post_train(model: nn.Module, replacement: nn.Module, windows: torch.Tensor, settings: StreamlineSettings,
               progress=None) -> dict:
    """The paper's post-training of a replaced layer: the streamlined model's causal-LM loss on the training
    windows, AdamW on the replacement's parameters only (the paper says which values, not which parameters; the
    replacement is the part it calls trained), the rest frozen."""
    trainable = {p for p in replacement.parameters()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(p in trainable)
    steps = math.ceil(len(windows) / settings.batch)
    task = progress.add_task("post-training (LM loss)", total=steps * settings.post_epochs) if progress else None
    t0 = time.perf_counter()
    try:
        curve = fit(list(trainable), batch_steps(list(windows), settings.batch, settings.seed + 1_000),
                    lambda w: lm_loss_sum(model, w), steps, settings.post_epochs, settings.post_lr,
                    settings.post_weight_decay, (lambda: progress.advance(task)) if progress else None)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {"windows": len(windows), "tokens": int(windows.numel()), "epochs": settings.post_epochs,
            "steps": steps * settings.post_epochs, "batch": f"{settings.batch} windows per step", "optimizer": "AdamW",
            "lr": settings.post_lr, "lr_schedule": f"cosine to {MIN_LR_FRACTION} x lr",
            "weight_decay": settings.post_weight_decay,
            "trained": "replacement only", "loss": "next-token cross-entropy of the whole model",
            "loss_curve": curve, "seconds": time.perf_counter() - t0}


def streamline_model(model: nn.Module, windows: torch.Tensor, settings: StreamlineSettings, progress=None) -> dict:
    """Streamline `model` in place (the stack is replaced, the config shortened); returns the record."""
    validate_settings(settings)
    settings = resolve_settings(settings)
    blocks = decoder_layers(model)
    num_layers = len(blocks)
    n = layers_to_remove(num_layers, settings.remove_layers, settings.ratio)
    if any(getattr(b, "STREAMLINE_REPLACEMENT", False) for b in blocks):
        raise UserError("the model is already streamlined (it holds an MLP-only replacement block); streamline "
                        "the original model with a larger --remove-layers instead")
    timings = {}
    params_before = decoder_linear_params(blocks)
    t0 = time.perf_counter()
    scores = score_spans(model, blocks, windows, n, progress)
    start = choose_span(scores)
    timings["score_s"] = time.perf_counter() - t0
    replacement = make_replacement(model, blocks, start, settings.replacement)
    training = post = None
    train_windows = training_windows(windows, settings.tokens)
    if replacement is not None:
        t0 = time.perf_counter()
        data = collect_span(model, blocks, train_windows, start, n, progress)
        timings["collect_s"] = time.perf_counter() - t0
        training = train(replacement, data, settings.replacement, settings, progress)
        del data
        replacement.to(next(blocks[start].parameters()).dtype)
    _new, cut = replace_span(model, blocks, start, n, replacement, settings.replacement)
    if settings.post_train:
        post = post_train(model, replacement, train_windows, settings, progress)
    params_after = decoder_linear_params(decoder_layers(model))
    rep = {"kind": settings.replacement, "index": None if replacement is None else start}
    if settings.replacement in MLP_KINDS:
        rep.update(width=replacement.mlp.down_proj.in_features, act=_act_name(model),
                   init="down projection zeroed (starts as dropping the span), norm copied from layer "
                        f"{start}", params=sum(p.numel() for p in replacement.parameters()))
    elif settings.replacement == "layer":
        rep.update(init=f"copy of layer {start}", params=sum(p.numel() for p in replacement.parameters()))
    return {
        "schema": SCHEMA,
        "method": "llm-streamline",
        "settings": asdict(settings),
        "paper_deviations": paper_deviations(settings),
        "removed": {"start": start, "end": start + n, "layers": list(range(start, start + n)), "count": n},
        "num_layers": {"before": num_layers, "after": new_layer_count(num_layers, n, settings.replacement)},
        "replacement": rep,
        # the unit every other form's sparsity counts in, so a depth-pruned model compares at equal parameters
        "decoder_linear_params": {"before": params_before, "after": params_after,
                                  "removed_share": 1 - params_after / params_before},
        "span_scores": [{"start": i, "end": i + n, "cosine": v} for i, v in enumerate(scores)],
        "selected_cosine": scores[start],
        "score": "mean over calibration tokens of cos(hidden entering layer start, hidden leaving layer end-1), "
                 "raw block outputs (before the final norm)",
        "training": training,
        "post_training": post,
        "config_lists_cut": cut,
        "timings": timings,
    }


def paper_deviations(settings: StreamlineSettings) -> list[str]:
    """Where the (resolved) settings leave the paper's, in words; the token budget always does."""
    out = [f"trained on {settings.tokens} tokens of span input/output (whole windows), not the paper's 30,000 samples"]
    if (settings.replacement in PAPER_OPTIMIZER
            and (settings.lr, settings.weight_decay) != PAPER_OPTIMIZER[settings.replacement]):
        out.append(f"lr {settings.lr}, weight decay {settings.weight_decay} (paper for {settings.replacement}: "
                   f"{PAPER_OPTIMIZER[settings.replacement][0]}, {PAPER_OPTIMIZER[settings.replacement][1]})")
    for name, value, paper in (("batch", settings.batch, BATCH), ("epochs", settings.epochs, EPOCHS),
                               ("nsamples", settings.nsamples, NSAMPLES)):
        if value != paper:
            out.append(f"{name} {value} (paper: {paper})")
    if settings.replacement == "layer" and not settings.post_train:
        out.append("no post-training (the paper post-trains a replaced layer for one epoch; --post-train)")
    post = (settings.post_lr, settings.post_weight_decay, settings.post_epochs)
    if settings.post_train and post != (POST_LR, POST_WEIGHT_DECAY, POST_EPOCHS):
        out.append(f"post-training lr {settings.post_lr}, weight decay {settings.post_weight_decay}, "
                   f"{settings.post_epochs} epochs (paper: {POST_LR}, {POST_WEIGHT_DECAY}, {POST_EPOCHS})")
    return out


def decoder_linear_params(blocks: nn.ModuleList) -> int:
    return sum(m.weight.numel() for block in blocks for m in block.modules() if isinstance(m, nn.Linear))


def _act_name(model: nn.Module) -> str:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"


def streamline_to_folder(model_ref: str, out: Path, settings: StreamlineSettings, device: str = "cpu",
                         data_root: str | None = None, force: bool = False, progress=None) -> dict:
    """The whole job: load, calibrate, streamline, save a reloadable HF folder with streamline.json, atomically.
    The model is loaded, trained and saved in fp32."""
    validate_settings(settings)
    check_writable(out, force)
    ref, config = models.load_config(model_ref)
    if isinstance(getattr(config, "num_hidden_layers", None), int):
        # refuse before the slow load
        layers_to_remove(config.num_hidden_layers, settings.remove_layers, settings.ratio)
    if (Path(ref) / models.STRUCTURE_FILE).is_file():
        raise UserError(f"{model_ref} is structured-pruned (it has {models.STRUCTURE_FILE}); streamline the dense "
                        "model first, then prune the streamlined one")
    if (Path(ref) / models.STREAMLINE_FILE).is_file():
        raise UserError(f"{model_ref} is already streamlined; streamline the original model with a larger "
                        "--remove-layers instead")
    root = data.data_dir(data_root)
    t0 = time.perf_counter()
    model, tok = models.load(model_ref, device, torch.float32)
    # refuse before calibration
    layers_to_remove(len(models.decoder_layers(model)), settings.remove_layers, settings.ratio)
    load_s = time.perf_counter() - t0
    seqlen = settings.seqlen or data.default_seqlen(model.config)
    calibration = data.calibration(settings.calib, tok, settings.nsamples, seqlen, settings.seed, root)
    torch.manual_seed(settings.seed)
    with atomic_dir(out, force) as tmp:
        record = streamline_model(model, calibration.windows, settings, progress)
        record["timings"]["load_s"] = load_s
        record.update(model=model_ref, device=device,
                      calibration={"corpus": settings.calib, "source": calibration.source,
                                   "nsamples": settings.nsamples, "seqlen": seqlen},
                      provenance=provenance())
        save_streamlined(model, tok, tmp, record)
    return record


def save_streamlined(model: nn.Module, tok, folder: Path, record: dict) -> None:
    """An HF folder `models.load` rebuilds the streamlined stack from (streamline.json names the replacement)."""
    model.config.use_cache = True
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_json_atomic(Path(folder) / models.STREAMLINE_FILE, record)
