"""Depth pruning with LLM-Streamline (Chen et al., ICLR 2025, "Streamlining Redundant Layers to Compress Large
Language Models"): on calibration text, find the contiguous span of n decoder layers whose output hidden state is
most similar (cosine, averaged over tokens) to its input, cut it, and put one lightweight module in its place,
trained with MSE to map the span's input hidden states to its output hidden states.

Three parts, top to bottom: pure math (span scores, the span choice, layer counts), the replacement modules
(`ffn`, `swiglu`: a residual MLP-only block; `layer`: a copy of the span's first decoder layer), and the wiring
(running calibration windows through the model, training, rebuilding the layer stack and config, the job).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

SCHEMA = "dlp-deploy/streamline/1"
REPLACEMENTS = ("none", "ffn", "swiglu", "layer")
MLP_KINDS = ("ffn", "swiglu")  # blocks with no attention: h + mlp(norm(h))

# Training defaults. The learning rate and weight decay follow the public LLM-Streamline training scripts as far
# as they could be checked here (AdamW, peak lr 2e-4 decaying on a cosine to a quarter of it, weight decay 1e-3);
# the paper trains on far more tokens than a CPU job can afford, so tokens and epochs are scaled down instead and
# recorded with the result.
LR = 2e-4
MIN_LR_FRACTION = 0.25
WEIGHT_DECAY = 1e-3
EPOCHS = 5
TOKENS = 65_536  # span input/output pairs kept for training: 8 * TOKENS * hidden bytes (fp32 input + target)
BATCH_TOKENS = 512  # MLP replacements train on shuffled tokens; a `layer` replacement on whole windows


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


# ---------------------------------------------------------------- replacement modules

class FFN(nn.Module):
    """A plain two-layer MLP: down(act(up(x)))."""

    def __init__(self, hidden: int, width: int, act: str):
        from transformers.activations import ACT2FN

        super().__init__()
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.act_fn = ACT2FN[act]
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class SwiGLU(nn.Module):
    """A gated MLP as LLaMA's: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, width: int, act: str = "silu"):
        from transformers.activations import ACT2FN

        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MLPBlock(nn.Module):
    """A residual MLP-only block, h + mlp(norm(h)), that stands in the decoder stack in place of a span: it takes
    a decoder layer's call (hidden states, then keyword arguments it ignores) and returns the hidden states, as
    decoder layers do in this transformers version. It has no attention and so no keys or values."""

    STREAMLINE_REPLACEMENT = True  # models.decoder_layers accepts it beside the model's own decoder layers

    def __init__(self, norm: nn.Module, mlp: nn.Module, layer_idx: int):
        super().__init__()
        self.norm = norm
        self.mlp = mlp
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, past_key_values=None, use_cache=False, **kwargs):
        if use_cache and past_key_values is not None and hasattr(past_key_values, "update"):
            # HF reads the cache length from one layer's slot (layer 0 by default) to place new positions; one
            # 1-wide zero entry per token keeps this block's slot in step with the others wherever the block sits
            mark = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            past_key_values.update(mark, mark, self.layer_idx)
        return hidden_states + self.mlp(self.norm(hidden_states))


def first_norm(block: nn.Module) -> nn.Module:
    """A fresh copy of the block's first norm (its class and eps; the weights come from the block): the replacement
    normalises its input as the model does."""
    for child in block.children():
        weight = getattr(child, "weight", None)
        if (not list(child.children()) and isinstance(weight, torch.Tensor) and weight.dim() == 1
                and not isinstance(child, (nn.Linear, nn.Embedding))):
            return copy.deepcopy(child)
    raise UserError(f"{type(block).__name__}: no norm among the decoder layer's modules to copy into an MLP "
                    "replacement; use --replacement none or layer")


def mlp_width(block: nn.Module, hidden: int) -> int:
    """The block's MLP width (the replacement takes it), read off the down projection: the widest input of a
    Linear back to the hidden size. Not the widest output from it: a fused gate/up projection is twice as wide."""
    widths = [m.in_features for m in block.modules() if isinstance(m, nn.Linear) and m.out_features == hidden
              and m.in_features != hidden]
    return max(widths) if widths else 4 * hidden


