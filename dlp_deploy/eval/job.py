"""A whole eval job: perplexity on the requested corpora and optional zero-shot tasks, one JSON out."""
from __future__ import annotations

import json
from pathlib import Path

from .. import data, models
from ..models import model_sparsity
from ..provenance import provenance
from .perplexity import corpus_ids, perplexity


def evaluate(model_ref: str, ppl: list[str], seqlen: int = 2048, max_windows: int | None = None,
             zeroshot: list[str] | None = None, limit: int | None = None, device: str = "cpu",
             data_root: str | None = None, progress=None) -> dict:
    root = data.data_dir(data_root) if ppl else None
    texts = {name: data.eval_text(name, root) for name in ppl}  # fail on missing data before loading the model
    if zeroshot:
        from .zeroshot import check_tasks

        check_tasks(zeroshot)
    model, tok = models.load(model_ref, device)
    result: dict = {"schema": "dlp-deploy/eval/1", "model": model_ref, "perplexity": {}, "perplexity_details": {}}
    for name, text in texts.items():
        cap = min(x for x in (max_windows, text.max_windows) if x is not None) if (max_windows or text.max_windows) \
            else None
        scored = perplexity(model, corpus_ids(tok, text.text), seqlen, cap, progress, f"ppl {name}")
        result["perplexity"][name] = scored["ppl"]
        result["perplexity_details"][name] = {**scored, "source": text.source}
    if zeroshot:
        from .zeroshot import evaluate_zeroshot

        result["zeroshot"] = evaluate_zeroshot(model, tok, zeroshot, limit=limit, progress=progress)
    result["weight_sparsity"] = model_sparsity(model)["global_sparsity"]
    result["pruning"] = _pruning_summary(model_ref)
    result["provenance"] = provenance(device=device)
    return result


def _pruning_summary(model_ref: str) -> dict | None:
    path = Path(model_ref) / "pruning.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return {k: report.get(k) for k in ("settings", "global_sparsity", "calibration", "seed")}
