"""Wiring of the allocation search (`dlp-deploy search`) and of --alpha/--owl-lambda auto: held-out validation
text, the dense snapshot (oneshot.py), scoring a candidate, the seeded resumable loop, and saved allocations.

Every candidate is allocated with the search's mapping (SearchSettings.mapping, expressions.MAPPINGS: `dsa`, the
authors', by default), which the saved allocation records and uses: what is scored is what `--allocation NAME`
prunes with. Candidates themselves carry no mapping, so their keys are the same under either.

Resuming: the loop is a deterministic function of the seed and of the fitness of each candidate, so a resumed
search replays it from the start, reading the fitness of every candidate already in history.jsonl instead of
scoring it again, and continues exactly where the interrupted one stopped (same candidates as an uninterrupted
run with the same seed).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import data, models
from ..errors import UserError
from ..eval.perplexity import perplexity
from ..io import write_json_atomic
from ..provenance import provenance
from .allocate import ALLOCATORS, EXPR_PREFIX, OWL_M, default_dlp_alpha
from .evolve import ALPHA_GRID, Candidate, offspring, random_candidate
from .expressions import DEFAULT_MAPPING, MAPPINGS, parse
from .masks import Pattern
from .oneshot import DenseSnapshot
from .pipeline import pattern_ratios

SAVED_DIR = "allocations"
# the population starts from DLP and OWL as expressions, written for the mapping the search uses
SEEDS = {"dsa": ("median", "outlier>neg"), "owl": ("median>neg", "outlier")}
VAL_WINDOWS = 16
# --alpha auto / --owl-lambda auto: 0 is uniform, so a model on which the allocation hurts gets uniform
AUTO_GRIDS = {"alpha": (0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20),
              "owl_lambda": (0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.15, 0.20)}
# mixed N:M rounds each layer's ratio to a whole count of M: no layer moves off the uniform N until the spread
# (half the range, alpha or lambda) passes 1/(2M), 0.125 at M=4, so the grid goes wider for it
MIXED_EXTRA = (0.25, 0.30, 0.40)


def auto_grid(parameter: str, pattern: Pattern) -> tuple[float, ...]:
    return AUTO_GRIDS[parameter] + (MIXED_EXTRA if pattern.kind == "mixed" else ())


# ---------------------------------------------------------------- scoring on held-out text

@dataclass
class Scorer:
    """A model in memory, its dense snapshot and the held-out validation windows: score(allocation) -> ppl."""

    snapshot: DenseSnapshot
    validation: data.Validation
    method: str = "wanda"

    @classmethod
    def build(cls, model, calibration: data.Calibration, tokenizer, val_windows: int, seqlen: int, root,
              calib_corpus: str, method: str = "wanda", progress=None) -> "Scorer":
        validation = data.validation_windows(tokenizer, calibration, val_windows, seqlen, root, calib_corpus)
        return cls(DenseSnapshot.collect(model, calibration.windows, progress), validation, method)

    def perplexity(self) -> float:
        ids = self.validation.ids
        ppl = perplexity(self.snapshot.model, ids.flatten(), ids.shape[1])["ppl"]
        return ppl if math.isfinite(ppl) else math.inf

    def score(self, ratios: list[float], m: int | None = None) -> float:
        """Validation perplexity of the one-shot prune at these ratios (in groups of m for N:M ratios)."""
        try:
            self.snapshot.apply(ratios, self.method, m=m)
            return self.perplexity()
        finally:
            self.snapshot.restore()

    def describe(self) -> dict:
        v = self.validation
        return {"source": v.source, "windows": int(v.ids.shape[0]), "seqlen": int(v.ids.shape[1]),
                "docs": [v.docs[0], v.docs[-1]], "doc_count": len(v.docs),
                "pruning": f"one-shot {self.method} from dense-model statistics"}


def tune(scorer: Scorer, allocation: str, parameter: str, sparsity: float, params: dict, progress=None,
         pattern: Pattern = Pattern("unstructured")) -> dict:
    """--alpha auto / --owl-lambda auto: the grid value whose one-shot pruned model has the lowest validation
    perplexity (ties to the smaller value); the layer statistics are computed once for the whole grid. A mixed
    N:M pattern is scored as it will be pruned: each layer's ratio rounded to its count of M."""
    grid = auto_grid(parameter, pattern)
    stats = scorer.snapshot.statistics(allocation, params)
    task = progress.add_task(f"--{parameter.replace('_', '-')} auto", total=len(grid)) if progress else None
    scores = []
    for value in grid:
        alloc = scorer.snapshot.allocate(allocation, sparsity, {**params, parameter: value}, stats)
        ratios, _ = pattern_ratios(pattern, alloc.ratios, scorer.snapshot.sizes, sparsity)
        scores.append(scorer.score(ratios, pattern.m))
        if progress:
            progress.advance(task)
    best = min(range(len(grid)), key=lambda i: (scores[i], grid[i]))
    return {"parameter": parameter, "grid": list(grid), "validation_ppl": scores, "choice": grid[best],
            "validation": scorer.describe()}


