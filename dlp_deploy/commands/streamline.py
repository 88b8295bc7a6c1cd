"""`dlp-deploy streamline`: depth pruning (LLM-Streamline)."""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..progress import console, progress_bar, quiet_transformers
from ..prune import depth
from ..prune.to_folder import resolve_device
from .options import AutoDevice, DataDir, enum_value

Replacement = enum.Enum("Replacement", {k: k for k in depth.REPLACEMENTS}, type=str)


def _paper(i: int) -> str:
    """The paper's lr (i=0) or weight decay (i=1) per replacement kind, for --help."""
    return ", ".join(f"{kind} {values[i]:g}" for kind, values in depth.PAPER_OPTIMIZER.items())


def streamline_cmd(
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
                                                      "500 samples)")] = depth.NSAMPLES,
    seqlen: Annotated[Optional[int], typer.Option(min=2, help="calibration window; default min(2048, the "
                                                              "model's context)")] = None,
    seed: int = 0,
    tokens: Annotated[int, typer.Option(min=1, help="train the replacement on the first calibration windows up to "
                                                    "this many tokens (CPU budget; the paper: 30,000 samples)")] = \
        depth.TOKENS,
    epochs: Annotated[int, typer.Option(min=1, help="passes over the training windows (paper: 20)")] = depth.EPOCHS,
    lr: Annotated[Optional[float], typer.Option(help="AdamW peak learning rate (cosine decay to a quarter); "
                                                     f"default the paper's per kind: {_paper(0)}")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay; default the paper's per kind: "
                                                               f"{_paper(1)}")] = None,
    batch: Annotated[int, typer.Option(min=1, help="calibration windows per optimizer step (paper: 32 samples)")] = \
        depth.BATCH,
    post_train: Annotated[bool, typer.Option(help="then train the replacement on the whole model's next-token loss "
                                                  "(the paper's post-training of a replaced layer; one full "
                                                  "forward and backward per window)")] = False,
    post_lr: Annotated[float, typer.Option(help="post-training learning rate (paper: 5e-5)")] = depth.POST_LR,
    post_weight_decay: Annotated[float, typer.Option(help="post-training weight decay (paper: 1e-3)")] = \
        depth.POST_WEIGHT_DECAY,
    post_epochs: Annotated[int, typer.Option(min=1, help="post-training passes (paper: 1)")] = depth.POST_EPOCHS,
    device: AutoDevice = "auto",
    data_dir: DataDir = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """Cut the most redundant span of decoder layers (LLM-Streamline: highest input/output cosine on calibration
    text), replace it with a trained lightweight block, and save a reloadable HF folder with streamline.json."""
    settings = depth.StreamlineSettings(remove_layers, ratio, enum_value(replacement), calib, nsamples, seqlen, seed,
                                        tokens, epochs, lr, weight_decay, batch, post_train, post_lr,
                                        post_weight_decay, post_epochs)
    depth.validate_settings(settings)
    device = resolve_device(device)
    quiet_transformers()
    with progress_bar() as progress:
        record = depth.streamline_to_folder(model, out, settings, device, str(data_dir) if data_dir else None,
                                            force, progress)
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


COMMANDS = {"streamline": streamline_cmd}
