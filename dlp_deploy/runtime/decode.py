"""The project's own greedy KV-cache generation loop over an engine session (see runtime/engines.py).

One prefill forward over the whole prompt, then one forward per new token. Timing sits inside the loop with
time.perf_counter around each engine step only, so the benchmark harness can reuse it as is.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from ..errors import UserError
from .deployment import load_deployment
from .engines import ENGINES


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # new tokens only
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)  # one per decode step (tokens after the first)
    first_logits: np.ndarray | None = None  # prefill logits [L, V], for numeric checks

    @property
    def decode_tokens_per_s(self) -> float | None:
        total = sum(self.decode_s)
        return len(self.decode_s) / total if total > 0 else None


def step_inputs(seq_len: int, filled: int, length: int, start: int | None = None):
    """attention_mask [1,S], positions [1,L], causal_mask [1,1,L,S] for `length` new tokens after `filled` ones.

    Slots are right-aligned in the S-slot window: the new tokens take the last L slots and the `filled` earlier
    tokens the ones before them; anything further left is padding.
    """
    start = filled if start is None else start
    valid = filled + length
    attention_mask = np.zeros((1, seq_len), np.int64)
    attention_mask[0, seq_len - valid:] = 1
    positions = np.arange(start, start + length, dtype=np.int64)[None]
    # row i may see every filled slot and new tokens up to itself
    cols = np.arange(seq_len)[None, :]
    rows = np.arange(length)[:, None]
    causal = (cols >= seq_len - valid) & (cols <= seq_len - length + rows)
    return attention_mask, positions, causal.astype(np.int64)[None, None]


def generate(session, prompt_ids: Iterable[int], max_new_tokens: int,
             on_token: Callable[[int], None] | None = None, stop_ids: Iterable[int] = ()) -> Generation:
    """Greedy decoding of up to `max_new_tokens` tokens after `prompt_ids`; stops early on `stop_ids`."""
    prompt = [int(t) for t in prompt_ids]
    seq_len, stop = session.seq_len, set(stop_ids)
    if not prompt:
        raise UserError("the prompt is empty; give at least one token of text")
    if len(prompt) + max_new_tokens > seq_len:
        raise UserError(f"prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens exceed the {seq_len}-token "
                        "window; shorten the prompt, lower --max-new-tokens, or use a larger --seq-len")
    out = Generation(prompt)
    if max_new_tokens <= 0:
        return out
    session.prepare(len(prompt))
    session.prepare(1)
    perf = time.perf_counter

    length = len(prompt)
    past = session.init_past(length)
    ids = np.asarray([prompt], np.int64)
    mask, positions, causal = step_inputs(session.window(0, length), 0, length)
    t0 = perf()
    logits, present = session.run(ids, mask, positions, causal, past)
    token = int(np.argmax(logits[0, -1]))
    out.prefill_s = perf() - t0
    out.first_logits = logits[0]
    filled = length
    while True:
        out.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if len(out.tokens) >= max_new_tokens or token in stop:
            return out
        t0 = perf()  # a decode step's cost includes carrying the cache over, which differs per engine
        past = session.advance(present, 1)
        mask, positions, causal = step_inputs(session.window(filled, 1), filled, 1)
        logits, present = session.run(np.asarray([[token]], np.int64), mask, positions, causal, past)
        token = int(np.argmax(logits[0, -1]))
        out.decode_s.append(perf() - t0)
        filled += 1


# ---------------------------------------------------------------- `dlp-deploy generate` in a worker

def generate_task(args: dict, emit) -> dict:
    """The worker's side of `dlp-deploy generate` (runtime/worker.py): compile, then each new token as an event."""
    deployment = load_deployment(args["deploy_dir"])
    session = ENGINES[args["engine"]].compile(deployment.model_path, deployment.seq_len, num_cores=args["num_cores"])
    session.prepare(len(args["prompt_ids"]))
    session.prepare(1)
    emit({"compiled": True})
    result = generate(session, args["prompt_ids"], args["max_new_tokens"], on_token=lambda t: emit({"token": t}),
                      stop_ids=args["stop_ids"])
    return {"tokens": len(result.tokens), "prefill_s": result.prefill_s,
            "decode_tokens_per_s": result.decode_tokens_per_s}
