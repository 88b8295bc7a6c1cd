"""`dlp-deploy report`: Markdown + self-contained HTML (plots inlined) from sweep results.json files only."""
from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from functools import partial
from pathlib import Path

from ..errors import UserError
from ..bench.records import SWEEP_SCHEMA, load_results, perplexity_by, random_model_record
from ..bench.stats import (aa_floor, attach_speedups, control_spread, core_counts_in, cores_of, dense_drift,
                           has_sparse_kernels, is_aa_control, is_dense, lower_end, noise_floor, peer_rows,
                           precision_of, removes_weights, replication, sparsity_speedup, PEER_ENGINE,
                           PEER_PRECISION, SMALLER_FORMS)
from ..io import atomic_dir
from . import figures
from .tables import (FORMS_HEADER, TABLE5_HEADER, depth_quality_rows, forms, forms_rows, nm_quality_rows,
                     ppl_basis, pytorch_basis, quality_rows, recovery_rows, scaling_header, scaling_rows,
                     structured_quality_rows, table5_rows, unstructured_only, with_ci)

SCHEMA = SWEEP_SCHEMA


def load_runs(run_dirs: list[Path]) -> dict:
    runs = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"{path} not found; give a RUN_DIR written by `dlp-deploy sweep`")
        runs.append(load_results(path, SCHEMA))  # files from before schema_version: its one adapter
    machines = {(run["machine"]["cpu_model"], tuple(run["machine"]["isa"])) for run in runs}
    if len(machines) > 1:
        raise UserError("these runs were measured on different machines (" +
                        "; ".join(f"{cpu}, {'/'.join(isa)}" for cpu, isa in sorted(machines)) +
                        "): speedups only compare within one machine, so report each machine's runs separately")
    for run in runs:
        _label_perplexities(run)
    runs, earlier = _split_replication(runs, run_dirs)
    merged = dict(runs[0])
    merged["results"] = [r for run in runs for r in run["results"]]
    # runs over the same prepared folders (one sweep per engine or cache mode) repeat its quality entries
    merged["quality"] = list({q["label"]: q for run in reversed(runs) for q in run["quality"]}.values())[::-1]
    merged["unmeasured"] = [u for run in runs for u in run.get("unmeasured", [])]
    attach_speedups(merged["results"])  # against the dense rows of all runs given, by the current rule
    if earlier is not None:
        merged["replicated_from"] = earlier
    return merged


def _split_replication(runs: list[dict], run_dirs: list[Path]) -> tuple[list[dict], dict | None]:
    """A run that replicates an earlier one is compared with it, never merged into its tables: the earlier run is
    the one given beside it, or the folder its results.json names."""
    new = next((run for run in runs if run.get("replicates")), None)
    if new is None:
        return runs, None
    given = {str(Path(d).resolve()): run for d, run in zip(run_dirs, runs)}
    earlier = given.get(str(Path(new["replicates"]).resolve()))
    if earlier is None:
        path = Path(new["replicates"]) / "results.json"
        if not path.is_file():
            # a committed report carries the earlier run's rows; otherwise the earlier run is gone: report the new
            # one alone
            return runs, new.get("replicated_from")
        earlier = load_results(path, SCHEMA)
    attach_speedups(earlier["results"])
    return [run for run in runs if run is not earlier], {"run": new["replicates"], "results": earlier["results"]}


def _label_perplexities(run: dict) -> None:
    """Rows written before they said whose perplexity they carry: read it off their quality entry as the sweep
    decides it now (records.perplexity_by)."""
    settings = {"max_windows": None, "seq_len": 512, **run["settings"]}
    quality = {q["label"]: q for q in run["quality"]}
    for r in run["results"]:
        entry = quality.get(r["label"].removesuffix(f".{precision_of(r)}").split(" ")[0])
        if r.get("perplexity_by") is None and entry is not None:
            r["perplexity_by"] = perplexity_by(settings, {"deployment_perplexity": {}, **entry}, precision_of(r))


def at_largest_count(data: dict) -> dict:
    """The sections before core lists existed read one core count, the largest (the machine as deployed); only
    the scaling table puts counts side by side."""
    counts = core_counts_in(data["results"])
    if len(counts) < 2:
        return data
    return {**data, "results": [r for r in data["results"] if cores_of(r) == counts[-1]]}


def report_plots(data: dict) -> dict:
    """The figures a report of `data` draws: file name -> (drawing function, its arguments before the path)."""
    corpus = data["settings"]["ppl"][0]
    main = at_largest_count(data)["results"]
    unstructured = unstructured_only(main)
    plots = {}
    if len(forms(main)) > 1 or len({precision_of(r) for r in main}) > 1:
        plots["pareto.png"] = (figures.pareto, [r for r in main if not is_aa_control(r)], corpus)
    if forms(unstructured):
        plots.update({
            "decode_tokens_per_s.png": (figures.decode_throughput, unstructured),
            "decode_speedup.png": (partial(figures.decode_speedup, band=noise_floor(main)["value"]), unstructured),
            "prefill_speedup.png": (figures.prefill_speedup, unstructured),
            "perplexity.png": (figures.perplexity, unstructured_only(data["quality"]), corpus),
            "tradeoff.png": (figures.tradeoff, unstructured, corpus),
        })
    return plots


