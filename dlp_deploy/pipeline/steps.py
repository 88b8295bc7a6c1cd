"""A sweep's steps, one level or one measured round at a time: prune, streamline or recover the level's model,
score it, export and score its deployments, measure one round of one pair. Each step leaves its file in RUN_DIR
and is skipped when the file is there, so an interrupted sweep resumes; each logs before it works, so an
executor's dry run (executors.py) finds what is left without doing it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..bench.harness import BenchSettings, bench_pair_subprocess, core_counts, pair_identity
from ..bench.records import scoring_engine
from ..errors import UserError
from ..eval.evaluate import evaluate, evaluate_deployment
from ..export.deployment import (QualityCheck, QuantizeOptions, default_ppl_tolerance, export_deployment,
                                 export_gguf_deployment)
from ..io import write_json_atomic
from ..models import STREAMLINE_FILE
from ..prune.depth import streamline_to_folder
from ..prune.recover import recover_to_folder
from ..prune.to_folder import prune_to_folder
from ..runtime.deployment import EXPORT_FILE
from ..runtime.worker import EngineFailure
from .levels import (Level, SweepSettings, bench_settings, level_settings, precision_format, recover_settings,
                     streamline_settings)


def prepare_level(sweep: SweepSettings, run_dir: Path, level: Level, progress, log) -> tuple:
    """(level, PyTorch quality, {precision: deployment folder}, {precision: deployment eval or None})."""
    model_ref = sweep.model if level.sparsity is None else str(model_step(sweep, run_dir, level, progress, log))
    quality = eval_step(sweep, run_dir, level, model_ref, progress, log)
    deploys = {p: export_step(sweep, run_dir, level, model_ref, log, p) for p in sweep.precisions}
    deploy_quality = {p: deployment_eval_step(sweep, run_dir, level, deploys[p], p, log) if sweep.precisions != ["fp32"]
                      else None for p in sweep.precisions}
    return level, quality, deploys, deploy_quality


def model_step(sweep: SweepSettings, run_dir: Path, level: Level, progress, log) -> Path:
    """The level's model folder: recovered from its base, streamlined, or pruned."""
    if level.recovered:
        return recover_step(sweep, run_dir, level, progress, log)
    if level.replacement:
        return streamline_step(sweep, run_dir, level, progress, log)
    return prune_step(sweep, run_dir, level, progress, log)


def streamline_step(sweep: SweepSettings, run_dir: Path, level: Level, progress, log) -> Path:
    out = run_dir / "models" / level.label
    if not (out / STREAMLINE_FILE).is_file():
        log(f"[{level.label}] streamlining")
        streamline_to_folder(sweep.model, out, streamline_settings(sweep, level), sweep.device, force=True,
                             progress=progress)
    return out


def recover_step(sweep: SweepSettings, run_dir: Path, level: Level, progress, log) -> Path:
    out = run_dir / "models" / level.label
    if not (out / "recovery.json").is_file():
        log(f"[{level.label}] recovery fine-tuning")  # first: an executor's dry run stops at the first log
        base = run_dir / "models" / level.base
        if not base.is_dir():
            raise UserError(f"{base} is missing: recovering {level.label} needs its base level prepared first")
        recover_to_folder(str(base), out, recover_settings(sweep), sweep.device, force=True, progress=progress)
    return out


def prune_step(sweep: SweepSettings, run_dir: Path, level: Level, progress, log) -> Path:
    out = run_dir / "models" / level.label
    if not (out / "pruning.json").is_file():
        log(f"[{level.label}] pruning")
        calibration = sweep.calibration
        prune_to_folder(sweep.model, out, level_settings(sweep, level), calibration.corpus, calibration.nsamples,
                        calibration.seqlen, calibration.seed, sweep.device, force=True, progress=progress)
    return out


def eval_step(sweep: SweepSettings, run_dir: Path, level: Level, model_ref: str, progress, log) -> dict:
    out = run_dir / "eval" / f"{level.label}.json"
    if not out.is_file():
        log(f"[{level.label}] perplexity")
        result = evaluate(model_ref, sweep.eval.ppl, sweep.eval.seqlen, sweep.eval.max_windows, device=sweep.device,
                          progress=progress)
        write_json_atomic(out, result, force=True)
    return json.loads(out.read_text())


def deploy_name(level: Level, precision: str) -> str:
    return level.label if precision == "fp32" else f"{level.label}.{precision}"


