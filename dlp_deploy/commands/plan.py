"""`dlp-deploy plan`: the fastest deployment of a model on this CPU within a quality budget."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..plan.candidates import default_peers
from ..plan.run import run_plan
from ..plan.stages import PlanSettings
from ..progress import console, progress_bar, quiet_transformers
from .options import parse_floats, parse_names


def plan_cmd(
    model: Annotated[str, typer.Argument(help="HF folder, hub id or alias (smollm2-135m)")],
    max_ppl_increase: Annotated[float, typer.Option("--max-ppl-increase", help="largest perplexity rise over the "
                                                    "dense model allowed, as a fraction (0.10: 10%)")],
    out: Annotated[Path, typer.Option(help="plan folder; an interrupted plan resumes from it")],
    engines: Annotated[str, typer.Option(help="ONNX engines to measure on, comma list (GGUF deployments are "
                                              "measured on llama.cpp)")] = "onnxruntime",
    cores: Annotated[Optional[int], typer.Option(help="cores for every engine (default: all usable)")] = None,
    time_budget: Annotated[Optional[float], typer.Option(help="minutes this run may take; candidates whose "
                                                              "estimated cost would not fit are skipped and named")]
    = None,
    include: Annotated[str, typer.Option(help="pruning forms, comma list: unstructured, nm, structured, depth")]
    = "unstructured,nm",
    levels: Annotated[str, typer.Option(help="sparsities screened for the unstructured and mixed N:M forms")]
    = "0.1,0.2,0.3,0.4,0.5,0.6",
    precisions: Annotated[str, typer.Option(help="comma list: fp32, int8 (ONNX, dynamic per-token "
                                                 "activations, head too), int4 (where export supports it), q8_0, q4_k_m (GGUF)")]
    = "fp32,int8,q8_0,q4_k_m",
    peers: Annotated[str, typer.Option(help="the dense model on llama.cpp to compare against: GGUF formats "
                                            "(q8_0, q4_k_m, source: the GGUF a fetched model came from), none, or "
                                            "auto (q8_0,q4_k_m, and source where there is one)")] = "auto",
    allocations: Annotated[str, typer.Option(help="saved searched allocations (`dlp-deploy search --name`) to "
                                                  "screen beside uniform and DLP, comma list")] = "",
    executor: Annotated[str, typer.Option(help="where measurements run: local or ray")] = "local",
    address: Annotated[Optional[str], typer.Option(help="ray: the cluster (default: start a local one)")] = None,
    screen_margin: Annotated[float, typer.Option(help="stage 1 keeps candidates up to this much above the budget "
                                                      "(one-shot scores run worse than the real prune)")] = 0.10,
    seq_len: Annotated[int, typer.Option(help="export window; every perplexity uses windows one token shorter")]
    = 512,
    val_windows: Annotated[int, typer.Option(min=1, help="held-out C4 validation windows")] = 16,
    test_windows: Annotated[Optional[int], typer.Option(min=1, help="WikiText-2 and C4 test windows (each) "
                                                                    "scored after the choice")] = 128,
    calib: str = "c4",
    nsamples: Annotated[int, typer.Option(min=1)] = 128,
    calib_seqlen: Annotated[Optional[int], typer.Option(min=2, help="calibration window; default min(2048, the "
                                                                    "model's context)")] = None,
    seed: int = 0,
    prompt_len: int = 64,
    gen_len: int = 128,
    runs: int = 5,
    warmup: int = 1,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved worker processes per measured pair")] = 3,
    validate: Annotated[bool, typer.Option(help="check each ONNX export's logits against PyTorch")] = True,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="offline corpora folder")] = None,
) -> None:
    """Find the fastest deployment of MODEL on this CPU whose perplexity stays within --max-ppl-increase: screen
    pruning candidates one-shot, export and score the survivors, measure them interleaved with dense fp32, the
    llama.cpp peer and an A/A control; write DIR/deployment (with a model card), DIR/plan.md and plan.json."""
    if data_dir:
        os.environ["DLP_DEPLOY_DATA"] = str(data_dir)
    if executor != "ray" and address:
        raise UserError("--address belongs to --executor ray")
    settings = PlanSettings(model, max_ppl_increase, parse_names(engines), cores, time_budget, parse_names(include),
                            parse_floats(levels, "--levels"), parse_names(precisions), default_peers(model) if peers == "auto" else parse_names(peers), executor,
                            screen_margin, seq_len, val_windows, calib, nsamples, calib_seqlen, seed, prompt_len,
                            gen_len, runs, warmup, rounds, test_windows, validate, parse_names(allocations))
    quiet_transformers()
    with progress_bar() as progress:
        plan = run_plan(settings, out, progress, log=lambda m: console.print(m, markup=False),
                        executor_options={"address": address} if executor == "ray" else None)
    c = plan["choice"]
    console.print(f"chosen: {c['deploy']} on {c['engine']}, {c['decode_tokens_per_s']:.1f} tokens/s, "
                  f"validation ppl {c['validation_ppl']:.3f} ({c['why']}) -> {out / 'deployment'}; plan: "
                  f"{out / 'plan.md'}", markup=False)


COMMANDS = {"plan": plan_cmd}
