"""Recovery fine-tuning of a pruned model with LoRA (peft) that keeps its sparsity mask.

A pruned model loses quality; a short causal-LM fine-tune on C4 text windows wins part of it back. Plain LoRA
would undo the pruning: merging adds the dense update scale·B@A to every weight, pruned zeros included.

Mask approach ("masked LoRA"): every exact zero in a decoder block's linear weight counts as pruned. The mask M
(1 where the weight is non-zero) is taken once, before training, and the adapter's update is projected onto it
everywhere it is used:

* training: an adapted layer computes x @ (W + M ⊙ (scale·B@A))ᵀ, so the optimiser only sees the part of the
  update that will survive, and the model trained is the model saved (masking only at the merge would discard
  the trained update's off-mask half without telling the optimiser);
* merging: W' = W + M ⊙ (scale·B@A). Off the mask W is 0 and so is the update: the zeros stay exactly 0.0.
  A kept weight whose sum lands on exactly 0 in the saved dtype (vanishingly rare) keeps its old value, so
  the set of zeros, not only their count, is unchanged; every layer is checked after the merge.

A layer with no zeros (a dense layer, a streamline replacement block) keeps peft's own low-rank forward: there
M is all ones. Target modules are found structurally: every nn.Linear inside `models.decoder_layers`
(streamline's MLP-only blocks included); embeddings, the LM head and norms stay frozen. LoRA dropout is off: the
masked forward folds the update into the weight, where dropout on the adapter's input path has no place.
Training runs in fp32; the output keeps the input's dtype. Cost of the mask: each masked layer materialises
M ⊙ ΔW (one weight-sized tensor, kept for backward), so training holds about one extra fp32 copy of the
decoder's linear weights, plus the bool masks.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import data, models
from ..errors import UserError
from ..pruning_record import read_pruning_record

SCHEMA = "dlp-deploy/recovery/1"
ADAPTER = "default"  # peft's adapter name

# LoRA rank by the paper behind the use. DLP (ICML 2025, Table 7: LoRA on C4, pruning mask fixed, autoregressive
# loss) states no rank; its recovery is Wanda's lora_ft script (locuslab/wanda lora_ft/finetune_lm.py: r 8,
# alpha 16), so a pruned or dense input gets 8. A streamlined input gets LLM-Streamline's comparison rank, 128
# (Chen et al., ICLR 2025: "For LoRA, we set the rank to 128"). Alpha defaults to 2 x rank, Wanda's alpha / r.
RANK = 8
STREAMLINE_RANK = 128
ALPHA_PER_RANK = 2.0
# the rest: short CPU-friendly runs
STEPS = 100
LR = 2e-4
NSAMPLES = 128
BATCH_SIZE = 4
EVAL_WINDOWS = 16


@dataclass
class RecoverSettings:
    steps: int = STEPS
    lora_rank: int | None = None  # None: by the input (RANK, or STREAMLINE_RANK for a streamlined folder)
    lora_alpha: float | None = None  # None: ALPHA_PER_RANK x rank
    lr: float = LR
    nsamples: int = NSAMPLES
    seqlen: int | None = None  # None: min(2048, the model's context)
    batch_size: int = BATCH_SIZE
    seed: int = 0
    eval_windows: int = EVAL_WINDOWS  # 0: no perplexity before/after


def validate_settings(settings: RecoverSettings) -> None:
    """One-line refusals before any loading."""
    for flag, value in (("--steps", settings.steps), ("--lora-rank", settings.lora_rank),
                        ("--nsamples", settings.nsamples), ("--batch-size", settings.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give a positive whole number (at least 1)")
    if settings.seqlen is not None and settings.seqlen < 2:
        raise UserError(f"--seqlen {settings.seqlen}: a training window needs at least 2 tokens")
    if settings.eval_windows < 0:
        raise UserError(f"--eval-windows {settings.eval_windows}: give 0 (no perplexity) or more held-out windows")
    for flag, value, example in (("--lr", settings.lr, LR),
                                 ("--lora-alpha", settings.lora_alpha, ALPHA_PER_RANK * RANK)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{flag} {value}: give a positive number, e.g. {example}")


def resolve_settings(settings: RecoverSettings, streamlined: bool) -> RecoverSettings:
    """Rank and alpha left None take the default of the paper behind the use (see RANK)."""
    rank = settings.lora_rank if settings.lora_rank is not None else STREAMLINE_RANK if streamlined else RANK
    alpha = settings.lora_alpha if settings.lora_alpha is not None else ALPHA_PER_RANK * rank
    return replace(settings, lora_rank=rank, lora_alpha=alpha)


# ---------------------------------------------------------------- targets and masks

def target_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the decoder stack by its qualified name in the model (what peft matches exactly)."""
    blocks = models.decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    return {f"{prefix}.{i}.{name}": linear for i, block in enumerate(blocks)
            for name, linear in models.linear_modules(block).items()}


def keep_masks(targets: dict[str, nn.Linear]) -> dict[str, torch.Tensor | None]:
    """Per target: a bool mask of the weights to keep, or None when nothing is pruned (no mask needed)."""
    masks = {}
    for name, linear in targets.items():
        keep = linear.weight.detach() != 0
        masks[name] = None if bool(keep.all()) else keep
    return masks


