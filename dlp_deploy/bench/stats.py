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
    if is_aa_control(result):  # the dense deployment measured a second time: the A/A control, never a baseline
        return False
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
    where its nodes were of several kinds (pipeline/executors.py; None elsewhere): what every comparison of two rows
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
    for r in results:
        r["process_spread"] = process_spread(r)
    attach_floors(results)


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
    return (r.get("model") or r["label"], precision_of(r), setup_key(r), is_aa_control(r))


def _ratio_block(base: dict, r: dict, seed: int) -> dict:
    """Decode-step ratio base / r: the median per-run figures with a cluster-bootstrap interval where both have
    several runs, else the medians over all steps."""
    base_groups, groups = process_runs(base), process_runs(r)
    if _run_count(base_groups) > 1 and _run_count(groups) > 1:
        return {"decode": _median_ratio(base_groups, groups),
                "decode_ci95": bootstrap_ratio_ci(base_groups, groups, seed=seed)}
    return {"decode": base["decode_ms"]["median"] / r["decode_ms"]["median"]}


def _speedup_block(base: dict, r: dict, seed: int) -> dict:
    b = _baseline(base)
    block = {**_speedups(b, r), "baseline": base["label"], **{f"baseline_{k}": v for k, v in b.items()}}
    base_groups, groups = _baseline_groups(base), process_runs(r)
    if _run_count(base_groups) > 1 and _run_count(groups) > 1:
        # the estimate and its interval are the same statistic: median per-run decode step, dense over this
        block["decode"] = _median_ratio(base_groups, groups)
        block["decode_ci95"] = bootstrap_ratio_ci(base_groups, groups, seed=seed)
    return block


def _run_count(groups: list[list[float]]) -> int:
    return sum(map(len, groups))


def _median_ratio(base_groups: list[list[float]], groups: list[list[float]]) -> float:
    return float(np.median(np.concatenate(base_groups)) / np.median(np.concatenate(groups)))


def process_runs(r: dict) -> list[list[float]]:
    """A row's per-run decode medians grouped by the worker process that measured them: runs of one process share
    its compile, memory layout and CPU placement, so they are not independent of each other, while processes
    are. From each round's own list where the row kept it; else the merged list cut into its rounds (equal
    numbers of runs each, in round order, as merge_rounds concatenates them); else one process."""
    runs = list(r.get("decode_ms_runs") or [])
    rounds = r.get("rounds") or []
    if rounds and all(x.get("decode_ms_runs") for x in rounds):
        return [list(x["decode_ms_runs"]) for x in rounds]
    if len(rounds) > 1 and runs and len(runs) % len(rounds) == 0:
        size = len(runs) // len(rounds)
        return [runs[i:i + size] for i in range(0, len(runs), size)]
    return [runs] if runs else []


def _baseline_groups(base: dict) -> list[list[float]]:
    """Every process of a baseline, its repeat after all levels (one more process) included; empty where a
    measurement of it kept no per-run figures (then the point estimate stays the mean of its medians, with no
    interval)."""
    groups = process_runs(base)
    if base.get("remeasured"):
        repeat = process_runs(base["remeasured"])
        if not repeat:
            return []
        groups += repeat
    return groups


def process_spread(r: dict) -> dict | None:
    """How far a row's worker processes disagree: their per-process medians, the coefficient of variation of those
    medians and their range relative to their mean (None with a single process, which cannot show it)."""
    groups = process_runs(r)
    if r.get("remeasured"):
        groups = _baseline_groups(r)
    if len(groups) < 2:
        return None
    medians = np.array([np.median(g) for g in groups])
    mean = float(medians.mean())
    return {"processes": len(groups), "medians": [float(m) for m in medians],
            "cv": float(medians.std(ddof=1) / mean), "range": float((medians.max() - medians.min()) / mean)}


def bootstrap_ratio_ci(base_runs: list, runs: list, n: int = 2000, seed: int = 0,
                       level: float = 0.95) -> list[float]:
    """Percentile cluster bootstrap of median(base) / median(runs): the worker process is the unit of resampling.
    Each argument is a list of processes (each a list of per-run figures); a flat list of numbers is one
    process."""
    rng = np.random.default_rng(seed)
    ratios = cluster_bootstrap_medians(_as_groups(base_runs), n, rng) / cluster_bootstrap_medians(_as_groups(runs),
                                                                                                   n, rng)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))]


def _as_groups(runs: list) -> list[list[float]]:
    return [list(runs)] if runs and np.isscalar(runs[0]) else [list(g) for g in runs]


