"""Perplexity over non-overlapping windows of a tokenized corpus, as the pruning papers compute it."""
from __future__ import annotations

import math

import torch
from torch import nn


def corpus_ids(tokenizer, text: str) -> torch.Tensor:
    """The whole corpus tokenized once (the papers' `tokenizer(text, return_tensors='pt')`)."""
    return tokenizer(text, return_tensors="pt").input_ids[0]


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               progress=None, label: str = "perplexity") -> dict:
    """exp(mean next-token NLL) over floor(len/seqlen) windows of `seqlen` tokens (optionally the first
    `max_windows`); each window is scored independently, the first token of each window is context only."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"corpus has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    task = progress.add_task(label, total=n) if progress else None
    nll_sum, count = 0.0, 0
    for i in range(n):
        window = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(window, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        nll_sum += float(loss)
        count += seqlen - 1
        if progress:
            progress.advance(task)
    return {"ppl": math.exp(nll_sum / count), "windows": n, "seqlen": seqlen, "tokens_scored": count}