def export_step(sweep: SweepSettings, run_dir: Path, level: Level, model_ref: str, log,
                precision: str = "fp32") -> Path:
    out = run_dir / "deploy" / deploy_name(level, precision)
    if (out / EXPORT_FILE).is_file():
        return out
    if precision_format(precision) == "gguf":
        log(f"[{out.name}] export GGUF")
        export_gguf_deployment(model_ref, out, precision, seq_len=sweep.export.seq_len, validate=sweep.export.validate,
                               force=True, num_cores=_most_cores(sweep))
    else:
        log(f"[{out.name}] export")
        export_deployment(model_ref, out, seq_len=sweep.export.seq_len, validate=sweep.export.validate, force=True,
                          num_cores=_most_cores(sweep),
                          quantize=None if precision == "fp32" else QuantizeOptions(precision,
                                                                                    seed=sweep.calibration.seed),
                          quality=QualityCheck(tolerance=default_ppl_tolerance(precision)))
    return out


def deployment_eval_step(sweep: SweepSettings, run_dir: Path, level: Level, deploy: Path, precision: str, log) -> dict:
    """The deployment's own perplexity (an ONNX graph on ONNX Runtime, a GGUF file on llama.cpp), windows of the
    export window minus one: every precision compared on the same protocol."""
    engine = scoring_engine(precision)
    out = run_dir / "eval" / f"{deploy_name(level, precision)}.{engine}.json"
    if not out.is_file():
        log(f"[{deploy.name}] deployment perplexity ({engine})")
        result = evaluate_deployment(str(deploy), engine, sweep.eval.ppl, None, sweep.eval.max_windows,
                                     _most_cores(sweep))
        write_json_atomic(out, result, force=True)
    return json.loads(out.read_text())


def bench_step(sweep: SweepSettings, run_dir: Path, level: Level, precision: str, deploy: Path, engine: str,
               cores: int | None, log, round_: int = 0) -> dict:
    """One round of one pair, measured once and kept. A round that ran past --bench-timeout, or whose engine
    crashed, is kept as an `unmeasured` record (the pair is then left out of the results and named in the
    report); it is measured again by a sweep given a longer limit, or none."""
    out = bench_path(sweep, run_dir, level, precision, engine, cores, round_)
    kept = json.loads(out.read_text()) if out.is_file() else None
    if kept is not None and not _retry_unmeasured(sweep, kept):
        return kept
    on = f"{engine} with {cores} core{'s' if cores > 1 else ''}" if isinstance(sweep.cores, list) else engine
    earlier = _unmeasured_round(sweep, run_dir, level, precision, engine, cores)
    if earlier is not None:  # the same pair timed out in another round: it would again, at the same limit
        log(f"[{deploy.name}] not measured on {on}, round {round_ + 1}/{sweep.rounds}: an earlier round timed out")
        write_json_atomic(out, {**earlier, "round": round_}, force=True)
        return json.loads(out.read_text())
    log(f"[{deploy.name}] bench on {on}, round {round_ + 1}/{sweep.rounds}")
    settings = bench_settings(sweep, engine, cores)
    try:
        result = bench_pair_subprocess(deploy, settings, sweep.bench_timeout)
    except EngineFailure as exc:  # past --bench-timeout, or the engine crashed
        log(f"[{deploy.name}] not measured: {exc}")
        result = unmeasured_record(deploy, settings, str(exc), sweep.bench_timeout, round_)
    write_json_atomic(out, result, force=True)
    return json.loads(out.read_text())


def unmeasured_record(deploy: Path, settings: BenchSettings, reason: str, timeout: float, round_: int) -> dict:
    """What a timed-out round leaves: enough to name the pair in the report and to pair it with its machine."""
    return {"unmeasured": reason, "timeout_s": timeout, "label": deploy.name, "round": round_,
            **pair_identity(settings)}


def _retry_unmeasured(sweep: SweepSettings, record: dict) -> bool:
    return "unmeasured" in record and (sweep.bench_timeout is None or sweep.bench_timeout > record["timeout_s"])


def _unmeasured_round(sweep: SweepSettings, run_dir: Path, level: Level, precision: str, engine: str,
                      cores: int | None) -> dict | None:
    for r in range(sweep.rounds):
        path = bench_path(sweep, run_dir, level, precision, engine, cores, r)
        if path.is_file():
            record = json.loads(path.read_text())
            if "unmeasured" in record and not _retry_unmeasured(sweep, record):
                return record
    return None


def bench_path(sweep: SweepSettings, run_dir: Path, level: Level, precision: str, engine: str, cores: int | None,
               round_: int) -> Path:
    """Where one round of one pair is kept; a single count keeps the file names of sweeps from before core
    lists, so those resume."""
    tag = f".c{cores}" if isinstance(sweep.cores, list) else ""
    return run_dir / "bench" / f"{deploy_name(level, precision)}.{engine}{tag}.r{round_}.json"


def _most_cores(sweep: SweepSettings) -> int | None:
    """Export validation and deployment perplexity run once, at the largest count measured."""
    return core_counts(sweep.cores)[-1]
