"""Issue 11's Table-9-style comparison on a real model: every layer-wise allocation (and a searched expression)
at several sparsities, perplexity on WikiText-2 and C4, with each method's per-layer ratios plotted.

Protocol (the same for every row, so rows compare): calibration windows collected once; the dense model's Wanda
statistics collected once (every block fed dense activations); each cell then allocates, prunes every Linear
one-shot from its dense weight (Wanda, per-output) and is scored, and the dense weights are restored. This is
the search's scoring, not `prune`'s sequential re-calibration (which costs two passes per cell); the sequential
figures for uniform/OWL/DLP are in reports/smollm2-135m-quality. Cells are cached in RUN_DIR (resumable).
`dlp-auto` is DLP with --alpha auto (grid scored on held-out C4 text, search.tune). A saved search is a row by
its name; --search-dir adds the search's cost and its validation figures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dlp_deploy import data, models
from dlp_deploy.bench.records import ALLOCATIONS_SCHEMA, RESULT_SCHEMA_VERSION
from dlp_deploy.eval.perplexity import corpus_ids, perplexity
from dlp_deploy.io import write_json_atomic
from dlp_deploy.progress import console, progress_bar, quiet_transformers
from dlp_deploy.provenance import provenance
from dlp_deploy.prune.allocate import default_dlp_alpha, get_allocator, split_allocations
from dlp_deploy.prune.pipeline import PruneSettings, allocation_params
from dlp_deploy.prune.search import Scorer, tune
from dlp_deploy.report.figures import layer_ratios

AUTO_SUFFIX = "-auto"  # dlp-auto: DLP with its alpha tuned on the validation text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--allocations", default="uniform,global,er,er-plus,lamp,alphapruning,owl,dlp,dlp-auto")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--val-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    # first N windows per corpus: WikiText-2's 8 as reports/smollm2-135m-quality, so its sequential rows compare
    ap.add_argument("--corpora", default="wikitext2=8,c4=4")
    ap.add_argument("--search-dir", type=Path, default=None)
    ap.add_argument("--sequential", type=Path, default=Path("reports/smollm2-135m-quality/quality.json"),
                    help="quality grid of `prune` (sequential) runs to set beside the one-shot rows")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/allocations"))
    ap.add_argument("--report", type=Path, default=Path("reports/smollm2-135m-allocations"))
    args = ap.parse_args()
    quiet_transformers()
    root = data.data_dir(None)
    model, tok = models.load(args.model)
    calibration = data.calibration("c4", tok, args.nsamples, args.calib_seqlen, 0, root)
    windows = {n: int(w) for n, w in (x.split("=") for x in args.corpora.split(","))}
    corpora = {name: data.eval_text(name, root) for name in windows}
    ids = {name: (corpus_ids(tok, text.text), windows[name]) for name, text in corpora.items()}
    args.run_dir.mkdir(parents=True, exist_ok=True)
    cache_file = args.run_dir / "cells.jsonl"
    cells = {c["key"]: c for c in map(json.loads, cache_file.read_text().splitlines())} if cache_file.is_file() \
        else {}
    with progress_bar() as progress:
        scorer = Scorer.build(model, calibration, tok, args.val_windows, args.calib_seqlen, root, "c4",
                              progress=progress)
        plan = [("dense", 0.0)] + [(a, float(p)) for p in args.sparsities.split(",")
                                   for a in split_allocations(args.allocations)]
        task = progress.add_task("cells", total=len(plan))
        for allocation, sparsity in plan:
            key = f"{allocation}@{sparsity:g}"
            if key not in cells:
                cells[key] = run_cell(scorer, allocation, sparsity, ids, args, progress)
                cells[key]["key"] = key
                with cache_file.open("a") as fh:
                    fh.write(json.dumps(cells[key]) + "\n")
                console.print(f"{key}: " + ", ".join(f"{c} {v:.2f}" for c, v in cells[key]["ppl"].items()))
            progress.advance(task)
    write_report(args, [cells[f"{a}@{p:g}"] for a, p in plan], corpora, windows, calibration, scorer)


def run_cell(scorer: Scorer, allocation: str, sparsity: float, ids: dict, args, progress) -> dict:
    t = time.perf_counter()
    cell: dict = {"allocation": allocation, "sparsity": sparsity}
    if allocation == "dense":
        ratios = None
    else:
        base = allocation[:-len(AUTO_SUFFIX)] if allocation.endswith(AUTO_SUFFIX) else allocation
        settings = PruneSettings(sparsity, "wanda", base, default_dlp_alpha(sparsity))
        params = allocation_params(settings)
        if base != allocation:
            tuning = tune(scorer, base, "alpha", sparsity, params, progress)
            params["alpha"] = cell["alpha"] = tuning["choice"]
            cell["tuning"] = tuning
        elif get_allocator(base).uses_alpha:
            cell["alpha"] = params["alpha"]
        ratios = scorer.snapshot.allocate(base, sparsity, params).ratios
        scorer.snapshot.apply(ratios)
    try:
        cell["ppl"] = {name: perplexity(scorer.snapshot.model, corpus, args.eval_seqlen, n, progress,
                                        f"{allocation} {sparsity:.0%} {name}")["ppl"]
                       for name, (corpus, n) in ids.items()}
    finally:
        scorer.snapshot.restore()
    sizes = scorer.snapshot.sizes
    cell["ratios"] = ratios
    cell["weighted_sparsity"] = (sum(r * n for r, n in zip(ratios, sizes)) / sum(sizes)) if ratios else 0.0
    cell["seconds"] = time.perf_counter() - t
    return cell


def write_report(args, rows: list[dict], corpora: dict, windows: dict, calibration, scorer: Scorer) -> None:
    args.report.mkdir(parents=True, exist_ok=True)
    levels = sorted({r["sparsity"] for r in rows if r["allocation"] != "dense"})
    names = list(dict.fromkeys(r["allocation"] for r in rows if r["allocation"] != "dense"))
    by = {(r["allocation"], r["sparsity"]): r for r in rows}
    dense = by[("dense", 0.0)]["ppl"]
    search = _search_summary(args.search_dir, by) if args.search_dir else None
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_json_atomic(args.report / "results.json", {
        "schema": ALLOCATIONS_SCHEMA, "schema_version": RESULT_SCHEMA_VERSION, "settings": settings,
        "calibration": calibration.source, "validation": scorer.describe(),
        "corpora": {n: c.source for n, c in corpora.items()}, "rows": rows, "search": search,
        "provenance": provenance(seed=0)}, force=True)
    corpus_names = list(corpora)
    head = " | ".join(f"{c} {p:.0%}" for c in corpus_names for p in levels)
    lines = [f"# {args.model}: layer-wise allocations compared (Wanda, one-shot)", "",
             f"Wanda scores from {args.nsamples} C4 calibration windows of {args.calib_seqlen} tokens (offline: "
             f"validation docs 0-999, seed 0), collected once on the dense model; every cell prunes each Linear "
             f"one-shot from its dense weight to its layer's ratio (per-output). Perplexity over the first "
             f"non-overlapping {args.eval_seqlen}-token windows of "
             + ", ".join(f"{n} ({windows[n]} windows; {c.source})" for n, c in corpora.items())
             + ". Dense: " + ", ".join(f"{n} {v:.2f}" for n, v in dense.items()) + ". Lower is better; the best of "
             "each column is bold. One ratio per decoder block (ER is uniform on equal blocks; global and LAMP "
             "thresholds are block-level).", "",
             f"| allocation | {head} |", "|---|" + "---|" * (len(corpus_names) * len(levels))]
    best = {(c, p): min(by[(n, p)]["ppl"][c] for n in names) for c in corpus_names for p in levels}
    for n in names:
        vals = []
        for c in corpus_names:
            for p in levels:
                v = by[(n, p)]["ppl"][c]
                vals.append(f"**{v:.2f}**" if v == best[(c, p)] else f"{v:.2f}")
        alphas = [by[(n, p)].get("alpha") for p in levels]
        label = n + (f" (α {', '.join(f'{a:g}' for a in alphas)})" if any(a is not None for a in alphas) else "")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    if args.sequential and args.sequential.is_file() and "wikitext2" in corpora:
        lines += ["", *_sequential_lines(args.sequential, by, levels, windows["wikitext2"])]
    if search:
        lines += ["", "## The searched expression", "", _search_text(search)]
    lines += ["", "![per-layer ratios](ratios.png)", ""]
    layer_ratios({p: {n: by[(n, p)]["ratios"] for n in names} for p in levels}, args.report / "ratios.png",
                 f"{args.model}: per-layer sparsity of each allocation")
    (args.report / "table.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines), markup=False)


def _sequential_lines(path: Path, by: dict, levels: list[float], windows: int) -> list[str]:
    """One-shot (this table) beside sequential (`prune`, the quality grid) where both exist, WikiText-2."""
    grid = json.loads(path.read_text())
    if grid["settings"].get("max_windows") != windows:
        return []
    seq = {(r["cell"]["allocation"], r["cell"]["sparsity"]): r["perplexity"]["wikitext2"] for r in grid["rows"]}
    names = [n for n in ("uniform", "owl", "dlp") if all((n, p) in seq and (n, p) in by for p in levels)]
    out = ["## One-shot here vs sequential `prune`", "",
           f"WikiText-2, same calibration and windows; sequential from {path} (each block re-calibrated on the "
           "pruned blocks' outputs).", "", "| allocation | " + " | ".join(f"{p:.0%} one-shot / sequential"
                                                                           for p in levels) + " |",
           "|---|" + "---|" * len(levels)]
    for n in names:
        out.append(f"| {n} | " + " | ".join(f"{by[(n, p)]['ppl']['wikitext2']:.2f} / {seq[(n, p)]:.2f}"
                                             for p in levels) + " |")
    return out


def _search_summary(search_dir: Path, by: dict) -> dict:
    best = json.loads((search_dir / "best.json").read_text())
    meta = json.loads((search_dir / "search.json").read_text())
    history = [json.loads(x) for x in (search_dir / "history.jsonl").read_text().splitlines()]
    dlp = next(h for h in history if h["origin"] == "seed" and h["expression"] == "median>neg")
    owl = next(h for h in history if h["origin"] == "seed" and h["expression"].startswith("outlier"))
    p = best["sparsity"]
    test = {}
    if (best["name"], p) in by and ("dlp", p) in by:
        test = {c: {"dlp": by[("dlp", p)]["ppl"][c], "searched": by[(best["name"], p)]["ppl"][c]}
                for c in by[("dlp", p)]["ppl"]}
    return {"name": best["name"], "expression": best["expression"], "alpha": best["alpha"], "sparsity": p,
            "candidates": best["candidates"], "candidates_per_hour": best["candidates_per_hour"],
            "scoring_hours": best["seconds_scoring"] / 3600, "validation": meta["validation"],
            "validation_ppl": {"dense": meta["references"]["dense"], "uniform": meta["references"]["uniform"],
                               "dlp": dlp["fitness"], "owl": owl["fitness"], "searched": best["fitness"]},
            "test_ppl": test, "errors": sum(1 for h in history if h["error"]),
            "same_ratios": sum(1 for h in history if h.get("same_ratios_as_earlier"))}


def _search_text(s: dict) -> str:
    v = s["validation_ppl"]
    gain = 100 * (v["dlp"] - v["searched"]) / v["dlp"]
    text = (f"`expr:{s['expression']}` with α {s['alpha']:g}, saved as `{s['name']}`: best of {s['candidates']} "
            f"candidates ({s['errors']} not finite, {s['same_ratios']} repeating earlier ratios) at "
            f"{s['sparsity']:.0%}, {s['candidates_per_hour']:.0f} candidates/hour on this machine. Validation "
            f"({s['validation']['windows']} × {s['validation']['seqlen']} tokens, {s['validation']['source']}): "
            f"dense {v['dense']:.2f}, uniform {v['uniform']:.2f}, OWL {v['owl']:.2f}, DLP {v['dlp']:.2f}, searched "
            f"{v['searched']:.2f} ({gain:+.1f}% vs DLP).")
    for corpus, t in s["test_ppl"].items():
        g = 100 * (t["dlp"] - t["searched"]) / t["dlp"]
        text += f" Test {corpus} at {s['sparsity']:.0%}: DLP {t['dlp']:.2f}, searched {t['searched']:.2f} ({g:+.1f}%)."
    return text


if __name__ == "__main__":
    main()
