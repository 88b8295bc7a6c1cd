"""What a sweep is, before any work: its settings, the levels they make (dense, pruned, depth-cut, recovered), the
settings each level's stage takes, the (level, precision, engine, cores) pairs a round measures, and the checks
that refuse a sweep in one line before anything is written. Nothing here prunes, exports or measures: that is
steps.py, run by an executor (executors.py) for sweep.run_sweep.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path

from ..bench.harness import BenchSettings, check_cores, check_settings, core_counts
from ..bench.records import ONNX_PRECISIONS
from ..data import default_seqlen
from ..errors import UserError
from ..export.gguf import GGUF_QUANTS
from ..models import load_config
from ..prune.allocate import get_allocator
from ..prune.depth import StreamlineSettings, validate_settings as check_streamline
from ..prune.masks import NM_COUNTS, parse_pattern
from ..prune.recover import RecoverSettings, validate_settings as check_recover
from ..prune.settings import prune_settings
from ..prune.structured import DEFAULT_IMPORTANCE
from ..runtime.engines import ENGINES, NBITS_REFUSALS

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
    # --alpha is the spread of the allocations that have one (dlp, expr:...); the others ignore it
    alpha = sweep.alpha if level.allocation and get_allocator(level.allocation).uses_alpha else None
    return prune_settings(level.sparsity, sweep.method, level.allocation, alpha, pattern=level.pattern,
                          structure=level.structure, importance=level.importance or DEFAULT_IMPORTANCE,
                          multiple=sweep.multiple)


def streamline_settings(sweep: SweepSettings, level: Level) -> StreamlineSettings:
    # the calibration the prunes use (corpus, windows, window length), so every form sees the same text
    settings = StreamlineSettings(ratio=level.sparsity, replacement=level.replacement, calib=sweep.calib,
                                  nsamples=sweep.nsamples, seqlen=sweep.calib_seqlen, seed=sweep.seed)
    check_streamline(settings)
    return settings


def recover_settings(sweep: SweepSettings) -> RecoverSettings:
    settings = RecoverSettings(steps=sweep.recover_steps, seqlen=sweep.calib_seqlen, seed=sweep.seed)
    check_recover(settings)
    return settings


def precision_format(precision: str) -> str:
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
            check_settings(bench_settings(sweep, engine, cores), sweep.seq_len)
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


def bench_settings(sweep: SweepSettings, engine: str, cores: int | None) -> BenchSettings:
    return BenchSettings(engine, cores, sweep.prompt_len, sweep.gen_len, 1, sweep.runs, sweep.warmup,
                         sweep.external_cache)


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