def report_markdown(data: dict) -> str:
    """report.md of `data` without drawing its figures (they are referred to by name): what a regenerated report
    is compared on."""
    plots = set(report_plots(data))
    return to_markdown(build_sections(data, data["settings"]["ppl"][0], plots), plots)


def make_report(run_dirs: list[Path], out: Path, force: bool = False) -> Path:
    data = load_runs(run_dirs)
    with atomic_dir(out, force) as tmp:
        _write_report(data, tmp)
    return out


def _write_report(data: dict, folder: Path) -> None:
    plots = {}
    for name, (draw, *args) in report_plots(data).items():
        plots[name] = draw(*args, folder / name)
    sections = build_sections(data, data["settings"]["ppl"][0], set(plots))
    (folder / "report.md").write_text(to_markdown(sections, plots))
    (folder / "report.html").write_text(to_html(sections, plots))
    (folder / "results.json").write_text(json.dumps(data, indent=2))


def rewrite_report(folder: Path) -> Path:
    """Regenerate a report in place from its own results.json (a committed report needs nothing else). Files the
    report does not write (notes, READMEs beside it) stay; each written file replaces its old self only once all
    are written."""
    folder = Path(folder)
    data = load_runs([folder])
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent) as tmp:
        _write_report(data, Path(tmp))
        for path in sorted(Path(tmp).iterdir()):
            os.replace(path, folder / path.name)
    return folder


def random_weights_note(data: dict) -> str | None:
    """A model made by `dlp-deploy models random` measures speed only: say so before any figure. Runs written
    before results.json kept the record read it from the model folder, where it still exists."""
    info = data.get("random_weights") or random_model_record(data["settings"]["model"])
    if not info:
        return None
    return (f"**Random weights** ({info.get('shape')}, seed {info.get('seed')}): this model has a real model's "
            "shape and random weights, so its speed figures are real and its perplexities mean nothing (they are "
            "shown only because the tables have the column).")


def build_sections(data: dict, corpus: str, plots: set[str] | None = None) -> list[tuple[str, object]]:
    """The report as (kind, content) items: ('h', title), ('p', text), ('table', rows), ('plot', name)."""
    plots = plots if plots is not None else {"decode_tokens_per_s.png", "decode_speedup.png", "prefill_speedup.png",
                                             "perplexity.png", "tradeoff.png"}
    settings, m, everything = data["settings"], data["machine"], data["results"]
    data = at_largest_count(data)
    items: list[tuple[str, object]] = [("h1", f"Speedup report: {settings['model']}, {settings['method']} pruning")]
    random_note = random_weights_note(data)
    if random_note:
        items.append(("p", random_note))
    items += [("p", line) for line in verdict_lines(data)]  # the first screen: at most five lines, then the figure
    if "pareto.png" in plots:
        items.append(("plot", "pareto.png"))
    if data.get("replicated_from"):
        items += replication_section(data)
    items.append(("h", "Summary"))
    items.append(("p", summary_sentence(data)))
    if data.get("unmeasured"):
        items.append(("p", unmeasured_sentence(data["unmeasured"])))
    items.append(("h", "Machine"))
    cache = m.get("last_level_cache_bytes")
    items.append(("table", [["CPU", "ISA", "cores used / usable", "memory", "last-level cache",
                              "copy bandwidth (1 thread = per core)"],
                            [m["cpu_model"], ", ".join(m["isa"]),
                             f"{_cores_used(m, everything)} / {m['usable_cores']}",
                             f"{m['memory_gib']} GiB", f"{cache / 2**20:.0f} MiB" if cache else "unknown",
                             f"{m['copy_bandwidth_gbs']:.1f} GB/s"]]))
    kernels = openvino_kernel_sentence(data["results"], m)
    if kernels:
        items.append(("p", kernels))
    if m["cores_used"] <= 4:
        items.append(("p", f"Measured on {m['cores_used']} cores. Sparse kernels need cores to decompress and "
                           "bandwidth to save; a 2-core machine shows the least of what DeepSparse can do."))
    if len(core_counts_in(everything)) > 1:
        items += scaling_section(everything, m)
    if "pareto.png" in plots:
        items += forms_sections(data, corpus)
    if "decode_speedup.png" not in plots:
        items += noise_and_versions(data)
        return items
    items.append(("h", "Decode, unstructured (Table 5 form)"))
    items.append(("p", f"Prompt {settings['prompt_len']} tokens, {settings['gen_len']} generated, median of "
                       f"{settings['runs']} runs after {settings['warmup']} warm-up; latency is the median per-token "
                       "decode step. Ideal = dense / non-zero fp32 weight bytes streamed per token (what a purely "
                       "bandwidth-bound engine could gain; lm_head stays dense)."))
    for (engine, allocation), rows in table5_rows(unstructured_only(data["results"])).items():
        items.append(("h3", f"{engine}, {allocation} allocation"))
        items.append(("table", [TABLE5_HEADER] + rows))
    items += noise_items(data)
    for name in ("decode_tokens_per_s.png", "decode_speedup.png", "prefill_speedup.png"):
        items.append(("plot", name))
    items.append(("h", f"Quality ({corpus} perplexity, {pytorch_basis(data['quality'], corpus)})"))
    items.append(("p", _quality_setup(settings, data["quality"], corpus)))
    items.append(("table", quality_rows(unstructured_only(data["quality"]), corpus)))
    items += [("plot", "perplexity.png"), ("plot", "tradeoff.png")]
    items.append(("h", "Versions"))
    items.append(("table", [["package", "version"]] + [[k, str(v)] for k, v in data["provenance"]["versions"].items()]))
    return items


