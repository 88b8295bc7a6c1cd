"""Pure summaries for benchmark figures: percentiles, speedups, the bandwidth-bound ideal."""
from __future__ import annotations

import numpy as np


def latency_summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "min": float(ms.min()), "n": int(ms.size)}


def weight_bytes_per_token(per_initializer: dict) -> dict:
    """Bytes a decode step must stream from memory for the MatMul weights: all of them dense, only the non-zeros
    sparse (fp32; index overhead of any compressed format ignored, so this is the optimistic limit)."""
    dense = sum(4 * int(np.prod(e["shape"])) for e in per_initializer.values())
    sparse = sum(4 * (int(np.prod(e["shape"])) - e["zeros"]) for e in per_initializer.values())
    return {"dense_bytes": dense, "sparse_bytes": sparse, "ideal_speedup": dense / sparse if sparse else None}


def attach_speedups(results: list[dict]) -> None:
    """Add speedups against the dense entry (sparsity 0) of the same engine and KV-cache mode, where present."""
    baselines = {(r["engine"], r["kv_cache"]): r for r in results if r["sparsity"] < 1e-4}
    for r in results:
        base = baselines.get((r["engine"], r["kv_cache"]))
        if base is None:
            r["speedup"] = None
            continue
        r["speedup"] = {
            "decode": base["decode_ms"]["median"] / r["decode_ms"]["median"],
            "prefill": base["prefill_ms"] / r["prefill_ms"],
            "e2e": r["e2e_tokens_per_s"] / base["e2e_tokens_per_s"],
            "baseline": base["label"],
        }
