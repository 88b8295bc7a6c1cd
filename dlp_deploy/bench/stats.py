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
    if form_of(result) not in (None, "dense"):  # a depth-pruned model has no zeros and is no baseline
        return False
    # an INT8 graph's zeros include weights that rounded to zero: judge by the model it was exported from
    zeros = result.get("pytorch_sparsity")
    return not pruning.get("global_sparsity") and (result["sparsity"] if zeros is None else zeros) < DENSE_MAX_SPARSITY


REMEASURED_KEYS = ("decode_ms", "prefill_ms", "decode_tokens_per_s", "e2e_tokens_per_s", "decode_ms_runs")


def attach_remeasured(results: list[dict], repeats) -> None:
    """Put a repeated measurement of a model (same deployment, engine and cache mode) on its first result."""
    for rep in repeats:
        for r in results:
            if (r["model"], r["engine"], r["kv_cache"]) == (rep["model"], rep["engine"], rep["kv_cache"]):
                r["remeasured"] = {k: rep[k] for k in REMEASURED_KEYS if k in rep}
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


def pair_key(r: dict) -> tuple:
    """What must be equal for one measurement to divide another: engine, cache mode, window, cores, prompt and
    generation lengths, and the machine (CPU model and ISA). Rows written before a field existed leave it None."""
    return (*setup_key(r), cores_of(r))


def setup_key(r: dict) -> tuple:
    """pair_key without the core count: what one model's measurements at several core counts share."""
    return (r["engine"], r["kv_cache"], r.get("seq_len"), *_workload_and_machine(r))


def _workload_and_machine(r: dict) -> tuple:
    """Prompt and generation lengths, CPU model and ISA, and the machine kind a cluster sweep measured the row on
    where its nodes were of several kinds (bench/executors.py; None elsewhere): what every comparison of two rows
    needs equal."""
    s, m = r.get("settings") or {}, r.get("machine") or {}
    return (s.get("prompt_len"), s.get("gen_len"), m.get("cpu_model"), tuple(m.get("isa") or ()), m.get("kind"))


def cores_of(r: dict) -> int | None:
    """The cores a row ran with: the resolved count where recorded, else the setting (None: the engine's default
    on a file written before rows recorded their count)."""
    return r.get("cores") or (r.get("settings") or {}).get("cores")


def core_counts_in(results: list[dict]) -> list[int]:
    return sorted({c for c in map(cores_of, results) if c is not None})


def precision_of(r: dict) -> str:
    return r.get("precision") or "fp32"


def attach_speedups(results: list[dict], seed: int = 0) -> None:
    """Add speedups against the dense fp32 entry (`speedup`), the dense INT8 entry (`speedup_vs_int8`) and, for
    any other precision (a GGUF format), the dense entry of that precision (`speedup_vs_<precision>`), each with
    the same pair_key where present (the least sparse one when several qualify); None where no such baseline was
    measured, so mismatched runs are never divided. Every row also gets `vs_peer`: its decode tokens/s against
    dense llama.cpp in the peer format (PEER_PRECISION), same machine, cores and lengths."""
    baselines: dict[tuple, dict] = {}
    for r in sorted((r for r in results if is_dense(r)), key=lambda r: r["sparsity"], reverse=True):
        baselines[(pair_key(r), precision_of(r))] = r
    for r in results:
        fields = [("speedup", "fp32"), ("speedup_vs_int8", "int8")]
        if precision_of(r) not in ("fp32", "int8"):
            fields.append((f"speedup_vs_{precision_of(r)}", precision_of(r)))
        for field_name, precision in fields:
            base = baselines.get((pair_key(r), precision))
            r[field_name] = None if base is None else _speedup_block(base, r, seed)
        base = baselines.get((pair_key(r), "fp32")) or baselines.get((pair_key(r), precision_of(r)))
        if base is not None and r.get("weights") and base.get("weights"):
            # the bytes the dense fp32 model streams (an engine without fp32 files: its dense model in the row's
            # format), over the non-zero bytes this one streams: a structured model's own weights are dense but
            # fewer, an INT8 one's a quarter of the size
            sparse = r["weights"]["sparse_bytes"]
            r["weights"]["ideal_speedup"] = base["weights"]["dense_bytes"] / sparse if sparse else None
    attach_peer(results, seed)
    attach_core_scaling(results, seed)


PEER_ENGINE = "llamacpp"
PEER_PRECISION = "q4_1"  # SmolLM2 ships as Q4_1; the 4-bit format users download