def mlp_block(kind: str, norm: nn.Module, hidden: int, width: int, act: str, layer_idx: int,
              identity: bool = True) -> MLPBlock:
    """An `ffn` or `swiglu` replacement. identity=True zeroes the down projection, so before training the block
    is exactly "drop the span" and training starts from that baseline rather than from noise."""
    mlp = FFN(hidden, width, act) if kind == "ffn" else SwiGLU(hidden, width, act)
    for m in mlp.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    if identity:
        nn.init.zeros_(mlp.down_proj.weight)
    return MLPBlock(norm, mlp, layer_idx)


def output_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


# ---------------------------------------------------------------- training

def mse(module: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, dict]]) -> float:
    """Mean squared error of module(input) against the target over all batches (token-weighted)."""
    total = count = 0.0
    with torch.no_grad():
        for x, y, kw in batches:
            total += float(F.mse_loss(output_hidden(module(x, **kw)).float(), y.float(), reduction="sum"))
            count += y.numel()
    return total / max(count, 1)


def fit(module: nn.Module, batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor, dict]]],
        steps_per_epoch: int, epochs: int, lr: float, weight_decay: float, on_step: Callable | None = None) -> list:
    """AdamW on the MSE between module(span input) and the span output; `batches(epoch)` yields (input, target,
    call kwargs). Returns the mean training loss of every epoch (the loss curve)."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total_steps, step, curve = steps_per_epoch * epochs, 0, []
    with torch.enable_grad():
        for epoch in range(epochs):
            losses = []
            for x, y, kw in batches(epoch):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(step, total_steps, lr)
                loss = F.mse_loss(output_hidden(module(x, **kw)).float(), y.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
                if on_step:
                    on_step()
            curve.append(sum(losses) / max(len(losses), 1))
    return curve


def token_batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> Callable[[int], Iterator]:
    """Shuffled token minibatches (an MLP block sees each token alone), reshuffled every epoch."""
    def batches(epoch: int):
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, x.shape[0], batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx], {}
    return batches


def window_batches(xs: list[torch.Tensor], ys: list[torch.Tensor], kwargs: dict, seed: int) -> Callable:
    """Whole windows in shuffled order, with the decoder layer's own call (positions, masks)."""
    def batches(epoch: int):
        order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in order:
            yield xs[i], ys[i], kwargs
    return batches


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

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.inputs[0].shape[-1]
        return (torch.cat(self.inputs, dim=1).reshape(-1, hidden), torch.cat(self.outputs, dim=1).reshape(-1, hidden))


def collect_span(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, start: int, n: int,
                 max_tokens: int, whole_windows: bool, progress=None) -> SpanData:
    """The span's input and output for calibration windows until `max_tokens` tokens are held (only these two
    states are kept, and the forward stops after the span). whole_windows keeps windows intact (a `layer`
    replacement attends over them); otherwise the last window is cut at the budget."""
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
            left = max_tokens - data.tokens
            if left <= 0:
                break
            _run(model, window)
            keep = current["x"].shape[1] if whole_windows else min(left, current["x"].shape[1])
            data.inputs.append(current["x"][:, :keep].float().cpu())
            data.outputs.append(current["y"][:, :keep].float().cpu())
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


def renumber(blocks: nn.ModuleList) -> None:
    """Each layer's modules index the KV cache by `layer_idx`: after a cut the layers behind it move up."""
    for i, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i


def shorten_config(config, start: int, n: int, replacement: str) -> list[str]:
    """Set the layer count and cut every per-layer list of the config (layer_types and the like: any list as
    long as the old stack) the same way as the stack: the replacement keeps the span's first layer's entry.
    Returns the names of the lists cut."""
    old = config.num_hidden_layers
    keep = list(range(start)) + ([start] if replacement != "none" else []) + list(range(start + n, old))
    cut = []
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == old and not name.startswith("_"):
            setattr(config, name, type(value)(value[i] for i in keep))
            cut.append(name)
    config.num_hidden_layers = len(keep)
    return cut


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


def rebuild(model: nn.Module, blocks: nn.ModuleList, record: dict) -> None:
    """Give a model built from a streamlined folder's config its MLP-only replacement block (weights are loaded
    afterwards); `none` and `layer` folders hold ordinary decoder layers and need nothing."""
    rep = record.get("replacement") or {}
    kind = rep.get("kind")
    if kind not in MLP_KINDS:
        return
    index = rep["index"]
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") \
        else model.config.hidden_size
    blocks[index] = mlp_block(kind, first_norm(blocks[index]), hidden, rep["width"], rep["act"], index)


