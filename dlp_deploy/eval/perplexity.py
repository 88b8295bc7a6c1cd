"""Perplexity over non-overlapping windows of a tokenized corpus, as the pruning papers compute it, for a PyTorch
model or for a deployment run through an inference engine (same windows, same scoring)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn


def corpus_ids(tokenizer, text: str) -> torch.Tensor:
    """The whole corpus tokenized once (the papers' `tokenizer(text, return_tensors='pt')`)."""
    return tokenizer(text, return_tensors="pt").input_ids[0]


def torch_logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    device = next(model.parameters()).device

    def logits(window: torch.Tensor) -> torch.Tensor:
        return model(window.unsqueeze(0).to(device), use_cache=False).logits[0].float()

    return logits


def session_logits(session) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of a whole window from an engine session: one prefill step with an empty cache, as generation
    starts (so the graph, its attention masks and its cache inputs are exactly what is deployed)."""
    from ..errors import UserError
    from ..runtime.decode import step_inputs

    if getattr(session, "internal_cache", False) and not getattr(session, "scores_windows", False):
        # a cache the engine keeps to itself holds no defined slots before the first step: score with the same
        # graph and the cache in Python (deepsparse-external) instead
        raise UserError(f"{session.name} keeps its KV cache inside the engine; score with deepsparse-external "
                        "(the same compiled graph, cache carried in Python)")

    def logits(window: torch.Tensor) -> torch.Tensor:
        ids = window.numpy().astype(np.int64)[None]
        length = ids.shape[1]
        session.prepare(length)
        mask, positions, causal = step_inputs(session.window(0, length), 0, length)
        out, _ = session.run(ids, mask, positions, causal, session.init_past(length))
        return torch.from_numpy(np.asarray(out[0], dtype=np.float32))

    return logits


@torch.inference_mode()
def perplexity(model_or_logits, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               progress=None, label: str = "perplexity") -> dict:
    """exp(mean next-token NLL) over floor(len/seqlen) windows of `seqlen` tokens (optionally the first
    `max_windows`); each window is scored independently, the first token of each window is context only.
    `model_or_logits` is a PyTorch causal LM or a function window -> logits [L, V]."""
    logits_of = torch_logits(model_or_logits) if isinstance(model_or_logits, nn.Module) else model_or_logits
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"corpus has {ids.numel()} tokens, fewer than one window of {seqlen}")
    task = progress.add_task(label, total=n) if progress else None
    nll_sum, count = 0.0, 0
    for i in range(n):
        window = ids[i * seqlen:(i + 1) * seqlen]
        logits = logits_of(window)
        loss = nn.functional.cross_entropy(logits[:-1], window[1:].to(logits.device), reduction="sum")
        nll_sum += float(loss)
        count += seqlen - 1
        if progress:
            progress.advance(task)
    return {"ppl": math.exp(nll_sum / count), "windows": n, "seqlen": seqlen, "tokens_scored": count}
