"""Prune settings as every entry point builds them (the CLI's prune, the sweep, the planner): what a form implies
is filled in and the whole is validated here, below the commands, so no stage imports the CLI for it."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from .allocate import OWL_LAMBDA, OWL_M, default_dlp_alpha, get_allocator
from .masks import parse_pattern
from .pipeline import PruneSettings, validate_settings
from .structured import DEFAULT_IMPORTANCE


def prune_settings(sparsity: float | None, method: str, allocation: str | None, alpha: float | None,
                   reducer: str = "median", granularity: str | None = None, pattern: str = "unstructured",
                   structure: str | None = None, importance: str = DEFAULT_IMPORTANCE, multiple: int = 8,
                   owl_m: float = OWL_M, owl_lambda: float = OWL_LAMBDA, auto: str | None = None,
                   val_windows: int = 16):
    """Fill what the form implies (an N:M pattern's sparsity and uniform allocation, DLP's default alpha), then
    validate: the one place the CLI and the sweep build settings."""
    fixed = parse_pattern(pattern).fixed_sparsity
    if sparsity is None:
        if fixed is None:
            raise UserError("--sparsity is required (except for a fixed N:M --pattern, which implies it)")
        sparsity = fixed
    if not 0 <= sparsity < 1:
        raise UserError(f"--sparsity {sparsity} is outside [0, 1); give a fraction such as 0.5")
    allocation = allocation or ("uniform" if fixed is not None else "dlp")
    if alpha is None and get_allocator(allocation).uses_alpha:
        alpha = default_dlp_alpha(sparsity)
    settings = PruneSettings(sparsity, method, allocation, alpha, reducer, granularity, pattern.strip().lower(),
                             structure, importance, multiple, owl_m, owl_lambda, auto, val_windows)
    validate_settings(settings)
    return settings


@dataclass
class SweepPrune:
    """The pruned forms a sweep makes, each level one PruneSettings (prune_settings), a depth cut
    (StreamlineSettings) or a recovery (RecoverSettings): every pattern at every sparsity x allocation (a fixed N:M
    once, uniform); structured pruning (when `structure` is set) at structure_sparsities x structure_allocations x
    importances; one depth level per replacement in `depth`, cutting `depth_ratio` of the decoder layers; and a
    LoRA-recovered twin "<label>+recovery" of every level whose label matches a `recover` pattern (fnmatch)."""

    sparsities: list[float]
    method: str = "wanda"
    allocations: list[str] = field(default_factory=lambda: ["dlp", "uniform"])
    patterns: list[str] = field(default_factory=lambda: ["unstructured"])
    structure: str | None = None
    structure_sparsities: list[float] | None = None
    structure_allocations: list[str] | None = None
    importances: list[str] = field(default_factory=lambda: [DEFAULT_IMPORTANCE])
    multiple: int = 8
    alpha: float | None = None  # DLP's spread; None: the paper's App. G value per level
    depth: list[str] = field(default_factory=list)
    depth_ratio: float = 0.25
    recover: list[str] = field(default_factory=list)
    recover_steps: int = 100

    def settings(self, sparsity: float | None, allocation: str | None, pattern: str = "unstructured",
                 structure: str | None = None, importance: str | None = None):
        """One level's PruneSettings. `alpha` is the spread of the allocations that have one (dlp, expr:...);
        the others ignore it."""
        alpha = self.alpha if allocation and get_allocator(allocation).uses_alpha else None
        return prune_settings(sparsity, self.method, allocation, alpha, pattern=pattern, structure=structure,
                              importance=importance or DEFAULT_IMPORTANCE, multiple=self.multiple)


@dataclass
class Calibration:
    """The text every prune, depth cut and recovery of a sweep calibrates on (corpus, windows, window length, seed),
    so every form sees the same text; the seed also seeds the INT8 export's calibration and recovery's init."""

    corpus: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


def auto_values(alpha: str | None, owl_lambda: str) -> tuple[float | None, float, str | None]:
    """--alpha and --owl-lambda take a number or `auto` (at most one of them auto)."""
    def number(text: str, flag: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{flag} {text!r} is neither a number nor auto") from None

    autos = [flag for flag, v in (("alpha", alpha), ("owl_lambda", owl_lambda)) if (v or "").lower() == "auto"]
    if len(autos) > 1:
        raise UserError("--alpha auto and --owl-lambda auto: one allocation uses one of them; give one")
    alpha_value = None if alpha is None or "alpha" in autos else number(alpha, "--alpha")
    lam = OWL_LAMBDA if "owl_lambda" in autos else number(owl_lambda, "--owl-lambda")
    return alpha_value, lam, (autos[0] if autos else None)
