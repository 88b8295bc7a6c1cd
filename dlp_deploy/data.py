"""Calibration and perplexity corpora, handled as the pruning papers' reference code does (see the data README).

Each corpus loads through `datasets` from the hub, or from a local folder laid out like `shared/data` when one is
given (`--data-dir` or env DLP_DEPLOY_DATA). Offline C4 holds only validation documents: calibration draws from
documents 0-999 and evaluation uses 1000-1999, which every result records under "source".
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError

DATA_ENV = "DLP_DEPLOY_DATA"
LAYOUT = ("wikitext-2-raw/wiki.test.raw, ptb/ptb.test.txt, ptb/ptb.valid.txt, c4/c4_validation_2k.parquet")
C4_CALIB_DOCS = range(0, 1000)
C4_EVAL_DOCS = range(1000, 2000)
C4_MAX_EVAL_WINDOWS = 256
# hub C4 validation documents past the papers' evaluation slice (0-1099): the search's validation text online
HUB_VALIDATION_DOCS = range(1100, 2100)


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get(DATA_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"data folder {path} does not exist; point --data-dir or {DATA_ENV} at a folder holding "
                        f"{LAYOUT}")
    return path


def _local_file(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise UserError(f"{path} not found; the data folder ({DATA_ENV} or --data-dir) must hold {LAYOUT}")
    return path


def _hub(fn: Callable, what: str):
    try:
        return fn()
    except Exception as exc:  # any hub/network failure: tell the user how to work offline
        raise UserError(f"cannot load {what} from the Hugging Face hub ({type(exc).__name__}); offline, set "
                        f"{DATA_ENV} or --data-dir to a folder holding {LAYOUT}") from None


# ---------------------------------------------------------------- evaluation text

@dataclass(frozen=True)
class EvalText:
    text: str
    source: str
    max_windows: int | None = None  # the papers cap C4 at 256 windows


def wikitext_rows_from_raw(raw: str) -> list[str]:
    """The hub's `wikitext-2-raw-v1` rows: one per line, newline kept, blank lines as empty strings."""
    lines = raw.replace("\r\n", "\n").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def _wikitext2(root: Path | None) -> EvalText:
    if root is None:
        from datasets import load_dataset

        rows = _hub(lambda: load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"], "wikitext2")
        return EvalText("\n\n".join(rows), "hub wikitext/wikitext-2-raw-v1 test")
    raw = _local_file(root, "wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    return EvalText("\n\n".join(wikitext_rows_from_raw(raw)), "local wikitext-2-raw/wiki.test.raw (test)")


def _ptb(root: Path | None) -> EvalText:
    if root is None:
        from datasets import load_dataset

        rows = _hub(lambda: load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"], "ptb")
        return EvalText(" ".join(rows), "hub ptb_text_only test")
    lines = _local_file(root, "ptb/ptb.test.txt").read_text(encoding="utf-8").splitlines()
    return EvalText(" ".join(line.strip() for line in lines), "local ptb/ptb.test.txt (test)")


def c4_documents(root: Path | None, docs: range, split: str) -> list[str]:
    if root is None:
        from datasets import load_dataset

        shard = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = _hub(lambda: load_dataset("allenai/c4", data_files={split: shard[split]}, split=split), "c4")
        return ds["text"] if split == "train" else ds["text"][:1100]
    import pandas as pd

    texts = pd.read_parquet(_local_file(root, "c4/c4_validation_2k.parquet"), columns=["text"])["text"]
    return list(texts.iloc[docs.start:docs.stop])


def _c4(root: Path | None) -> EvalText:
    docs = c4_documents(root, C4_EVAL_DOCS, "validation")
    source = ("hub allenai/c4 en validation docs 0-1099" if root is None else
              "local c4_validation_2k docs 1000-1999 (offline: calibration uses docs 0-999)")
    return EvalText(" ".join(docs), source, C4_MAX_EVAL_WINDOWS)


EVAL_CORPORA: dict[str, Callable[[Path | None], EvalText]] = {"wikitext2": _wikitext2, "ptb": _ptb, "c4": _c4}


def eval_text(name: str, root: Path | None) -> EvalText:
    if name not in EVAL_CORPORA:
        raise UserError(f"unknown perplexity corpus {name!r}; choose from {', '.join(EVAL_CORPORA)}")
    return EVAL_CORPORA[name](root)


# ---------------------------------------------------------------- window length

DEFAULT_SEQLEN = 2048  # the pruning papers' window (LLaMA's context)
# where configs keep their context length (LLaMA-style first, then GPT-2 / Falcon / ChatGLM / MPT spellings)
CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len")


def model_context(config) -> int | None:
    """The context length a model config declares, or None when it declares none."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_seqlen(config) -> int:
    """Calibration and evaluation window when none is given: min(2048, the model's context), so a model with a
    shorter context is never fed positions it was not trained for."""
    context = model_context(config)
    return DEFAULT_SEQLEN if context is None else min(DEFAULT_SEQLEN, context)


# ---------------------------------------------------------------- calibration

@dataclass(frozen=True)
class Calibration:
    windows: torch.Tensor  # [nsamples, seqlen] token ids
    source: str
    docs: tuple[int, ...] = ()  # C4 only: every document index the sampler drew (used or too short)
    used: tuple[int, ...] = ()  # C4 only: the documents a window was cut from


def sample_doc_windows(docs: list[str], tokenize: Callable[[str], list[int]], nsamples: int, seqlen: int,
                       seed: int) -> torch.Tensor:
    """Wanda/SparseGPT's C4 sampler: random document longer than seqlen, then a random window inside it."""
    return draw_doc_windows(docs, tokenize, nsamples, seqlen, seed)[0]


def draw_doc_windows(docs: list[str], tokenize: Callable[[str], list[int]], nsamples: int, seqlen: int,
                     seed: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """sample_doc_windows, also returning the indices (sorted) of every document drawn and of those a window was
    cut from, so that held-out text can avoid the latter."""
    rng = random.Random(seed)
    tokens: dict[int, list[int]] = {}
    max_draws = 20 * len(docs)  # bounds the search when no document is long enough
    windows, used = [], set()
    for _ in range(nsamples):
        for _draw in range(max_draws):
            i = rng.randint(0, len(docs) - 1)
            if i not in tokens:
                tokens[i] = tokenize(docs[i])
            if len(tokens[i]) > seqlen:
                break
        else:
            raise UserError(f"no calibration document is longer than --seqlen {seqlen} tokens; "
                            "use a smaller --seqlen")
        ids = tokens[i]
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start:start + seqlen])
        used.add(i)
    return torch.stack([torch.tensor(w, dtype=torch.long) for w in windows]), sorted(tokens), sorted(used)


def sample_text_windows(ids: list[int], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda/SparseGPT's WikiText-2/PTB sampler: random windows of the tokenized train text."""
    if len(ids) <= seqlen:
        raise UserError(f"calibration text has {len(ids)} tokens, fewer than --seqlen {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return torch.tensor([ids[s:s + seqlen] for s in starts], dtype=torch.long)


def calibration(name: str, tokenizer, nsamples: int, seqlen: int, seed: int, root: Path | None) -> Calibration:
    def tokenize(text: str) -> list[int]:
        # Wanda's and SparseGPT's loaders call `tokenizer(doc, return_tensors='pt')`, i.e. with the tokenizer's
        # default special tokens: a LLaMA tokenizer puts BOS at position 0 of every document (or of the joined
        # WikiText-2/PTB train text). The length test then counts BOS, and the random slice [i, i + seqlen) holds
        # it only when i == 0; tokenizers that add no BOS (GPT-2 style) are unaffected.
        return tokenizer(text)["input_ids"]

    if name == "c4":
        docs = c4_documents(root, C4_CALIB_DOCS, "train")
        source = "hub allenai/c4 en train shard 0" if root is None else "local c4_validation_2k docs 0-999"
        windows, drawn, used = draw_doc_windows(docs, tokenize, nsamples, seqlen, seed)
        offset = C4_CALIB_DOCS.start if root is not None else 0
        return Calibration(windows, source, tuple(offset + i for i in drawn), tuple(offset + i for i in used))
    if name in ("wikitext2", "ptb"):
        if root is not None:
            raise UserError(f"calibration on {name} needs its train split, which the offline data folder lacks; "
                            "use --calib c4 offline")
        text = _train_text(name)
        return Calibration(sample_text_windows(tokenize(text), nsamples, seqlen, seed), f"hub {name} train")
    raise UserError(f"unknown calibration corpus {name!r}; choose from c4, wikitext2, ptb")


def _train_text(name: str) -> str:
    from datasets import load_dataset

    if name == "wikitext2":
        rows = _hub(lambda: load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"], name)
        return " ".join(rows)  # Wanda's get_wikitext2 joins train rows with a space
    rows = _hub(lambda: load_dataset("ptb_text_only", "penn_treebank", split="train")["sentence"], name)
    return " ".join(rows)


# ---------------------------------------------------------------- held-out validation (search, --alpha auto)

@dataclass(frozen=True)
class Validation:
    ids: torch.Tensor  # [windows, seqlen] token ids
    source: str
    docs: tuple[int, ...]  # C4 validation document indices the text came from


def validation_windows(tokenizer, calibration: Calibration, windows: int, seqlen: int, root: Path | None,
                       calib_corpus: str = "c4", flag: str = "--val-windows") -> Validation:
    """Held-out C4 text for choosing allocations and for recovery's before/after perplexity: never an evaluation
    document and never one a calibration window was cut from. Offline: documents 0-999 but those (1000-1999 are
    evaluation); online: hub validation documents 1100+ (0-1099 are the papers' evaluation slice; calibration
    reads train). A document the sampler only looked at (too short for a window) gave calibration no token, so it
    is held-out text: offline, where 1 in about 30 documents is longer than 2048 tokens, 128 windows look at nearly
    all 1000 and leave too little text otherwise. Documents are joined with a space in index order and cut into
    `windows` non-overlapping windows of `seqlen` tokens; `flag` names the caller's option in the refusal."""
    if root is None:
        pool, source = HUB_VALIDATION_DOCS, "hub allenai/c4 en validation docs from 1100"
        texts = _hub(lambda: _hub_validation_texts(pool), "c4")
    else:
        pool, source = C4_CALIB_DOCS, "local c4_validation_2k docs 0-999 no calibration window came from"
        texts = c4_documents(root, pool, "validation")
    used_by_calibration = set(calibration.used) if calib_corpus == "c4" else set()
    needed, count, used, chosen = windows * seqlen, 0, [], []
    for offset, text in enumerate(texts):
        index = pool.start + offset
        if index in used_by_calibration:
            continue
        used.append(index)
        chosen.append(text)
        count += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count >= needed + 2:  # margin: joining can merge tokens across a boundary
            break
    ids = tokenizer(" ".join(chosen))["input_ids"]  # tokenized once, as the evaluation corpora are
    if len(ids) < needed:
        raise UserError(f"held-out C4 text has {len(ids)} tokens, fewer than {windows} validation windows of "
                        f"{seqlen}; ask for fewer {flag}")
    return Validation(torch.tensor(ids[:needed], dtype=torch.long).reshape(windows, seqlen), source, tuple(used))


def _hub_validation_texts(pool: range) -> list[str]:
    from datasets import load_dataset

    ds = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                      split="validation")
    return ds["text"][pool.start:pool.stop]
