"""`dlp-deploy streamline`: depth pruning (LLM-Streamline); `dlp-deploy recover`: LoRA recovery fine-tuning."""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..prune import recover as rec
from ..prune import depth as sl

Replacement = enum.Enum("Replacement", {k: k for k in sl.REPLACEMENTS}, type=str)


def _paper(i: int) -> str:
    """The paper's lr (i=0) or weight decay (i=1) per replacement kind, for --help."""
    return ", ".join(f"{kind} {values[i]:g}" for kind, values in sl.PAPER_OPTIMIZER.items())


def streamline(
    model: Annotated[str, typer.Argument(help="HF folder, hub id or alias (smollm2-135m)")],
    out: Annotated[Path, typer.Option(help="output folder (must not exist unless --force)")],
    remove_layers: Annotated[Optional[int], typer.Option(help="decoder layers to cut (one contiguous span)")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="share of decoder layers to cut, rounded (instead of "
                                                        "--remove-layers)")] = None,
    replacement: Annotated[Replacement, typer.Option(help="what replaces the span: none (drop it), ffn (norm + "
                                                          "MLP), swiglu (norm + gated MLP), layer (a copy of the "
                                                          "span's first layer), the last three trained")] = "ffn",
    calib: Annotated[str, typer.Option(help="calibration corpus: c4, wikitext2, ptb")] = "c4",
    nsamples: Annotated[int, typer.Option(min=1, help="calibration windows; span scores use all (the paper's "
                                                      "500 samples)")] = sl.NSAMPLES,
    seqlen: Annotated[Optional[int], typer.Option(min=2, help="calibration window; default min(2048, the "
                                                              "model's context)")] = None,
    seed: int = 0,
    tokens: Annotated[int, typer.Option(min=1, help="train the replacement on the first calibration windows up to "
                                                    "this many tokens (CPU budget; the paper: 30,000 samples)")] = \
        sl.TOKENS,
    epochs: Annotated[int, typer.Option(min=1, help="passes over the training windows (paper: 20)")] = sl.EPOCHS,
    lr: Annotated[Optional[float], typer.Option(help="AdamW peak learning rate (cosine decay to a quarter); "
                                                     f"default the paper's per kind: {_paper(0)}")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay; default the paper's per kind: "
                                                               f"{_paper(1)}")] = None,
    batch: Annotated[int, typer.Option(min=1, help="calibration windows per optimizer step (paper: 32 samples)")] = \
        sl.BATCH,
    post_train: Annotated[bool, typer.Option(help="then train the replacement on the whole model's next-token loss "
                                                  "(the paper's post-training of a replaced layer; one full "
                                                  "forward and backward per window)")] = False,
    post_lr: Annotated[float, typer.Option(help="post-training learning rate (paper: 5e-5)")] = sl.POST_LR,
    post_weight_decay: Annotated[float, typer.Option(help="post-training weight decay (paper: 1e-3)")] = \
        sl.POST_WEIGHT_DECAY,
    post_epochs: Annotated[int, typer.Option(min=1, help="post-training passes (paper: 1)")] = sl.POST_EPOCHS,
    device: Annotated[str, typer.Option(help="torch device: auto (CUDA when present, else cpu), cpu, cuda, "
                                             "cuda:1 …")] = "auto",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="offline corpora folder (else env "
                                                     "DLP_DEPLOY_DATA, else the hub)")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """Cut the most redundant span of decoder layers (LLM-Streamline: highest input/output cosine on calibration
    text), replace it with a trained lightweight block, and save a reloadable HF folder with streamline.json."""
    from ..progress import console, progress_bar, quiet_transformers
    from ..prune.depth import StreamlineSettings, streamline_to_folder, validate_settings
    from ..prune.to_folder import resolve_device

    kind = replacement.value if isinstance(replacement, enum.Enum) else replacement
    settings = StreamlineSettings(remove_layers, ratio, kind, calib, nsamples, seqlen, seed, tokens, epochs, lr,
                                  weight_decay, batch, post_train, post_lr, post_weight_decay, post_epochs)
    validate_settings(settings)
    device = resolve_device(device)
    quiet_transformers()
    with progress_bar() as progress:
        record = streamline_to_folder(model, out, settings, device, str(data_dir) if data_dir else None, force,
                                      progress)
    removed, layers, training = record["removed"], record["num_layers"], record["training"]
    console.print(f"streamlined {model}: cut layers {removed['start']}..{removed['end'] - 1} (cosine "
                  f"{record['selected_cosine']:.4f}), {layers['before']} -> {layers['after']} layers, "
                  f"replacement {settings.replacement} -> {out}")
    if training:
        console.print(f"replacement MSE {training['mse_before']:.3e} -> {training['mse_after']:.3e} "
                      f"(dropping the span: {training['mse_drop_span']:.3e}) on {training['tokens']} tokens")
    if record["post_training"]:
        curve = record["post_training"]["loss_curve"]
        console.print(f"post-training loss {curve[0]:.3f} -> {curve[-1]:.3f}")