# ---------------------------------------------------------------- wiring: the job

@dataclass
class StreamlineSettings:
    remove_layers: int | None = None
    ratio: float | None = None
    replacement: str = "ffn"
    calib: str = "c4"
    nsamples: int = 64
    seqlen: int | None = None
    seed: int = 0
    tokens: int = TOKENS
    epochs: int = EPOCHS
    lr: float = LR
    weight_decay: float = WEIGHT_DECAY
    batch_tokens: int = BATCH_TOKENS


def validate_settings(s: StreamlineSettings) -> None:
    if (s.remove_layers is None) == (s.ratio is None):
        raise UserError("give exactly one of --remove-layers N or --ratio R (share of decoder layers to remove)")
    if s.replacement not in REPLACEMENTS:
        raise UserError(f"--replacement {s.replacement!r}: choose from {', '.join(REPLACEMENTS)}")
    for flag, value in (("--tokens", s.tokens), ("--epochs", s.epochs), ("--nsamples", s.nsamples),
                        ("--batch-tokens", s.batch_tokens)):
        if value < 1:
            raise UserError(f"{flag} {value}: give a positive number")
    if not s.lr > 0:
        raise UserError(f"--lr {s.lr}: give a positive learning rate, e.g. {LR}")


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


def train(replacement: nn.Module, data: SpanData, kind: str, s: StreamlineSettings, progress=None) -> dict:
    """Fit the replacement to the span and report the loss curve and the MSE before, after, and of dropping the
    span (the identity), all on the training tokens."""
    device = next(replacement.parameters()).device
    replacement.float()
    if kind == "layer":
        xs, ys = [x.to(device) for x in data.inputs], [y.to(device) for y in data.outputs]
        batches, steps = window_batches(xs, ys, data.call, s.seed), len(xs)
    else:
        x, y = (t.to(device) for t in data.flat())
        batches, steps = token_batches(x, y, s.batch_tokens, s.seed), math.ceil(x.shape[0] / s.batch_tokens)
    everything = list(batches(0))
    identity = sum(float(F.mse_loss(x.float(), y.float(), reduction="sum")) for x, y, _ in everything) / \
        sum(y.numel() for _, y, _ in everything)
    before = mse(replacement, everything)
    task = progress.add_task(f"training {kind} replacement", total=steps * s.epochs) if progress else None
    t0 = time.perf_counter()
    curve = fit(replacement, batches, steps, s.epochs, s.lr, s.weight_decay,
                (lambda: progress.advance(task)) if progress else None)
    seconds = time.perf_counter() - t0
    return {"tokens": data.tokens, "windows": len(data.inputs), "epochs": s.epochs, "steps": steps * s.epochs,
            "batch": "one window" if kind == "layer" else f"{s.batch_tokens} shuffled tokens",
            "optimizer": "AdamW", "lr": s.lr, "lr_schedule": f"cosine to {MIN_LR_FRACTION} x lr",
            "weight_decay": s.weight_decay, "loss": "MSE(replacement(span input), span output)",
            "loss_curve": curve, "mse_before": before, "mse_after": mse(replacement, everything),
            "mse_drop_span": identity, "seconds": seconds}


