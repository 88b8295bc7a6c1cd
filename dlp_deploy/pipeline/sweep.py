"""A sparsity sweep: prune -> eval -> export -> bench for every level and allocation plus the dense model.

Every finished step leaves its file in RUN_DIR and is skipped on the next start, so an interrupted sweep resumes.
Layout: run.json (settings), models/<label>/, eval/<label>.json, deploy/<label>/, bench/<label>.<engine>.json,
and results.json, the one file `dlp-deploy report` reads. A sweep on a Ray cluster (pipeline/executors.py) adds
executor.json (its nodes and every task's attempts) and, where its nodes are of several CPU kinds, measures on
each kind into machines/<kind>/bench/.
"""
from __future__ import annotations

import json
import tomllib
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..data import default_seqlen
from ..errors import UserError
from ..io import write_json_atomic
from ..models import load_config
from ..provenance import provenance
from ..prune.masks import NM_COUNTS, parse_pattern
from ..prune.structured import DEFAULT_IMPORTANCE
from ..runtime.deployment import EXPORT_FILE
from ..runtime.engines import ENGINES, NBITS_REFUSALS
from ..runtime.worker import EngineFailure
from ..bench.harness import (BenchSettings, bench_pair_subprocess, check_cores, check_settings, core_counts,
                      machine_block, pair_identity)
from ..bench.records import (ONNX_PRECISIONS, RESULT_SCHEMA_VERSION, SWEEP_SCHEMA, fits, perplexity_by, q_of,
                      random_model_record, scoring_engine)
from ..bench.stats import AA_SUFFIX, attach_speedups, removed_from_source

DENSE = "dense"


@dataclass
class SweepSettings:
    model: str
    sparsities: list[float]
    method: str = "wanda"
    allocations: list[str] = field(default_factory=lambda: ["dlp", "uniform"])
    engines: list[str] = field(default_factory=lambda: ["deepsparse", "onnxruntime"])
    calib: str = "c4"
    nsamples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    ppl: list[str] = field(default_factory=lambda: ["wikitext2"])
    eval_seqlen: int = 2048
    max_windows: int | None = None
    seq_len: int = 512
    validate: bool = True
    # one count (None: all usable), or a list: every pair is then measured at each count (scaling with cores)
    cores: int | list[int] | None = None
    prompt_len: int = 64
    gen_len: int = 128
    runs: int = 5
    warmup: int = 1
    external_cache: bool = False
    device: str = "cpu"
    # pruning forms: each pattern runs at every sparsity x allocation (a fixed N:M once, uniform); structured
    # pruning (when `structure` is set) at structure_sparsities x structure_allocations x importances
    patterns: list[str] = field(default_factory=lambda: ["unstructured"])
    structure: str | None = None
    structure_sparsities: list[float] | None = None
    structure_allocations: list[str] | None = None
    importances: list[str] = field(default_factory=lambda: [DEFAULT_IMPORTANCE])
    multiple: int = 8
    # every level exported in each precision: fp32 and int8 as ONNX, GGUF formats (q4_1, q8_0, ...) for llama.cpp;
    # a sweep with more than fp32 scores every deployment itself (ONNX Runtime, or llama.cpp for GGUF)
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    # each (level, precision, engine) measured in `rounds` worker processes, interleaved (bench/schedule.py); the
    # bootstrap resamples processes, so fewer than 3 leave it next to nothing to resample
    rounds: int = 3
    order: str = "abba"
    order_seed: int = 0
    alpha: float | None = None  # DLP's spread; None: the paper's App. G value per level
    # depth pruning (LLM-Streamline): one level per replacement, cutting `depth_ratio` of the decoder layers
    depth: list[str] = field(default_factory=list)
    depth_ratio: float = 0.25
    # recovery fine-tuning: every level whose label matches one of these patterns (fnmatch) gets a twin
    # "<label>+recovery", LoRA-trained from it with the zeros kept
    recover: list[str] = field(default_factory=list)
    recover_steps: int = 100
    # seconds one benchmark worker (compile and runs) may take; a pair past it is reported as not measured
    bench_timeout: float | None = None