# ---------------------------------------------------------------- the search

@dataclass(frozen=True)
class SearchSettings:
    """What identifies a search: a resumed one must match all of it. Budgets may change between runs."""

    model: str
    sparsity: float
    method: str = "wanda"
    alpha: float | None = None  # fixed spread; None: DLP's App. G value for the sparsity (unless searched)
    search_alpha: bool = False
    population: int = 20
    top_k: int = 5
    sample_ratio: float = 0.9
    seed: int = 0
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None
    val_windows: int = VAL_WINDOWS
    owl_m: float = OWL_M
    # statistic -> ratios for every candidate (expressions.MAPPINGS); the allocation the search saves uses it too
    mapping: str = DEFAULT_MAPPING

    def alphas(self) -> tuple[float, ...]:
        if self.search_alpha:
            return ALPHA_GRID
        return (self.alpha if self.alpha is not None else default_dlp_alpha(self.sparsity),)


@dataclass
class SearchState:
    history: list[dict] = field(default_factory=list)
    cached: dict[str, dict] = field(default_factory=dict)  # candidate key -> its history record

    @property
    def best(self) -> dict | None:
        done = [h for h in self.history if h["fitness"] is not None]
        return min(done, key=lambda h: (h["fitness"], h["index"])) if done else None


def validate_search(settings: SearchSettings) -> None:
    if not 0 < settings.sparsity < 1:
        raise UserError(f"--sparsity {settings.sparsity} is outside (0, 1); give a fraction such as 0.6")
    if settings.method not in ("wanda", "magnitude"):
        raise UserError(f"--method {settings.method}: the search prunes one-shot from dense statistics, which "
                        "wanda and magnitude allow; search with wanda and prune the result with any method")
    if settings.population < 2 or not 1 < settings.top_k <= settings.population:
        raise UserError(f"--population {settings.population} / --top-k {settings.top_k}: need 2 <= top-k <= population")
    if not 0 < settings.sample_ratio <= 1:
        raise UserError(f"--sample-ratio {settings.sample_ratio} must be in (0, 1]")
    if settings.alpha is not None and settings.search_alpha:
        raise UserError("--alpha fixes the spread and --search-alpha searches it; give one of them")
    if settings.mapping not in MAPPINGS:
        raise UserError(f"--mapping {settings.mapping}: choose from {', '.join(MAPPINGS)}")


