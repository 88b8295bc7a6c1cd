"""Issue 24's report: every quantized form of one dense model and of its pruned twin, side by side.

Quality comes from each deployment's own export.json (validation: the deployment's perplexity on the same
WikiText-2 windows as PyTorch fp32's reference, greedy agreement); speed from one `dlp-deploy bench` results file
that measured them interleaved (speedups against the same engine's fp32 deployment of the same model, and
against the dense llama.cpp peers). Writes REPORT/README.md, REPORT/quant.json and REPORT/tradeoff.png.

    python scripts/quant_report.py --exports runs/q24 --bench runs/q24/bench.json --out reports/smollm2-135m-quant
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dlp_deploy.io import write_json_atomic  # noqa: E402
from dlp_deploy.provenance import provenance  # noqa: E402

ENGINES = ("deepsparse", "onnxruntime", "openvino")
FORMS = {  # folder suffix: what it is
    "fp32": "fp32",
    "static": "INT8 W8A8, static per-tensor activation scales (today's form)",
    "dynamic": "INT8 W8A8, dynamic per-token activation scales",
    "gptq32": "INT8 dynamic per-token, GPTQ weights (32 calibration windows)",
    "budget3": "INT8 dynamic per-token, 3% quality budget",
    "dynamic-head": "INT8 dynamic per-token, lm_head quantized too (--quantize-head)",
    "w8": "w8: int8 weights in blocks of 32, int8 activations per block at run time (MatMulNBits)",
    "w8-head": "w8, lm_head quantized too (--quantize-head)",
    "int4-g32": "INT4 weight-only, symmetric, blocks of 32",
    "int4-g128": "INT4 weight-only, symmetric, blocks of 128",
    "q8_0": "GGUF q8_0 (llama.cpp)",
    "q4_k_m": "GGUF q4_k_m (llama.cpp)",
}
MODELS = {"dense": "dense", "dlp50": "DLP-Wanda 50%"}


def quality(folder: Path) -> dict | None:
    path = folder / "export.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    v = info.get("validation") or {}
    q = v.get("quality") or {}
    out = {"reference_ppl": q.get("reference_ppl"), "windows": q.get("windows"), "seqlen": q.get("seqlen"),
           "engines": {}}
    for engine, entry in v.items():
        if isinstance(entry, dict) and "ppl" in entry:
            out["engines"][engine] = {k: entry.get(k) for k in ("ppl", "ppl_vs_reference", "greedy_agreement")}
    budget = (info.get("quantization") or {}).get("budget")
    if budget:
        out["kept_fp32"] = len(budget.get("kept", []))
    return out


def speed_rows(bench: dict) -> dict:
    """(model folder name, engine) -> the bench row (A/A rows left out)."""
    rows = {}
    for r in bench["results"]:
        if r.get("aa_control") or r["label"].endswith("(A/A)"):
            continue
        rows[(Path(r["model"]).name, r["engine"])] = r
    return rows


def bench_name(folder: Path) -> str:
    """The folder name bench recorded (it resolves links: runs/q24/dense-w8 -> runs/w8-dense)."""
    return Path(folder).resolve().name


def aa_rows(bench: dict) -> dict:
    return {r["engine"]: r for r in bench["results"] if r.get("aa_control") or r["label"].endswith("(A/A)")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exports", type=Path, required=True, help="folder of <model>-<form> deployments")
    ap.add_argument("--fp32", nargs="+", metavar="DENSE [PRUNED]", type=Path, required=True,
                    help="the fp32 deployments of the dense and (optionally) the pruned model (benched beside the "
                         "others)")
    ap.add_argument("--bench", type=Path, help="bench results (--json) over the deployments")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reproduce", default="bash scripts/quant_report.sh",
                    help="the command the report names as what made it")
    ap.add_argument("--only-exported", action="store_true",
                    help="rows only for the forms exported (default: every form, unexported ones marked so)")
    args = ap.parse_args()

    bench = json.loads(args.bench.read_text()) if args.bench and args.bench.is_file() else None
    speed = speed_rows(bench) if bench else {}
    table, record = [], []
    for model, model_name in list(MODELS.items())[:len(args.fp32)]:
        # the fp32 row's quality: PyTorch fp32 on the same windows, as every export of this model recorded it
        refs = [q["reference_ppl"] for form in FORMS if form != "fp32"
                for q in [quality(args.exports / f"{model}-{form}")] if q and q["reference_ppl"]]
        ref = refs[0] if refs else None
        for form, what in FORMS.items():
            folder = args.fp32[0 if model == "dense" else 1] if form == "fp32" else args.exports / f"{model}-{form}"
            if args.only_exported and not folder.exists():
                continue
            q = quality(folder) if form != "fp32" else None
            row = {"model": model_name, "form": form, "what": what, "folder": str(folder), "quality": q,
                   "speed": {}}
            for engine in ENGINES + ("llamacpp",):
                r = speed.get((bench_name(folder), engine))
                own = speed.get((bench_name(args.fp32[1]), engine)) if model == "dlp50" else None
                if r:
                    sp = r.get("speedup") or {}
                    row["speed"][engine] = {"tokens_per_s": r["decode_tokens_per_s"],
                                            "decode_ms": r["decode_ms"]["median"],
                                            "speedup_vs_dense_fp32": sp.get("decode"),
                                            "speedup_ci95": sp.get("decode_ci95"),
                                            "speedup_vs_pruned_fp32": (own["decode_ms"]["median"]
                                                                       / r["decode_ms"]["median"]) if own else None}
            record.append(row)
            table.append((model, form, row, q, ref))
    write_table(args, table, record, bench)


def ppl_cell(q: dict | None, engine: str, ref: float | None, form: str) -> str:
    if form == "fp32":
        return f"{ref:.2f} (PyTorch)" if ref else "—"
    if not q or engine not in q["engines"]:
        return "—"
    e = q["engines"][engine]
    return f"{e['ppl']:.2f} ({e['ppl_vs_reference']:+.1%}, agr. {e['greedy_agreement']:.2f})"


def write_table(args, table, record, bench) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| model | form | deployed ppl, ONNX Runtime (vs fp32, greedy agr.) | deployed ppl, OpenVINO | "
             "deployed ppl, llama.cpp | DeepSparse tok/s (x dense fp32 [95% CI]) | ONNX Runtime | OpenVINO | llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, form, row, q, ref in table:
        if q is None and form != "fp32":
            lines.append(f"| {MODELS[model]} | {form} | not exported | | | | | | |")
            continue
        cells = [ppl_cell(q, e, ref, form) for e in ("onnxruntime", "openvino", "llamacpp")]
        if form == "fp32":
            cells = [cells[0], cells[0], "—"]
        speeds = []
        for engine in ENGINES + ("llamacpp",):
            s = row["speed"].get(engine)
            if s is None:
                speeds.append("—")
                continue
            text = f"{s['tokens_per_s']:.1f}"
            if s["speedup_vs_dense_fp32"] and not (model == "dense" and form == "fp32"):
                ci = s.get("speedup_ci95")
                text += f" ({s['speedup_vs_dense_fp32']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + ")"
            if s.get("speedup_vs_pruned_fp32") and form != "fp32":
                text += f"; {s['speedup_vs_pruned_fp32']:.2f}x its fp32"
            speeds.append(text)
        budget = f", {q.get('kept_fp32')} Linears kept fp32" if q and q.get("kept_fp32") is not None else ""
        lines.append(f"| {MODELS[model]} | {form}{budget} | " + " | ".join(cells + speeds) + " |")
    aa = aa_rows(bench) if bench else {}
    aa_text = "; ".join(f"{e} {r['speedup']['decode']:.2f}x [{r['speedup']['decode_ci95'][0]:.2f}, "
                        f"{r['speedup']['decode_ci95'][1]:.2f}]" for e, r in aa.items()
                        if (r.get("speedup") or {}).get("decode_ci95"))
    machine = (bench or {}).get("machine", {})
    models = " and ".join(dict.fromkeys(row["model"] for row in record))
    shown = {row["form"] for row in record}
    text = [f"# SmolLM2-135M: {'the' if args.only_exported else 'every'} quantized form{'s' if args.only_exported else ''}"
            f", {models} (issue 24)", "",
            "Deployed perplexity: each deployment's own, WikiText-2 test, 8 windows of 256 tokens, against PyTorch "
            "fp32 on the same windows (the fp32 rows). Greedy agreement: share of 64 next-token choices that match "
            "PyTorch fp32's. Decode tokens/s from one `dlp-deploy bench` run (bench.json), all rows interleaved, "
            "3 worker processes per pair; in brackets the decode speedup over the dense fp32 deployment on the same "
            "engine with its cluster-bootstrap 95% interval, and for the pruned model its ratio to its own fp32 "
            "deployment on that engine (point estimate). llama.cpp rows are the peers (GGUF of the same models).", "", *lines, "",
            f"A/A control (dense fp32 measured again): {aa_text or 'none'}.", "",
            "Forms:", *[f"- `{k}`: {v}" for k, v in FORMS.items() if k in shown], "",
            "OpenVINO's MatMul kernels on a one-token step (export.json's `openvino_kernels`, from its perf "
            "counters; weight types of its FullyConnected layers):", "", *kernel_lines(table), "",
            f"Machine: {machine.get('cpu_model', '?')}, {machine.get('usable_cores', '?')} cores, ISA "
            f"{', '.join(machine.get('isa', []))}.", "",
            f"Reproduce: `{args.reproduce}` (exports, bench, this table)."]
    (out / "README.md").write_text("\n".join(text) + "\n")
    write_json_atomic(out / "quant.json", {"rows": record, "bench": str(args.bench) if args.bench else None,
                                           "provenance": provenance()}, force=True)
    plot(out, table)


def kernel_lines(table) -> list[str]:
    lines = []
    for model, form, row, q, ref in table:
        if model != "dense" or form in ("fp32", "q8_0", "q4_k_m"):
            continue
        path = Path(row["folder"]) / "export.json"
        if not path.is_file():
            continue
        record = (json.loads(path.read_text()).get("quantization") or {}).get("openvino_kernels") or {}
        step = record.get("one_token") or {}
        if step:
            kernels = ", ".join(f"{k} x{c}" for k, c in step.get("kernels", {}).items())
            weights = ", ".join(f"{k} x{c}" for k, c in step.get("fully_connected_weight_types", {}).items())
            lines.append(f"- `{form}`: {kernels}; weights {weights}")
    return lines


def plot(out: Path, table) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for model, form, row, q, ref in table:
        for engine, s in row["speed"].items():
            ppl = ref if form == "fp32" else ((q or {}).get("engines", {}).get(engine) or {}).get("ppl")
            if ppl is None:
                ppl = ((q or {}).get("engines", {}).get("onnxruntime") or {}).get("ppl")
            if ppl is None:
                continue
            marker = "o" if model == "dense" else "s"
            ax.scatter(s["tokens_per_s"], ppl, marker=marker, label=None)
            ax.annotate(f"{model} {form} {engine[:4]}", (s["tokens_per_s"], ppl), fontsize=6)
    ax.set_xlabel("decode tokens/s (higher is better)")
    ax.set_ylabel("deployed WikiText-2 perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: quantized forms, speed against quality (o dense, s DLP 50%)")
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