def count_zeros(targets: dict[str, nn.Linear]) -> int:
    return sum(int((linear.weight == 0).sum()) for linear in targets.values())


# ---------------------------------------------------------------- masked LoRA

def attach_lora(model: nn.Module, names: list[str], settings: RecoverSettings):
    """Wrap the named linears with LoRA adapters (peft freezes every other parameter); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=names)
    torch.manual_seed(settings.seed)  # A's random init
    return get_peft_model(model, config)


def masked_forward(layer, keep: torch.Tensor):
    """A forward for one peft LoRA layer computing x @ (W + keep ⊙ ΔW)ᵀ + b, ΔW = scale·B@A (differentiable):
    peft's own forward adds the dense low-rank path, which would train weights that pruning removed."""
    base = layer.get_base_layer()

    def forward(x, *args, **kwargs):
        delta = layer.get_delta_weight(ADAPTER).to(base.weight.dtype)
        return F.linear(x.to(base.weight.dtype), base.weight + delta * keep, base.bias)

    return forward


def mask_adapters(peft_model, masks: dict[str, torch.Tensor | None]) -> int:
    """Give every LoRA layer over a pruned weight the masked forward; returns how many were masked."""
    layers = lora_layers(peft_model)
    masked = 0
    for name, layer in layers.items():
        keep = masks[name]
        if keep is not None:
            # an instance attribute shadows the class's forward: peft's wrapper stays, only its math changes
            layer.forward = masked_forward(layer, keep)
            masked += 1
    return masked


