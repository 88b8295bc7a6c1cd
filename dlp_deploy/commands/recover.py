"""`dlp-deploy recover`: LoRA recovery fine-tuning that keeps every pruned zero."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..io import check_writable
from ..progress import console, progress_bar, quiet_transformers
from ..prune import recover as rec
from ..prune.to_folder import resolve_device
from .options import AutoDevice, DataDir


def recover_cmd(
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
    device: AutoDevice = "auto",
    data_dir: DataDir = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """Recover a pruned model's quality with a short LoRA fine-tune on C4 text, merged so that every pruned zero
    stays exactly zero (the update is masked in training and at the merge); writes an HF folder with
    recovery.json (loss curve, held-out perplexity before/after, zero counts)."""
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


COMMANDS = {"recover": recover_cmd}