def peer_key(r: dict) -> tuple:
    """What a cross-engine comparison must share: the machine, cores and prompt/generation lengths (the engine,
    its cache and the file format are what is being compared)."""
    return (*_workload_and_machine(r), cores_of(r))


def peer_rows(results: list[dict]) -> dict[tuple, dict]:
    return {peer_key(r): r for r in results
            if r["engine"] == PEER_ENGINE and precision_of(r) == PEER_PRECISION and is_dense(r)}


def attach_peer(results: list[dict], seed: int = 0) -> None:
    """`vs_peer`: decode speed against the dense model as llama.cpp runs it in PEER_PRECISION (>1: faster than
    what most CPU users would deploy instead), with a bootstrap interval over runs."""
    peers = peer_rows(results)
    for r in results:
        peer = peers.get(peer_key(r))
        r["vs_peer"] = None if peer is None else {"peer": f"{PEER_ENGINE} {PEER_PRECISION} dense",
                                                  **_ratio_block(peer, r, seed)}


def attach_core_scaling(results: list[dict], seed: int = 0) -> None:
    """Where one model was measured at several core counts, each row's decode gain over the same model at the
    smallest count (`core_scaling`); rows measured at one count only get none."""
    smallest: dict[tuple, dict] = {}
    for r in sorted((r for r in results if cores_of(r) is not None), key=cores_of, reverse=True):
        smallest[same_model(r)] = r
    for r in results:
        base = smallest.get(same_model(r))
        if base is not None and base is not r:
            r["core_scaling"] = {"baseline_cores": cores_of(base), **_ratio_block(base, r, seed)}


def same_model(r: dict) -> tuple:
    """One deployment on one engine setup, whatever the core count."""
    return (r.get("model") or r["label"], precision_of(r), setup_key(r))


def _ratio_block(base: dict, r: dict, seed: int) -> dict:
    """Decode-step ratio base / r: the median per-run figures with a bootstrap interval where both have several
    runs, else the medians over all steps."""
    base_runs, runs = base.get("decode_ms_runs") or [], r.get("decode_ms_runs") or []
    if len(base_runs) > 1 and len(runs) > 1:
        return {"decode": float(np.median(base_runs) / np.median(runs)),
                "decode_ci95": bootstrap_ratio_ci(base_runs, runs, seed=seed)}
    return {"decode": base["decode_ms"]["median"] / r["decode_ms"]["median"]}


def _speedup_block(base: dict, r: dict, seed: int) -> dict:
    b = _baseline(base)
    block = {**_speedups(b, r), "baseline": base["label"], **{f"baseline_{k}": v for k, v in b.items()}}
    base_runs = _all_runs(base)
    if len(base_runs) > 1 and len(r.get("decode_ms_runs") or []) > 1:
        # the estimate and its interval are the same statistic: median per-run decode step, dense over this
        block["decode"] = float(np.median(base_runs) / np.median(r["decode_ms_runs"]))
        block["decode_ci95"] = bootstrap_ratio_ci(base_runs, r["decode_ms_runs"], seed=seed)
    return block


def _all_runs(base: dict) -> list[float]:
    """Every per-run decode median of a baseline, its repeat after all levels included; empty where a measurement
    of it kept no per-run figures (then the point estimate stays the mean of its medians, with no interval)."""
    runs = list(base.get("decode_ms_runs") or [])
    if base.get("remeasured"):
        repeat = base["remeasured"].get("decode_ms_runs")
        if not repeat:
            return []
        runs += list(repeat)
    return runs


def bootstrap_ratio_ci(base_runs: list[float], runs: list[float], n: int = 2000, seed: int = 0,
                       level: float = 0.95) -> list[float]:
    """Percentile bootstrap of median(base) / median(runs) over independent resamples of each group's runs."""
    rng = np.random.default_rng(seed)
    base, other = np.asarray(base_runs, dtype=np.float64), np.asarray(runs, dtype=np.float64)
    ratios = (np.median(rng.choice(base, (n, base.size)), axis=1) /
              np.median(rng.choice(other, (n, other.size)), axis=1))
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))]


def _speedups(baseline: dict, r: dict) -> dict:
    return {"decode": baseline["decode_ms"] / r["decode_ms"]["median"],
            "prefill": baseline["prefill_ms"] / r["prefill_ms"],
            "e2e": r["e2e_tokens_per_s"] / baseline["e2e_tokens_per_s"]}


