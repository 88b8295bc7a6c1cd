"""What a sweep is, before any work: its settings, the levels they make (dense, pruned, depth-cut, recovered), the
settings each level's stage takes, the (level, precision, engine, cores) pairs a round measures, and the checks
that refuse a sweep in one line before anything is written. Nothing here prunes, exports or measures: that is
steps.py, run by an executor (executors.py) for sweep.run_sweep.
"""
from __future__ import annotations

import json
import typing
from copy import deepcopy
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path

from ..bench.harness import BenchSettings, check_cores, check_settings, core_counts
from ..bench.records import ONNX_PRECISIONS
from ..data import default_seqlen
from ..errors import UserError
from ..eval.evaluate import EvalSettings
from ..export.deployment import ExportSettings
from ..export.gguf import GGUF_QUANTS
from ..models import load_config
from ..prune.depth import StreamlineSettings, validate_settings as check_streamline
from ..prune.masks import NM_COUNTS, parse_pattern
from ..prune.recover import RecoverSettings, validate_settings as check_recover
from ..prune.settings import Calibration, SweepPrune
from ..runtime.engines import ENGINES, NBITS_REFUSALS

DENSE = "dense"


@dataclass
class SweepSettings:
    """A sweep: the stages' own settings, composed, and the sweep's own fields. The steps pass each part straight
    to its stage (bench's BenchSettings gets its engine and cores per pair). run.json, results.json and recipes
    keep the settings flat, under the names in FLAT (to_flat, from_flat)."""

    model: str
    prune: SweepPrune  # the pruned forms (levels), prune/settings.py
    calibration: Calibration = field(default_factory=Calibration)  # prune, depth cut and recovery calibration
    eval: EvalSettings = field(default_factory=EvalSettings)  # perplexity of every level and deployment
    export: ExportSettings = field(default_factory=ExportSettings)
    bench: BenchSettings = field(default_factory=BenchSettings)  # engine and cores: each pair's (bench_settings)
    engines: list[str] = field(default_factory=lambda: ["deepsparse", "onnxruntime"])
    # every level exported in each precision: fp32 and int8 as ONNX, GGUF formats (q4_1, q8_0, ...) for llama.cpp;
    # a sweep with more than fp32 scores every deployment itself (ONNX Runtime, or llama.cpp for GGUF)
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    # one count (None: all usable), or a list: every pair is then measured at each count (scaling with cores)
    cores: int | list[int] | None = None
    # each (level, precision, engine) measured in `rounds` worker processes, interleaved (bench/schedule.py); the
    # bootstrap resamples processes, so fewer than 3 leave it next to nothing to resample
    rounds: int = 3
    order: str = "abba"
    order_seed: int = 0
    device: str = "cpu"
    # seconds one benchmark worker (compile and runs) may take; a pair past it is reported as not measured
    bench_timeout: float | None = None

    def to_flat(self) -> dict:
        """The settings as run.json, results.json and a recipe's [settings] table hold them: one flat table."""
        return {name: deepcopy(getattr(self if part is None else getattr(self, part), attr))
                for name, (part, attr) in FLAT.items()}

    @classmethod
    def from_flat(cls, flat: dict | None = None, /, **named) -> SweepSettings:
        """The settings of a flat table (to_flat's form); keys it leaves out take their defaults. A name not in
        FLAT is a TypeError, as a dataclass's unknown keyword."""
        given = {**(flat or {}), **named}
        unknown = sorted(set(given) - set(FLAT))
        if unknown:
            raise TypeError(f"SweepSettings has no setting {', '.join(unknown)}")
        parts: dict[str | None, dict] = {}
        for name, value in given.items():
            part, attr = FLAT[name]
            parts.setdefault(part, {})[attr] = value
        own = parts.pop(None, {})
        return cls(**own, **{part: PARTS[part](**values) for part, values in parts.items()},
                   **{part: PARTS[part]() for part in PARTS if part not in parts and part != "prune"})

    def replace_flat(self, **changes) -> SweepSettings:
        """These settings with some flat fields changed (a recipe's values, a test's variant)."""
        return SweepSettings.from_flat({**self.to_flat(), **changes})


# part -> its class; FLAT: each flat setting -> (its part, None for the sweep's own field; the part's field), in
# the order run.json has always written them
PARTS = {"prune": SweepPrune, "calibration": Calibration, "eval": EvalSettings, "export": ExportSettings,
         "bench": BenchSettings}
FLAT: dict[str, tuple[str | None, str]] = {
    "model": (None, "model"), "sparsities": ("prune", "sparsities"), "method": ("prune", "method"),
    "allocations": ("prune", "allocations"), "engines": (None, "engines"), "calib": ("calibration", "corpus"),
    "nsamples": ("calibration", "nsamples"), "calib_seqlen": ("calibration", "seqlen"),
    "seed": ("calibration", "seed"), "ppl": ("eval", "ppl"), "eval_seqlen": ("eval", "seqlen"),
    "max_windows": ("eval", "max_windows"), "seq_len": ("export", "seq_len"), "validate": ("export", "validate"),
    "cores": (None, "cores"), "prompt_len": ("bench", "prompt_len"), "gen_len": ("bench", "gen_len"),
    "runs": ("bench", "runs"), "warmup": ("bench", "warmup"), "external_cache": ("bench", "external_cache"),
    "device": (None, "device"), "patterns": ("prune", "patterns"), "structure": ("prune", "structure"),
    "structure_sparsities": ("prune", "structure_sparsities"),
    "structure_allocations": ("prune", "structure_allocations"), "importances": ("prune", "importances"),
    "multiple": ("prune", "multiple"), "precisions": (None, "precisions"), "rounds": (None, "rounds"),
    "order": (None, "order"), "order_seed": (None, "order_seed"), "alpha": ("prune", "alpha"),
    "depth": ("prune", "depth"), "depth_ratio": ("prune", "depth_ratio"), "recover": ("prune", "recover"),
    "recover_steps": ("prune", "recover_steps"), "bench_timeout": (None, "bench_timeout"),
}


