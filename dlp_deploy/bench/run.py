"""`dlp-deploy bench`'s measurement: deployments x engines x core counts measured in interleaved worker processes,
an A/A control, speedups with their intervals; one results record (the sweep measures its own pairs)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..provenance import provenance
from ..runtime.deployment import load_deployment
from ..runtime.engines import ENGINES
from ..runtime.worker import EngineFailure
from .harness import (BenchSettings, bench_pair_subprocess, bench_report, check_settings, core_counts, machine_block,
                      pair_identity)
from .replicate import mark_replication
from .schedule import merge_rounds, run_interleaved
from .stats import AA_SUFFIX, attach_speedups, is_dense


def run_bench(o: dict, source: Path | None = None, earlier: dict | None = None, progress=None) -> dict:
    """Measure the options' pairs interleaved and return the results record (naming `source`, and which of
    `earlier`'s wins replicated, when this run replicates it). `progress`: a rich Progress to advance, or None."""
    deployments, engines, counts, rounds = o["deployments"], o["engines"], o["cores"], o["rounds"]
    prompt_len, gen_len, batch, runs, warmup, external_cache = (o[k] for k in (
        "prompt_len", "gen_len", "batch", "runs", "warmup", "external_cache"))
    plan = [(load_deployment(d), BenchSettings(e, c, prompt_len, gen_len, batch, runs, warmup, external_cache))
            for d, only in map(split_engine_suffix, deployments) for e in ([only] if only else engines)
            for c in core_counts(counts)]
    for dep, settings in plan:
        check_settings(settings, dep.seq_len)
    plan, not_run = runnable_pairs(plan)
    measured_models = len(plan)
    plan += _aa_plan(plan) if len(deployments) > 1 else []
    task = progress.add_task("benchmarking", total=len(plan) * rounds) if progress else None
    measured = run_interleaved(len(plan), rounds, o["order"], o["order_seed"], lambda r, i: _measure(*plan[i]),
                               on_done=(lambda r, i: progress.advance(task)) if progress else None)
    _mark_aa(measured[measured_models:])
    # a pair whose engine crashed in any round has no figures; it is named instead, as the sweep names it
    failed = [next((r["unmeasured"] for r in m if "unmeasured" in r), None) for m in measured]
    unmeasured = [f for f in failed if f is not None]
    results = [merge_rounds(m) for m, f in zip(measured, failed) if f is None]
    _unique_labels(results)
    attach_speedups(results)
    report = {**bench_report(results, machine_block(counts), unmeasured), "not_run": not_run, "settings": o,
              "provenance": provenance(**({"replicates": str(source)} if source else {}))}
    if earlier is not None:
        report.update(replicates=str(source), replication=mark_replication(earlier["results"], results))
    return report


def split_engine_suffix(deployment: str) -> tuple[str, str | None]:
    """FOLDER@ENGINE measures FOLDER on ENGINE only (a 7 GB fp32 graph need not compile on every engine of the run);
    a folder whose own name holds an @ is itself."""
    folder, at, engine = str(deployment).rpartition("@")
    if not at or Path(deployment).is_dir():
        return str(deployment), None
    if engine not in ENGINES:
        raise UserError(f"{deployment}: {engine!r} after @ is not an engine; give FOLDER@ENGINE with one of "
                        f"{', '.join(ENGINES)}, or the folder alone")
    return folder, engine


def runnable_pairs(plan: list[tuple]) -> tuple[list[tuple], list[dict]]:
    """The pairs whose engine runs the deployment, and the others with the engine's reason (a w8 or int4 folder
    on DeepSparse when one bench also measures INT8 there). A deployment no engine runs is the user's mistake."""
    keep, not_run, refusals = [], [], {}
    for dep, settings in plan:
        try:
            dep.check_engine(settings.session_kind)
            keep.append((dep, settings))
        except UserError as exc:
            refusals.setdefault(dep.folder, exc)
            not_run.append({"label": dep.folder.name, "model": str(dep.folder), "engine": settings.session_kind,
                            "reason": str(exc)})
    for folder, exc in refusals.items():
        if not any(dep.folder == folder for dep, _ in keep):
            raise exc
    return keep, not_run


def _measure(dep, settings) -> dict:
    """One round of one pair, or {"unmeasured": what names the pair and how its engine failed}."""
    try:
        return bench_pair_subprocess(dep.folder, settings)
    except EngineFailure as exc:
        return {"unmeasured": {"label": dep.folder.name, "model": str(dep.folder), **pair_identity(settings),
                               "reason": str(exc), **exc.record}}


def _aa_plan(plan: list[tuple]) -> list[tuple]:
    """The A/A control: on every engine, the first dense deployment that engine runs measured again at every core
    count, last in each round (ABBA then puts it at the other end from the dense pair it is compared with). Per
    engine, because a GGUF (llama.cpp) and an ONNX folder (the others) never run on the same engine."""

    def dense(dep) -> bool:
        zeros = dep.info.get("weight_sparsity") or {}
        return is_dense({"source": dep.info.get("source"), "sparsity": zeros.get("global", 0.0),
                         "pytorch_sparsity": zeros.get("pytorch_global")})

    first: dict[str, object] = {}
    for dep, settings in plan:
        if dense(dep):
            first.setdefault(settings.engine, dep.folder)
    # load_deployment makes one object per (folder, engine) pair: compare folders, not objects
    return [(dep, settings) for dep, settings in plan if first.get(settings.engine) == dep.folder]


def _mark_aa(measured: list[list[dict]]) -> None:
    """Label the A/A pairs' rounds (and their unmeasured records) as the control, before they are merged."""
    for rounds in measured:
        for r in rounds:
            record = r.get("unmeasured", r)
            record["label"] = record["label"] + AA_SUFFIX
            r["aa_control"] = True


def _unique_labels(results: list[dict]) -> None:
    """Folder names label results; where two deployments share a name, their paths do."""
    paths: dict[str, set] = {}
    for r in results:
        paths.setdefault(r["label"], set()).add(r["model"])
    for r in results:
        if len(paths[r["label"]]) > 1:
            r["label"] = r["model"]
