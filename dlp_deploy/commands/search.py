"""`dlp-deploy search`: evolve DSA allocation expressions and save the best for --allocation NAME."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..progress import console, progress_bar, quiet_transformers
from ..prune.search import SearchSettings, run_search
from .options import DataDir


def search_cmd(
    model: Annotated[str, typer.Argument(help="HF folder, hub id or alias (smollm2-135m)")],
    out: Annotated[Path, typer.Option(help="search folder: search.json, history.jsonl, best.json; an existing "
                                           "one with the same settings is resumed")],
    sparsity: Annotated[float, typer.Option(help="target sparsity the expressions are scored at")],
    name: Annotated[Optional[str], typer.Option(help="save the best expression under this name for --allocation "
                                                     "NAME (default: the --out folder's name)")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="budget: candidates in all (a resumed search counts "
                                                        "those it has)")] = 100,
    time_budget: Annotated[Optional[float], typer.Option(help="budget: minutes of new scoring in this run")] = None,
    population: Annotated[int, typer.Option(help="DSA: population size")] = 20,
    top_k: Annotated[int, typer.Option(help="DSA: parents are the top k of each draw")] = 5,
    sample_ratio: Annotated[float, typer.Option(help="DSA: share of the population each draw takes")] = 0.9,
    alpha: Annotated[Optional[float], typer.Option(help="fixed spread (default: DLP's App. G value)")] = None,
    search_alpha: Annotated[bool, typer.Option(help="search alpha with the expression")] = False,
    mapping: Annotated[str, typer.Option(help="statistic to ratios: dsa (the authors': higher value, more "
                                              "sparsity) or owl (OWL's and DLP's direction; searches made "
                                              "before this option used it)")] = "dsa",
    method: Annotated[str, typer.Option(help="one-shot scores while searching: wanda or magnitude")] = "wanda",
    calib: str = "c4",
    nsamples: Annotated[int, typer.Option(min=1)] = 128,
    seqlen: Annotated[Optional[int], typer.Option(min=2, help="calibration and validation window")] = None,
    val_windows: Annotated[int, typer.Option(min=1, help="held-out C4 windows scoring each candidate")] = 16,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="torch device: auto (CUDA when present, else cpu), cpu, cuda …")]
    = "auto",
    data_dir: DataDir = None,
    force: Annotated[bool, typer.Option(help="start over (and replace a saved allocation of that name)")] = False,
) -> None:
    """Evolve DSA allocation expressions (seeded, resumable); fitness is the one-shot pruned model's perplexity on
    held-out C4 text disjoint from calibration and evaluation."""
    settings = SearchSettings(model, sparsity, method, alpha, search_alpha, population, top_k, sample_ratio, seed,
                              calib, nsamples, seqlen, val_windows, mapping=mapping)
    quiet_transformers()
    with progress_bar() as progress:
        result = run_search(settings, out, name, candidates, time_budget * 60 if time_budget else None, device,
                            str(data_dir) if data_dir else None, force, progress)
    ref = result["references"]
    console.print(f"best: expr:{result['expression']} (alpha {result['alpha']:g}) validation ppl "
                  f"{result['fitness']:.3f} (uniform {ref['uniform']:.3f}, dense {ref['dense']:.3f}) after "
                  f"{result['candidates']} candidates ({result['candidates_per_hour']:.0f}/hour); saved as "
                  f"--allocation {result['name']}")


COMMANDS = {"search": search_cmd}