def flat_hints() -> dict:
    """Each flat setting's type, from the field of the part that holds it (a recipe's values are checked
    against these)."""
    hints = {part: typing.get_type_hints(c) for part, c in PARTS.items()}
    hints[None] = typing.get_type_hints(SweepSettings)
    return {name: hints[part][attr] for name, (part, attr) in FLAT.items()}


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
    forms = sweep.prune
    out = [Level(DENSE, None, None)]
    for text in forms.patterns:
        pattern = parse_pattern(text)
        if pattern.kind == "nm":
            out.append(Level(f"{forms.method}-{pattern.n}of{pattern.m}", pattern.fixed_sparsity, "uniform",
                             str(pattern)))
            continue
        tag = "" if pattern.kind == "unstructured" else f"mixed{pattern.m}-"
        for p in forms.sparsities:
            out += [Level(f"{forms.method}-{tag}{_folder_safe(a)}-{p:.2f}", p, a, str(pattern))
                    for a in forms.allocations]
    if forms.structure:
        for p in forms.structure_sparsities or forms.sparsities:
            for imp in forms.importances:
                out += [Level(f"structured-{imp}-{_folder_safe(a)}-{p:.2f}", p, a, "unstructured", forms.structure, imp)
                        for a in (forms.structure_allocations or forms.allocations)]
    out += [Level(f"streamline-{r}-{forms.depth_ratio:.2f}", forms.depth_ratio, f"streamline-{r}", replacement=r)
            for r in forms.depth]
    return out + recovered_levels(sweep, out)


RECOVERED = "+recovery"


def recovered_levels(sweep: SweepSettings, plan: list[Level]) -> list[Level]:
    """A twin of every pruned level whose label matches a --recover pattern; they come last, after their bases."""
    return [replace(level, label=level.label + RECOVERED, base=level.label) for level in plan
            if level.sparsity is not None and any(fnmatchcase(level.label, p) for p in sweep.prune.recover)]


def prepare_waves(plan: list[Level]) -> list[list[Level]]:
    """Levels that can be prepared in any order, wave after wave: a recovered level trains from its base's
    folder, so it waits for the wave that makes it."""
    return [w for w in ([lv for lv in plan if not lv.recovered], [lv for lv in plan if lv.recovered]) if w]


def _folder_safe(allocation: str) -> str:
    """An allocation as part of a folder name: an expression's ':', '>' and ',' become '_' (expr_abslog_var_atan)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in allocation)


def level_settings(sweep: SweepSettings, level: Level):
    return sweep.prune.settings(level.sparsity, level.allocation, pattern=level.pattern, structure=level.structure,
                                importance=level.importance)


def streamline_settings(sweep: SweepSettings, level: Level) -> StreamlineSettings:
    # the calibration the prunes use (corpus, windows, window length), so every form sees the same text
    calibration = sweep.calibration
    settings = StreamlineSettings(ratio=level.sparsity, replacement=level.replacement, calib=calibration.corpus,
                                  nsamples=calibration.nsamples, seqlen=calibration.seqlen, seed=calibration.seed)
    check_streamline(settings)
    return settings


def recover_settings(sweep: SweepSettings) -> RecoverSettings:
    settings = RecoverSettings(steps=sweep.prune.recover_steps, seqlen=sweep.calibration.seqlen,
                               seed=sweep.calibration.seed)
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
    if sweep.calibration.seqlen is not None and sweep.eval.seqlen is not None:
        return sweep
    window = default_seqlen(load_config(sweep.model)[1])
    return replace(sweep, calibration=replace(sweep.calibration, seqlen=sweep.calibration.seqlen or window),
                   eval=replace(sweep.eval, seqlen=sweep.eval.seqlen or window))


def check_sweep(sweep: SweepSettings, run_dir: Path) -> None:
    plan = levels(sweep)
    for level in plan[1:]:
        if level.replacement:
            streamline_settings(sweep, level)
        elif not level.recovered:
            level_settings(sweep, level)
    if sweep.prune.recover and not any(lv.recovered for lv in plan):
        raise UserError(f"--recover {','.join(sweep.prune.recover)} matches no level; level labels look like "
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
            check_settings(bench_settings(sweep, engine, cores), sweep.export.seq_len)
    saved = run_dir / "run.json"
    if saved.is_file():
        run = json.loads(saved.read_text())
        _check_nm_meaning(run, run_dir)
        before = run["settings"]
        grows = ("sparsities", "allocations", "engines", "patterns", "structure_sparsities", "structure_allocations",
                 "importances", "precisions", "depth", "recover")
        free = ("bench_timeout",)  # a limit on waiting, not on what is measured
        changed = sorted(k for k, v in sweep.to_flat().items() if k not in grows + free and before.get(k, v) != v)
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
    return replace(sweep.bench, engine=engine, cores=cores)


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