@dataclass(frozen=True)
class Level:
    label: str
    sparsity: float | None  # None: the dense model
    allocation: str | None
    pattern: str = "unstructured"
    structure: str | None = None
    importance: str | None = None
    replacement: str | None = None  # depth pruning: what replaces the cut span (none, ffn, swiglu, layer)
    base: str | None = None  # a recovered level: the label of the level it was trained from
    aa_control: bool = False  # the dense deployment measured again as if it were another model (the A/A control)

    @property
    def form(self) -> str:
        if self.sparsity is None:
            return "dense"
        return "structured" if self.structure else ("depth" if self.replacement else self.pattern)

    @property
    def recovered(self) -> bool:
        return self.base is not None

    @property
    def variant(self) -> str | None:
        """What a series of levels shares (report tables and plots group by it); unstructured keeps the bare
        allocation name, as reports before the other forms had it."""
        if self.sparsity is None:
            return None
        if self.structure:
            name = f"structured {self.importance}, {self.allocation}"
        elif self.replacement:
            name = f"depth, {self.replacement}"
        else:
            name = self.allocation if self.pattern == "unstructured" else f"{self.pattern}, {self.allocation}"
        return f"{name} +recovery" if self.recovered else name


def levels(sweep: SweepSettings) -> list[Level]:
    out = [Level(DENSE, None, None)]
    for text in sweep.patterns:
        pattern = parse_pattern(text)
        if pattern.kind == "nm":
            out.append(Level(f"{sweep.method}-{pattern.n}of{pattern.m}", pattern.fixed_sparsity, "uniform",
                             str(pattern)))
            continue
        tag = "" if pattern.kind == "unstructured" else f"mixed{pattern.m}-"
        for p in sweep.sparsities:
            out += [Level(f"{sweep.method}-{tag}{_folder_safe(a)}-{p:.2f}", p, a, str(pattern))
                    for a in sweep.allocations]
    if sweep.structure:
        for p in sweep.structure_sparsities or sweep.sparsities:
            for imp in sweep.importances:
                out += [Level(f"structured-{imp}-{_folder_safe(a)}-{p:.2f}", p, a, "unstructured", sweep.structure, imp)
                        for a in (sweep.structure_allocations or sweep.allocations)]
    out += [Level(f"streamline-{r}-{sweep.depth_ratio:.2f}", sweep.depth_ratio, f"streamline-{r}", replacement=r)
            for r in sweep.depth]
    return out + recovered_levels(sweep, out)


RECOVERED = "+recovery"


def recovered_levels(sweep: SweepSettings, plan: list[Level]) -> list[Level]:
    """A twin of every pruned level whose label matches a --recover pattern; they come last, after their bases."""
    from fnmatch import fnmatchcase

    return [replace(level, label=level.label + RECOVERED, base=level.label) for level in plan
            if level.sparsity is not None and any(fnmatchcase(level.label, p) for p in sweep.recover)]


def prepare_waves(plan: list[Level]) -> list[list[Level]]:
    """Levels that can be prepared in any order, wave after wave: a recovered level trains from its base's
    folder, so it waits for the wave that makes it."""
    return [w for w in ([lv for lv in plan if not lv.recovered], [lv for lv in plan if lv.recovered]) if w]


