"""Pure summaries for benchmark figures: percentiles, speedups, the bandwidth-bound ideal."""
from __future__ import annotations

import numpy as np


def latency_summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "min": float(ms.min()), "n": int(ms.size)}


def weight_bytes_per_token(per_initializer: dict) -> dict:
    """Bytes a decode step must stream from memory for the MatMul weights: all of them dense, only the non-zeros
    sparse (4 bytes fp32, 1 int8; index overhead of any compressed format ignored, so this is the optimistic
    limit)."""
    dense = sum(e.get("bytes_per_weight", 4) * int(np.prod(e["shape"])) for e in per_initializer.values())
    sparse = sum(e.get("bytes_per_weight", 4) * (int(np.prod(e["shape"])) - e["zeros"])
                 for e in per_initializer.values())
    return {"dense_bytes": dense, "sparse_bytes": sparse, "ideal_speedup": dense / sparse if sparse else None}


DENSE_MAX_SPARSITY = 0.01


def is_dense(result: dict) -> bool:
    """The dense baseline: nothing pruned it and under 1% of its weights are zeros (a dequantized GGUF, like
    SmolLM2's, already holds a few hundredths of a percent of exact zeros, so "no zeros at all" is too strict)."""
    pruning = (result.get("source") or {}).get("pruning") or {}
    return not pruning.get("global_sparsity") and result["sparsity"] < DENSE_MAX_SPARSITY


REMEASURED_KEYS = ("decode_ms", "prefill_ms", "decode_tokens_per_s", "e2e_tokens_per_s")


def attach_remeasured(results: list[dict], repeats) -> None:
    """Put a repeated measurement of a model (same deployment, engine and cache mode) on its first result."""
    for rep in repeats:
        for r in results:
            if (r["model"], r["engine"], r["kv_cache"]) == (rep["model"], rep["engine"], rep["kv_cache"]):
                r["remeasured"] = {k: rep[k] for k in REMEASURED_KEYS}
                break


_BASELINE_KEYS = ("decode_ms", "prefill_ms", "e2e_tokens_per_s")


def _baseline(base: dict) -> dict:
    """The dense figures speedups divide by: the mean of its measurements (first, and repeated after all levels
    when the sweep did that), so a drift of the machine during the run is split between early and late levels."""
    runs = [base] + ([base["remeasured"]] if base.get("remeasured") else [])
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"decode_ms": mean([r["decode_ms"]["median"] for r in runs]),
            "prefill_ms": mean([r["prefill_ms"] for r in runs]),
            "e2e_tokens_per_s": mean([r["e2e_tokens_per_s"] for r in runs])}


def attach_speedups(results: list[dict]) -> None:
    """Add speedups against the dense entry of the same engine and KV-cache mode, where present (the least sparse
    one when several qualify)."""
    baselines: dict[tuple, dict] = {}
    for r in sorted((r for r in results if is_dense(r)), key=lambda r: r["sparsity"], reverse=True):
        baselines[(r["engine"], r["kv_cache"])] = r
    for r in results:
        base = baselines.get((r["engine"], r["kv_cache"]))
        if base is None:
            r["speedup"] = None
            continue
        b = _baseline(base)
        r["speedup"] = {**_speedups(b, r), "baseline": base["label"], **{f"baseline_{k}": v for k, v in b.items()}}
        # the bytes the dense model streams, over the non-zero bytes this one streams: a structured model's own
        # weights are dense but fewer, so its ideal is against the baseline's bytes, not its own
        sparse = r["weights"]["sparse_bytes"]
        r["weights"]["ideal_speedup"] = base["weights"]["dense_bytes"] / sparse if sparse else None


def _speedups(baseline: dict, r: dict) -> dict:
    return {"decode": baseline["decode_ms"] / r["decode_ms"]["median"],
            "prefill": baseline["prefill_ms"] / r["prefill_ms"],
            "e2e": r["e2e_tokens_per_s"] / baseline["e2e_tokens_per_s"]}


def remeasured_row(result: dict) -> dict:
    """A dense result's repeated measurement as a result row of its own, with speedups against the same baseline."""
    speed = result["speedup"]
    row = {**result, **result["remeasured"], "remeasured": None}
    row["speedup"] = {**speed, **_speedups({k: speed[f"baseline_{k}"] for k in _BASELINE_KEYS}, row)}
    return row


def has_sparse_kernels(result: dict) -> bool:
    """Results written before the field existed count as sparse-kernel engines (never as the noise control)."""
    return result.get("sparse_kernels", True)


def dense_drift(results: list[dict]) -> dict[tuple, float]:
    """(engine, kv_cache) -> relative change of the dense decode step between its first and repeated measurement."""
    return {(r["engine"], r["kv_cache"]): r["remeasured"]["decode_ms"]["median"] / r["decode_ms"]["median"] - 1
            for r in results if is_dense(r) and r.get("remeasured")}


def control_spread(results: list[dict]) -> list[float]:
    """Decode speedups of zero-pruned models (unstructured, N:M) on engines without sparse kernels: the same work
    at every sparsity, so their distance from 1.0 is what noise alone does to a speedup in this run."""
    return [r["speedup"]["decode"] for r in results
            if r.get("speedup") and not has_sparse_kernels(r) and not is_dense(r) and not removes_weights(r)]


def removes_weights(result: dict) -> bool:
    """Structured pruning makes the model smaller, so every engine does less work: never a noise control."""
    return form_of(result) == "structured"


def noise_band(results: list[dict]) -> float:
    """The largest relative speedup this run's noise produced: dense drift, and the control engines' spread."""
    deviations = [abs(d) for d in dense_drift(results).values()] + [abs(x - 1) for x in control_spread(results)]
    return max(deviations, default=0.0)


def _pruning(r: dict) -> dict:
    return (r.get("source") or {}).get("pruning") or {}


def form_of(r: dict) -> str | None:
    """The pruning form of a result: set by the sweep, else read from the deployment's pruning summary."""
    return r.get("form") or _pruning(r).get("form")


def removed_share(r: dict) -> float:
    """Share of decoder-Linear weights gone: zeros for the in-weight forms, removed parameters for structured."""
    if form_of(r) == "structured":
        return r.get("removed") or _pruning(r).get("global_sparsity", 0.0)
    return r["sparsity"]
