"""A whole eval job: perplexity on the requested corpora and optional zero-shot tasks, one JSON out."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import data, models
from ..errors import UserError
from ..models import model_sparsity
from ..provenance import provenance
from ..pruning_record import read_pruning_record
from ..runtime.deployment import EXPORT_FILE, load_deployment
from ..runtime.engines import ENGINES
from ..runtime.worker import ProgressEvents, replay_progress, run_in_worker, workaround
from .perplexity import corpus_ids, perplexity, session_logits
from .zeroshot import check_tasks, evaluate_zeroshot


@dataclass
class EvalSettings:
    """Perplexity as a sweep scores every level and deployment: the corpora, the window (None: min(2048, the
    model's context)) and at most `max_windows` windows (None: all)."""

    ppl: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    max_windows: int | None = None


def evaluate(model_ref: str, ppl: list[str], seqlen: int | None = None, max_windows: int | None = None,
             zeroshot: list[str] | None = None, limit: int | None = None, device: str = "cpu",
             data_root: str | None = None, progress=None) -> dict:
    root = data.data_dir(data_root) if ppl else None
    texts = {name: data.eval_text(name, root) for name in ppl}  # fail on missing data before loading the model
    if zeroshot:
        check_tasks(zeroshot)
    model, tok = models.load(model_ref, device)
    seqlen = seqlen or data.default_seqlen(model.config)  # None: min(2048, the model's context)
    result: dict = {"schema": "dlp-deploy/eval/1", "model": model_ref, "seqlen": seqlen, "perplexity": {},
                    "perplexity_details": {}}
    _score_corpora(result, model, tok, texts, seqlen, max_windows, progress)
    if zeroshot:
        result["zeroshot"] = evaluate_zeroshot(model, tok, zeroshot, limit=limit, progress=progress)
    result["weight_sparsity"] = model_sparsity(model)["global_sparsity"]
    result["pruning"] = _pruning_summary(model_ref)
    result["provenance"] = provenance(device=device)
    return result


def _score_corpora(result: dict, model_or_logits, tok, texts: dict, seqlen: int, max_windows, progress) -> None:
    for name, text in texts.items():
        cap = min(x for x in (max_windows, text.max_windows) if x is not None) if (max_windows or text.max_windows) \
            else None
        scored = perplexity(model_or_logits, corpus_ids(tok, text.text), seqlen, cap, progress, f"ppl {name}")
        result["perplexity"][name] = scored["ppl"]
        result["perplexity_details"][name] = {**scored, "source": text.source}


def is_deployment(ref: str) -> bool:
    return (Path(ref) / EXPORT_FILE).is_file()


def evaluate_deployment(deploy_dir: str, engine: str, ppl: list[str], seqlen: int | None = None,
                        max_windows: int | None = None, cores: int | None = None, data_root: str | None = None,
                        progress=None) -> dict:
    """Perplexity of a deployment itself: its ONNX graph or GGUF file on an inference engine, the windows and scoring of the
    PyTorch evaluation (each window one prefill step with an empty cache). The engine runs in a worker process
    (runtime/worker.py): a crash there is a one-line error, not the end of this process."""
    dep = load_deployment(deploy_dir)
    dep.check_engine(engine)
    seqlen = seqlen or min(data.DEFAULT_SEQLEN, dep.seq_len - 1)
    if seqlen >= dep.seq_len:
        raise UserError(f"--seqlen {seqlen} must be shorter than the deployment's {dep.seq_len}-token window; "
                        f"use --seqlen {dep.seq_len - 1} or re-export with a larger --seq-len")
    root = data.data_dir(data_root)
    for name in ppl:
        data.eval_text(name, root)  # missing data answers here, before a worker starts
    ENGINES[engine]  # as does an engine that is not installed
    result: dict = {"schema": "dlp-deploy/eval/1", "model": str(deploy_dir), "engine": engine, "seqlen": seqlen}
    result.update(run_in_worker("eval", {"deploy_dir": str(deploy_dir), "engine": engine, "ppl": ppl,
                                         "seqlen": seqlen, "max_windows": max_windows, "cores": cores,
                                         "data_root": str(root) if root else None},
                                engine=engine, label=dep.folder.name, during="perplexity",
                                on_event=replay_progress(progress), hint=workaround(engine, "choose another --engine")))
    result["deployment"] = {k: dep.info.get(k) for k in ("source", "quantization", "seq_len")}
    result["provenance"] = provenance()
    return result


def deployment_perplexity_task(args: dict, emit) -> dict:
    """The worker's side of evaluate_deployment (runtime/worker.py): compile, then score every corpus."""
    dep = load_deployment(args["deploy_dir"])
    root = Path(args["data_root"]) if args["data_root"] else None
    texts = {name: data.eval_text(name, root) for name in args["ppl"]}
    session = ENGINES[args["engine"]].compile(dep.model_path, dep.seq_len, num_cores=args["cores"])
    result: dict = {"perplexity": {}, "perplexity_details": {}}
    _score_corpora(result, session_logits(session), dep.tokenizer(), texts, args["seqlen"], args["max_windows"],
                   ProgressEvents(emit))
    return result


def _pruning_summary(model_ref: str) -> dict | None:
    report = read_pruning_record(model_ref)
    if report is None:
        return None
    return {k: report.get(k) for k in ("settings", "global_sparsity", "calibration", "seed")}
