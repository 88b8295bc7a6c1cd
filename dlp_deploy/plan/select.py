"""The plan's decisions, as pure functions of figures already measured: no model, engine or file here.

- budget: a perplexity is within budget when it is at most (1 + max increase) times the reference's, the
  reference being the dense model scored the same way (one-shot screen: dense PyTorch on the validation windows;
  deployments: the dense fp32 deployment on its engine, same windows);
- the screen keeps a margin above the budget, because a one-shot prune from dense statistics scores worse than
  the sequential prune stage 2 makes (and quantization only adds to it, so nothing is kept for it);
- the choice: the fastest measured deployment within budget, where a speed within the run's noise floor (the A/A
  control's interval) of the fastest is a tie, which the better perplexity wins;
- the time planner: each stage's cost per unit is estimated from the units that have run, and a unit that would
  not fit in what is left of --time-budget is skipped (and named in plan.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from ..report.tables import pareto_front

__all__ = ["limit", "within_budget", "budget_split", "pareto_front", "front_ids", "choose", "TimePlanner",
           "measurement_order"]


def limit(reference: float, max_increase: float, margin: float = 0.0) -> float:
    """The largest perplexity allowed: reference x (1 + max_increase), times (1 + margin) for a screen."""
    return reference * (1 + max_increase) * (1 + margin)


def within_budget(ppl: float | None, reference: float, max_increase: float, margin: float = 0.0) -> bool:
    """A perplexity that is missing or not finite (a collapsed model) is never within budget."""
    return ppl is not None and math.isfinite(ppl) and ppl <= limit(reference, max_increase, margin)


def budget_split(rows: list[dict], reference: float, max_increase: float, margin: float = 0.0,
                 key: str = "ppl") -> tuple[list[dict], list[dict]]:
    """(kept, dropped) in the order given; each dropped row gains `why`, the figure against the limit."""
    bound = limit(reference, max_increase, margin)
    kept, dropped = [], []
    for r in rows:
        if within_budget(r.get(key), reference, max_increase, margin):
            kept.append(r)
        else:
            rise = (r.get(key) / reference - 1) if r.get(key) is not None and math.isfinite(r.get(key)) else math.inf
            dropped.append({**r, "why": f"perplexity {_num(r.get(key))} is {rise:+.1%} over the reference "
                                        f"{reference:.3f}, above the limit {bound:.3f}"
                                        + (f" (budget +{100 * max_increase:g}% with a {100 * margin:g}% screening "
                                           "margin)" if margin else f" (budget +{100 * max_increase:g}%)")})
    return kept, dropped


def _num(x) -> str:
    return "missing" if x is None else f"{x:.3f}"


def front_ids(rows: list[dict], speed: str = "speed", ppl: str = "ppl") -> list[str]:
    """Ids of the rows on the speed / perplexity Pareto front (faster and better than no other row)."""
    points = [(r[speed], r[ppl]) for r in rows]
    return [rows[i]["id"] for i in pareto_front(points)]


def choose(rows: list[dict], floor: float, speed: str = "speed", ppl: str = "ppl") -> tuple[dict | None, str]:
    """The fastest row; rows whose speed is within `floor` (a relative noise floor, e.g. 0.05) of the fastest tie
    with it, and the tied row with the lowest perplexity wins (then the faster, then the id, so that the choice
    never depends on the order given). Returns (row, why)."""
    if not rows:
        return None, "no deployment within budget was measured"
    fastest = max(rows, key=lambda r: (r[speed], -r[ppl], r["id"]))
    tied = [r for r in rows if fastest[speed] <= r[speed] * (1 + max(floor, 0.0))]
    best = min(tied, key=lambda r: (r[ppl], -r[speed], r["id"]))
    if best is fastest:
        others = [r["id"] for r in tied if r is not fastest]
        why = "the fastest within budget" + (f"; tied within the noise floor ({floor:.1%}) with "
                                            f"{', '.join(others)}, and the best perplexity of them" if others else "")
    else:
        why = (f"tied with the fastest, {fastest['id']} ({fastest[speed]:.1f} against {best[speed]:.1f}, within the "
               f"noise floor of {floor:.1%}), and the better perplexity ({best[ppl]:.3f} against "
               f"{fastest[ppl]:.3f})")
    return best, why


def measurement_order(rows: list[dict]) -> list[dict]:
    """Which stage-3 candidates are measured first when time is short: those most likely to be fast (fewest bytes
    to stream per token: the smaller file, then the more zeros for engines with sparse kernels), then the better
    perplexity."""
    return sorted(rows, key=lambda r: (r.get("bytes") or math.inf, -(r.get("sparsity") or 0.0), r["ppl"], r["id"]))


@dataclass
class TimePlanner:
    """--time-budget: seconds from `started` (None: no limit). Each stage records what its units cost; a unit is
    admitted when the stage's mean cost so far fits in what is left (a stage with no cost yet admits one unit,
    which teaches it its cost, while any time is left)."""

    budget_s: float | None
    clock: Callable[[], float] = time.monotonic
    started: float | None = None
    costs: dict[str, list[float]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    reserved: float = 0.0  # seconds promised to units admitted but not yet run (stage 3 plans before it measures)
    held: dict[str, float] = field(default_factory=dict)  # fixed costs still to come (references, test text)

    def __post_init__(self):
        if self.started is None:
            self.started = self.clock()

    def left(self, until: float | None = None) -> float:
        """Seconds left of the budget, or of it up to `until` (seconds since the start) where that comes first."""
        if self.budget_s is None:
            return math.inf
        elapsed = self.clock() - self.started
        whole = self.budget_s - elapsed - self.reserved - sum(self.held.values())
        # a stage's share (share_of_left) is already net of the held time: it ends at `until` or with the budget
        return whole if until is None else min(until - elapsed - self.reserved, whole)

    def hold(self, what: str, seconds: float) -> None:
        """Set aside the estimated cost of work that runs whatever the budget, later in the plan: no optional
        unit is admitted into that time."""
        self.held[what] = max(seconds, 0.0)

    def release(self, what: str) -> None:
        """The held work is about to run: its time is the clock's now."""
        self.held.pop(what, None)

    def share_of_left(self, share: float) -> float | None:
        """The `until` that gives a stage starting now `share` of the time left (None without a budget)."""
        if self.budget_s is None:
            return None
        return self.clock() - self.started + share * max(self.left(), 0.0)

    def estimate(self, stage: str) -> float | None:
        seen = self.costs.get(stage)
        return sum(seen) / len(seen) if seen else None

    def record(self, stage: str, seconds: float) -> None:
        self.costs.setdefault(stage, []).append(seconds)

    def admit(self, stage: str, unit: str, units: int = 1, reserve: bool = False, until: float | None = None,
              share: str = "", then: tuple[tuple[str, float], ...] = ()) -> bool:
        """Whether `units` more units of `stage` fit in the budget (up to `until`, a stage's share of it, named
        by `share`); if not, `unit` is recorded as skipped, with the figures. `reserve`: the admitted units'
        estimate is set aside, for admitting several before any of them runs. `then`: (stage, units) pairs of the
        work that comes with the unit (the prune a deployment needs, the measurement it is made for): admitted only
        if that fits as well, as far as those stages' costs are known."""
        left, each = self.left(until), self.estimate(stage)
        of = f"of {share}" if until is not None and share else "of --time-budget"
        need = None if each is None else each * units
        if need is not None:
            need += sum((self.estimate(stage) or 0.0) * n for stage, n in then)
        if left > 0 and (need is None or need <= left):
            if reserve and need is not None and self.budget_s is not None:
                self.reserved += need
            return True
        self.skipped.append({"stage": stage, "unit": unit, "estimate_s": need, "left_s": max(left, 0.0),
                             "why": f"would need ~{need:.0f} s"
                             + (" (with " + ", ".join(f"{n:g} of {stage}" for stage, n in then) + ")" if then else "")
                             + f", {max(left, 0.0):.0f} s left {of}"
                             if need is not None else f"no time left {of}"})
        return False
