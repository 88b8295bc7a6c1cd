"""Rows for the report's tables, grouped from sweep results (pure: dicts in, lists out)."""
from __future__ import annotations

from collections import defaultdict

from ..bench.stats import (PEER_PRECISION, SMALLER_FORMS, core_counts_in, cores_of, is_aa_control, precision_of,
                           remeasured_row, removed_share, same_model, sparsity_speedup)


def series(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(engine label, allocation) -> rows by sparsity; the dense row starts every allocation's series."""
    dense = defaultdict(list)
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        engine = f"{r['engine']} ({r['kv_cache']} KV)" + ("" if precision_of(r) == "fp32" else f", {precision_of(r)}")
        if is_aa_control(r):  # the noise control, not a level of any series (the noise section has it)
            continue
        if r["allocation"] is None:
            dense[engine].append(r)
        else:
            grouped[(engine, r.get("variant") or r["allocation"])].append(r)
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
        with_ci(r.get("speedup")),
        spread_cell(r),
        _x(r["weights"]["ideal_speedup"]),
        f"{r['prefill_ms']:.1f}",
        _x((r.get("speedup") or {}).get("prefill")),
        f"{r['e2e_tokens_per_s']:.1f}",
    ]


TABLE5_HEADER = ["Sparsity", "measured", "Latency ms (p50)", "p90 / p99 ms", "Throughput tokens/s",
                 "Speedup [95% CI]", "between-process spread", "ideal (bandwidth)", "prefill ms", "prefill speedup", "e2e tokens/s"]


def quality_rows(quality: list[dict], corpus: str) -> list[list[str]]:
    dense = [q for q in quality if q["allocation"] is None]
    by_level: dict[float, dict[str, float]] = defaultdict(dict)
    for q in quality:
        if q["allocation"] is not None:
            by_level[q["target_sparsity"]][column_name(q)] = q["perplexity"][corpus]
    allocations = sorted({a for row in by_level.values() for a in row})
    rows = [["dense"] + [f"{dense[0]['perplexity'][corpus]:.2f}" if dense else "—"] * len(allocations)]
    for level in sorted(by_level):
        rows.append([f"{level:.0%}"] + [f"{by_level[level][a]:.2f}" if a in by_level[level] else "—"
                                         for a in allocations])
    return [["Sparsity"] + allocations] + rows


def column_name(q: dict) -> str:
    """A quality row's series: its allocation, marked where the model was recovery fine-tuned."""
    return q["allocation"] + (" +recovery" if q.get("recovered") else "")


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}x"


# ---------------------------------------------------------------- pruning forms (unstructured, N:M, structured)

def forms(rows: list[dict]) -> list[str]:
    """The pruning forms present, dense excluded ('unstructured' for results written before forms existed)."""
    return sorted({r.get("form") or "unstructured" for r in rows if r["allocation"] is not None})


