"""The evolutionary operators of the allocation search (pure: a seeded random.Random in, candidates out).

DSA (Li et al., NeurIPS 2024, Alg. 1) evolves allocation expressions with a population of 20, parents from the
top 5, and a sample ratio of 0.9; its authors released the expression engine but not the search, so this is our
reading: each step draws 90% of the population at random, takes that sample's 5 fittest as parents, crosses two
of them part by part (pre-ops, reduction, post-ops, alpha) and mutates the child; the child joins the population
and the least fit member leaves. The 10% left out of each draw keeps the very best from always breeding.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from .expressions import POST_OPS, PRE_OPS, REDUCTIONS, Expression

MAX_PRE, MAX_POST = 2, 2
OUTLIER_M = (3.0, 5.0, 7.0, 10.0)
# DLP App. G spans 0.02-0.15; 0 would be uniform, which needs no search
ALPHA_GRID = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20)


@dataclass(frozen=True)
class Candidate:
    expression: Expression
    alpha: float

    @property
    def key(self) -> str:
        return f"{self.expression}|{self.alpha:g}"


def _reduction(rng: random.Random) -> tuple[str, float | None]:
    name = rng.choice(sorted(REDUCTIONS))
    return name, (rng.choice(OUTLIER_M) if REDUCTIONS[name].takes_arg else None)


def _ops(rng: random.Random, vocabulary, most: int) -> tuple[str, ...]:
    return tuple(rng.choice(sorted(vocabulary)) for _ in range(rng.randint(0, most)))


def random_candidate(rng: random.Random, alphas: tuple[float, ...]) -> Candidate:
    name, arg = _reduction(rng)
    expr = Expression(_ops(rng, PRE_OPS, MAX_PRE), name, arg, _ops(rng, POST_OPS, MAX_POST))
    return Candidate(expr, rng.choice(alphas))


def crossover(rng: random.Random, a: Candidate, b: Candidate) -> Candidate:
    """Each part (pre-ops, reduction with its argument, post-ops, alpha) from one parent or the other."""
    pick = lambda x, y: x if rng.random() < 0.5 else y  # noqa: E731
    ea, eb = a.expression, b.expression
    reduction = pick((ea.reduce, ea.reduce_arg), (eb.reduce, eb.reduce_arg))
    expr = Expression(pick(ea.pre, eb.pre), reduction[0], reduction[1], pick(ea.post, eb.post))
    return Candidate(expr, pick(a.alpha, b.alpha))


def _mutate_ops(rng: random.Random, ops: tuple[str, ...], vocabulary, most: int) -> tuple[str, ...]:
    ops = list(ops)
    moves = ["replace", "delete"] * bool(ops) + ["insert"] * (len(ops) < most)
    move = rng.choice(moves)
    if move == "insert":
        ops.insert(rng.randint(0, len(ops)), rng.choice(sorted(vocabulary)))
    elif move == "delete":
        ops.pop(rng.randrange(len(ops)))
    else:
        ops[rng.randrange(len(ops))] = rng.choice(sorted(vocabulary))
    return tuple(ops)


def mutate(rng: random.Random, c: Candidate, alphas: tuple[float, ...]) -> Candidate:
    """One change: an op inserted, deleted or replaced in the pre- or post-ops, a new reduction, or (when alpha
    is searched) a neighbouring alpha."""
    parts = ["pre", "reduce", "post"] + ["alpha"] * (len(alphas) > 1)
    part = rng.choice(parts)
    e = c.expression
    if part == "pre":
        return replace(c, expression=replace(e, pre=_mutate_ops(rng, e.pre, PRE_OPS, MAX_PRE)))
    if part == "post":
        return replace(c, expression=replace(e, post=_mutate_ops(rng, e.post, POST_OPS, MAX_POST)))
    if part == "reduce":
        name, arg = _reduction(rng)
        return replace(c, expression=replace(e, reduce=name, reduce_arg=arg))
    i = min(range(len(alphas)), key=lambda k: abs(alphas[k] - c.alpha))
    j = min(max(i + rng.choice((-1, 1)), 0), len(alphas) - 1)
    return replace(c, alpha=alphas[j])


def parents(rng: random.Random, population: list[tuple[Candidate, float]], sample_ratio: float,
            top_k: int) -> list[Candidate]:
    """The top_k fittest (lowest fitness) of a random sample of ceil(sample_ratio * size) members."""
    size = max(1, math.ceil(sample_ratio * len(population)))
    sample = rng.sample(population, size)
    sample.sort(key=lambda cf: cf[1])
    return [c for c, _ in sample[:top_k]]


def offspring(rng: random.Random, population: list[tuple[Candidate, float]], seen: set[str],
              alphas: tuple[float, ...], sample_ratio: float, top_k: int, tries: int = 20) -> tuple[Candidate, str]:
    """A child not yet evaluated: crossover of two parents, then a mutation (mutated again while it repeats an
    earlier candidate); a random candidate when no new child turns up."""
    chosen = parents(rng, population, sample_ratio, top_k)
    a, b = (rng.sample(chosen, 2) if len(chosen) > 1 else (chosen[0], chosen[0]))
    child = mutate(rng, crossover(rng, a, b), alphas)
    for _ in range(tries):
        if child.key not in seen:
            return child, f"child of {a.key} x {b.key}"
        child = mutate(rng, child, alphas)
    for _ in range(tries):
        child = random_candidate(rng, alphas)
        if child.key not in seen:
            return child, "random"
    return child, "random (repeat)"