def remeasured_row(result: dict) -> dict:
    """A dense result's repeated measurement as a result row of its own, with speedups against the same baseline."""
    speed = result["speedup"]
    row = {**result, **result["remeasured"], "remeasured": None}
    row["speedup"] = {**speed, **_speedups({k: speed[f"baseline_{k}"] for k in _BASELINE_KEYS}, row)}
    row["speedup"].pop("decode_ci95", None)
    return row


def has_sparse_kernels(result: dict) -> bool:
    """Results written before the field existed count as sparse-kernel engines (never as the noise control)."""
    return result.get("sparse_kernels", True)


def dense_drift(results: list[dict]) -> dict[tuple, float]:
    """(engine, kv_cache) -> relative change of the dense fp32 decode step between its first and last measurement
    (a repeat after all levels, or the first and last of its interleaved rounds); where the dense model ran at
    several core counts, the largest drift among them, so the noise band never shrinks by averaging."""
    out = {}
    fp32_engines = {r["engine"] for r in results if is_dense(r) and precision_of(r) == "fp32"}
    for r in results:
        # an engine's fp32 dense model, or its dense model in any format where it runs no fp32 (llama.cpp)
        if not is_dense(r) or (precision_of(r) != "fp32" and r["engine"] in fp32_engines):
            continue
        if r.get("remeasured"):
            drift = r["remeasured"]["decode_ms"]["median"] / r["decode_ms"]["median"] - 1
        elif len(r.get("rounds") or []) > 1:  # interleaved rounds: the first against the last
            drift = r["rounds"][-1]["decode_ms_median"] / r["rounds"][0]["decode_ms_median"] - 1
        else:
            continue
        key = (r["engine"], r["kv_cache"])
        if abs(drift) >= abs(out.get(key, 0.0)):
            out[key] = drift
    return out


def control_spread(results: list[dict]) -> list[float]:
    """Decode speedups of zero-pruned models (unstructured, N:M) on engines without sparse kernels: the same work
    at every sparsity, so their distance from 1.0 is what noise alone does to a speedup in this run."""
    out = []
    for r in results:
        if has_sparse_kernels(r) or is_dense(r) or removes_weights(r):
            continue
        same_precision = sparsity_speedup(r)  # an INT8 row against dense INT8: INT8's own gain is no noise
        if same_precision:
            out.append(same_precision["decode"])
    return out


def sparsity_speedup(r: dict) -> dict | None:
    """The speedup that pruning alone explains: against the dense model of the same precision."""
    return r.get("speedup") if precision_of(r) == "fp32" else r.get(f"speedup_vs_{precision_of(r)}")


SMALLER_FORMS = ("structured", "depth")


def removes_weights(result: dict) -> bool:
    """Structured and depth pruning make the model smaller, so every engine does less work: never a noise
    control."""
    return form_of(result) in SMALLER_FORMS


def noise_band(results: list[dict]) -> float:
    """The largest relative speedup this run's noise produced: dense drift, and the control engines' spread."""
    deviations = [abs(d) for d in dense_drift(results).values()] + [abs(x - 1) for x in control_spread(results)]
    return max(deviations, default=0.0)


def _pruning(r: dict) -> dict:
    return (r.get("source") or {}).get("pruning") or {}


def form_of(r: dict) -> str | None:
    """The pruning form of a result: set by the sweep, else read from the deployment's pruning summary (a
    streamlined model is depth-pruned whatever else was done to it afterwards)."""
    if (r.get("source") or {}).get("streamline"):
        return "depth"
    return r.get("form") or _pruning(r).get("form")


def removed_share(r: dict) -> float:
    """Share of decoder-Linear weights gone: zeros for the in-weight forms, removed parameters for structured."""
    if form_of(r) in SMALLER_FORMS:
        return r.get("removed") or removed_from_source(r.get("source") or {})
    return r["sparsity"]


def removed_from_source(source: dict) -> float:
    """Share of the original decoder-Linear weights gone, from an export's source block: zeros (or removed
    parameters, structured) over the pruned model, and for a depth-pruned one the layers cut as well."""
    pruning = source.get("pruning") or {}
    if source.get("streamline"):
        return removed_by_depth(source["streamline"], pruning)
    return pruning.get("global_sparsity", 0.0)


def removed_by_depth(streamline: dict | None, pruning: dict | None) -> float:
    """Decoder-Linear parameters gone from a streamlined model against the original, counting zeros where the
    streamlined model was pruned again (its sparsity is over what the cut left)."""
    if not streamline or streamline.get("removed_share") is None:
        return 0.0
    left = 1 - streamline["removed_share"]
    return 1 - left * (1 - ((pruning or {}).get("global_sparsity") or 0.0))