def unstructured_only(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["allocation"] is None or (r.get("form") or "unstructured") == "unstructured"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (higher speed x, lower perplexity y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 <= y) and (x2 > x or y2 < y) for x2, y2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _level_name(r: dict) -> str:
    name = "dense" if r["allocation"] is None else r.get("variant") or r["allocation"]
    name = "dense, A/A control" if is_aa_control(r) else name
    return name if precision_of(r) == "fp32" else f"{name}, {precision_of(r)}"


FORMS_HEADER = ["model", "form / allocation", "target", "removed", "ppl (whose, windows × tokens)", "decode ms",
                "tokens/s", "decode speedup [95% CI]", "win", "between-process spread", "vs dense INT8", "ideal (bandwidth)", "prefill ms", "prefill speedup",
                f"vs llama.cpp {PEER_PRECISION} dense [95% CI]", "on Pareto front"]


def with_ci(speed: dict | None) -> str:
    """A decode ratio with its 95% interval where it has one ("1.73x [1.58, 1.93]"), or a dash."""
    if not speed:
        return "—"
    ci = speed.get("decode_ci95")
    return _x(speed.get("decode")) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def forms_rows(results: list[dict], corpus: str) -> dict[str, list[list[str]]]:
    """Per engine, every level of every form against the same dense model: the one table that compares forms."""
    out: dict[str, list[list[str]]] = defaultdict(list)
    for engine, rows in _by_engine(results).items():
        models = [r for r in rows if not is_aa_control(r)]  # the control is no deployment choice
        front = {id(models[i]) for i in pareto_front([(r["decode_tokens_per_s"], r["perplexity"][corpus])
                                                      for r in models])}
        for r in sorted(rows, key=lambda r: (r["allocation"] is not None, r.get("form") or "", _level_name(r),
                                             r["target_sparsity"], precision_of(r))):
            speed = _headline_speedup(r)
            out[engine].append([
                r["label"], _level_name(r), "—" if r["allocation"] is None else f"{r['target_sparsity']:.0%}",
                f"{removed_share(r):.1%}", f"{r['perplexity'][corpus]:.2f} ({ppl_basis(r)})",
                f"{r['decode_ms']['median']:.2f}", f"{r['decode_tokens_per_s']:.1f}", with_ci(speed) + _against(r),
                _win_cell(r), spread_cell(r), with_ci(r.get("speedup_vs_int8")),
                _x(r["weights"].get("ideal_speedup")),
                f"{r['prefill_ms']:.1f}", _x((speed or {}).get("prefill")), with_ci(r.get("vs_peer")),
                "yes" if id(r) in front else ""])
    return dict(out)


def ppl_basis(r: dict) -> str:
    """Whose perplexity a row carries and on what windows: "PyTorch, 8 × 2048" or "deployment on onnxruntime,
    8 × 511"."""
    by = r.get("perplexity_by")
    if not by:
        return "source not recorded"
    return f"{by['who']}, {by['windows'] or 'all'} × {by['seqlen']}"


def pytorch_basis(quality: list[dict], corpus: str) -> str:
    """The quality tables' perplexities are the PyTorch model's: say so, with their windows."""
    details = quality[0]["perplexity_details"][corpus]
    return f"PyTorch, {details['windows']} × {details['seqlen']}"


def spread_cell(r: dict) -> str:
    """Between-process spread of a row: range of its per-process medians over their mean, and how many."""
    spread = r.get("process_spread")
    return "— (1 process)" if not spread else f"±{spread['range'] / 2:.1%} (n={spread['processes']})"


def _win_cell(r: dict) -> str:
    if is_aa_control(r) or r["allocation"] is None:
        return ""
    return "yes" if r.get("win") else "no"


def _headline_speedup(r: dict) -> dict | None:
    """Against dense fp32 on the same engine; an engine without fp32 files (llama.cpp) against its dense model in
    the row's own format."""
    return r.get("speedup") or sparsity_speedup(r)


def _against(r: dict) -> str:
    return "" if r.get("speedup") or not sparsity_speedup(r) else f" (vs dense {precision_of(r)})"


def _by_engine(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        out[f"{r['engine']} ({r['kv_cache']} KV)"].append(r)
    return dict(sorted(out.items()))


def nm_quality_rows(quality: list[dict], corpus: str) -> list[list[str]]:
    """DLP paper Table 15's shape: one row per in-weight pattern, one column per allocation (perplexity)."""
    rows = [q for q in quality if q["allocation"] is not None and q.get("form", "unstructured") not in SMALLER_FORMS]
    allocations = sorted({column_name(q) for q in rows})
    table = defaultdict(dict)
    for q in rows:
        table[(q.get("form") or "unstructured", q["target_sparsity"])][column_name(q)] = q["perplexity"][corpus]
    out = [["pattern", "sparsity"] + allocations]
    for (form, level), cells in sorted(table.items()):
        out.append([form, f"{level:.0%}"] + [f"{cells[a]:.2f}" if a in cells else "—" for a in allocations])
    return out


def structured_quality_rows(quality: list[dict], corpus: str) -> list[list[str]]:
    """DLP paper Table 14's shape: one row per share of parameters removed, columns importance x allocation."""
    rows = [q for q in quality if q.get("form") == "structured"]
    columns = sorted({(q["importance"], column_name(q)) for q in rows})
    table = defaultdict(dict)
    for q in rows:
        table[q["target_sparsity"]][(q["importance"], column_name(q))] = q
    out = [["removed (target)"] + [f"{imp}, {alloc}" for imp, alloc in columns]]
    for level, cells in sorted(table.items()):
        out.append([f"{level:.0%}"] + [f"{cells[c]['perplexity'][corpus]:.2f} ({cells[c]['removed']:.1%})"
                                       if c in cells else "—" for c in columns])
    return out


DEPTH_HEADER = ["model", "replacement", "layers cut", "removed", "ppl", "replacement MSE (dropping the span)",
                "closest in-weight model by removed share", "its ppl"]


def depth_quality_rows(quality: list[dict], corpus: str) -> list[list[str]]:
    """LLM-Streamline's levels (and their recovered twins), each beside the unstructured or N:M model that
    removes the nearest share of decoder-Linear weights: depth against width at equal parameters."""
    in_weight = [q for q in quality if q["allocation"] is not None and q.get("form") not in SMALLER_FORMS]
    out = [DEPTH_HEADER]
    for q in sorted((q for q in quality if q.get("form") == "depth"), key=lambda q: q["label"]):
        depth = q.get("depth") or {}
        near = min(in_weight, key=lambda o: (abs(o["removed"] - q["removed"]), o.get("recovered") != q.get(
            "recovered")), default=None)
        mse = depth.get("mse_after")
        out.append([q["label"], depth.get("replacement", "—"),
                    f"{depth['layers_removed']} of {depth['num_layers']['before']}" if depth else "—",
                    f"{q['removed']:.1%}", f"{q['perplexity'][corpus]:.2f}",
                    "—" if mse is None else f"{mse:.3g} ({depth['mse_drop_span']:.3g})",
                    "—" if near is None else f"{near['label']} ({near['removed']:.1%})",
                    "—" if near is None else f"{near['perplexity'][corpus]:.2f}"])
    return out


RECOVERY_HEADER = ["model", "from", "ppl before", "ppl after", "held-out C4 ppl before → after", "steps",
                   "tokens", "wall time", "zeros kept"]


def recovery_rows(quality: list[dict], corpus: str) -> list[list[str]]:
    """Every recovered model against the level it was trained from: the evaluation corpus before and after, the
    recovery's own held-out perplexity, its budget, and the zero count it kept."""
    by_label = {q["label"]: q for q in quality}
    out = [RECOVERY_HEADER]
    for q in (q for q in quality if q.get("recovery")):
        rec, base = q["recovery"], by_label.get(q["recovery"]["base"])
        held = rec.get("held_out_perplexity") or {}
        zeros = rec["zeros"]
        out.append([q["label"], rec["base"], f"{base['perplexity'][corpus]:.2f}" if base else "—",
                    f"{q['perplexity'][corpus]:.2f}",
                    f"{held['before']:.2f} → {held['after']:.2f}" if held else "—", str(rec["steps"]),
                    f"{rec['tokens']:,}", f"{rec['wall_s'] / 60:.1f} min",
                    f"{zeros['zeros_after']:,} / {zeros['zeros_before']:,}"])
    return out


# ---------------------------------------------------------------- scaling with cores

def _cores_name(n: int) -> str:
    return f"{n} core" + ("" if n == 1 else "s")


def scaling_header(results: list[dict]) -> list[str]:
    counts = core_counts_in(results)
    header = ["model", "precision"]
    for n in counts:
        header += [f"{_cores_name(n)}: tokens/s"] + ([f"{_cores_name(n)}: vs {_cores_name(counts[0])}"]
                                                     if n != counts[0] else []) + [f"{_cores_name(n)}: vs dense"]
    return header


def scaling_rows(results: list[dict]) -> dict[str, list[list[str]]]:
    """Per engine, one row per model: at each core count its decode tokens/s, its gain over the same model at the
    smallest count, and its speedup against dense of the same precision at that count (never across counts)."""
    counts = core_counts_in(results)
    out: dict[str, list[list[str]]] = {}
    for engine, rows in _by_engine(results).items():
        models: dict[tuple, dict[int, dict]] = defaultdict(dict)
        for r in rows:
            models[same_model(r)][cores_of(r)] = r
        lines = []
        for by_count in sorted(models.values(), key=lambda m: _model_order(next(iter(m.values())))):
            first = next(iter(by_count.values()))
            line = [first["label"], precision_of(first)]
            for n in counts:
                line += _scaling_cells(by_count.get(n), n == counts[0])
            lines.append(line)
        out[engine] = lines
    return out


def _model_order(r: dict) -> tuple:
    """Dense first, then form, series, level and precision, as the forms table orders them."""
    return r["allocation"] is not None, r.get("form") or "", _level_name(r), r["target_sparsity"], precision_of(r)


def _scaling_cells(r: dict | None, smallest: bool) -> list[str]:
    width = 2 if smallest else 3
    if r is None:
        return ["—"] * width
    cells = [f"{r['decode_tokens_per_s']:.1f}"]
    if not smallest:
        cells.append(with_ci(r.get("core_scaling")))
    return cells + [with_ci(sparsity_speedup(r))]