def lora_layers(peft_model) -> dict[str, nn.Module]:
    """peft's LoRA layers by the qualified name their base linear had in the plain model."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def merged_weight(weight: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor | None,
                  saved_dtype: torch.dtype) -> torch.Tensor:
    """W + keep ⊙ ΔW, rounded to the dtype it is saved in (returned in `weight`'s dtype, values exact in the
    saved one). A kept weight that rounds to exactly 0 keeps its old value, so the zero set cannot grow."""
    if keep is None:
        keep = torch.ones_like(weight, dtype=torch.bool)
    new = torch.where(keep, weight + delta.to(weight.dtype), torch.zeros_like(weight)).to(saved_dtype)
    collapsed = keep & (new == 0)
    new[collapsed] = weight[collapsed].to(saved_dtype)
    return new.to(weight.dtype)


def merge_and_unload(peft_model, masks: dict[str, torch.Tensor | None], saved_dtype: torch.dtype) -> nn.Module:
    """Fold each adapter into its base weight with the mask, then drop the adapters (peft's unload, no merge)."""
    with torch.no_grad():
        for name, layer in lora_layers(peft_model).items():
            base = layer.get_base_layer()
            delta = layer.get_delta_weight(ADAPTER)
            base.weight.copy_(merged_weight(base.weight, delta, masks[name], saved_dtype))
    return peft_model.unload()


def check_mask_kept(targets: dict[str, nn.Linear], masks: dict[str, torch.Tensor | None]) -> None:
    """Same zero positions as before, layer by layer; a mismatch is a bug here, never a user error."""
    for name, linear in targets.items():
        keep = masks[name]
        zeros_now = linear.weight == 0
        expected = torch.zeros_like(zeros_now) if keep is None else ~keep
        if not torch.equal(zeros_now, expected):
            raise RuntimeError(f"recovery changed the zero pattern of {name}: "
                               f"{int(expected.sum())} zeros before, {int(zeros_now.sum())} after")


# ---------------------------------------------------------------- training

def lr_at(step: int, total: int, lr: float) -> float:
    from .depth import cosine_lr

    return cosine_lr(step, total, lr)  # cosine decay to a quarter, as streamline's replacement training


def batches(windows: torch.Tensor, steps: int, batch_size: int, seed: int):
    """`steps` batches of windows, reshuffled on every pass over them (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(windows), generator=gen).tolist()
        take, order = order[:batch_size], order[batch_size:]
        yield windows[take]


def train(peft_model, windows: torch.Tensor, settings: RecoverSettings, device: str, progress=None) -> list[float]:
    """Causal LM loss on the windows with AdamW over the LoRA parameters; returns the loss of every step."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    task = progress.add_task("LoRA recovery", total=settings.steps) if progress else None
    peft_model.train()
    curve = []
    for step, batch in enumerate(batches(windows, settings.steps, settings.batch_size, settings.seed)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings.steps, settings.lr)
        batch = batch.to(device)
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
        if progress:
            progress.update(task, advance=1, description=f"LoRA recovery (loss {curve[-1]:.3f})")
    peft_model.eval()
    return curve


def held_out_ppl(model: nn.Module, ids: torch.Tensor | None, seqlen: int, progress, label: str) -> float | None:
    from ..eval.perplexity import perplexity

    if ids is None:
        return None
    model.eval()
    return perplexity(model, ids.flatten(), seqlen, progress=progress, label=label)["ppl"]


# ---------------------------------------------------------------- the job

def recover_model(model: nn.Module, windows: torch.Tensor, settings: RecoverSettings, device: str, saved_dtype,
                  held_out: torch.Tensor | None = None, progress=None) -> tuple[nn.Module, dict]:
    """Fine-tune with masked LoRA and merge; returns (the plain merged model, the record minus provenance)."""
    seqlen = windows.shape[1]
    targets = target_modules(model)
    masks = keep_masks(targets)
    zeros_before = count_zeros(targets)
    ppl_before = held_out_ppl(model, held_out, seqlen, progress, "perplexity before")
    t0 = time.perf_counter()
    peft_model = attach_lora(model, list(targets), settings)
    masked = mask_adapters(peft_model, masks)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    curve = train(peft_model, windows, settings, device, progress)
    train_s = time.perf_counter() - t0
    model = merge_and_unload(peft_model, masks, saved_dtype)
    targets = target_modules(model)  # unload put the plain linears back
    check_mask_kept(targets, masks)
    zeros_after = count_zeros(targets)
    ppl_after = held_out_ppl(model, held_out, seqlen, progress, "perplexity after")
    record = {
        "lora": {"rank": settings.lora_rank, "alpha": settings.lora_alpha,
                 "scale": settings.lora_alpha / settings.lora_rank, "dropout": 0.0, "targets": len(targets),
                 "masked_targets": masked, "trainable_params": trainable, "target_names": list(targets)},
        "mask": {"approach": "masked LoRA: update M*(scale*B@A) in training and at the merge",
                 "zeros_before": zeros_before, "zeros_after": zeros_after, "params": sum(
                     t.weight.numel() for t in targets.values()), "zero_pattern_unchanged": True},
        "training": {"steps": settings.steps, "batch_size": settings.batch_size, "seqlen": seqlen,
                     "windows": len(windows), "tokens": settings.steps * settings.batch_size * seqlen,
                     "lr": settings.lr, "schedule": "cosine to lr/4", "optimizer": "AdamW (weight decay 0)",
                     "loss_every": 1, "loss_curve": curve, "seconds": train_s},
        "perplexity": None if held_out is None else {"before": ppl_before, "after": ppl_after,
                                                     "windows": len(held_out), "seqlen": seqlen},
    }
    return model, record


def source_pruning(folder: Path | None) -> dict | None:
    """The input's pruning.json, or None. It still describes the output: the update is masked, so the zero set
    (sparsity, N:M groups, per-layer ratios) is the input's exactly; only the kept weights' values changed."""
    return None if folder is None else read_pruning_record(folder)


def _summary(pruning: dict | None) -> dict | None:
    return None if pruning is None else {k: pruning.get(k) for k in ("form", "target_sparsity", "global_sparsity",
                                                                     "settings")}


def recover_to_folder(model_ref: str, out: Path, settings: RecoverSettings, device: str = "cpu",
                      data_root: str | None = None, force: bool = False, progress=None) -> dict:
    """Load, fine-tune, merge, and write a reloadable HF folder (weights, tokenizer, structure.json /
    streamline.json carried over, recovery.json) atomically; returns the record."""
    from ..io import atomic_dir, check_writable, write_json_atomic
    from ..provenance import provenance
    from .to_folder import checkpoint_dtype, save_layout_records

    validate_settings(settings)
    out = Path(out)
    check_writable(out, force)
    t_start = time.perf_counter()
    ref, config = models.load_config(model_ref)
    folder = Path(ref) if Path(ref).is_dir() else None
    settings = resolve_settings(settings, folder is not None and (folder / models.STREAMLINE_FILE).is_file())
    saved_dtype, _ = checkpoint_dtype(folder, config)
    root = data.data_dir(data_root)
    model, tok = models.load(model_ref, device, torch.float32)  # trained in fp32, saved in the input's dtype
    seqlen = settings.seqlen or data.default_seqlen(model.config)
    calibration = data.calibration("c4", tok, settings.nsamples, seqlen, settings.seed, root)
    held_out = (data.validation_windows(tok, calibration, settings.eval_windows, seqlen, root, flag="--eval-windows")
                if settings.eval_windows else None)
    with atomic_dir(out, force) as tmp:
        model, record = recover_model(model, calibration.windows, settings, device, saved_dtype,
                                      held_out.ids if held_out else None, progress)
        model.to(saved_dtype)  # exact: merged weights were already rounded to this dtype
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_layout_records(model, folder, tmp, structured_now=False)
        pruning = source_pruning(folder)
        if pruning is not None:  # carried, so export still checks N:M groups and reports the form
            write_json_atomic(tmp / "pruning.json", {**pruning, "recovered_by": "recovery.json"})
        record = {"schema": SCHEMA, "model": model_ref, "source_pruning": _summary(pruning),
                  "settings": asdict(settings), **record,
                  "data": {"corpus": "c4", "source": calibration.source, "nsamples": settings.nsamples,
                           "held_out_source": held_out.source if held_out else None},
                  "dtype": {"training": "fp32", "saved": str(saved_dtype).removeprefix("torch.")},
                  "device": device, "wall_s": time.perf_counter() - t_start, "provenance": provenance()}
        write_json_atomic(tmp / "recovery.json", record)
    return record
