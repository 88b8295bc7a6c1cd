"""The results table `bench` and `sweep` print (rich): the figures a person compares at a glance."""
from __future__ import annotations

from rich.table import Table

from ..bench.stats import core_counts_in, cores_of, removed_share, sparsity_speedup


def results_table(results: list[dict]):
    """The figures a person compares; p90/p99, RSS and compile time are in the JSON and the report."""
    several = len(core_counts_in(results)) > 1
    table = Table("model", "engine", *(["cores"] if several else []), "removed", "prefill ms", "decode ms", "tok/s",
                  "speedup (95% CI)", caption="decode speedups against the dense deployment in the same precision "
                  "on the same engine" + (" and cores" if several else ""))
    for r in results:
        speed = sparsity_speedup(r)
        ci = (speed or {}).get("decode_ci95")
        table.add_row(r["label"], f"{r['engine']}/{r['kv_cache'][:3]} {r.get('precision', 'fp32')}",
                      *([str(cores_of(r))] if several else []), f"{removed_share(r):.0%}",
                      f"{r['prefill_ms']:.1f}", f"{r['decode_ms']['median']:.2f}", f"{r['decode_tokens_per_s']:.1f}",
                      "—" if not speed else f"{speed['decode']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
    return table
