"""PNG plots for a speedup report, from the sweep results' rows only."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .tables import column_name, pareto_front, series  # noqa: E402


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, log_y: bool = False) -> Path:
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both" if log_y else "major")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _line_plot(results, y, ylabel, title, path: Path, ideal=None, band: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if band:
        ax.axhspan(1 - band, 1 + band, color="gray", alpha=0.15, lw=0, label=f"noise floor (±{band:.0%})")
    for (engine, allocation), rows in series(results).items():
        xs = [r["target_sparsity"] * 100 for r in rows]
        ax.plot(xs, [y(r) for r in rows], marker="o", label=f"{engine} / {allocation}")
    if ideal is not None:  # engine-independent: one dashed line per allocation
        drawn = set()
        for (engine, allocation), rows in series(results).items():
            if allocation not in drawn:
                drawn.add(allocation)
                ax.plot([r["target_sparsity"] * 100 for r in rows], [ideal(r) for r in rows], "--", lw=1,
                        color="black" if len(drawn) == 1 else "gray", label=f"bandwidth-bound ideal ({allocation})")
    return _finish(fig, ax, path, "target sparsity (%)", ylabel, title)


def decode_throughput(results, path: Path) -> Path:
    return _line_plot(results, lambda r: r["decode_tokens_per_s"], "decode tokens/s (median step)",
                      "Decode throughput vs sparsity", path)


def decode_speedup(results, path: Path, band: float | None = None) -> Path:
    return _line_plot(results, lambda r: (r.get("speedup") or {}).get("decode", float("nan")),
                      "decode speedup vs dense", "Decode speedup vs sparsity", path,
                      ideal=lambda r: r["weights"]["ideal_speedup"], band=band)


def prefill_speedup(results, path: Path) -> Path:
    return _line_plot(results, lambda r: (r.get("speedup") or {}).get("prefill", float("nan")),
                      "prefill (time to first token) speedup", "Prefill speedup vs sparsity", path)


def perplexity(quality, corpus: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = [q for q in quality if q["allocation"] is None]
    for allocation in sorted({column_name(q) for q in quality if q["allocation"]}):
        rows = dense + sorted((q for q in quality if q["allocation"] and column_name(q) == allocation),
                              key=lambda q: q["target_sparsity"])
        ax.plot([q["target_sparsity"] * 100 for q in rows], [q["perplexity"][corpus] for q in rows], marker="o",
                label=allocation)
    return _finish(fig, ax, path, "target sparsity (%)", f"{corpus} perplexity (log)", "Quality vs sparsity", True)


def tradeoff(results, corpus: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (engine, allocation), rows in series(results).items():
        ax.plot([r["decode_tokens_per_s"] for r in rows], [r["perplexity"][corpus] for r in rows], marker="o",
                label=f"{engine} / {allocation}")
        for r in rows:
            ax.annotate(f"{r['target_sparsity']:.0%}", (r["decode_tokens_per_s"], r["perplexity"][corpus]),
                        fontsize=6, alpha=0.7)
    return _finish(fig, ax, path, "decode tokens/s", f"{corpus} perplexity (log)", "Speed / quality trade-off", True)


_FORM_COLOURS = {"dense": "black", "unstructured": "tab:blue", "nm": "tab:orange", "mixed": "tab:green",
                 "structured activation": "tab:red", "structured taylor": "tab:purple", "depth": "tab:brown"}
_ENGINE_MARKERS = ["o", "s", "^", "D", "v"]


def _form_family(r: dict) -> str:
    form = r.get("form") or "unstructured"
    if r["allocation"] is None:
        return "dense"
    if form == "structured":
        return f"structured {r.get('importance')}"
    if form == "depth":
        return "depth"
    return "mixed" if form.startswith("mixed") else ("nm" if ":" in form else "unstructured")


def pareto(results, corpus: str, path: Path) -> Path:
    """Decode tokens/s against perplexity, one point per (model, engine) run, no lines between unrelated points;
    each engine's Pareto front (faster and better than no other point) is ringed and joined by a dashed step."""
    fig, ax = plt.subplots(figsize=(7.6, 5.2))
    engines = sorted({(r["engine"], r["kv_cache"]) for r in results})
    for k, engine in enumerate(engines):
        rows = [r for r in results if (r["engine"], r["kv_cache"]) == engine]
        pts = [(r["decode_tokens_per_s"], r["perplexity"][corpus]) for r in rows]
        front = pareto_front(pts)
        for i, (r, (x, y)) in enumerate(zip(rows, pts)):
            # a recovered model: its form's colour, ringed in black
            ax.scatter(x, y, color=_FORM_COLOURS[_form_family(r)], marker=_ENGINE_MARKERS[k % 5], s=36, zorder=3,
                       edgecolors="black" if r.get("recovered") else "none", linewidths=1.4)
            if i in front:  # only the front is named; every point is in the tables
                ax.annotate(r["label"].replace("structured-", "s-"), (x, y), fontsize=6, alpha=0.8,
                            xytext=(3, 2), textcoords="offset points")
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", ls="--", lw=0.8,
                color="gray", zorder=2)
        ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], facecolors="none", edgecolors="black",
                   s=110, marker=_ENGINE_MARKERS[k % 5], zorder=4)
    for name, colour in _FORM_COLOURS.items():
        if any(_form_family(r) == name for r in results):
            ax.scatter([], [], color=colour, label=name)
    if any(r.get("recovered") for r in results):
        ax.scatter([], [], color="white", edgecolors="black", linewidths=1.4, label="+recovery (LoRA)")
    for k, engine in enumerate(engines):
        ax.scatter([], [], color="gray", marker=_ENGINE_MARKERS[k % 5], label=f"{engine[0]} ({engine[1]} KV)")
    ax.scatter([], [], facecolors="none", edgecolors="black", s=110, label="Pareto front (per engine)")
    return _finish(fig, ax, path, "decode tokens/s (median step)", f"{corpus} perplexity (log)",
                   "Speed / quality of every pruning form", True)


def layer_ratios(ratios: dict[float, dict[str, list[float]]], path: Path, title: str) -> Path:
    """One panel per target sparsity: each allocation's per-layer ratio against the layer index."""
    levels = sorted(ratios)
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 4.0), sharey=True, squeeze=False)
    for ax, level in zip(axes[0], levels):
        for name, values in ratios[level].items():
            ax.plot(range(len(values)), values, marker=".", lw=1.2, label=name)
        ax.axhline(level, color="gray", lw=0.8, ls="--")
        ax.set_title(f"target {level:.0%}")
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sparsity ratio")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, path)