def recover(
    model: Annotated[str, typer.Argument(help="HF folder (pruned, structured, streamlined or dense), hub id or "
                                              "alias")],
    out: Annotated[Path, typer.Option(help="output folder (must not exist unless --force)")],
    steps: Annotated[int, typer.Option(help="optimizer steps")] = rec.STEPS,
    lora_rank: Annotated[Optional[int], typer.Option(help=f"LoRA rank r; default {rec.RANK} (DLP's recovery, "
                                                          f"after Wanda's LoRA script), {rec.STREAMLINE_RANK} for a "
                                                          "streamlined input (LLM-Streamline's LoRA comparison)")] \
        = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (the update is scaled by alpha / r); "
                                                             f"default {rec.ALPHA_PER_RANK:g} x rank")] = None,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate (cosine decay to a quarter)")] = rec.LR,
    nsamples: Annotated[int, typer.Option(help="C4 training windows (calibration documents)")] = rec.NSAMPLES,
    seqlen: Annotated[Optional[int], typer.Option(help="training and evaluation window; default min(2048, the "
                                                       "model's context)")] = None,
    batch_size: Annotated[int, typer.Option(help="windows per step")] = rec.BATCH_SIZE,
    seed: int = 0,
    eval_windows: Annotated[int, typer.Option(help="held-out C4 windows, perplexity before/after (0: skip)")] = \
        rec.EVAL_WINDOWS,
    device: Annotated[str, typer.Option(help="torch device: auto (CUDA when present, else cpu), cpu, cuda, "
                                             "cuda:1 …")] = "auto",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="offline corpora folder (else env "
                                                     "DLP_DEPLOY_DATA, else the hub)")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """Recover a pruned model's quality with a short LoRA fine-tune on C4 text, merged so that every pruned zero
    stays exactly zero (the update is masked in training and at the merge); writes an HF folder with
    recovery.json (loss curve, held-out perplexity before/after, zero counts)."""
    from ..io import check_writable
    from ..progress import console, progress_bar, quiet_transformers
    from ..prune.to_folder import resolve_device

    settings = rec.RecoverSettings(steps, lora_rank, lora_alpha, lr, nsamples, seqlen, batch_size, seed,
                                   eval_windows)
    rec.validate_settings(settings)
    check_writable(out, force)  # before loading anything
    device = resolve_device(device)
    quiet_transformers()
    with progress_bar() as progress:
        record = rec.recover_to_folder(model, out, settings, device, str(data_dir) if data_dir else None, force,
                                       progress)
    training, mask, ppl = record["training"], record["mask"], record["perplexity"]
    console.print(f"recovered {model}: {training['steps']} steps on {training['tokens']} tokens, loss "
                  f"{training['loss_curve'][0]:.3f} -> {training['loss_curve'][-1]:.3f}; zeros kept "
                  f"{mask['zeros_after']}/{mask['zeros_before']} -> {out}")
    if ppl:
        console.print(f"held-out C4 perplexity {ppl['before']:.3f} -> {ppl['after']:.3f} ({ppl['windows']} windows "
                      f"of {ppl['seqlen']})")


COMMANDS = {"streamline": streamline, "recover": recover}