def _folder_safe(allocation: str) -> str:
    """An allocation as part of a folder name: an expression's ':', '>' and ',' become '_' (expr_abslog_var_atan)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in allocation)


def level_settings(sweep: SweepSettings, level: Level):
    from ..prune.settings import prune_settings
    from ..prune.allocate import get_allocator

    # --alpha is the spread of the allocations that have one (dlp, expr:...); the others ignore it
    alpha = sweep.alpha if level.allocation and get_allocator(level.allocation).uses_alpha else None
    return prune_settings(level.sparsity, sweep.method, level.allocation, alpha, pattern=level.pattern,
                          structure=level.structure, importance=level.importance or DEFAULT_IMPORTANCE,
                          multiple=sweep.multiple)


def precision_format(precision: str) -> str:
    from ..export.gguf import GGUF_QUANTS

    if precision in ONNX_PRECISIONS:
        return "onnx"
    if precision in GGUF_QUANTS:
        return "gguf"
    raise UserError(f"unknown precision {precision!r}; choose from {', '.join(ONNX_PRECISIONS + tuple(GGUF_QUANTS))}")


def runs_on(engine: str, precision: str) -> bool:
    """Whether `engine` reads the file format `precision` is exported to (llama.cpp GGUF, the others ONNX) and
    runs its weights (DeepSparse has no blockwise 4- or 8-bit ones)."""
    refused = engine in NBITS_REFUSALS.get(precision, {})
    return dict.get(ENGINES, engine).model_format == precision_format(precision) and not refused


def resolve_windows(sweep: SweepSettings) -> SweepSettings:
    """The calibration and perplexity windows left None, resolved to min(2048, the model's context) before any
    work, so that run.json and the report hold the number."""
    if sweep.calib_seqlen is not None and sweep.eval_seqlen is not None:
        return sweep
    window = default_seqlen(load_config(sweep.model)[1])
    return replace(sweep, calib_seqlen=sweep.calib_seqlen or window, eval_seqlen=sweep.eval_seqlen or window)


def check_sweep(sweep: SweepSettings, run_dir: Path) -> None:
    plan = levels(sweep)
    for level in plan[1:]:
        if level.replacement:
            streamline_settings(sweep, level)
        elif not level.recovered:
            level_settings(sweep, level)
    if sweep.recover and not any(lv.recovered for lv in plan):
        raise UserError(f"--recover {','.join(sweep.recover)} matches no level; level labels look like "
                        f"{plan[-1].label if len(plan) > 1 else 'wanda-dlp-0.50'} (patterns may use * and ?)")
    if any(lv.recovered for lv in plan):
        recover_settings(sweep)
    for engine in sweep.engines:
        ENGINES[engine]  # noqa: B018 - unknown or uninstalled engines refuse here, before any work
    for precision in sweep.precisions:
        if not any(runs_on(e, precision) for e in sweep.engines):
            fmt = precision_format(precision)
            raise UserError(f"--precision {precision} makes {fmt.upper()} deployments and none of --engines "
                            f"{','.join(sweep.engines)} runs them; add "
                            + ("llamacpp" if fmt == "gguf" else "onnxruntime"))
    check_cores(sweep.cores)
    if sweep.bench_timeout is not None and not sweep.bench_timeout > 0:
        raise UserError(f"--bench-timeout {sweep.bench_timeout:g}: give a positive number of seconds, or leave it out")
    for engine in sweep.engines:
        for cores in core_counts(sweep.cores):
            check_settings(_bench_settings(sweep, engine, cores), sweep.seq_len)
    saved = run_dir / "run.json"
    if saved.is_file():
        run = json.loads(saved.read_text())
        _check_nm_meaning(run, run_dir)
        before = run["settings"]
        grows = ("sparsities", "allocations", "engines", "patterns", "structure_sparsities", "structure_allocations",
                 "importances", "precisions", "depth", "recover")
        free = ("bench_timeout",)  # a limit on waiting, not on what is measured
        changed = sorted(k for k, v in asdict(sweep).items() if k not in grows + free and before.get(k, v) != v)
        if changed:
            raise UserError(f"{run_dir} holds a sweep with other settings ({', '.join(changed)}); resume it with the "
                            "same options or choose a new --out")


def _check_nm_meaning(run: dict, run_dir: Path) -> None:
    """A run written while N in N:M counted the weights pruned holds other levels under the same names (its 1:4
    was 25% sparse); only 2:4 and 4:8 mean the same either way."""
    if run.get("nm_counts") == NM_COUNTS:
        return
    for text in run["settings"].get("patterns") or []:
        pattern = parse_pattern(text)
        if pattern.kind == "nm" and 2 * pattern.n != pattern.m:
            raise UserError(f"{run_dir} was swept when N in --pattern {text} counted pruned weights (now kept: "
                            f"{text} is {pattern.fixed_sparsity:.0%} sparse); choose a new --out")


def _bench_settings(sweep: SweepSettings, engine: str, cores: int | None) -> BenchSettings:
    return BenchSettings(engine, cores, sweep.prompt_len, sweep.gen_len, 1, sweep.runs, sweep.warmup,
                         sweep.external_cache)


def _most_cores(sweep: SweepSettings) -> int | None:
    """Export validation and deployment perplexity run once, at the largest count measured."""
    return core_counts(sweep.cores)[-1]


# what run.json keeps beside `settings`; a recipe (`dlp-deploy sweep --recipe`) may hold them and they are not read
RUN_RECORDS = ("nm_counts", "provenance", "recipe")


def run_record(sweep: SweepSettings, recipe: dict | None = None) -> dict:
    """run.json: the settings (a recipe that replays this run), the N:M meaning, provenance, and where the
    settings came from when a recipe gave them ({"file": its path, "overridden": the fields the command line
    set})."""
    return {"settings": asdict(sweep), "nm_counts": NM_COUNTS, "provenance": provenance(),
            **({"recipe": recipe} if recipe is not None else {})}


def read_recipe(path: Path) -> dict:
    """A sweep recipe's settings: a run.json, or a TOML file (.toml) with the same [settings] table. Keys that
    SweepSettings does not have, values of another type, and tables beside it are refused in one line; keys it
    leaves out take their default (the command line's, in `dlp-deploy sweep --recipe`)."""
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # TOML and JSON decode errors are ValueErrors
        raise UserError(f"--recipe {path} is not a readable recipe ({' '.join(str(exc).split())}); give a "
                        "sweep's run.json or a .toml file with a [settings] table") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise UserError(f"--recipe {path} has no [settings] table; give a sweep's run.json or a .toml file with "
                        "one")
    beside = sorted(set(data) - {"settings", *RUN_RECORDS})
    if beside:
        raise UserError(f"--recipe {path}: unknown key {', '.join(beside)} beside [settings] (a recipe holds "
                        f"settings, and what run.json keeps: {', '.join(RUN_RECORDS)})")
    hints = typing.get_type_hints(SweepSettings)
    settings = data["settings"]
    unknown = sorted(set(settings) - set(hints))
    if unknown:
        raise UserError(f"--recipe {path}: unknown setting {', '.join(unknown)}; a sweep's settings are "
                        f"{', '.join(hints)}")
    for key, value in settings.items():
        if not fits(value, hints[key]):
            raise UserError(f"--recipe {path}: {key} = {value!r} is not of type {_type_text(hints[key])}")
    return dict(settings)


def _type_text(hint) -> str:
    if typing.get_origin(hint) is None and isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def apply_recipe(sweep: SweepSettings, recipe: dict, given: set[str]) -> SweepSettings:
    """`sweep` (built from the command line) with the recipe's values, except the fields in `given` (set by
    options the user typed, which override the recipe)."""
    return replace(sweep, **{k: v for k, v in recipe.items() if k not in given})


def run_sweep(sweep: SweepSettings, run_dir: Path, progress=None, log=print, prepare_only: bool = False,
              executor: str = "local", executor_options: dict | None = None, recipe: dict | None = None) -> dict | None:
    """All models are prepared first (prune, eval, export: heavy, order-free), then benchmarked in interleaved
    rounds, so no preparation work shares the CPU with a measurement and drift spreads over every level.
    `prepare_only` stops before the benchmarks (they resume from the prepared folders on the next start).
    `executor` says where the work runs (pipeline/executors.py: local, this process; ray, a Ray cluster) with its
    `executor_options`; results.json has the same form whichever ran it. `recipe`: where the settings came from
    (run_record), kept in run.json."""
    from .executors import get_executor

    run_dir = Path(run_dir)
    runner = get_executor(executor)(sweep, run_dir, progress, log, **(executor_options or {}))  # refuses before work
    check_sweep(sweep, run_dir)
    with runner:  # a cluster is reached (or started) before anything is written
        write_json_atomic(run_dir / "run.json", run_record(sweep, recipe), force=True)
        prepared = runner.prepare(levels(sweep))
        if prepare_only:
            log(f"prepared {len(prepared)} levels in {run_dir}; run the same command without --prepare-only to "
                "measure")
            return None
        measured = runner.measure(sweep_pairs(sweep, prepared), sweep.rounds, sweep.order, sweep.order_seed)
    return write_results(sweep, run_dir, prepared, measured.pairs, measured.rounds, measured.machine)


def sweep_pairs(sweep: SweepSettings, prepared: list[tuple]) -> list[tuple]:
    """(level, precision, deployment folder, engine, cores) for every measurement of a round; the core count is
    one more interleaved item, so a drifting machine spreads over every count as well. The A/A pairs come last,
    so ABBA puts them at the other end of each round from the dense model they are compared with."""
    pairs = [(level, precision, deploys[precision], engine, cores) for level, _, deploys, _ in prepared
             for precision in sweep.precisions for engine in sweep.engines for cores in core_counts(sweep.cores)
             if runs_on(engine, precision)]
    return pairs + aa_pairs(sweep, prepared)


AA_LEVEL = "dense-aa"  # its bench files' stem; its result rows are labelled "dense (A/A)"


def aa_pairs(sweep: SweepSettings, prepared: list[tuple]) -> list[tuple]:
    """The A/A control: on every engine and core count, the dense deployment (in the first precision the engine
    runs) measured as a second model; its speedup against dense is the run's noise floor."""
    dense = next(((lv, deploys) for lv, _, deploys, _ in prepared if lv.sparsity is None), None)
    if dense is None or len(prepared) < 2:
        return []
    level, deploys = dense
    aa = replace(level, label=AA_LEVEL, aa_control=True)
    return [(aa, precision, deploys[precision], engine, cores) for engine in sweep.engines
            for precision in [next((p for p in sweep.precisions if runs_on(engine, p)), None)] if precision
            for cores in core_counts(sweep.cores)]


def pairs_per_level(sweep: SweepSettings) -> int:
    return sum(runs_on(e, p) for p in sweep.precisions for e in sweep.engines) * len(core_counts(sweep.cores))


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


def streamline_settings(sweep: SweepSettings, level: Level):
    from ..prune.depth import StreamlineSettings, validate_settings

    # the calibration the prunes use (corpus, windows, window length), so every form sees the same text
    settings = StreamlineSettings(ratio=level.sparsity, replacement=level.replacement, calib=sweep.calib,
                                  nsamples=sweep.nsamples, seqlen=sweep.calib_seqlen, seed=sweep.seed)
    validate_settings(settings)
    return settings


def recover_settings(sweep: SweepSettings):
    from ..prune.recover import RecoverSettings, validate_settings

    settings = RecoverSettings(steps=sweep.recover_steps, seqlen=sweep.calib_seqlen, seed=sweep.seed)
    validate_settings(settings)
    return settings


def streamline_step(sweep: SweepSettings, run_dir: Path, level: Level, progress, log) -> Path:
    from ..models import STREAMLINE_FILE
    from ..prune.depth import streamline_to_folder

    out = run_dir / "models" / level.label
    if not (out / STREAMLINE_FILE).is_file():
        log(f"[{level.label}] streamlining")
        streamline_to_folder(sweep.model, out, streamline_settings(sweep, level), sweep.device, force=True,
                             progress=progress)
    return out


def recover_step(sweep: SweepSettings, run_dir: Path, level: Level, progress, log) -> Path:
    from ..prune.recover import recover_to_folder

    out = run_dir / "models" / level.label
    if not (out / "recovery.json").is_file():
        log(f"[{level.label}] recovery fine-tuning")  # first: an executor's dry run stops at the first log
        base = run_dir / "models" / level.base
        if not base.is_dir():
            raise UserError(f"{base} is missing: recovering {level.label} needs its base level prepared first")
        recover_to_folder(str(base), out, recover_settings(sweep), sweep.device, force=True, progress=progress)
    return out


def prune_step(sweep: SweepSettings, run_dir: Path, level: Level, progress, log) -> Path:
    from ..prune.to_folder import prune_to_folder

    out = run_dir / "models" / level.label
    if not (out / "pruning.json").is_file():
        log(f"[{level.label}] pruning")
        prune_to_folder(sweep.model, out, level_settings(sweep, level), sweep.calib, sweep.nsamples,
                        sweep.calib_seqlen, sweep.seed, sweep.device, force=True, progress=progress)
    return out


def eval_step(sweep: SweepSettings, run_dir: Path, level: Level, model_ref: str, progress, log) -> dict:
    from ..eval.evaluate import evaluate

    out = run_dir / "eval" / f"{level.label}.json"
    if not out.is_file():
        log(f"[{level.label}] perplexity")
        result = evaluate(model_ref, sweep.ppl, sweep.eval_seqlen, sweep.max_windows, device=sweep.device,
                          progress=progress)
        write_json_atomic(out, result, force=True)
    return json.loads(out.read_text())


def _deploy_name(level: Level, precision: str) -> str:
    return level.label if precision == "fp32" else f"{level.label}.{precision}"


def export_step(sweep: SweepSettings, run_dir: Path, level: Level, model_ref: str, log,
                precision: str = "fp32") -> Path:
    from ..export.deployment import (QualityCheck, QuantizeOptions, default_ppl_tolerance, export_deployment,
                                     export_gguf_deployment)

    out = run_dir / "deploy" / _deploy_name(level, precision)
    if (out / EXPORT_FILE).is_file():
        return out
    if precision_format(precision) == "gguf":
        log(f"[{out.name}] export GGUF")
        export_gguf_deployment(model_ref, out, precision, seq_len=sweep.seq_len, validate=sweep.validate, force=True,
                               num_cores=_most_cores(sweep))
    else:
        log(f"[{out.name}] export")
        export_deployment(model_ref, out, seq_len=sweep.seq_len, validate=sweep.validate, force=True,
                          num_cores=_most_cores(sweep),
                          quantize=None if precision == "fp32" else QuantizeOptions(precision, seed=sweep.seed),
                          quality=QualityCheck(tolerance=default_ppl_tolerance(precision)))
    return out


def deployment_eval_step(sweep: SweepSettings, run_dir: Path, level: Level, deploy: Path, precision: str, log) -> dict:
    """The deployment's own perplexity (an ONNX graph on ONNX Runtime, a GGUF file on llama.cpp), windows of the
    export window minus one: every precision compared on the same protocol."""
    from ..eval.evaluate import evaluate_deployment

    engine = scoring_engine(precision)
    out = run_dir / "eval" / f"{_deploy_name(level, precision)}.{engine}.json"
    if not out.is_file():
        log(f"[{deploy.name}] deployment perplexity ({engine})")
        result = evaluate_deployment(str(deploy), engine, sweep.ppl, None, sweep.max_windows, _most_cores(sweep))
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
    settings = _bench_settings(sweep, engine, cores)
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
    return run_dir / "bench" / f"{_deploy_name(level, precision)}.{engine}{tag}.r{round_}.json"


def write_results(sweep: SweepSettings, run_dir: Path, prepared: list[tuple], pairs: list[tuple],
                  measured: list[list[dict]], machine: dict | None = None) -> dict:
    """`machine`: the measuring machine's block where an executor measured it (a cluster's bench node); None
    measures this one."""
    from ..bench.schedule import merge_rounds

    quality, meta = [], {}
    for level, q, deploys, deploy_quality in prepared:
        export_info = json.loads((Path(deploys[sweep.precisions[0]]) / "export.json").read_text())
        form = {"form": level.form, "variant": level.variant, "importance": level.importance,
                "recovered": level.recovered}
        entry = {"label": level.label, "allocation": level.allocation, **form,
                 "target_sparsity": level.sparsity or 0.0, "sparsity": q["weight_sparsity"],
                 "removed": removed_from_source(export_info["source"]),
                 "perplexity": q["perplexity"], "perplexity_details": q["perplexity_details"],
                 "validation": _validation_summary(export_info),
                 "deployment_perplexity": {p: (dq or {}).get("perplexity") for p, dq in deploy_quality.items()},
                 "deployment_perplexity_details": {p: (dq or {}).get("perplexity_details")
                                                   for p, dq in deploy_quality.items()},
                 **model_records(run_dir, level)}
        quality.append(entry)
        meta[level.label] = (form, entry)
    settings = asdict(sweep)
    results, unmeasured = [], []
    for (level, precision, *_), rounds in zip(pairs, measured):
        form, entry = meta[DENSE if level.aa_control else level.label]
        missed = next((r for r in rounds if "unmeasured" in r), None)
        if missed is not None:  # a pair with a round that never finished has no figures to merge or compare
            unmeasured.append({"label": level.label, "precision": precision, "engine": missed["engine"],
                               "kv_cache": missed["kv_cache"], "cores": missed["cores"],
                               "reason": missed["unmeasured"],
                               **({"machine": missed["machine"]} if "kind" in missed["machine"] else {})})
            continue
        results.append({**merge_rounds(rounds), "allocation": level.allocation, **form, "precision": precision,
                        "target_sparsity": level.sparsity or 0.0, "removed": entry["removed"],
                        "perplexity": q_of(entry, precision), "perplexity_by": perplexity_by(settings, entry, precision),
                        **({"label": DENSE + AA_SUFFIX, "aa_control": True} if level.aa_control else {})})
    attach_speedups(results)
    report = {"schema": SWEEP_SCHEMA, "schema_version": RESULT_SCHEMA_VERSION, "settings": settings,
              "machine": machine or machine_block(sweep.cores), "quality": quality, "results": results,
              "unmeasured": unmeasured, "provenance": provenance(),
              "random_weights": random_model_record(sweep.model), **replicates_record(run_dir)}
    write_json_atomic(run_dir / "results.json", report, force=True)
    return report


def model_records(run_dir: Path, level: Level) -> dict:
    """What the depth cut and the recovery fine-tune did, from the level's model folder, for the report."""
    folder = run_dir / "models" / level.label
    out = {}
    if level.replacement or (level.recovered and (folder / "streamline.json").is_file()):
        record = json.loads((folder / "streamline.json").read_text())
        training = record.get("training") or {}
        out["depth"] = {"layers_removed": record["removed"]["count"], "num_layers": record["num_layers"],
                        "span": [record["removed"]["start"], record["removed"]["end"]],
                        "replacement": record["replacement"]["kind"], "cosine": record["selected_cosine"],
                        "mse_after": training.get("mse_after"), "mse_drop_span": training.get("mse_drop_span"),
                        "train_tokens": training.get("tokens"), "seconds": sum(record["timings"].values())
                        + (training.get("seconds") or 0.0)}
    if level.recovered:
        record = json.loads((folder / "recovery.json").read_text())
        out["recovery"] = {"base": level.base, "steps": record["training"]["steps"],
                           "tokens": record["training"]["tokens"], "wall_s": record["wall_s"],
                           "held_out_perplexity": record["perplexity"], "zeros": record["mask"]}
    return out


def replicates_record(run_dir: Path) -> dict:
    """{"replicates": the earlier run's folder} where this run re-measures one (pipeline/replicate.py)."""
    path = run_dir / "replicates.json"
    return {"replicates": json.loads(path.read_text())["run"]} if path.is_file() else {}


def _validation_summary(export_info: dict) -> dict | None:
    v = export_info.get("validation")
    if not v:
        return None
    return {engine: {k: v[engine].get(k) for k in ("max_abs_logit_diff", "greedy_match", "fraction_of_supported_ops")
                     if k in v[engine]} for engine in v if isinstance(v[engine], dict) and "greedy_match" in v[engine]}
