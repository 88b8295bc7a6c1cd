"""`dlp-deploy eval`: perplexity and zero-shot accuracy of a model, or perplexity of a deployment on an engine."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import UserError
from ..eval.evaluate import evaluate, evaluate_deployment, is_deployment
from ..io import check_writable, write_json_atomic
from ..progress import console, progress_bar, quiet_transformers
from .options import DataDir

Device = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1 …")]


def eval_cmd(
    model: Annotated[str, typer.Argument(help="HF folder (e.g. a pruned one), hub id or alias, or a deployment "
                                              "folder (with --engine)")],
    json_out: Annotated[Path, typer.Option("--json", help="result file (must not exist unless --force)")],
    ppl: Annotated[str, typer.Option(help="comma list of wikitext2, ptb, c4; empty for none")] = "wikitext2",
    seqlen: Annotated[Optional[int], typer.Option(min=2, help="window; default min(2048, the model's context), "
                                                              "for a deployment min(2048, its "
                                                              "--seq-len minus one")] = None,
    engine: Annotated[Optional[str], typer.Option(help="score a deployment folder's ONNX graph on this engine "
                                                       "(onnxruntime, deepsparse-external, openvino)")] = None,
    cores: Annotated[Optional[int], typer.Option(help="engine threads (default: all)")] = None,
    max_windows: Annotated[Optional[int], typer.Option(min=1, help="score only the first N windows")] = None,
    zeroshot: Annotated[str, typer.Option(help="comma list of tasks, e.g. boolq,arc_easy")] = "",
    limit: Annotated[Optional[int], typer.Option(min=1, help="first N docs per zero-shot task")] = None,
    device: Device = "cpu",
    data_dir: DataDir = None,
    force: bool = False,
) -> None:
    """Perplexity (non-overlapping windows) and zero-shot accuracy of MODEL, written to --json."""
    check_writable(json_out, force)
    quiet_transformers()
    root = str(data_dir) if data_dir else None
    if engine is None and is_deployment(model):
        raise UserError(f"{model} is a deployment folder; give --engine to score its ONNX graph "
                        "(onnxruntime, deepsparse-external, openvino)")
    with progress_bar() as progress:
        if engine is not None:
            if zeroshot:
                raise UserError("--zeroshot runs on PyTorch models only; drop it or give an HF model folder")
            result = evaluate_deployment(model, engine, _split(ppl), seqlen, max_windows, cores, root, progress)
        else:
            result = evaluate(model, _split(ppl), seqlen, max_windows, _split(zeroshot), limit, device,
                              root, progress)
    write_json_atomic(json_out, result, force)
    table = Table("metric", "value", title=f"{model}")
    for name, value in result["perplexity"].items():
        table.add_row(f"ppl {name}", f"{value:.3f}")
    for task, scores in result.get("zeroshot", {}).items():
        table.add_row(f"{task} acc / acc_norm", " / ".join("—" if scores.get(k) is None else f"{scores[k]:.4f}"
                                                           for k in ("acc", "acc_norm")))
    console.print(table)


def _split(csv: str) -> list[str]:
    return [s.strip() for s in csv.split(",") if s.strip()]


COMMANDS = {"eval": eval_cmd}
