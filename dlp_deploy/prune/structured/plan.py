"""How many units each layer keeps, and which: pure functions of geometry, ratios and unit scores.

Attention is coarse (a query head is 2*hidden*head_dim parameters), so each layer first takes the head layout
closest to its ratio (equal query heads in every kept KV group, so grouped-query attention stays valid; whole
KV groups go when fewer heads per group cannot get close enough). MLP channels, in steps of `multiple`, then
absorb the rest of the layer's ratio, and one round-and-repair pass over all layers meets the parameter-weighted
target within one step of `multiple` channels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import UserError
from ...models.geometry import BlockGeometry
from ...models.shapes import Keep
from ..allocate import round_and_repair

UNITS = ("heads", "channels")


@dataclass(frozen=True)
class LayerPlan:
    kv_heads: int
    heads_per_group: int
    channels: int
    clipped: bool  # the layer's ratio asked for more than one KV group, one head and `multiple` channels allow

    @property
    def heads(self) -> int:
        return self.kv_heads * self.heads_per_group

    def params(self, g: BlockGeometry) -> int:
        return g.attention_params(self.heads, self.kv_heads) + g.mlp_params(self.channels)


def parse_units(text: str) -> tuple[str, ...]:
    units = tuple(u.strip() for u in text.split(",") if u.strip())
    unknown = [u for u in units if u not in UNITS]
    if unknown or not units:
        raise UserError(f"--structure {text!r}: give heads, channels or heads,channels")
    return tuple(u for u in UNITS if u in units)


def attention_layout(g: BlockGeometry, keep_params: float) -> tuple[int, int]:
    """(kv groups, query heads per group) whose parameters come closest to keep_params (ties keep more)."""
    options = [(kv, per) for kv in range(1, g.num_kv_heads + 1) for per in range(1, g.group + 1)]
    return min(options, key=lambda o: (abs(g.attention_params(o[0] * o[1], o[0]) - keep_params),
                                       -g.attention_params(o[0] * o[1], o[0])))


def plan_layers(geoms: list[BlockGeometry], ratios: list[float], units: tuple[str, ...],
                multiple: int) -> list[LayerPlan]:
    for i, g in enumerate(geoms):
        if "channels" in units and g.intermediate < multiple:
            raise UserError(f"--multiple {multiple} exceeds block {i}'s MLP width {g.intermediate}")
    layouts = []
    for g, r in zip(geoms, ratios):
        if "heads" not in units:
            layouts.append((g.num_kv_heads, g.group))
            continue
        keep = (1 - r) * (g.attention_params(g.num_heads, g.num_kv_heads) if "channels" in units else g.params())
        keep -= 0 if "channels" in units else g.mlp_params(g.intermediate)
        layouts.append(attention_layout(g, keep))
    attn_kept = [g.attention_params(kv * per, kv) for g, (kv, per) in zip(geoms, layouts)]
    if "channels" in units:
        unit = np.array([g.mlp_params(multiple) for g in geoms], dtype=np.float64)
        ideal = np.array([((1 - r) * g.params() - a) for g, r, a in zip(geoms, ratios, attn_kept)]) / unit
        target_total = sum((1 - r) * g.params() for g, r in zip(geoms, ratios)) - sum(attn_kept)
        steps = round_and_repair(ideal, unit, [1] * len(geoms), [g.intermediate // multiple for g in geoms],
                                 target_total)
        channels = [int(s) * multiple for s in steps]
        short = list(ideal < 1)
    else:
        channels = [g.intermediate for g in geoms]
        short = [False] * len(geoms)
    plans = []
    for g, r, (kv, per), ch, s in zip(geoms, ratios, layouts, channels, short):
        floor = g.attention_params(1, 1) + (g.mlp_params(multiple) if "channels" in units else 0)
        plans.append(LayerPlan(kv, per, ch, bool(s) or (1 - r) * g.params() < floor))
    return plans


def select_units(scores: dict[str, torch.Tensor], g: BlockGeometry, plan: LayerPlan) -> Keep:
    """The most important units: top KV groups, then the top query heads inside each kept group, top channels."""
    kv = _top(scores["kv_groups"], plan.kv_heads)
    heads = []
    for group in kv:
        members = torch.arange(group * g.group, (group + 1) * g.group)
        heads += [int(members[j]) for j in _top(scores["heads"][members], plan.heads_per_group)]
    return Keep(kv, heads, _top(scores["channels"], plan.channels))


def _top(values: torch.Tensor, k: int) -> list[int]:
    order = torch.argsort(values.float(), descending=True, stable=True)[:k]
    return sorted(int(i) for i in order)