def _cores_used(machine: dict, results: list[dict]) -> str:
    counts = core_counts_in(results)
    return ", ".join(map(str, counts)) if len(counts) > 1 else str(machine["cores_used"])


def scaling_section(results: list[dict], machine: dict) -> list[tuple[str, object]]:
    """Each model at every core count measured, with the bandwidth per core that relates the figures to other
    machines: a decode step that streams its weights is bound by memory bandwidth more than by cores."""
    counts = core_counts_in(results)
    items: list[tuple[str, object]] = [("h", "Scaling with cores")]
    items.append(("p", f"Every model measured at {', '.join(map(str, counts))} cores, interleaved. 'vs "
                       f"{counts[0]} core{'s' if counts[0] > 1 else ''}': decode gain over the same model at that "
                       "count; 'vs dense': against the dense model of the same precision at the same count (speedups "
                       f"never divide across counts). The other sections show {counts[-1]} cores."))
    items.append(("p", bandwidth_sentence(machine, counts)))
    for engine, rows in scaling_rows(results).items():
        items.append(("h3", engine))
        items.append(("table", [scaling_header(results)] + rows))
    return items


def bandwidth_sentence(machine: dict, counts: list[int]) -> str:
    by = machine.get("copy_bandwidth_gbs_by_threads") or {"1": machine["copy_bandwidth_gbs"]}
    said = [f"{by[str(n)]:.1f} GB/s with {n} thread{'s' if n > 1 else ''}"
            + ("" if n == 1 else f" ({by[str(n)] / n:.1f} GB/s per core)")
            for n in sorted({1, *counts}) if str(n) in by]
    return ("Measured copy bandwidth (read + write) on this machine: " + ", ".join(said) + "; decode streams "
            "every weight once per token, so relate these figures to a larger machine by its bandwidth per core "
            "and in total rather than by its core count alone.")


def openvino_kernel_sentence(results: list[dict], machine: dict) -> str | None:
    rows = [r for r in results if r["engine"] == "openvino" and r.get("kernels")]
    if not rows:
        return None
    amx = "amx_int8" in machine.get("isa", [])
    used = [r["label"] for r in rows if r["kernels"].get("sparse_kernel_used")]
    types = sorted({t for r in rows for t in r["kernels"]["matmul_exec_types"]})
    return (f"OpenVINO: this CPU {'has' if amx else 'has no'} AMX-INT8, the only ISA with its sparse INT8 kernel; "
            f"a sparse kernel ran for {len(used)} of {len(rows)} OpenVINO rows"
            f"{' (' + ', '.join(used) + ')' if used else ''}. MatMul kernels executed: {', '.join(types)}.")


