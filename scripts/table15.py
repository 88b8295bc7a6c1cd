"""DLP paper Table 15's shape on a real model: uniform N:M against DLP's mixed N:M at the same parameter count.

N counts the weights kept (the paper's "N refers to non-zero weights"). Rows: N:4 at 1:4, 2:4, 3:4 and N:8 at
2:8, 4:8, 6:8. Columns: uniform (every layer N:M), mixed DLP with Appendix G's alpha for the level, and mixed DLP
with --alpha auto (the spread chosen on held-out C4 validation text over a grid that goes past the 1/(2M) at
which layers start to move; never on the test text). Runs the functions behind `dlp-deploy prune` / `eval`;
finished cells are recorded in REPORT/cells (committed), so an interrupted run resumes, on another machine too.
Writes REPORT/{quality.json,README.md,n_per_layer.png}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dlp_deploy.eval.evaluate import evaluate  # noqa: E402
from dlp_deploy.io import write_json_atomic  # noqa: E402
from dlp_deploy.progress import console, progress_bar, quiet_transformers  # noqa: E402
from dlp_deploy.provenance import provenance  # noqa: E402
from dlp_deploy.prune.allocate import default_dlp_alpha  # noqa: E402
from dlp_deploy.prune.to_folder import prune_to_folder  # noqa: E402
from dlp_deploy.prune.masks import parse_pattern  # noqa: E402
from dlp_deploy.prune.pipeline import PruneSettings  # noqa: E402

PATTERNS = ("1:4", "2:4", "3:4", "2:8", "4:8", "6:8")
# LLaMA-1-7B, WikiText-2 (DLP paper, Table 15): uniform, DLP
PAPER = {"1:4": (7225.68, 30.44), "2:4": (11.55, 7.32), "3:4": (6.19, 5.91), "2:8": (3485.97, 83.50),
         "4:8": (8.56, 7.19), "6:8": (6.02, 5.87)}


def moves_a_layer(alpha: float, m: int) -> bool:
    """DLP's ratios lie within p +- alpha (mean p); no layer's count leaves round(p * m) = n unless alpha passes
    1/(2m) (p * m is a whole number at every Table 15 level): below it mixed DLP is uniform N:M exactly, by
    construction, and is not pruned again."""
    return alpha >= 1 / (2 * m)


def cells(patterns) -> list[tuple[str, str | None, PruneSettings | None]]:
    out = [("dense", None, None)]
    for text in patterns:
        p = parse_pattern(text)
        sparsity = p.fixed_sparsity
        out.append((f"uniform-{p.n}of{p.m}", text, PruneSettings(sparsity, "wanda", "uniform", pattern=text)))
        mixed = f"mixed:{p.m}"
        if moves_a_layer(default_dlp_alpha(sparsity), p.m):
            out.append((f"dlp-appg-{p.n}of{p.m}", text,
                        PruneSettings(sparsity, "wanda", "dlp", default_dlp_alpha(sparsity), pattern=mixed)))
        out.append((f"dlp-auto-{p.n}of{p.m}", text, PruneSettings(sparsity, "wanda", "dlp", default_dlp_alpha(
            sparsity), pattern=mixed, auto="alpha")))  # the alpha given is replaced by the choice
    return out


def run_cell(args, name: str, pattern: str | None, settings: PruneSettings | None, progress) -> dict:
    """A finished cell's record is kept beside the report (REPORT/cells/NAME.json, small and committed), so a run
    interrupted by the end of a session resumes elsewhere; the pruned models stay in RUN_DIR."""
    result_file = args.report / "cells" / f"{name}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    model = args.model
    pruning = None
    if settings is not None:
        model_dir = args.run_dir / name / "model"
        if not (model_dir / "pruning.json").is_file():
            prune_to_folder(args.model, model_dir, settings, nsamples=args.nsamples, seqlen=args.calib_seqlen,
                            force=True, progress=progress)
        model = str(model_dir)
        pruning = json.loads((model_dir / "pruning.json").read_text())
    result = evaluate(model, ["wikitext2"], args.eval_seqlen, args.max_windows, progress=progress)
    result["cell"] = {"name": name, "pattern": pattern, "column": name.rsplit("-", 1)[0] if pattern else "dense"}
    if pruning is not None:
        result["cell"].update(alpha=pruning["settings"]["alpha"], auto=pruning.get("auto"),
                              n_per_layer=[layer["n"] for layer in pruning["layers"]],
                              global_sparsity=pruning["global_sparsity"], seconds=pruning["timings"])
    write_json_atomic(result_file, result, force=True)
    console.print(f"{name}: wikitext2 ppl {result['perplexity']['wikitext2']:.3f}")
    return result


def _ppl(row) -> str:
    return f"{row['perplexity']['wikitext2']:.2f}"


def table(rows: list[dict], patterns) -> list[str]:
    by = {r["cell"]["name"]: r for r in rows}
    lines = ["| N:M (N kept) | sparsity | uniform | DLP, App. G α | DLP, α auto (chosen α) | distinct N (auto) | "
             "paper uniform | paper DLP |", "|---|---|---|---|---|---|---|---|"]
    for text in patterns:
        p = parse_pattern(text)
        tag = f"{p.n}of{p.m}"
        u, a = by[f"uniform-{tag}"], by[f"dlp-auto-{tag}"]
        g = by.get(f"dlp-appg-{tag}")
        alpha = default_dlp_alpha(p.fixed_sparsity)
        appg = (f"{_ppl(g)} (α {alpha:g})" + (" (= uniform)" if len(set(g["cell"]["n_per_layer"])) == 1 else "")
                if g else f"= uniform (α {alpha:g} < 1/(2M))")
        lines.append(f"| {text} | {p.fixed_sparsity:.0%} | {_ppl(u)} | {appg} | "
                     f"{_ppl(a)} ({a['cell']['alpha']:g}) | {sorted(set(a['cell']['n_per_layer']))} | "
                     f"{PAPER[text][0]:g} | {PAPER[text][1]:g} |")
    return lines


def alpha_grid_lines(rows: list[dict], patterns) -> list[str]:
    by = {r["cell"]["name"]: r for r in rows}
    first = by[f"dlp-auto-{parse_pattern(patterns[0]).n}of{parse_pattern(patterns[0]).m}"]["cell"]["auto"]
    grid = first["grid"]
    lines = ["| N:M | " + " | ".join(f"α {v:g}" for v in grid) + " |", "|---|" + "---|" * len(grid)]
    for text in patterns:
        p = parse_pattern(text)
        auto = by[f"dlp-auto-{p.n}of{p.m}"]["cell"]["auto"]
        lines.append(f"| mixed {text} | " + " | ".join(
            (f"**{v:.1f}**" if g == auto["choice"] else f"{v:.1f}") for g, v in zip(grid, auto["validation_ppl"]))
            + " |")
    return lines


def plot_n(rows: list[dict], patterns, path: Path) -> None:
    by = {r["cell"]["name"]: r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharex=True)
    for ax, m in zip(axes, (4, 8)):
        for text in (t for t in patterns if parse_pattern(t).m == m):
            p = parse_pattern(text)
            n = by[f"dlp-auto-{p.n}of{p.m}"]["cell"]["n_per_layer"]
            ax.plot(range(len(n)), n, marker="o", ms=3, label=f"mixed {text} (auto)")
        ax.set_title(f"N kept of {m} per decoder block (DLP, α auto)")
        ax.set_xlabel("block")
        ax.set_ylim(-0.3, m + 0.3)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args, rows: list[dict], patterns) -> None:
    args.report.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("model", "nsamples", "calib_seqlen", "eval_seqlen", "max_windows")}
    write_json_atomic(args.report / "quality.json", {"settings": settings, "rows": rows, "provenance": provenance()},
                      force=True)
    dense = next(r for r in rows if r["cell"]["pattern"] is None)
    plot_n(rows, patterns, args.report / "n_per_layer.png")
    lines = [f"# {args.model}: mixed N:M sparsity against uniform N:M (DLP paper Table 15's shape)", "",
             "N counts the weights kept (the paper's \"N refers to non-zero weights\"): 1:4 is 75% sparse. "
             "Wanda scores; calibration "
             f"{args.nsamples} C4 windows of {args.calib_seqlen} tokens (offline: validation docs 0-999), seed 0. "
             f"WikiText-2 test perplexity on the first {args.max_windows} windows of {args.eval_seqlen} tokens "
             f"(PyTorch, fp32). Dense: {_ppl(dense)}. The paper's figures are LLaMA-1-7B's, for the shape only.",
             "", *table(rows, patterns), "",
             "## The spread mixed N:M needs", "",
             "A mixed layer's N is its allocated ratio times M, rounded (then repaired to the target). With DLP's "
             "ratios in [p - α, p + α], no layer leaves the uniform N until α passes 1/(2M): 0.125 for M = 4, "
             "0.0625 for M = 8. Appendix G's α (0.02-0.15, tuned for unstructured sparsity) is below that at 25% "
             "and 50%, so there mixed DLP is uniform N:M exactly (marked \"= uniform\"). `--alpha auto` scores a grid "
             "that extends to 0.40 for mixed patterns, one-shot on held-out C4 validation text (16 windows of the "
             "calibration length), rounding each candidate to whole counts as the prune will; the validation "
             "perplexities (bold: chosen):", "", *alpha_grid_lines(rows, patterns), "",
             "N per block for the chosen spread:", "", "![N per layer](n_per_layer.png)", "",
             "Reproduce: `python scripts/table15.py` (each finished cell is recorded in cells/; delete them to "
             "measure again)."]
    (args.report / "README.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/table15"))
    ap.add_argument("--report", type=Path, default=Path("reports/smollm2-135m-nm"))
    args = ap.parse_args()
    quiet_transformers()
    patterns = args.patterns.split(",")
    with progress_bar() as progress:
        rows = [run_cell(args, name, pattern, settings, progress) for name, pattern, settings in cells(patterns)]
    write_report(args, rows, patterns)


if __name__ == "__main__":
    main()