def streamline_model(model: nn.Module, windows: torch.Tensor, s: StreamlineSettings, progress=None) -> dict:
    """Streamline `model` in place (the stack is replaced, the config shortened); returns the record."""
    from ..models import decoder_layers

    validate_settings(s)
    blocks = decoder_layers(model)
    num_layers = len(blocks)
    n = layers_to_remove(num_layers, s.remove_layers, s.ratio)
    if any(getattr(b, "STREAMLINE_REPLACEMENT", False) for b in blocks):
        raise UserError("the model is already streamlined (it holds an MLP-only replacement block); streamline "
                        "the original model with a larger --remove-layers instead")
    timings = {}
    params_before = decoder_linear_params(blocks)
    t0 = time.perf_counter()
    scores = score_spans(model, blocks, windows, n, progress)
    start = choose_span(scores)
    timings["score_s"] = time.perf_counter() - t0
    replacement = make_replacement(model, blocks, start, s.replacement)
    training = None
    if replacement is not None:
        t0 = time.perf_counter()
        data = collect_span(model, blocks, windows, start, n, s.tokens, s.replacement == "layer", progress)
        timings["collect_s"] = time.perf_counter() - t0
        training = train(replacement, data, s.replacement, s, progress)
        del data
        replacement.to(next(blocks[start].parameters()).dtype)
    _new, cut = replace_span(model, blocks, start, n, replacement, s.replacement)
    params_after = decoder_linear_params(decoder_layers(model))
    rep = {"kind": s.replacement, "index": None if replacement is None else start}
    if s.replacement in MLP_KINDS:
        rep.update(width=replacement.mlp.down_proj.in_features, act=_act_name(model),
                   init="down projection zeroed (starts as dropping the span), norm copied from layer "
                        f"{start}", params=sum(p.numel() for p in replacement.parameters()))
    elif s.replacement == "layer":
        rep.update(init=f"copy of layer {start}", params=sum(p.numel() for p in replacement.parameters()))
    return {
        "schema": SCHEMA,
        "method": "llm-streamline",
        "settings": asdict(s),
        "removed": {"start": start, "end": start + n, "layers": list(range(start, start + n)), "count": n},
        "num_layers": {"before": num_layers, "after": new_layer_count(num_layers, n, s.replacement)},
        "replacement": rep,
        # the unit every other form's sparsity counts in, so a depth-pruned model compares at equal parameters
        "decoder_linear_params": {"before": params_before, "after": params_after,
                                  "removed_share": 1 - params_after / params_before},
        "span_scores": [{"start": i, "end": i + n, "cosine": v} for i, v in enumerate(scores)],
        "selected_cosine": scores[start],
        "score": "mean over calibration tokens of cos(hidden entering layer start, hidden leaving layer end-1), "
                 "raw block outputs (before the final norm)",
        "training": training,
        "config_lists_cut": cut,
        "timings": timings,
    }


def decoder_linear_params(blocks: nn.ModuleList) -> int:
    return sum(m.weight.numel() for block in blocks for m in block.modules() if isinstance(m, nn.Linear))


def _act_name(model: nn.Module) -> str:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"


def streamline_to_folder(model_ref: str, out: Path, s: StreamlineSettings, device: str = "cpu",
                         data_root: str | None = None, force: bool = False, progress=None) -> dict:
    """The whole job: load, calibrate, streamline, save a reloadable HF folder with streamline.json, atomically.
    The model is loaded, trained and saved in fp32."""
    from .. import data, models
    from ..io import atomic_dir, check_writable
    from ..provenance import provenance

    validate_settings(s)
    check_writable(out, force)
    ref, config = models.load_config(model_ref)
    if isinstance(getattr(config, "num_hidden_layers", None), int):
        layers_to_remove(config.num_hidden_layers, s.remove_layers, s.ratio)  # refuse before the slow load
    if (Path(ref) / models.STRUCTURE_FILE).is_file():
        raise UserError(f"{model_ref} is structured-pruned (it has {models.STRUCTURE_FILE}); streamline the dense "
                        "model first, then prune the streamlined one")
    if (Path(ref) / models.STREAMLINE_FILE).is_file():
        raise UserError(f"{model_ref} is already streamlined; streamline the original model with a larger "
                        "--remove-layers instead")
    root = data.data_dir(data_root)
    t0 = time.perf_counter()
    model, tok = models.load(model_ref, device, torch.float32)
    layers_to_remove(len(models.decoder_layers(model)), s.remove_layers, s.ratio)  # refuse before calibration
    load_s = time.perf_counter() - t0
    seqlen = s.seqlen or data.default_seqlen(model.config)
    calibration = data.calibration(s.calib, tok, s.nsamples, seqlen, s.seed, root)
    torch.manual_seed(s.seed)
    with atomic_dir(out, force) as tmp:
        record = streamline_model(model, calibration.windows, s, progress)
        record["timings"]["load_s"] = load_s
        record.update(model=model_ref, device=device,
                      calibration={"corpus": s.calib, "source": calibration.source, "nsamples": s.nsamples,
                                   "seqlen": seqlen},
                      provenance=provenance())
        save_streamlined(model, tok, tmp, record)
    return record


def save_streamlined(model: nn.Module, tok, folder: Path, record: dict) -> None:
    """An HF folder `models.load` rebuilds the streamlined stack from (streamline.json names the replacement)."""
    from .. import models
    from ..io import write_json_atomic

    model.config.use_cache = True
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_json_atomic(Path(folder) / models.STREAMLINE_FILE, record)