def cluster_bootstrap_medians(groups: list[list[float]], n: int, rng) -> np.ndarray:
    """n bootstrap medians of a two-level sample: draw as many processes as there are, with replacement, then in
    each drawn process as many of its runs as it has, with replacement, and take the median of the pooled draws.
    Treating the runs of 2 processes as independent would make an interval as narrow as the within-process noise
    when the processes disagree (bimodal dense rounds); resampling processes makes it as wide as they disagree."""
    sizes = np.array([len(g) for g in groups])
    k, m = len(groups), int(sizes.max())
    table = np.full((k, m), np.nan)
    for i, g in enumerate(groups):
        table[i, :len(g)] = g
    procs = rng.integers(0, k, (n, k))
    drawn_sizes = sizes[procs][..., None]  # (n, k, 1): runs the drawn process has
    picks = (rng.random((n, k, m)) * drawn_sizes).astype(int)
    values = np.where(np.arange(m) < drawn_sizes, table[procs[..., None], picks], np.nan)
    return np.nanmedian(values.reshape(n, k * m), axis=1)


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


AA_SUFFIX = " (A/A)"
# without an A/A control (runs from before it existed), nothing is called a speedup within this of 1.0x: the
# per-process variation seen on a shared CPU
FLOOR_WITHOUT_AA = 0.10


def is_aa_control(r: dict) -> bool:
    """The dense deployment measured as if it were a second model, interleaved like the others: its 'speedup'
    against dense is what this run's noise alone makes of a ratio."""
    return bool(r.get("aa_control"))


def aa_floor(block: dict) -> float:
    """The noise floor an A/A ratio gives: how far its 95% interval reaches from 1.0x on either side (the estimate
    where it has no interval)."""
    lo, hi = block.get("decode_ci95") or [block["decode"]] * 2
    return max(abs(1 - lo), abs(hi - 1))


def aa_floors(results: list[dict]) -> dict[tuple, float]:
    """(pair_key, precision) -> the A/A floor measured on that engine setup."""
    return {(pair_key(r), precision_of(r)): aa_floor(sparsity_speedup(r)) for r in results
            if is_aa_control(r) and sparsity_speedup(r)}


def noise_floor(results: list[dict], r: dict | None = None) -> dict:
    """The half-width around 1.0x inside which a decode ratio is not told from noise: the A/A floor of the row's
    own engine setup where one was measured, else the largest A/A floor of the run; a run without any A/A control
    falls back to its dense drift and the dense-kernel engines' spread, never below FLOOR_WITHOUT_AA."""
    floors = aa_floors(results)
    if r is not None and (pair_key(r), precision_of(r)) in floors:
        return {"value": floors[pair_key(r), precision_of(r)], "source": "A/A"}
    if floors:
        return {"value": max(floors.values()), "source": "A/A (largest of the run)"}
    deviations = [abs(d) for d in dense_drift(results).values()] + [abs(x - 1) for x in control_spread(results)]
    return {"value": max([FLOOR_WITHOUT_AA, *deviations]), "source": "no A/A control: dense drift and control engines"}


def lower_end(block: dict) -> float:
    """A decode ratio's 95% interval's lower end where it has one, else the estimate: what a claim rests on."""
    ci = block.get("decode_ci95")
    return ci[0] if ci else block["decode"]


def is_win(block: dict | None, floor: float) -> bool:
    """A speedup is claimed only when its interval clears both 1.0x and the A/A floor above it."""
    return bool(block) and lower_end(block) > 1 + max(floor, 0.0)


def attach_floors(results: list[dict]) -> None:
    """Every row's noise floor and whether its speedup (against dense of its own precision) is a win."""
    for r in results:
        floor = noise_floor(results, r)
        r["noise_floor"] = floor
        r["win"] = not is_aa_control(r) and is_win(sparsity_speedup(r), floor["value"])


def machine_kind(machine: dict) -> tuple:
    """What two runs must share for their speedups to be compared: CPU model and ISA."""
    return machine.get("cpu_model"), tuple(machine.get("isa") or ())


def replicate_key(r: dict) -> tuple:
    """One measured pair across runs: deployment label, precision, engine, cache mode and cores."""
    return r["label"], precision_of(r), r["engine"], r["kv_cache"], cores_of(r)


def replicated(old: dict, new: dict) -> bool:
    """A speedup replicates when both runs call it a win (each against its own A/A floor) and their intervals
    overlap."""
    a, b = sparsity_speedup(old), sparsity_speedup(new)
    if not (a and b and old.get("win") and new.get("win")):
        return False
    (lo1, hi1), (lo2, hi2) = (x.get("decode_ci95") or [x["decode"]] * 2 for x in (a, b))
    return lo1 <= hi2 and lo2 <= hi1


def replication(old_results: list[dict], new_results: list[dict]) -> list[dict]:
    """Per pair measured in both runs (A/A and dense rows left out): both rows and whether the speedup
    replicated."""
    old = {replicate_key(r): r for r in old_results}
    return [{"old": old[replicate_key(r)], "new": r, "replicated": replicated(old[replicate_key(r)], r)}
            for r in new_results
            if replicate_key(r) in old and sparsity_speedup(r) and not is_dense(r) and not is_aa_control(r)]


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