def forms_sections(data: dict, corpus: str) -> list[tuple[str, object]]:
    """Every form against the same dense model in one table per engine, the Pareto figure, and the quality
    tables in the DLP paper's shapes (Table 15: N:M patterns x allocation; Table 14: structured)."""
    settings = data["settings"]
    items: list[tuple[str, object]] = [("h", "Pruning forms compared")]
    items.append(("p", "One row per model: `removed` is the share of decoder-Linear weights that are zeros (unstructured, "
                       "N:M) or gone (structured: heads, KV groups and MLP channels removed; depth: whole layers cut; "
                       "so every engine runs a smaller dense model). Speedups divide by the dense model on the same engine in this run; "
                       "ideal = dense fp32 weight bytes over the bytes this model streams per token. 'On Pareto "
                       f"front': no other model on that engine is both faster and better in {corpus} perplexity."))
    for engine, rows in forms_rows(data["results"], corpus).items():
        items.append(("h3", engine))
        items.append(("table", [FORMS_HEADER] + rows))
    items.append(("p", "Pareto figure: above, under the verdict (only the models on a front are labelled)."))
    if any(q.get("form", "unstructured") not in SMALLER_FORMS and q["allocation"] for q in data["quality"]):
        items.append(("h3", f"N:M patterns (Table 15 form, {corpus} perplexity, {pytorch_basis(data['quality'], corpus)})"))
        items.append(("table", nm_quality_rows(data["quality"], corpus)))
    if any(q.get("form") == "structured" for q in data["quality"]):
        items.append(("h3", f"Structured (Table 14 form, {corpus} perplexity, {pytorch_basis(data['quality'], corpus)}; "
                            "parameters removed in brackets)"))
        items.append(("p", f"Heads ({settings.get('structure')}) removed in whole query heads per KV group or whole KV "
                           f"groups; MLP widths kept a multiple of {settings.get('multiple', 8)}."))
        items.append(("table", structured_quality_rows(data["quality"], corpus)))
    if any(q.get("form") == "depth" for q in data["quality"]):
        items.append(("h3", f"Depth pruning (LLM-Streamline, {corpus} perplexity, {pytorch_basis(data['quality'], corpus)})"))
        items.append(("p", "The most redundant contiguous span of decoder layers (highest cosine between the hidden "
                           "state entering and leaving it on calibration text) is cut and replaced: none, an "
                           "MLP-only block (ffn, swiglu) or one decoder layer, trained on the span's input and "
                           "output with MSE. `removed` counts the original decoder-Linear weights gone, net of the "
                           "replacement, so it compares with the in-weight forms' sparsity."))
        items.append(("table", depth_quality_rows(data["quality"], corpus)))
    if any(q.get("recovery") for q in data["quality"]):
        items.append(("h3", "Recovery fine-tuning (LoRA, zeros kept)"))
        items.append(("p", "LoRA on every decoder Linear, trained on C4 windows with the update masked by the "
                           "pruned weights' keep mask (in training and at the merge), so the zero set is the "
                           "base's exactly; the held-out column is C4 text the calibration sampler did not draw."))
        items.append(("table", recovery_rows(data["quality"], corpus)))
    items.append(("p", _quality_setup(settings, data["quality"], corpus)))
    return items


def unmeasured_sentence(unmeasured: list[dict]) -> str:
    """Pairs the sweep gave up on (--bench-timeout): named, so that a missing row is never read as a result."""
    names = "; ".join(f"{u['label']} ({u['precision']}) on {u['engine']} ({u['kv_cache']} KV cache): "
                      f"{u['reason']}" for u in unmeasured)
    return f"Not measured, so absent from every table and figure below: {names}."


def noise_items(data: dict) -> list[tuple[str, object]]:
    """The noise floor and what else the run says of its noise, then the sanity checks on its figures."""
    items: list[tuple[str, object]] = [("h3", "Noise"), ("p", noise_paragraph(data["results"]))]
    flags = sanity_flags(data)
    items += [("h3", "Sanity checks")] + [("p", f) for f in flags] if flags else []
    return items


def noise_and_versions(data: dict) -> list[tuple[str, object]]:
    return [*noise_items(data), ("h", "Versions"),
            ("table", [["package", "version"]] + [[k, str(v)] for k, v in data["provenance"]["versions"].items()])]


def _clears(r: dict) -> bool:
    """A decode speedup the run calls a win (stats.attach_floors): against the dense model of the row's own
    precision (so INT8's gain is not credited to sparsity), its interval's lower end above 1.0x plus the A/A
    floor of its engine."""
    return bool(r.get("win"))


def _first_clearing(rows: list[dict]) -> dict | None:
    """The lowest level whose speedup clears the floor: a level named by a rule, not the maximum of noisy rows."""
    return next((r for r in sorted(rows, key=lambda r: (r["target_sparsity"], r["label"])) if _clears(r)), None)


def floor_clause(results: list[dict]) -> str:
    floor = noise_floor(results)
    if floor["source"].startswith("A/A"):
        return (f"Speedups whose 95% interval does not clear 1.0x plus the A/A floor (up to ±{floor['value']:.1%}) "
                "are not told apart from noise (below)")
    return (f"Speedups within ±{floor['value']:.0%} of 1.0x are not told apart from noise (this run has no A/A "
            "control; below)")