def _open_search_dir(out: Path, settings: SearchSettings, force: bool) -> SearchState:
    meta = out / "search.json"
    if out.exists() and force:
        shutil.rmtree(out)
    elif meta.is_file():
        before = json.loads(meta.read_text())["settings"]
        before.setdefault("mapping", "owl")  # searches from before the mapping was a setting used owl's
        now = json.loads(json.dumps(asdict(settings)))
        differ = sorted(k for k in now if before.get(k) != now[k])
        if differ:
            raise UserError(f"{out} holds a search with other settings ({', '.join(differ)}); resume it with the "
                            "same settings, or pass --force to start over, or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and holds no search; pass --force to replace it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return _read_history(out / "history.jsonl")


def _read_history(path: Path) -> SearchState:
    state = SearchState()
    if not path.is_file():
        return state
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interruption: that candidate is scored again
            continue
        state.cached[record["key"]] = record
    return state


def run_search(settings: SearchSettings, out: Path, name: str | None = None, candidates: int = 100,
               time_budget: float | None = None, device: str = "auto", data_root: str | None = None,
               force: bool = False, progress=None, console=None) -> dict:
    """Evolve allocation expressions; write search.json, history.jsonl, best.json into `out` and save the best
    under `name` (default: the folder's name) for `--allocation NAME`."""
    validate_search(settings)
    name = name or out.name
    check_name(name)
    saved = saved_path(name)
    if saved.is_file() and not force and json.loads(saved.read_text()).get("search_dir") != str(out.resolve()):
        raise UserError(f"an allocation named {name!r} is already saved ({saved}) by another search; pass --name "
                        "to choose another name or --force to replace it")
    from .to_folder import resolve_device

    device = resolve_device(device)
    root = data.data_dir(data_root)
    state = _open_search_dir(out, settings, force)
    started = time.perf_counter()
    model, tok = models.load(settings.model, device)
    seqlen = settings.seqlen or data.default_seqlen(model.config)
    calibration = data.calibration(settings.calib, tok, settings.nsamples, seqlen, settings.seed, root)
    scorer = Scorer.build(model, calibration, tok, settings.val_windows, seqlen, root, settings.calib,
                          settings.method, progress)
    meta = _references(out, settings, scorer, calibration, seqlen)
    loop = _Loop(settings, scorer, state, out / "history.jsonl")
    task = progress.add_task("search", total=candidates) if progress else None
    try:
        for _ in loop.run(candidates, time_budget, started):
            if progress:
                best = state.best
                progress.update(task, completed=len(state.history), description=(
                    f"search: best {best['expression']} (alpha {best['alpha']:g}) ppl {best['fitness']:.3f}"
                    if best else "search"))
    finally:
        del model
    best = state.best
    result = {"name": name, "expression": best["expression"], "alpha": best["alpha"], "mapping": settings.mapping,
              "fitness": best["fitness"],
              "sparsity": settings.sparsity, "method": settings.method, "model": settings.model,
              "search_dir": str(out.resolve()), "candidates": len(state.history),
              "new_candidates": loop.scored, "references": meta["references"],
              "seconds_scoring": sum(h["seconds"] for h in state.history),
              "provenance": provenance(seed=settings.seed, device=device)}
    result["candidates_per_hour"] = (3600 * len(state.history) / result["seconds_scoring"]
                                     if result["seconds_scoring"] else None)
    write_json_atomic(out / "best.json", result, force=True)
    write_json_atomic(saved, result, force=True)
    return result


def _references(out: Path, settings: SearchSettings, scorer: Scorer, calibration, seqlen: int) -> dict:
    """search.json: settings, data, machine, and the validation perplexity of the dense and uniformly pruned model
    (computed once; a resumed search reads them)."""
    path = out / "search.json"
    if path.is_file():
        return json.loads(path.read_text())
    references = {"dense": scorer.perplexity(),
                  "uniform": scorer.score([settings.sparsity] * len(scorer.snapshot.sizes))}
    meta = {"schema": "dlp-deploy/search/1", "settings": asdict(settings), "seqlen": seqlen,
            "calibration": {"source": calibration.source, "docs_drawn": len(calibration.docs)},
            "validation": scorer.describe(), "references": references,
            "algorithm": "evolve.py: population, top-k parents of a sample_ratio draw, crossover + mutation, "
                         "steady state; seeded with DLP ({}) and OWL ({}), {} mapping".format(
                             *SEEDS[settings.mapping], settings.mapping),
            "provenance": provenance(seed=settings.seed)}
    write_json_atomic(path, meta, force=True)
    return meta


class _Loop:
    def __init__(self, settings: SearchSettings, scorer: Scorer, state: SearchState, history: Path):
        self.settings, self.scorer, self.state, self.history_path = settings, scorer, state, history
        self.rng = random.Random(settings.seed)
        self.alphas = settings.alphas()
        self.by_ratios: dict[tuple, float | None] = {}
        self.scored = 0

    def run(self, budget: int, time_budget: float | None, started: float):
        """Yields after each candidate; stops at `budget` candidates in all, or (for new scoring only) when the
        wall-clock budget is spent."""
        population: list[tuple[Candidate, float]] = []
        seen: set[str] = set()
        seeds = [Candidate(parse(e), a) for e in SEEDS[self.settings.mapping] for a in self.alphas[:1]]
        while len(self.state.history) < budget:
            if len(seen) < self.settings.population:
                candidate = seeds[len(seen)] if len(seen) < len(seeds) else random_candidate(self.rng, self.alphas)
                origin = "seed" if len(seen) < len(seeds) else "random"
                if candidate.key in seen:
                    continue
            else:
                candidate, origin = offspring(self.rng, population, seen, self.alphas, self.settings.sample_ratio,
                                              self.settings.top_k)
            if candidate.key not in self.state.cached and time_budget is not None \
                    and time.perf_counter() - started > time_budget:
                return
            seen.add(candidate.key)
            record = self._evaluate(candidate, origin)
            fitness = math.inf if record["fitness"] is None else record["fitness"]
            population.append((candidate, fitness))
            if len(population) > self.settings.population:
                population.remove(max(population, key=lambda cf: cf[1]))
            yield record

    def _evaluate(self, candidate: Candidate, origin: str) -> dict:
        index = len(self.state.history)
        cached = self.state.cached.get(candidate.key)
        if cached is not None and cached["index"] == index:
            record = cached
        else:
            record = self._score(candidate, origin, index)
            with self.history_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
            self.scored += 1
        if record["ratios"] is not None:
            self.by_ratios.setdefault(_ratio_key(record["ratios"]), record["fitness"])
        self.state.history.append(record)
        return record

    def _score(self, candidate: Candidate, origin: str, index: int) -> dict:
        t = time.perf_counter()
        record = {"index": index, "key": candidate.key, "expression": str(candidate.expression),
                  "alpha": candidate.alpha, "origin": origin, "fitness": None, "ratios": None, "error": None}
        params = {"alpha": candidate.alpha, "owl_m": self.settings.owl_m, "method": self.settings.method}
        # candidates (and their keys) carry no mapping: the search's own applies to all of them, as it will to
        # the allocation it saves
        expression = replace(candidate.expression, mapping=self.settings.mapping)
        try:
            alloc = self.scorer.snapshot.allocate(EXPR_PREFIX + str(expression), self.settings.sparsity, params)
        except UserError as exc:  # an expression that overflows or is not finite for some layer
            record["error"] = str(exc)
        else:
            record["ratios"] = alloc.ratios
            key = _ratio_key(alloc.ratios)
            if key in self.by_ratios:  # e.g. a monotone post-op that leaves the min-max scaled values alone
                record["fitness"], record["same_ratios_as_earlier"] = self.by_ratios[key], True
            else:
                ppl = self.scorer.score(alloc.ratios)
                record["fitness"] = ppl if math.isfinite(ppl) else None
        record["seconds"] = time.perf_counter() - t
        return record


def _ratio_key(ratios) -> tuple:
    return tuple(round(r, 9) for r in ratios)


# ---------------------------------------------------------------- saved allocations

def saved_path(name: str) -> Path:
    return models.cache_dir() / SAVED_DIR / f"{name}.json"


def _safe_name(name: str) -> bool:
    """A name that is one file in the allocations folder (no path separators, not hidden)."""
    return bool(name) and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


def check_name(name: str) -> None:
    if not _safe_name(name):
        raise UserError(f"allocation name {name!r}: use letters, digits, '-', '_' and '.'")
    if name in ALLOCATORS or name.lower().startswith(EXPR_PREFIX):
        raise UserError(f"allocation name {name!r} is a built-in allocator's; choose another --name")


def load_saved(name: str) -> dict | None:
    path = saved_path(name)
    if not _safe_name(name) or not path.is_file():
        return None
    return json.loads(path.read_text())
