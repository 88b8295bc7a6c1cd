"""The order measurements are taken in, and how one pair's repeated measurements become one row.

Every (deployment, engine) pair is measured in `rounds` separate worker processes, the pairs interleaved: ABBA
(every other round reversed, so a level measured early in one round is measured late in the next) or shuffled per
round with a seed. A machine that drifts during the run then spreads its drift over all levels instead of
loading it onto the last ones, and process-to-process variation shows in the confidence intervals.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np

from .stats import latency_summary

ORDERS = ("abba", "shuffle")


def interleaved_order(n: int, rounds: int, order: str = "abba", seed: int = 0) -> list[tuple[int, int]]:
    """(round, item) in the order to measure them."""
    if order not in ORDERS:
        raise ValueError(f"order {order!r} is not one of {ORDERS}")
    rng = random.Random(seed)
    out = []
    for r in range(rounds):
        items = list(range(n))
        if order == "abba" and r % 2 == 1:
            items.reverse()
        elif order == "shuffle":
            rng.shuffle(items)
        out += [(r, i) for i in items]
    return out


def run_interleaved(n: int, rounds: int, order: str, seed: int, measure: Callable[[int, int], dict],
                    on_done: Callable[[int, int], None] | None = None) -> list[list[dict]]:
    """measure(round, item) for every pair in interleaved order; returns per item its results by round."""
    results: list[list[dict | None]] = [[None] * rounds for _ in range(n)]
    for r, i in interleaved_order(n, rounds, order, seed):
        results[i][r] = measure(r, i)
        if on_done:
            on_done(r, i)
    return results  # type: ignore[return-value]


def merge_rounds(rounds: list[dict]) -> dict:
    """One result row from a pair's measurements in several processes: decode statistics over every step of
    every run, medians of the per-run figures, and what each round measured (for drift and bootstrap)."""
    first = rounds[0]
    steps = [s for r in rounds for s in r.get("decode_s_all", [])]
    run_decode = [m for r in rounds for m in r["decode_ms_runs"]]
    run_prefill = [p for r in rounds for p in r["prefill_ms_runs"]]
    run_e2e = [x for r in rounds for x in r["e2e_tokens_per_s_runs"]]
    decode = latency_summary(steps) if steps else {**first["decode_ms"], "median": float(np.median(run_decode))}
    merged = {**first,
              "decode_ms": decode,
              "decode_tokens_per_s": 1e3 / decode["median"],
              "prefill_ms": float(np.median(run_prefill)),
              "e2e_tokens_per_s": float(np.median(run_e2e)),
              "decode_ms_runs": run_decode, "prefill_ms_runs": run_prefill, "e2e_tokens_per_s_runs": run_e2e,
              "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds),
              "compile_s": float(np.median([r["compile_s"] for r in rounds])),
              "deterministic": all(r["deterministic"] for r in rounds) and all(r["tokens"] == first["tokens"]
                                                                               for r in rounds),
              # each round's own runs: the worker process is the bootstrap's unit (stats.process_runs)
              "rounds": [{"decode_ms_median": r["decode_ms"]["median"], "prefill_ms": r["prefill_ms"],
                          "decode_ms_runs": r["decode_ms_runs"], **_host(r)} for r in rounds]}
    merged.pop("decode_s_all", None)
    return merged


def _host(r: dict) -> dict:
    """The machine a round ran on, where its worker recorded it (rounds of one pair may run on several nodes of
    one kind in a cluster)."""
    host = (r.get("machine") or {}).get("hostname")
    return {"hostname": host} if host else {}