def _engine_groups(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        name = f"{r['engine']} ({r['kv_cache']} KV cache{'' if precision_of(r) == 'fp32' else ', ' + precision_of(r)})"
        out.setdefault(name, []).append(r)
    return dict(sorted(out.items()))


def summary_sentence(data: dict) -> str:
    """The answer first: per engine, the first level at which sparsity buys a decode speedup beyond this run's
    noise (or that none does), and the sparsest level's figures next to the bandwidth-bound ideal."""
    rows = [r for r in data["results"] if sparsity_speedup(r) and r["allocation"] is not None]
    if not rows:
        return "No dense baseline in these runs, so no speedups are computed."
    if len(forms(rows)) > 1 or len({precision_of(r) for r in rows}) > 1 or any(not r.get("speedup") for r in rows):
        return forms_summary(rows, data["settings"]["ppl"][0], data["results"])
    primary = data["settings"]["allocations"][0]
    parts = []
    for engine, mine in _engine_groups(rows).items():
        main = [r for r in mine if r["allocation"] == primary] or mine
        top = max(main, key=lambda r: r["target_sparsity"])
        first = _first_clearing(main)
        if not has_sparse_kernels(mine[0]):
            verdict = "dense kernels, so no speedup is expected and what it shows is noise"
        elif first:
            verdict = (f"from {first['target_sparsity']:.0%} ({primary}) on, sparsity buys a decode speedup beyond "
                       f"this run's noise ({first['speedup']['decode']:.2f}x there)")
        else:
            verdict = f"no level ({primary}) speeds up decode beyond this run's noise"
        parts.append(f"{engine}: {verdict}; at {top['target_sparsity']:.0%} {top['speedup']['decode']:.2f}x decode "
                     f"and {top['speedup']['prefill']:.2f}x prefill, against a bandwidth-bound ideal of "
                     f"{top['weights']['ideal_speedup']:.2f}x")
    return ". ".join(parts) + f". {floor_clause(data['results'])}."


def forms_summary(rows: list[dict], corpus: str, all_rows: list[dict] | None = None) -> str:
    """Per engine and form: the lowest level whose decode speedup clears this run's noise, with its perplexity,
    or that none does (zeros on a dense-kernel engine are noise by construction)."""
    parts = []
    for engine, mine in _engine_groups(rows).items():
        said = []
        for form in forms(mine):
            of_form = [r for r in mine if (r.get("form") or "unstructured") == form]
            if not has_sparse_kernels(of_form[0]) and not removes_weights(of_form[0]):
                said.append(f"{form}: noise only (dense kernels)")
                continue
            first = _first_clearing(of_form)
            if first is None:
                said.append(f"{form}: no level beyond noise")
            else:
                said.append(f"{form}: from {first['target_sparsity']:.0%} ({first['label']}, "
                            f"{sparsity_speedup(first)['decode']:.2f}x, ppl {first['perplexity'][corpus]:.1f})")
        parts.append(f"{engine}, first level of each form whose decode speedup (against dense in the same "
                     "precision) clears the noise: " + "; ".join(said))
    all_rows = all_rows or rows
    parts += [quantization_sentence(all_rows)] if any(precision_of(r) == "int8" for r in all_rows) else []
    parts += [peer_sentence(all_rows, corpus)] if peer_rows(all_rows) else []
    parts += [fastest_sentence(all_rows, corpus)] if any(r.get("speedup") for r in all_rows) else []
    return ". ".join(parts) + f". {floor_clause(all_rows)}."


def quantization_sentence(rows: list[dict]) -> str:
    """What INT8 alone buys per engine: dense INT8 against dense fp32, with the perplexity it costs."""
    said = []
    for r in sorted(rows, key=lambda r: r["engine"]):
        if precision_of(r) == "int8" and r["allocation"] is None and r.get("speedup"):
            said.append(f"{r['engine']} {with_ci(r['speedup'])}")
    return "INT8 alone (dense INT8 against dense fp32): " + ", ".join(said) if said else "no dense INT8 row"


def peer_sentence(rows: list[dict], corpus: str) -> str:
    """Where every deployment stands against the peer users would pick (dense llama.cpp in 4-bit), in decode
    speed and perplexity: which beat it, and the fastest of those that do not."""
    peer = next(iter(peer_rows(rows).values()))
    others = [r for r in rows if r is not peer and r.get("vs_peer") and not is_aa_control(r)]
    faster = sorted((r for r in others if lower_end(r["vs_peer"]) > 1.0), key=lambda r: -r["vs_peer"]["decode"])
    head = (f"The peer, dense {PEER_ENGINE} {PEER_PRECISION}: {peer['decode_tokens_per_s']:.1f} tokens/s, "
            f"ppl {peer['perplexity'][corpus]:.2f}")
    if not faster:
        best = max(others, key=lambda r: r["vs_peer"]["decode"], default=None)
        tail = "" if best is None else (f"; the closest is {_who(best)} at {best['vs_peer']['decode']:.2f}x "
                                        f"(ppl {best['perplexity'][corpus]:.2f})")
        return head + ". No other deployment decodes faster beyond its 95% interval" + tail
    return head + ". Faster beyond their 95% interval: " + ", ".join(
        f"{_who(r)} {r['vs_peer']['decode']:.2f}x at ppl {r['perplexity'][corpus]:.2f}" for r in faster)


def fastest_sentence(rows: list[dict], corpus: str) -> str:
    """The fastest deployment of the run on any engine, against the dense fp32 and dense INT8 models on its
    engine, with the perplexity it costs over dense fp32 there (the figure a deployment decision starts from)."""
    best = max((r for r in rows if not is_aa_control(r)), key=lambda r: r["decode_tokens_per_s"])
    dense = next((r for r in rows if is_dense(r) and precision_of(r) == "fp32" and r["engine"] == best["engine"]),
                 None)
    said = [f"Fastest deployment: {_who(best)}, {best['decode_tokens_per_s']:.1f} tokens/s, ppl "
            f"{best['perplexity'][corpus]:.2f}"]
    for key, name in (("speedup", "dense fp32"), ("speedup_vs_int8", "dense INT8")):
        block = best.get(key)
        if block:
            said.append(f"{with_ci(block)} over {name} on {best['engine']}")
    if dense is not None and dense is not best:
        said.append(f"perplexity {best['perplexity'][corpus] / dense['perplexity'][corpus] - 1:+.0%} over dense fp32 "
                    f"({dense['perplexity'][corpus]:.2f})")
    return "; ".join(said)


def _who(r: dict) -> str:
    return f"{r['label']} on {r['engine']} ({precision_of(r)})"


def noise_paragraph(results: list[dict]) -> str:
    """What the run itself says about its noise: the A/A floor first (what decides a win), the spread between
    worker processes, dense drift, the dense-kernel control, the harness's own cost."""
    sentences = [floor_sentence(results)]
    spread = [r for r in results if is_dense(r) and r.get("process_spread")]
    if spread:
        sentences.append("Between worker processes, the dense model's per-process median decode steps differ by " +
                         "; ".join(f"{r['engine']} ({r['kv_cache']} KV) {_spread(r['process_spread'])}"
                                   for r in spread) +
                         "; intervals resample processes, then runs within each (a cluster bootstrap).")
    single = [r for r in results if sparsity_speedup(r) and not r.get("process_spread")]
    if single:
        sentences.append(f"{len(single)} rows were measured in one worker process: their intervals show only the "
                         "run-to-run noise within that process, which understates the noise between processes.")
    drift = dense_drift(results)
    remeasured = [r for r in results if is_dense(r) and r.get("remeasured")]
    if drift and remeasured:
        dense = {(r["engine"], r["kv_cache"]): r for r in remeasured}
        sentences.append("The dense model was measured first and again after all levels: " + "; ".join(
            f"{e} ({kv} KV) {dense[e, kv]['decode_ms']['median']:.2f} → "
            f"{dense[e, kv]['remeasured']['decode_ms']['median']:.2f} ms per decode step ({d:+.1%})"
            for (e, kv), d in sorted(drift.items())) + "; speedups divide by the mean of the two.")
    elif drift:
        sentences.append("Every model was measured in interleaved rounds (ABBA or shuffled; separate worker "
                         "processes), the dense fp32 model's first and last round differing by " + "; ".join(
                             f"{e} ({kv} KV) {d:+.1%}" for (e, kv), d in sorted(drift.items())) +
                         "; speedups are ratios of medians over every run of every round.")
    control = control_spread([r for r in results if not is_aa_control(r)])
    if control:
        engines = sorted({r["engine"] for r in results if not has_sparse_kernels(r)})
        sentences.append(f"{', '.join(engines)} multiplies zeros like any other weight, so it does the same work at "
                         f"every sparsity: its decode 'speedups' span {min(control):.2f}x–{max(control):.2f}x, which "
                         "is what noise alone does here.")
    overhead = [r["harness_overhead"]["fraction_of_decode"] for r in results if r.get("harness_overhead")]
    if overhead:
        sentences.append(f"The harness's own cost per token is at most {max(overhead):.2%} of a decode step"
                         + (" (above 2%: see the sanity checks)." if max(overhead) > OVERHEAD_FLAG else "."))
    return " ".join(sentences)


def _spread(spread: dict) -> str:
    return (f"{spread['range']:.1%} (range over {spread['processes']} processes: "
            + ", ".join(f"{m:.2f}" for m in spread["medians"]) + f" ms; CV {spread['cv']:.1%})")


def floor_sentence(results: list[dict]) -> str:
    """The A/A control's ratios and the floor they set, or what stands in for it in a run without one."""
    aa = sorted((r for r in results if is_aa_control(r) and sparsity_speedup(r)), key=_who)
    floor = noise_floor(results)
    if not aa:
        return (f"Noise floor ±{floor['value']:.0%} ({floor['source']}): this run has no A/A control, so a speedup "
                "is called a win only when its interval clears that.")
    return ("A/A control: the dense deployment measured again as a second model, interleaved like the others; its "
            "'speedup' over dense is " + "; ".join(
                f"{r['engine']} ({r['kv_cache']} KV, {precision_of(r)}) {with_ci(sparsity_speedup(r))}, floor "
                f"±{aa_floor(sparsity_speedup(r)):.1%}" for r in aa) +
            f". Noise floor of this run: ±{floor['value']:.1%}. A speedup is a win only when its 95% interval's "
            "lower end clears 1.0x plus its engine's floor.")


OVERHEAD_FLAG = 0.02  # a harness cost above this share of a decode step is explained in the report


def sanity_flags(data: dict) -> list[str]:
    """Checks on the figures themselves: a speedup above its bandwidth ideal, a harness cost above 2%."""
    return ideal_flags(data) + overhead_flags(data["results"])


def ideal_flags(data: dict) -> list[str]:
    """Each measured decode speedup above the bandwidth-bound ideal, with the bytes behind the ideal."""
    depth = {q["label"]: q["depth"] for q in data["quality"] if q.get("depth")}
    flags = []
    for r in data["results"]:
        speed, weights = r.get("speedup"), r.get("weights") or {}
        ideal = weights.get("ideal_speedup")
        if not speed or not ideal or is_dense(r) or is_aa_control(r) or speed["decode"] <= ideal:
            continue
        base = next((b for b in data["results"] if b["label"] == speed["baseline"] and b["engine"] == r["engine"]
                     and b["kv_cache"] == r["kv_cache"]), None)
        dense_bytes = (base or {}).get("weights", {}).get("dense_bytes")
        arithmetic = (f"{dense_bytes / 1e6:.1f} MB / {weights['sparse_bytes'] / 1e6:.1f} MB = {ideal:.2f}x"
                      if dense_bytes else f"{ideal:.2f}x")
        layers = depth.get(r["label"])
        why = (f" The ideal counts MatMul weight bytes only (lm_head and embeddings included, so cutting layers "
               f"saves a smaller share of them); work that scales with the layer count instead (attention over the "
               f"cache window, norms, per-layer dispatch{', the external cache copy' if r['kv_cache'] == 'external' and r['engine'] == 'deepsparse' else ''}) "
               f"falls by {layers['num_layers']['before']}/{layers['num_layers']['after']} = "
               f"{layers['num_layers']['before'] / layers['num_layers']['after']:.2f}x, so the step is not purely "
               "weight-bandwidth-bound here." if layers else
               " A speedup above the bytes it saves means something other than weight streaming changed: check the "
               "kernels and the noise floor before reading it as a sparsity gain.")
        flags.append(f"{r['label']} on {r['engine']} ({r['kv_cache']} KV): decode {with_ci(speed)} is above its "
                     f"bandwidth ideal, dense weight bytes per token over this model's non-zero bytes: {arithmetic}"
                     + (" (even the interval's lower end is above it)." if lower_end(speed) > ideal else ".") + why)
    return flags


def overhead_flags(results: list[dict]) -> list[str]:
    """Harness cost above OVERHEAD_FLAG, per engine and cache mode, with how it is measured and why it is high."""
    worst: dict[tuple, dict] = {}
    for r in results:
        share = (r.get("harness_overhead") or {}).get("fraction_of_decode") or 0.0
        key = (r["engine"], r["kv_cache"])
        if share > OVERHEAD_FLAG and share > worst.get(key, {}).get("harness_overhead", {}).get("fraction_of_decode", 0):
            worst[key] = r
    flags = []
    for (engine, kv), r in sorted(worst.items()):
        o = r["harness_overhead"]
        fixed_window = engine == "deepsparse" and kv == "external"
        flags.append(
            f"Harness cost on {engine} ({kv} KV) reaches {o['fraction_of_decode']:.1%} of a decode step "
            f"({o['ms_per_token']:.2f} ms per token, {r['label']}), above {OVERHEAD_FLAG:.0%}. It is timed by running "
            "the same decode loop over a null session that answers instantly (bench/harness.py _harness_overhead): "
            "step inputs, argmax and the KV-cache carry-over between steps, without the engine. "
            + ("With DeepSparse's external cache on a fixed window the carry-over copies every layer's whole K and V "
               "window each token (runtime/engines.py _CacheWindow.advance), so it grows with the layer count and "
               "the window; it is real work of this deployment path and is inside its decode figures (not a timing "
               "error), and a model with fewer layers copies less." if fixed_window else
               "This engine's loop carries no cache copy, so a cost this high points at a busy machine: compare "
               "with the A/A floor."))
    return flags


def verdict_lines(data: dict) -> list[str]:
    """At most five lines: the fastest deployment within 5% and within 25% of dense perplexity (overall and per
    engine), the peer where measured, and the A/A floor."""
    corpus = data["settings"]["ppl"][0]
    rows = [r for r in data["results"] if not is_aa_control(r) and r.get("perplexity")]
    if not any(is_dense(r) for r in rows):
        return ["**Verdict**: no dense baseline in these runs, so no speedups are computed."]
    lines = [f"**Verdict** (decode tokens/s; perplexity: {_bases(rows)})."]
    lines += [fastest_within(rows, corpus, tolerance) for tolerance in (0.05, 0.25)]
    if peer_rows(rows):
        lines.append(peer_sentence(rows, corpus) + ".")
    floor = noise_floor(data["results"])
    lines.append(f"Noise floor ±{floor['value']:.1%} ({floor['source']}); 'win' = 95% interval clears 1.0x and the "
                 "floor.")
    return lines


def _bases(rows: list[dict]) -> str:
    return "; ".join(sorted({ppl_basis(r) for r in rows}))


def dense_reference(rows: list[dict], corpus: str) -> dict | None:
    """The perplexity a tolerance is read against: the unquantized dense model's (its best deployment in fp32),
    the same for every engine and precision. A quantized dense row is a candidate like any other: INT8 or q4_1 of
    the dense model is not 'within 5%' because it is dense."""
    dense = [r for r in rows if is_dense(r)]
    fp32 = [r for r in dense if precision_of(r) == "fp32"] or dense
    return min(fp32, key=lambda r: r["perplexity"][corpus], default=None)


def fastest_within(rows: list[dict], corpus: str, tolerance: float) -> str:
    """The fastest deployment whose perplexity is within `tolerance` of the dense fp32 model's, overall and per
    engine (and cache mode)."""
    reference = dense_reference(rows, corpus)
    if reference is None:
        return f"Within {tolerance:.0%} of dense perplexity: no dense row."
    limit = reference["perplexity"][corpus] * (1 + tolerance)
    picks = {}
    for engine, mine in _engine_groups(rows).items():
        ok = [r for r in mine if r["perplexity"][corpus] <= limit]
        picks[engine] = max(ok, key=lambda r: r["decode_tokens_per_s"], default=None)
    found = [r for r in picks.values() if r is not None]
    head = (f"Within {tolerance:.0%} of dense fp32 perplexity ({reference['perplexity'][corpus]:.2f}), fastest: ")
    if not found:
        return head + "none."
    best = max(found, key=lambda r: r["decode_tokens_per_s"])
    return (head + f"**{_pick(best, corpus, reference)}**; per engine: "
            + "; ".join(f"{engine}: {_pick(r, corpus, reference, short=True) if r else 'none'}"
                        for engine, r in picks.items()) + ".")


def _pick(r: dict, corpus: str, reference: dict, short: bool = False) -> str:
    speed = sparsity_speedup(r)
    ppl = r["perplexity"][corpus]
    said = (f"{r['label']} ({precision_of(r)}) {r['decode_tokens_per_s']:.1f} tok/s, ppl {ppl:.2f} "
            f"({ppl / reference['perplexity'][corpus] - 1:+.1%})")
    if r is reference:
        return said + " (dense fp32 itself)"
    if speed and not is_dense(r):
        said += f", {with_ci(speed)}{' win' if r.get('win') else ' not a win'}"
    return said if short else f"{said} on {r['engine']} ({r['kv_cache']} KV)"


def replication_section(data: dict) -> list[tuple[str, object]]:
    """Each speedup of this run beside the earlier run's of the same pair: replicated when both runs call it a
    win against their own floors and the two intervals overlap."""
    earlier = data["replicated_from"]
    pairs = replication(earlier["results"], data["results"])
    header = ["model", "engine", "precision", "earlier [95% CI]", "win then", "now [95% CI]", "win now",
              "replicated"]
    rows = [[p["new"]["label"], f"{p['new']['engine']} ({p['new']['kv_cache']} KV)", precision_of(p["new"]),
             with_ci(sparsity_speedup(p["old"])), "yes" if p["old"].get("win") else "no",
             with_ci(sparsity_speedup(p["new"])), "yes" if p["new"].get("win") else "no",
             "yes" if p["replicated"] else "no"] for p in pairs]
    claimed = [p for p in pairs if p["old"].get("win")]
    held = sum(p["replicated"] for p in claimed)
    return [("h", "Replication"),
            ("p", f"This run re-measures {earlier['run']} on the same machine kind. Of the {len(claimed)} speedups "
                  f"that run called wins, {held} replicated (win in both runs against each run's own A/A floor, and "
                  "the two 95% intervals overlap)."),
            ("table", [header] + rows)]


def _quality_setup(settings: dict, quality: list[dict], corpus: str) -> str:
    details = quality[0]["perplexity_details"][corpus]
    return (f"Calibration: {settings['nsamples']} {settings['calib']} windows of {settings['calib_seqlen']} tokens, "
            f"seed {settings['seed']}. "
            f"Evaluation: {details['windows']} windows of {details['seqlen']} tokens ({details['source']}).")


def to_markdown(items, plots) -> str:
    out = []
    for kind, content in items:
        if kind == "h1":
            out.append(f"# {content}\n")
        elif kind == "h":
            out.append(f"## {content}\n")
        elif kind == "h3":
            out.append(f"### {content}\n")
        elif kind == "p":
            out.append(f"{content}\n")
        elif kind == "table":
            header, *rows = content
            out.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
            out.extend("| " + " | ".join(r) + " |" for r in rows)
            out.append("")
        elif kind == "plot":
            out.append(f"![{content}]({content})\n")
    return "\n".join(out) + "\n"


def to_html(items, plots) -> str:
    body = []
    for kind, content in items:
        if kind in ("h1", "h", "h3"):
            tag = {"h1": "h1", "h": "h2", "h3": "h3"}[kind]
            body.append(f"<{tag}>{html.escape(content)}</{tag}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(content)}</p>")
        elif kind == "table":
            header, *rows = content
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) +
                        "</table>")
        elif kind == "plot":
            data = base64.b64encode(Path(plots[content]).read_bytes()).decode()
            body.append(f'<img alt="{content}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" + \
        "\n".join(body) + "</body></html>\n"
