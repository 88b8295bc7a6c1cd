"""Rows for the report's tables, grouped from sweep results (pure: dicts in, lists out)."""
from __future__ import annotations

from collections import defaultdict

from ..bench.stats import remeasured_row


def series(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(engine label, allocation) -> rows by sparsity; the dense row starts every allocation's series."""
    dense = defaultdict(list)
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        engine = f"{r['engine']} ({r['kv_cache']} KV)"
        if r["allocation"] is None:
            dense[engine].append(r)
        else:
            grouped[(engine, r["allocation"])].append(r)
    return {key: dense[key[0]] + sorted(rows, key=lambda r: r["target_sparsity"]) for key, rows in
            sorted(grouped.items())}


def table5_rows(results: list[dict]) -> dict[tuple[str, str], list[list[str]]]:
    """DLP paper Table 5's columns (Sparsity | Latency ms | Throughput tokens/s | Speedup) plus this machine's
    bandwidth-bound ideal and the prefill figures, per engine and allocation. A dense model measured again after
    all levels gets a second row, so the drift the speedups average over is in plain sight."""
    out = {}
    for key, rows in series(results).items():
        lines = []
        for r in rows:
            lines.append(_table5_line(r, "dense" if r["allocation"] is None else f"{r['target_sparsity']:.0%}"))
            if r.get("remeasured") and r.get("speedup"):
                lines.append(_table5_line(remeasured_row(r), "dense (again, last)"))
        out[key] = lines
    return out


def _table5_line(r: dict, label: str) -> list[str]:
    return [
        label,
        f"{r['sparsity']:.1%}",
        f"{r['decode_ms']['median']:.2f}",
        f"{r['decode_ms']['p90']:.2f} / {r['decode_ms']['p99']:.2f}",
        f"{r['decode_tokens_per_s']:.1f}",
        _x((r.get("speedup") or {}).get("decode")),
        _x(r["weights"]["ideal_speedup"]),
        f"{r['prefill_ms']:.1f}",
        _x((r.get("speedup") or {}).get("prefill")),
        f"{r['e2e_tokens_per_s']:.1f}",
    ]


TABLE5_HEADER = ["Sparsity", "measured", "Latency ms (p50)", "p90 / p99 ms", "Throughput tokens/s", "Speedup",
                 "ideal (bandwidth)", "prefill ms", "prefill speedup", "e2e tokens/s"]


def quality_rows(quality: list[dict], corpus: str) -> list[list[str]]:
    dense = [q for q in quality if q["allocation"] is None]
    by_level: dict[float, dict[str, float]] = defaultdict(dict)
    for q in quality:
        if q["allocation"] is not None:
            by_level[q["target_sparsity"]][q["allocation"]] = q["perplexity"][corpus]
    allocations = sorted({a for row in by_level.values() for a in row})
    rows = [["dense"] + [f"{dense[0]['perplexity'][corpus]:.2f}" if dense else "—"] * len(allocations)]
    for level in sorted(by_level):
        rows.append([f"{level:.0%}"] + [f"{by_level[level].get(a, float('nan')):.2f}" for a in allocations])
    return [["Sparsity"] + allocations] + rows


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}x"
