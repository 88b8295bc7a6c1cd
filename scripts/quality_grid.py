"""Issue #2's quality grid on a real model: dense, and Wanda at several sparsities with each allocation.

Runs the same functions as `dlp-deploy prune` / `dlp-deploy eval` and writes reports/<name>/quality.{json,md}.
Finished cells are cached in RUN_DIR, so an interrupted grid resumes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dlp_deploy.eval.evaluate import evaluate
from dlp_deploy.io import write_json_atomic
from dlp_deploy.progress import console, progress_bar, quiet_transformers
from dlp_deploy.provenance import provenance
from dlp_deploy.report.figures import perplexity as perplexity_plot
from dlp_deploy.prune.allocate import default_dlp_alpha
from dlp_deploy.prune.to_folder import prune_to_folder
from dlp_deploy.prune.pipeline import PruneSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--allocations", default="uniform,owl,dlp")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/quality"))
    ap.add_argument("--report", type=Path, default=Path("reports/smollm2-135m-quality"))
    args = ap.parse_args()
    quiet_transformers()
    cells = [("dense", None, None)] + [(f"{args.method}-{a}-{p}", float(p), a)
                                       for p in args.sparsities.split(",") for a in args.allocations.split(",")]
    rows = []
    with progress_bar() as progress:
        for name, sparsity, allocation in cells:
            rows.append(run_cell(args, name, sparsity, allocation, progress))
    write_report(args, rows)


def run_cell(args, name, sparsity, allocation, progress) -> dict:
    cell = args.run_dir / name
    result_file = cell / "eval.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    model = args.model
    if sparsity is not None:
        model_dir = cell / "model"
        if not (model_dir / "pruning.json").is_file():
            alpha = default_dlp_alpha(sparsity) if allocation == "dlp" else None
            prune_to_folder(args.model, model_dir, PruneSettings(sparsity, args.method, allocation, alpha),
                            nsamples=args.nsamples, seqlen=args.calib_seqlen, force=True, progress=progress)
        model = str(model_dir)
    result = evaluate(model, ["wikitext2"], args.eval_seqlen, args.max_windows, progress=progress)
    result["cell"] = {"name": name, "sparsity": sparsity, "allocation": allocation, "method": args.method}
    write_json_atomic(result_file, result, force=True)
    console.print(f"{name}: wikitext2 ppl {result['perplexity']['wikitext2']:.3f}")
    return result


def write_report(args, rows: list[dict]) -> None:
    args.report.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("model", "method", "nsamples", "calib_seqlen", "eval_seqlen",
                                               "max_windows")}
    write_json_atomic(args.report / "quality.json", {"settings": settings, "rows": rows, "provenance": provenance()},
                      force=True)
    dense = next(r for r in rows if r["cell"]["sparsity"] is None)["perplexity"]["wikitext2"]
    allocations = args.allocations.split(",")
    lines = [f"# {args.model}: WikiText-2 perplexity after {args.method} pruning", "",
             f"Calibration: {args.nsamples} C4 windows of {args.calib_seqlen} tokens (offline: validation docs "
             f"0-999), seed 0. Evaluation: the first {args.max_windows} non-overlapping {args.eval_seqlen}-token "
             f"windows of WikiText-2 test ({args.max_windows * args.eval_seqlen} tokens). Dense: {dense:.2f}.", "",
             "| sparsity | " + " | ".join(allocations) + " | realised sparsity |",
             "|---|" + "---|" * (len(allocations) + 1)]
    for p in args.sparsities.split(","):
        cells = {r["cell"]["allocation"]: r for r in rows if r["cell"]["sparsity"] == float(p)}
        ppl = " | ".join(f"{cells[a]['perplexity']['wikitext2']:.2f}" for a in allocations)
        realised = ", ".join(f"{cells[a]['weight_sparsity']:.4f}" for a in allocations)
        lines.append(f"| {float(p):.0%} | {ppl} | {realised} |")
    lines += ["", "![perplexity vs sparsity](perplexity.png)"]
    perplexity_plot([{"allocation": r["cell"]["allocation"], "target_sparsity": r["cell"]["sparsity"] or 0.0,
                      "perplexity": r["perplexity"]} for r in rows], "wikitext2", args.report / "perplexity.png")
    (args.report / "quality.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))


if __name__ == "__main__":
    main()
