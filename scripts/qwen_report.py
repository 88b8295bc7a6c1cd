"""Issue 25's report: Qwen2.5-Coder-1.5B-Instruct pruned, quantized and deployed on this machine, against the model's
own Q4_K_M GGUF on llama.cpp (the file its users run today).

Reads one run folder of scripts/qwen_study.sh and writes OUT/README.md, OUT/study.json (every number the README
shows, the inputs it read, the commands that made them and the machine) and OUT/tradeoff.png. Nothing is assumed:
a step that left no file is a row that says "not measured" and why.

    RUN/models/{dlp-0.50,uniform-0.50,owl-0.50}/pruning.json    allocation, alpha chosen by --alpha auto
    RUN/eval/{dense,dlp-0.50,...}.json                           PyTorch perplexity (dlp-deploy eval --json)
    RUN/eval/deploy-NAME.json                                    each deployment's own perplexity on its engine
    RUN/deploy/NAME/export.json                                  sizes, quantization, sparsity stored
    RUN/bench.json                                               one interleaved dlp-deploy bench, A/A control
    RUN/costs/STEP.txt, RUN/fetch.log                            GNU /usr/bin/time -v of each step
    RUN/speculative.json                                         optional: a pruned draft for the dense target

Statistics are dlp_deploy/bench/stats.py's: per-run decode medians, cluster-bootstrap 95% intervals of ratios
(worker processes resampled), the A/A floor of each engine.

    python scripts/qwen_report.py --run runs/q15 --out reports/qwen2.5-coder-1.5b
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dlp_deploy.bench import stats  # noqa: E402
from dlp_deploy.bench.records import BENCH_SCHEMA, load_results  # noqa: E402
from dlp_deploy.errors import UserError  # noqa: E402
from dlp_deploy.io import write_json_atomic  # noqa: E402
from dlp_deploy.provenance import machine_info, provenance  # noqa: E402
from dlp_deploy.pruning_record import read_pruning_record  # noqa: E402

MODEL = "Qwen2.5-Coder-1.5B-Instruct"
SCHEMA = "dlp-deploy/qwen-report/1"
CORPORA = {"wikitext2": "WikiText-2", "c4": "C4"}
QUALITY_LIMIT = 1.25  # the verdict's bound: deployed perplexity at most this times the peer's, on both corpora
PEER = "source-q4_k_m"
PEER_ENGINE = "llamacpp"
HEAD_SHAPE = (151_936, 1_536)  # the untied output matrix: streamed on every token (embeddings are a gather)
SHORT_ENGINE = {"deepsparse": "DS", "onnxruntime": "ORT", "openvino": "OV", "llamacpp": "llama.cpp"}
ENGINE_NAMES = {"deepsparse": "DeepSparse", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO",
                "llamacpp": "llama.cpp"}

# the PyTorch models of the quality table: run folder name -> label (dense is the fetched model itself)
MODELS = {"dense": "dense", "dlp-0.50": "DLP-Wanda 50%, --alpha auto", "dlp-appg-0.50": "DLP-Wanda 50%, App. G alpha",
          "owl-0.50": "OWL-Wanda 50%", "uniform-0.50": "uniform Wanda 50%", "uniform-0.30": "uniform Wanda 30%",
          "uniform-0.70": "uniform Wanda 70%", "dlp-appg-0.70": "DLP-Wanda 70%, App. G alpha",
          "owl-0.70": "OWL-Wanda 70%",
          "dlp-struct-0.20": "structured DLP 20%: whole MLP channels (Taylor importance), widths multiples of 32"}
# the deployments of scripts/qwen_study.sh: folder -> (PyTorch model it came from, form, engines that run it)
ONNX_ENGINES, GGUF_ENGINES = ("deepsparse", "onnxruntime"), ("llamacpp",)
DEPLOYMENTS = {
    "dense": ("dense", "fp32 ONNX", ONNX_ENGINES),
    "dlp-0.50": ("dlp-0.50", "fp32 ONNX", ONNX_ENGINES),
    "dlp-0.50.int8": ("dlp-0.50", "INT8 W8A8, static activation scales (ONNX; DeepSparse's sparse INT8 kernels)",
                      ("deepsparse",)),
    "dense.w8": ("dense", "w8: int8 weights in blocks of 32 (ONNX MatMulNBits)", ONNX_ENGINES),
    PEER: ("dense", "the original Q4_K_M GGUF, unchanged (the peer)", GGUF_ENGINES),
    "dense.q8_0": ("dense", "GGUF q8_0 re-exported from the fp32 form (second peer)", GGUF_ENGINES),
    "dlp-0.50.q4_k_m": ("dlp-0.50", "GGUF q4_k_m", GGUF_ENGINES),
    "uniform-0.30.int8": ("uniform-0.30", "INT8 W8A8, static activation scales (ONNX; DeepSparse's sparse INT8 "
                                          "kernels)", ("deepsparse",)),
    "uniform-0.30.q4_k_m": ("uniform-0.30", "GGUF q4_k_m", GGUF_ENGINES),
    "dlp-appg-0.70.q4_k_m": ("dlp-appg-0.70", "GGUF q4_k_m", GGUF_ENGINES),
    "dlp-appg-0.70": ("dlp-appg-0.70", "fp32 ONNX", ("deepsparse",)),
    "dlp-struct-0.20.q4_k_m": ("dlp-struct-0.20", "GGUF q4_k_m (narrower MLPs: fewer bytes per token)", GGUF_ENGINES),
}
# scripts/qwen_study.sh's steps in order (costs/STEP.txt); the fetch's timing is RUN/fetch.log
STEPS = {
    "fetch": "models fetch (assemble the parts, check, dequantize to an HF folder)",
    "prune-dlp50": "prune DLP-Wanda 50%, --alpha auto", "prune-dlp50-appg": "prune DLP-Wanda 50%, App. G alpha",
    "prune-uniform50": "prune uniform Wanda 50%",
    "prune-owl50": "prune OWL-Wanda 50%", "prune-uniform30": "prune uniform Wanda 30%",
    "prune-uniform70": "prune uniform Wanda 70%", "prune-dlp70-appg": "prune DLP-Wanda 70%, App. G alpha",
    "prune-owl70": "prune OWL-Wanda 70%", "prune-dlp20-struct": "prune structured DLP 20% (MLP channels, Taylor)",
    "eval-dense": "PyTorch perplexity, dense", "eval-dlp-0.50": "PyTorch perplexity, DLP 50%",
    "eval-dlp-appg-0.50": "PyTorch perplexity, DLP 50% App. G alpha",
    "eval-uniform-0.50": "PyTorch perplexity, uniform 50%", "eval-owl-0.50": "PyTorch perplexity, OWL 50%",
    "eval-uniform-0.30": "PyTorch perplexity, uniform 30%", "eval-uniform-0.70": "PyTorch perplexity, uniform 70%",
    "eval-dlp-appg-0.70": "PyTorch perplexity, DLP 70% App. G alpha", "eval-owl-0.70": "PyTorch perplexity, OWL 70%",
    "eval-dlp-struct-0.20": "PyTorch perplexity, structured DLP 20%",
    "export-source": "export: the source GGUF (copy and validate)", "export-dense": "export: dense fp32 ONNX",
    "export-dlp50": "export: DLP 50% fp32 ONNX", "export-dense-w8": "export: dense w8 ONNX",
    "export-dlp50-int8": "export: DLP 50% INT8 ONNX", "export-dense-q8_0": "export: dense GGUF q8_0",
    "export-dlp50-q4_k_m": "export: DLP 50% GGUF q4_k_m",
    "export-u30-int8": "export: uniform 30% INT8 ONNX", "export-u30-q4_k_m": "export: uniform 30% GGUF q4_k_m",
    "export-dlp70-appg-q4_k_m": "export: DLP 70% App. G alpha GGUF q4_k_m",
    "export-dlp70-appg": "export: DLP 70% App. G alpha fp32 ONNX",
    "export-dlp20-struct-q4_k_m": "export: structured DLP 20% GGUF q4_k_m",
    "deval-source-q4_k_m": "deployed perplexity: source Q4_K_M", "deval-dense.q8_0": "deployed perplexity: dense q8_0",
    "deval-dlp-0.50.q4_k_m": "deployed perplexity: DLP 50% q4_k_m", "deval-dense.w8": "deployed perplexity: dense w8",
    "deval-dlp-0.50.int8": "deployed perplexity: DLP 50% INT8",
    "deval-uniform-0.30.q4_k_m": "deployed perplexity: uniform 30% q4_k_m",
    "deval-uniform-0.30.int8": "deployed perplexity: uniform 30% INT8",
    "deval-dlp-appg-0.70.q4_k_m": "deployed perplexity: DLP 70% App. G alpha q4_k_m",
    "deval-dlp-struct-0.20.q4_k_m": "deployed perplexity: structured DLP 20% q4_k_m",
    "bench": "bench: every deployment x engine, interleaved, A/A control",
}


# ---------------------------------------------------------------- reading the run


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """A JSON file, or None and why not."""
    if not path.is_file():
        return None, f"{path.name} absent (step not run)"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} unreadable ({exc.__class__.__name__})"


def perplexity(path: Path) -> dict:
    """An eval --json file's perplexities: {"ppl": {corpus: value}, "windows": ..., "seqlen": ...} or a reason."""
    data, why = read_json(path)
    if data is None:
        return {"ppl": {}, "missing": why}
    details = data.get("perplexity_details") or {}
    first = next(iter(details.values()), {})
    return {"ppl": {c: v for c, v in (data.get("perplexity") or {}).items() if v is not None},
            "windows": first.get("windows"), "seqlen": first.get("seqlen"), "engine": data.get("engine"),
            "file": str(path)}


def quality_rows(run: Path) -> list[dict]:
    rows = []
    for name, label in MODELS.items():
        # a model folder that links to another (models/dlp-0.50 -> uniform-0.50 where --alpha auto chose alpha 0 in
        # an earlier run and this one did not tune again) is that model: its evaluation, said in its label
        alias = _alias(run, name)
        scored = name if alias is None or (run / "eval" / f"{name}.json").is_file() else alias
        row = {"model": name, "label": label if alias is None else f"{label} (= {alias}: the same folder)",
               **perplexity(run / "eval" / f"{scored}.json")}
        if name != "dense":
            folder = run / "models" / name
            try:
                record = read_pruning_record(folder) if folder.is_dir() else None
            except UserError as exc:
                record, row["pruning_missing"] = None, str(exc)
            if record is None:
                row.setdefault("pruning_missing", f"models/{name}/pruning.json absent (prune not run)")
            else:
                row["pruning"] = pruning_summary(record)
        rows.append(row)
    dense = rows[0]["ppl"]
    for row in rows:
        row["vs_dense"] = {c: row["ppl"][c] / dense[c] for c in row["ppl"] if dense.get(c)}
    return rows


def _alias(run: Path, name: str) -> str | None:
    folder = run / "models" / name
    return folder.resolve().name if folder.is_symlink() else None


def pruning_summary(record: dict) -> dict:
    settings = record.get("settings") or {}
    ratios = [layer.get("realized", layer.get("target")) for layer in record.get("layers") or []]
    ratios = [r for r in ratios if r is not None]
    out = {"allocation": settings.get("allocation"), "method": settings.get("method"),
           "global_sparsity": record.get("global_sparsity"), "alpha": settings.get("alpha"),
           "owl_lambda": settings.get("owl_lambda") if settings.get("allocation") == "owl" else None,
           "layer_ratios": ratios, "layer_ratio_range": [min(ratios), max(ratios)] if ratios else None}
    auto = record.get("auto")
    if auto:
        validation = auto.get("validation") or {}
        out["auto"] = {"parameter": auto.get("parameter"), "choice": auto.get("choice"), "grid": auto.get("grid"),
                       "validation_ppl": auto.get("validation_ppl"), "windows": validation.get("windows"),
                       "seqlen": validation.get("seqlen"), "scored_by": validation.get("pruning"),
                       "seconds": auto.get("seconds")}
    return out


def load_bench(run: Path) -> tuple[dict | None, str | None]:
    path = run / "bench.json"
    if not path.is_file():
        return None, "bench.json absent (bench step not run)"
    try:
        return load_results(path, BENCH_SCHEMA), None
    except UserError as exc:
        return None, f"bench.json unreadable: {exc}"


def bench_index(bench: dict | None) -> dict:
    """(deployment folder name, engine) -> ("row", row) | ("unmeasured", reason) | ("not run", reason)."""
    if bench is None:
        return {}
    out = {}
    for r in bench.get("not_run") or []:
        out[(Path(r["model"]).name, r["engine"])] = ("not run", r["reason"])
    for r in bench.get("unmeasured") or []:
        if not r["label"].endswith(stats.AA_SUFFIX):
            out[(Path(r["model"]).name, r["engine"])] = ("unmeasured", r["reason"])
    for r in bench["results"]:
        if not stats.is_aa_control(r):
            out[(Path(r["model"]).name, r["engine"])] = ("row", r)
    return out


def aa_controls(bench: dict | None) -> dict:
    """engine -> the A/A control's decode ratio block (dense measured as a second model)."""
    if bench is None:
        return {}
    return {r["engine"]: stats.sparsity_speedup(r) for r in bench["results"]
            if stats.is_aa_control(r) and stats.sparsity_speedup(r)}


# ---------------------------------------------------------------- bytes a decode step streams


def onnx_matrix_bytes(path: Path) -> dict:
    """Bytes of every matrix a decode step multiplies in an ONNX graph, read from the graph's initializer headers
    (no weights loaded): the non-activation inputs of MatMul, Gemm, MatMulInteger and MatMulNBits (packed weights,
    scales and zero points). Embeddings are a Gather and are not counted; the lm_head MatMul is."""
    import numpy as np
    import onnx
    from onnx import helper

    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    seen, total, head = set(), 0, 0
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "MatMulInteger", "MatMulNBits"):
            continue
        for name in node.input[1:]:
            if name not in inits or name in seen:
                continue
            seen.add(name)
            init = inits[name]
            size = int(np.prod(init.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            total += size
            if "lm_head" in name:
                head += size
    return {"bytes": total, "lm_head_bytes": head or None, "how": "ONNX initializer headers"}


def gguf_matrix_bytes(path: Path) -> dict:
    """Bytes of the block matrices and the output matrix (the token embedding where the head is tied to it) as
    stored in a GGUF file: what llama.cpp reads for one token (it has no sparse kernels)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2}
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    blocks = sum(int(t.n_bytes) for n, t in tensors.items() if n.startswith("blk."))
    head_bytes = int(tensors[head].n_bytes) if head in tensors else 0
    return {"bytes": blocks + head_bytes, "lm_head_bytes": head_bytes or None, "how": "GGUF tensor headers"}


def deployment_info(run: Path, name: str) -> dict:
    folder = run / "deploy" / name
    info, why = read_json(folder / "export.json")
    if info is None:
        return {"name": name, "missing": f"deploy/{name}/{why.replace('step not run', 'export not run')}"}
    sizes = info.get("sizes") or {}
    file_bytes = (sizes.get("model_gguf_bytes") or (sizes.get("model_onnx_bytes") or 0)
                  + (sizes.get("external_data_bytes") or 0)) or None
    zeros = info.get("weight_sparsity") or {}
    gguf_file = (info.get("format") or {}).get("type") == "gguf"
    out = {"name": name, "format": "gguf" if gguf_file else "onnx", "file_bytes": file_bytes,
           "folder_bytes": sizes.get("folder_bytes"), "sparsity_stored": zeros.get("global"),
           "quantization": (info.get("quantization") or {}).get("scheme") or (
               "int8" if info.get("quantization") else "fp32"),
           "lm_head": (info.get("quantization") or {}).get("lm_head"),
           "tensor_types": (info.get("format") or {}).get("tensor_types"),
           "source_model": (info.get("source") or {}).get("model"), "validated": bool(info.get("validation"))}
    try:
        model_file = folder / ((info.get("format") or {}).get("file") or ("model.gguf" if gguf_file else "model.onnx"))
        out["streamed"] = gguf_matrix_bytes(model_file) if gguf_file else onnx_matrix_bytes(model_file)
    except Exception as exc:  # a report never dies on one unreadable file: it says so
        out["streamed"] = {"bytes": None, "missing": f"model file unreadable ({exc.__class__.__name__}: {exc})"}
    return out


def deployed_ppl(run: Path, name: str, dep: dict, quality: dict) -> dict:
    """A deployment's own perplexity (eval/deploy-NAME.json, on its engine); for an fp32 ONNX graph without one,
    its PyTorch model's, marked as such, and whether the export validated the graph against it."""
    own = perplexity(run / "eval" / f"deploy-{name}.json")
    if own["ppl"]:
        return {**own, "who": f"deployment on {ENGINE_NAMES.get(own.get('engine'), own.get('engine') or '?')}"}
    if dep.get("quantization") == "fp32" and dep.get("format") == "onnx":
        pt = quality.get(DEPLOYMENTS[name][0]) or {}
        if pt.get("ppl"):
            return {"ppl": pt["ppl"], "windows": pt.get("windows"), "seqlen": pt.get("seqlen"),
                    "who": "PyTorch (fp32 ONNX, " + ("validated against it at export)" if dep.get("validated") else
                                                     "exported with --no-validate: not checked against it)"),
                    "file": pt.get("file")}
        return {"ppl": {}, "missing": f"eval/{DEPLOYMENTS[name][0]}.json absent (fp32 ONNX: its PyTorch model's "
                                      "perplexity stands for it; eval not run)"}
    return {"ppl": {}, "missing": own.get("missing")}


# ---------------------------------------------------------------- speed


def ratio_block(base: dict, r: dict) -> dict:
    """r's decode speed over base's: stats' ratio of per-run medians with its cluster-bootstrap 95% interval
    (the same statistic as bench's vs_peer)."""
    return stats._ratio_block(base, r, seed=0)  # noqa: SLF001 (the one implementation of the statistic)


def speed_cells(index: dict, bench: dict | None, name: str, engine: str) -> dict:
    kind, value = index.get((name, engine), (None, None))
    if bench is None:
        return {"missing": None}  # filled by the caller with bench's reason
    if kind is None:
        return {"missing": f"bench.json has no row for {name} on {engine} (not in the bench command)"}
    if kind != "row":
        return {"missing": ("the engine refuses it: " if kind == "not run" else "the engine failed: ") + value}
    r = value
    floor = engine_floor(bench, r)
    cell = {"tokens_per_s": r["decode_tokens_per_s"], "decode_ms": r["decode_ms"]["median"],
            "decode_ms_runs": r.get("decode_ms_runs"), "processes": len(stats.process_runs(r)),
            "sparse_kernels": r.get("sparse_kernels"), "precision": stats.precision_of(r),
            "compile_s": r.get("compile_s"), "peak_rss_mib": r.get("peak_rss_mib"),
            "weights": r.get("weights"), "floor": floor}
    own = r.get("speedup")
    if own and own.get("baseline") == r["label"]:  # the dense fp32 deployment itself
        cell["vs_dense_fp32"] = {"decode": 1.0, "baseline": True}
    elif own:
        cell["vs_dense_fp32"] = {"decode": own["decode"], "decode_ci95": own.get("decode_ci95"),
                                 "baseline": own.get("baseline"),
                                 "win": stats.is_win(own, floor["value"])}
    peer_kind, peer = index.get((PEER, PEER_ENGINE), (None, None))
    if name == PEER and engine == PEER_ENGINE:
        cell["vs_peer"] = {"decode": 1.0, "baseline": True}
    elif peer_kind == "row" and stats.peer_key(peer) == stats.peer_key(r):
        block = ratio_block(peer, r)
        pair_floor = max(floor["value"], engine_floor(bench, peer)["value"])
        cell["vs_peer"] = {**block, "floor": pair_floor, "win": stats.is_win(block, pair_floor)}
    return cell


def engine_floor(bench: dict, r: dict) -> dict:
    """The A/A floor of the row's engine (the dense fp32 deployment measured twice there: noise on that engine,
    whatever the row's precision); stats.noise_floor's answer where the bench measured no A/A on that engine."""
    floors = {e: stats.aa_floor(b) for e, b in aa_controls(bench).items()}
    if r["engine"] in floors:
        return {"value": floors[r["engine"]], "source": "A/A, this engine"}
    fallback = stats.noise_floor(bench["results"], r)
    return {**fallback, "source": fallback["source"] + ", none on this engine"}


def fmt_ratio(block: dict | None) -> str:
    if not block:
        return "—"
    if block.get("baseline") is True:
        return "1 (baseline)"
    ci = block.get("decode_ci95")
    return f"{block['decode']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else " (no interval)")


# ---------------------------------------------------------------- costs


_TIME_FIELDS = {"Elapsed (wall clock) time": "wall", "Maximum resident set size (kbytes)": "rss_kib",
                "Exit status": "exit", "Command being timed": "command"}


def parse_gnu_time(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Command terminated by signal"):
            out["signal"] = line.rsplit(" ", 1)[-1]
        key, _, value = line.partition(": ")
        for prefix, field in _TIME_FIELDS.items():
            if key.startswith(prefix):
                out[field] = value.strip().strip('"') if field == "command" else value.strip()
    if "wall" in out:
        out["wall_s"] = _clock_seconds(out.pop("wall"))
    if "rss_kib" in out:
        out["peak_rss_bytes"] = int(out.pop("rss_kib")) * 1024
    if "exit" in out:
        out["exit"] = int(out["exit"])
    return out


def _clock_seconds(text: str) -> float:
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def cost_rows(run: Path) -> list[dict]:
    files = {"fetch": run / "fetch.log"}
    files.update({step: run / "costs" / f"{step}.txt" for step in STEPS if step != "fetch"})
    extra = sorted(p for p in (run / "costs").glob("*.txt") if p.stem not in files) if (run / "costs").is_dir() \
        else []
    files.update({p.stem: p for p in extra})
    rows = []
    for step, path in files.items():
        row = {"step": step, "what": STEPS.get(step, step), "file": str(path.relative_to(run))}
        if not path.is_file():
            row["missing"] = f"{row['file']} absent (step not run)"
        else:
            parsed = parse_gnu_time(path.read_text(errors="replace"))
            if "wall_s" not in parsed:
                row["missing"] = f"{row['file']} holds no timing (step interrupted or still running)"
            else:
                row.update(parsed)
                if parsed.get("exit") or parsed.get("signal"):
                    row["failed"] = (f"signal {parsed['signal']}" if parsed.get("signal")
                                     else f"exit status {parsed['exit']}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the report


def build(run: Path) -> dict:
    quality = quality_rows(run)
    by_model = {q["model"]: q for q in quality}
    bench, bench_missing = load_bench(run)
    index = bench_index(bench)
    deployments = []
    for name, (model, form, engines) in DEPLOYMENTS.items():
        dep = deployment_info(run, name)
        dep.update(model=model, model_label=MODELS[model], form=form)
        dep["deployed_ppl"] = deployed_ppl(run, name, dep, by_model)
        dep["engines"] = {}
        measured = sorted({e for (n, e), (k, _) in index.items() if n == name and k != "not run"} - set(engines))
        for engine in (*engines, *measured):
            cell = speed_cells(index, bench, name, engine)
            if bench is None:
                cell["missing"] = bench_missing
            dep["engines"][engine] = cell
        deployments.append(dep)
    peer_ppl = next(d for d in deployments if d["name"] == PEER)["deployed_ppl"]["ppl"]
    for dep in deployments:
        ppl = dep["deployed_ppl"]["ppl"]
        dep["deployed_ppl"]["vs_peer"] = {c: ppl[c] / peer_ppl[c] for c in CORPORA if c in ppl and peer_ppl.get(c)}
        dense = by_model["dense"]["ppl"]
        dep["deployed_ppl"]["vs_dense_pytorch"] = {c: ppl[c] / dense[c] for c in CORPORA if c in ppl and dense.get(c)}
    bandwidth = bytes_per_token(deployments)
    machine = (bench or {}).get("machine") or {}
    return {"schema": SCHEMA, "model": model_block(run), "quality": quality, "deployments": deployments,
            "aa_controls": aa_controls(bench), "bench": {"file": str(run / "bench.json"), "missing": bench_missing,
                                                         "settings": (bench or {}).get("settings")},
            "costs": cost_rows(run), "bandwidth": bandwidth, "verdict": verdict(deployments, bandwidth),
            "speculative": speculative(run), "machine_measured": machine}


def model_block(run: Path) -> dict:
    info, _ = read_json(run / "deploy" / PEER / "export.json")
    fmt = (info or {}).get("format") or {}
    return {"name": MODEL, "alias": "qwen2.5-coder-1.5b", "source_file": fmt.get("source_file"),
            "source_tensor_types": fmt.get("tensor_types"),
            "fp32": "the Q4_K_M GGUF's weights dequantized to fp32 (models fetch): every fp32 row carries Q4_K_M's "
                    "rounding, and its quality ceiling is the Q4_K_M file's",
            "peer": f"deploy/{PEER}: the original GGUF file unchanged, on llama.cpp"}


def bytes_per_token(deployments: list[dict]) -> dict:
    """Per measured (deployment, engine): the weight bytes one decode step streams (the non-zeros only on an
    engine with sparse kernels, from the bench's own count of the file) over its median decode step; the best
    effective rate of the bench and of each engine."""
    best, by_engine = None, {}
    for dep in deployments:
        stored = (dep.get("streamed") or {}).get("bytes")
        for engine, cell in dep["engines"].items():
            if "tokens_per_s" not in cell or not stored:
                continue
            weights = cell.get("weights") or {}
            nonzero = weights.get("sparse_bytes")
            # the bench counts fp32 and int8 MatMul weights only: use its non-zero count where it covers the file
            covers = nonzero is not None and weights.get("dense_bytes") and abs(weights["dense_bytes"] - stored) \
                <= 0.02 * stored
            sparse = bool(cell.get("sparse_kernels")) and covers
            streamed = nonzero if sparse else stored
            cell["bytes_per_token"] = {"bytes": streamed, "counted": "non-zero weights (sparse kernels)" if sparse
                                       else "all stored weights", "gb_per_s": streamed / cell["decode_ms"] / 1e6}
            row = {"gb_per_s": cell["bytes_per_token"]["gb_per_s"], "deployment": dep["name"], "engine": engine}
            if best is None or row["gb_per_s"] > best["gb_per_s"]:
                best = row
            if engine not in by_engine or row["gb_per_s"] > by_engine[engine]["gb_per_s"]:
                by_engine[engine] = row
    return {"best_effective_gb_per_s": best, "by_engine": by_engine, "note": "the best effective bandwidth observed in this bench "
            "(weight bytes per token over the median decode step), not a measured peak: KV cache, activations and "
            "the engines' overhead are not counted, so the machine's true bandwidth is at least this"}


def _qualifies(dep: dict) -> bool | None:
    vs = dep["deployed_ppl"].get("vs_peer") or {}
    if not all(c in vs for c in CORPORA):
        return None
    return all(vs[c] <= QUALITY_LIMIT for c in CORPORA)


def verdict(deployments: list[dict], bandwidth: dict) -> dict:
    """Does a pruned deployment decode faster than the peer at <= QUALITY_LIMIT x its perplexity on both corpora?
    Faster: the interval's lower end above 1 and the A/A floor (stats.is_win)."""
    peer = next(d for d in deployments if d["name"] == PEER)
    peer_cell = peer["engines"].get(PEER_ENGINE) or {}
    if "tokens_per_s" not in peer_cell:
        return {"answer": None, "text": "Not measured: the peer (the source Q4_K_M on llama.cpp) has no decode "
                "figure (" + (peer_cell.get("missing") or "no bench row") + "), so no deployment can be compared "
                "with it."}
    if not all(c in peer["deployed_ppl"]["ppl"] for c in CORPORA):
        return {"answer": None, "text": "Not measured: the peer's own perplexity on WikiText-2 and C4 is missing ("
                + (peer["deployed_ppl"].get("missing") or "?") + "), so the quality bound cannot be applied."}
    candidates = []
    for dep in deployments:
        if dep["model"] == "dense":
            continue
        for engine, cell in dep["engines"].items():
            if "vs_peer" in cell:
                candidates.append({"deployment": dep["name"], "engine": engine, "qualifies": _qualifies(dep),
                                   "vs_peer": cell["vs_peer"], "tokens_per_s": cell["tokens_per_s"],
                                   "ppl_vs_peer": dep["deployed_ppl"].get("vs_peer"),
                                   "bytes_per_token": (cell.get("bytes_per_token") or {}).get("bytes")})
    if not candidates:
        return {"answer": None, "text": "Not measured: no pruned deployment has a decode figure beside the peer's."}
    wins = [c for c in candidates if c["qualifies"] and c["vs_peer"].get("win")]
    peer_bytes = (peer_cell.get("bytes_per_token") or {}).get("bytes")
    peer_ppl = peer["deployed_ppl"]["ppl"]
    if wins:
        best = max(wins, key=lambda c: stats.lower_end(c["vs_peer"]))
        return {"answer": True, "best": best, "candidates": candidates,
                "text": f"Yes. {_name(best)} decodes {fmt_ratio(best['vs_peer'])} as fast as the source Q4_K_M on "
                        f"llama.cpp ({best['tokens_per_s']:.1f} against {peer_cell['tokens_per_s']:.1f} tok/s, 95% "
                        f"interval clear of 1 and of the A/A floor ±{best['vs_peer']['floor']:.0%}) at "
                        f"{_ppl_text(best, peer_ppl)}."}
    qualified = [c for c in candidates if c["qualifies"]]
    pool = qualified or candidates
    best = max(pool, key=lambda c: c["vs_peer"]["decode"])
    reason = []
    if best["qualifies"] is None:
        reason.append("its own perplexity was not measured")
    elif not best["qualifies"]:
        reason.append(f"its perplexity is over {QUALITY_LIMIT}x the peer's ({_ppl_text(best, peer_ppl)})")
    if not best["vs_peer"].get("win"):
        lo = (best["vs_peer"].get("decode_ci95") or [best["vs_peer"]["decode"]])[0]
        what = "1" if lo <= 1 else f"the A/A noise floor (±{best['vs_peer'].get('floor', 0):.0%})"
        reason.append(f"its decode ratio {fmt_ratio(best['vs_peer'])} does not clear {what}")
    text = (f"No. No pruned deployment decodes faster than the source Q4_K_M on llama.cpp "
            f"({peer_cell['tokens_per_s']:.1f} tok/s) at ≤ {QUALITY_LIMIT}x its perplexity on both WikiText-2 and "
            f"C4. Closest{'' if qualified else ' (none meets the quality bound)'}: {_name(best)} at "
            f"{best['tokens_per_s']:.1f} tok/s, {fmt_ratio(best['vs_peer'])} the peer's speed; "
            + "; ".join(reason) + ".")
    # the bound is the closest deployment's own engine's: another engine's kernels reaching more GB/s say nothing
    # of what this engine can do with fewer bytes
    same = (bandwidth.get("by_engine") or {}).get(best["engine"])
    bw = (same or bandwidth.get("best_effective_gb_per_s") or {}).get("gb_per_s")
    where = f"on {ENGINE_NAMES.get(best['engine'], best['engine'])}" if same else "on any engine"
    bound = {}
    if best["bytes_per_token"] and peer_bytes:
        # bytes stand in the way only where they are not fewer than the peer's; else quality (or noise) does
        lead = ("What stands in the way is bytes per token" if best["bytes_per_token"] >= 0.95 * peer_bytes else
                "Its bytes per token would allow a win; quality is what stands in the way")
        text += (f" {lead}: it streams {fmt_gb(best['bytes_per_token'])} of "
                 f"weights per token against the peer's {fmt_gb(peer_bytes)} "
                 f"({best['bytes_per_token'] / peer_bytes:.2f}x)")
        bound = {"bytes_per_token": best["bytes_per_token"], "peer_bytes_per_token": peer_bytes}
        if bw:
            needed = bw * 1e9 / peer_cell["tokens_per_s"]
            bound.update(best_effective_gb_per_s=bw, bandwidth_of=where, max_tokens_per_s=bw * 1e9 /
                         best["bytes_per_token"], bytes_to_pass_peer=needed)
            text += (f"; even at the best effective bandwidth observed here {where} ({bw:.1f} GB/s) those bytes "
                     f"allow at "
                     f"most {bound['max_tokens_per_s']:.1f} tok/s, and to decode faster than the peer's "
                     f"{peer_cell['tokens_per_s']:.1f} tok/s at that rate a deployment must stream under "
                     f"{fmt_gb(needed)} per token")
        text += "."
        if best["engine"] == "llamacpp" and abs(best["bytes_per_token"] / peer_bytes - 1) < 0.05:
            text += (" llama.cpp has no sparse kernels: a pruned model's zeros are stored and streamed like any "
                     "other weight, so at the peer's bytes it decodes at the peer's speed, whatever its sparsity.")
    fastest = max(candidates, key=lambda c: c["vs_peer"]["decode"])
    if fastest is not best:  # the closest is chosen among those within the bound: say what speed costs beyond it
        text += (f" Fastest at any quality: {_name(fastest)} at {fastest['tokens_per_s']:.1f} tok/s, "
                 f"{fmt_ratio(fastest['vs_peer'])} the peer's speed"
                 + (" (a win)" if fastest["vs_peer"].get("win") else " (not a win)")
                 + (f", at {_ppl_text(fastest, peer_ppl)}" if fastest.get("ppl_vs_peer") else
                    ", its own perplexity not measured")
                 + (f"; it streams {fastest['bytes_per_token'] / peer_bytes:.2f}x the peer's bytes per token"
                    if fastest["bytes_per_token"] and peer_bytes else "") + ".")
    return {"answer": False, "closest": best, "fastest": fastest, "bound": bound, "candidates": candidates,
            "text": text}


def _name(c: dict) -> str:
    return f"`{c['deployment']}` on {ENGINE_NAMES.get(c['engine'], c['engine'])}"


def _ppl_text(c: dict, peer_ppl: dict) -> str:
    vs = c.get("ppl_vs_peer") or {}
    return ", ".join(f"{vs[k]:.2f}x the peer's {CORPORA[k]} perplexity ({peer_ppl[k]:.2f})" for k in CORPORA if k in vs)


# ---------------------------------------------------------------- speculative decoding


def speculative(run: Path) -> dict:
    """RUN/speculative.json as scripts/speculative_estimate.py writes it (acceptance, step costs, speedup per
    gamma); a file of another shape is shown key by key."""
    data, why = read_json(run / "speculative.json")
    if data is None:
        return {"missing": why.replace("step not run", "scripts/speculative_estimate.py not run")}
    return {"file": str(run / "speculative.json"), "data": data}


def speculative_lines(spec: dict) -> list[str]:
    if "missing" in spec:
        return [f"Not measured: {spec['missing']}."]
    data = spec["data"]
    acc, by_gamma = data.get("acceptance"), data.get("speedup_by_gamma")
    if not (isinstance(acc, dict) and isinstance(by_gamma, dict) and "c_target_ms" in data):
        return ["speculative.json, as written (not the shape of scripts/speculative_estimate.py):", "",
                *[f"- {k}: {_spec_value(v)}" for k, v in data.items() if k != "provenance"]]
    engines = data.get("engines") or {}
    lines = [f"Target: `{_folder(data.get('target'))}` on {ENGINE_NAMES.get(engines.get('target'), '?')}; draft: "
             f"`{_folder(data.get('draft'))}` on {ENGINE_NAMES.get(engines.get('draft'), engines.get('draft', '?'))}"
             f" (scripts/speculative_estimate.py). Acceptance (greedy agreement, {acc.get('method', '')}): "
             f"α = {acc['alpha']:.3f} over {acc.get('positions')} positions"
             + (f", per prompt {_spec_value(acc['per_prompt'])}" if acc.get("per_prompt") else "") + ". Step costs: "
             f"target decode {data['c_target_ms']:.2f} ms, draft decode {data['c_draft_ms']:.2f} ms; target "
             "verification pass for gamma = k (k + 1 tokens, every position's logits): "
             + ", ".join(f"k={k} {v:.2f} ms" for k, v in (data.get("c_verify_ms") or {}).items()) + ".", "",
             "| gamma | tokens per iteration (simulated; formula) | ms per iteration | estimated speedup "
             "(simulated; formula) |", "|---|---|---|---|"]
    for gamma, row in by_gamma.items():
        sim, e = row.get("tokens_per_iteration"), row.get("tokens_per_iteration_formula")
        sp, spf = row.get("speedup"), row.get("speedup_formula")
        mark = " (best)" if str(data.get("best_gamma")) == str(gamma) else ""
        lines.append(f"| {gamma}{mark} | {_num(sim)}; {_num(e)} | {_num(row.get('ms_per_iteration'))} | "
                     f"{_num(sp, 'x')}; {_num(spf, 'x')} |")
    best = data.get("best_speedup")
    lines += ["", (f"Best estimate: {best:.2f}x the target's own decode speed at gamma = {data.get('best_gamma')}"
                   if best is not None else "No gamma has a simulated speedup")
              + " (lossless by construction: every token emitted is the target's own greedy choice). "
              + (f"Estimate only: {data['estimate_only']}." if data.get("estimate_only") else "")]
    return lines


def _folder(block) -> str:
    return block.get("folder", "?") if isinstance(block, dict) else str(block)


def _num(value, unit: str = "") -> str:
    return "—" if value is None else f"{value:.2f}{unit}"


def _spec_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(_spec_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_spec_value(v)}" for k, v in value.items()) + "}"
    return str(value)


# ---------------------------------------------------------------- writing


def fmt_ppl(q: dict, corpus: str, ratio_key: str = "vs_dense") -> str:
    value = q["ppl"].get(corpus)
    if value is None:
        return "not measured"
    ratio = (q.get(ratio_key) or {}).get(corpus)
    return f"{value:.2f}" + (f" ({ratio:.2f}x)" if ratio is not None else "")


def fmt_bytes(n: float | None) -> str:
    if not n:
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def fmt_seconds(s: float) -> str:
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{s % 60:04.1f}" if s >= 3600 else \
        f"{int(s // 60)}:{s % 60:04.1f}" if s >= 60 else f"{s:.1f} s"


def quality_lines(report: dict) -> list[str]:
    lines = ["| model | allocation | WikiText-2 ppl (x dense) | C4 ppl (x dense) | sparsity | layer ratios |",
             "|---|---|---|---|---|---|"]
    for q in report["quality"]:
        if q["model"] != "dense" and "pruning" not in q:
            lines.append(f"| {q['label']} | not measured: {q['pruning_missing']} | "
                         f"{fmt_ppl(q, 'wikitext2')} | {fmt_ppl(q, 'c4')} | | |")
            continue
        p = q.get("pruning") or {}
        if q["model"] == "dense":
            how = "—"
        elif p.get("auto"):
            how = f"{p['allocation']}, α = {p['auto']['choice']} (--alpha auto)"
        elif p.get("allocation") == "owl":
            how = f"owl, λ = {p.get('owl_lambda')}"
        elif p.get("allocation") == "dlp" and p.get("alpha") is not None:
            how = f"dlp, α = {p['alpha']:g}"
        else:
            how = p.get("allocation") or "?"
        rng = p.get("layer_ratio_range")
        cells = [fmt_ppl(q, c) if q["ppl"].get(c) is not None else f"not measured: {q.get('missing')}"
                 for c in CORPORA]
        lines.append(f"| {q['label']} | {how} | {cells[0]} | {cells[1]} | "
                     f"{'0' if q['model'] == 'dense' else format(p.get('global_sparsity') or 0, '.1%')} | "
                     f"{'—' if not rng else f'{rng[0]:.3f}–{rng[1]:.3f}'} |")
    return lines


def alpha_lines(report: dict) -> list[str]:
    out = []
    for q in report["quality"]:
        auto = (q.get("pruning") or {}).get("auto")
        if not auto:
            continue
        grid = ", ".join(f"{a}: {v:.2f}" for a, v in zip(auto.get("grid") or [], auto.get("validation_ppl") or []))
        out.append(f"{q['label']}: --alpha auto chose α = {auto['choice']} from the one-shot validation perplexity "
                   f"of each candidate ({auto.get('windows')} C4 validation windows of {auto.get('seqlen')}, disjoint "
                   f"from calibration; {auto.get('scored_by')}): {grid}.")
    return out


def deployment_lines(report: dict) -> list[str]:
    lines = ["| deployment | from | engine | deployed ppl WikiText-2 (x peer) | C4 (x peer) | decode tok/s | "
             "x same engine's dense fp32 [95% CI] | x source Q4_K_M on llama.cpp [95% CI] | A/A floor | file | "
             "zeros stored |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for dep in report["deployments"]:
        head = f"| `{dep['name']}` ({dep['form']}) | {dep['model_label']} |"
        if "missing" in dep:
            lines.append(f"{head} | not measured: {dep['missing']} | | | | | | | | |")
            continue
        q = dep["deployed_ppl"]
        if q["ppl"]:
            ppl = [fmt_ppl(q, c, "vs_peer") for c in CORPORA]
            ppl[0] += f", {q['who']}"
        else:
            ppl = [f"not measured: {q.get('missing')}", ""]
        size = fmt_bytes(dep.get("file_bytes"))
        zeros = "—" if dep.get("sparsity_stored") is None else f"{dep['sparsity_stored']:.1%}"
        for engine, cell in dep["engines"].items():
            name = ENGINE_NAMES.get(engine, engine)
            if "tokens_per_s" not in cell:
                lines.append(f"{head} {name} | {ppl[0]} | {ppl[1]} | not measured: {cell['missing']} | | | | "
                             f"{size} | {zeros} |")
                continue
            own = cell.get("vs_dense_fp32")
            own_text = fmt_ratio(own) if own else ("— (no fp32 on llama.cpp)" if engine == "llamacpp" else "—")
            floor = cell["floor"]
            lines.append(f"{head} {name} | {ppl[0]} | {ppl[1]} | {cell['tokens_per_s']:.2f} | {own_text} | "
                         f"{fmt_ratio(cell.get('vs_peer'))} | ±{floor['value']:.1%} ({floor['source']}) | {size} | "
                         f"{zeros} |")
    return lines


def bytes_lines(report: dict) -> list[str]:
    lines = ["| deployment | engine | weight bytes per token | of which lm_head | counted | decode ms | "
             "effective GB/s |", "|---|---|---|---|---|---|---|"]
    for dep in report["deployments"]:
        if "missing" in dep:
            lines.append(f"| `{dep['name']}` | | not measured: {dep['missing']} | | | | |")
            continue
        streamed = dep.get("streamed") or {}
        if not streamed.get("bytes"):
            lines.append(f"| `{dep['name']}` | | not measured: {streamed.get('missing')} | | | | |")
            continue
        for engine, cell in dep["engines"].items():
            b = cell.get("bytes_per_token")
            if b is None:
                lines.append(f"| `{dep['name']}` | {ENGINE_NAMES.get(engine, engine)} | "
                             f"{fmt_gb(streamed['bytes'])} | {fmt_gb(streamed.get('lm_head_bytes'))} | "
                             f"all stored weights | not measured | — |")
                continue
            lines.append(f"| `{dep['name']}` | {ENGINE_NAMES.get(engine, engine)} | {fmt_gb(b['bytes'])} | "
                         f"{fmt_gb(streamed.get('lm_head_bytes'))} | {b['counted']} | {cell['decode_ms']:.2f} | "
                         f"{b['gb_per_s']:.2f} |")
    return lines


def fmt_gb(n: float | None) -> str:
    """Decimal units, as bandwidth is given."""
    if not n:
        return "—"
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def cost_lines(report: dict) -> list[str]:
    lines = ["| step | what | wall time | peak RSS |", "|---|---|---|---|"]
    for c in report["costs"]:
        if "missing" in c:
            lines.append(f"| {c['step']} | {c['what']} | not measured: {c['missing']} | |")
            continue
        failed = f" (failed: {c['failed']})" if c.get("failed") else ""
        lines.append(f"| {c['step']} | {c['what']}{failed} | {fmt_seconds(c['wall_s'])} | "
                     f"{c['peak_rss_bytes'] / 2**30:.2f} GiB |")
    compiles = []
    for dep in report["deployments"]:
        for engine, cell in dep.get("engines", {}).items():
            if cell.get("compile_s") is not None:
                compiles.append(f"`{dep['name']}` on {ENGINE_NAMES.get(engine, engine)}: compile "
                                f"{cell['compile_s']:.1f} s, worker peak RSS {cell['peak_rss_mib'] / 1024:.2f} GiB")
    if compiles:
        lines += ["", "Compile and bench per pair (bench.json, one worker process each): " + "; ".join(compiles) + "."]
    return lines


def machine_line(report: dict, prov: dict) -> str:
    m = report["machine_measured"] or {}
    if m:
        own = prov["machine"]
        return (f"Machine (bench.json): {m.get('cpu_model', '?')}, {m.get('usable_cores') or m.get('cores_used') or '?'}"
                f" cores, ISA {', '.join(m.get('isa') or []) or '?'}; memory {own.get('memory_gib')} GiB, last-level "
                f"cache {fmt_bytes(own.get('last_level_cache_bytes'))} (this machine, where the report was made).")
    own = prov["machine"]
    return (f"Machine (no bench.json: the machine the report was made on): {own.get('cpu_model')}, "
            f"{own.get('usable_cores')} cores, ISA {', '.join(own.get('isa') or [])}, memory {own.get('memory_gib')} "
            f"GiB, last-level cache {fmt_bytes(own.get('last_level_cache_bytes'))}.")


def commands(report: dict, run: Path) -> list[str]:
    """The commands that made the inputs, as GNU time recorded them."""
    return [c["command"] for c in report["costs"] if c.get("command")]


def run_notes(run: Path) -> list[str]:
    """RUN/NOTES.md, where whoever ran the study says what the files cannot (a step killed, a row left out and
    why), as a section of its own."""
    notes = run / "NOTES.md"
    if not notes.is_file():
        return []
    return ["## Notes from the run", "", notes.read_text(encoding="utf-8").strip(), ""]


def write(report: dict, run: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(run=str(run))
    prov["machine"] = prov.get("machine") or machine_info()
    report["provenance"] = prov
    report["commands"] = commands(report, run)
    bench_settings = report["bench"].get("settings") or {}
    q0 = next((q for q in report["quality"] if q.get("windows")), {})
    aa = "; ".join(f"{ENGINE_NAMES.get(e, e)} {fmt_ratio(b)} (floor ±{stats.aa_floor(b):.1%})"
                   for e, b in report["aa_controls"].items())
    bw = report["bandwidth"]["best_effective_gb_per_s"]
    copy = (report["machine_measured"] or {}).get("copy_bandwidth_gbs_by_threads") or {}
    copy_text = (" For comparison, bench's own copy probe (numpy copy of a 256 MiB buffer, read + write): " +
                 ", ".join(f"{v:.1f} GB/s with {k} thread{'s' if k != '1' else ''}" for k, v in copy.items()) + "."
                 if copy else "")
    text = [
        f"# {MODEL}: pruned, quantized and deployed against its own Q4_K_M on llama.cpp (issue 25)", "",
        machine_line(report, prov), "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v) + ".", "",
        "## The model", "",
        f"{MODEL} (`dlp-deploy models fetch qwen2.5-coder-1.5b`): qwen2 architecture, 28 layers, hidden 1536, MLP "
        "8960, 12 query and 2 KV heads, q/k/v biases, an untied output matrix of 151,936 x 1,536. It is published "
        "here as a Q4_K_M GGUF; **its \"fp32\" form is that Q4_K_M file dequantized**, so every fp32 figure below "
        "carries Q4_K_M's rounding. The peer is the original GGUF file itself, copied unchanged into "
        f"`deploy/{PEER}` and run on llama.cpp: what a user of this model runs today. `dense.q8_0` (a q8_0 GGUF "
        "re-exported from the fp32 form) is the second peer row.", "",
        "## Quality (PyTorch)", "",
        "Perplexity of each PyTorch model, " + (f"{q0['windows']} windows of {q0.get('seqlen')} tokens" if q0
                                                 else "(no eval file: not measured)") + " on "
        "WikiText-2 test and on C4 validation (documents disjoint from calibration); in brackets the ratio to dense. "
        "All prunes: Wanda scores on the decoder Linears' weights at the sparsity each label names (the global share "
        "of those weights), calibration on C4.", "",
        *quality_lines(report), "", *alpha_lines(report), "",
        "## Deployments", "",
        "Deployed perplexity: each deployment's own, through its engine (`eval/deploy-NAME.json`), on the same "
        "windows; an fp32 ONNX graph has none of its own and stands with its PyTorch model's (marked). In brackets "
        "its ratio to the peer's. Decode tokens/s: median decode step of one `dlp-deploy bench` run (bench.json), "
        f"every pair interleaved, {bench_settings.get('rounds', '?')} worker processes x "
        f"{bench_settings.get('runs', '?')} runs, prompt {bench_settings.get('prompt_len', '?')} tokens, "
        f"{bench_settings.get('gen_len', '?')} generated. Ratios are of per-run decode medians with cluster-bootstrap "
        "95% intervals (processes resampled); a speedup is claimed only where the interval clears 1 and the A/A "
        "floor. The A/A floor: the dense deployment measured again as if it were a second model, on the same "
        "engine (where the bench had none for an engine, the largest of the run).", "",
        *deployment_lines(report), "",
        f"A/A control: {aa or 'none in this run'}.", "",
        "## Bytes per token", "",
        "Weight bytes a decode step streams: every matrix it multiplies as stored in the deployment file (ONNX "
        "initializer or GGUF tensor headers: packed weights, scales and zero points), the untied lm_head "
        "(151,936 x 1,536) included; the embedding is a gather of one row and is not counted, nor are the KV cache "
        "and activations. On DeepSparse (sparse kernels) only the non-zero weights count (no index overhead: the "
        "optimistic limit). Effective GB/s = those bytes over the median decode step.", "",
        *bytes_lines(report), "",
        ("This machine's bandwidth, **as the best effective GB/s observed** in this bench (not a measured peak): "
         f"{bw['gb_per_s']:.2f} GB/s (`{bw['deployment']}` on {ENGINE_NAMES.get(bw['engine'], bw['engine'])})."
         if bw else "This machine's bandwidth: not measured (no decode figure with a byte count).") + copy_text, "",
        "## Costs", "",
        "GNU `/usr/bin/time -v` of each step of scripts/qwen_study.sh (`costs/STEP.txt`, the fetch in `fetch.log`): "
        "wall time and maximum resident set size.", "",
        *cost_lines(report), "",
        *run_notes(run),
        "## Verdict", "",
        f"Does any pruned deployment decode faster than the source Q4_K_M on llama.cpp at ≤ {QUALITY_LIMIT}x its "
        "perplexity (WikiText-2 and C4 both)?", "",
        report["verdict"]["text"], "",
        "## Speculative decoding: a pruned draft for the dense target", "",
        *speculative_lines(report["speculative"]), "",
        "Figure: `tradeoff.png`, decode tokens/s against deployed WikiText-2 perplexity, the Pareto front drawn and "
        "the peer marked.", "",
        f"Reproduce: `bash scripts/qwen_study.sh` (writes {run}), then `python scripts/qwen_report.py --run {run} "
        f"--out {out}`. Every number above is in study.json (and the bench run in bench.json) with the commands that made its inputs."]
    (out / "README.md").write_text("\n".join(text) + "\n")
    write_json_atomic(out / "study.json", report, force=True)  # not a sweep's results.json (bench/records.py)
    if (run / "bench.json").is_file():  # the measurement the tables come from, beside them
        shutil.copyfile(run / "bench.json", out / "bench.json")
    plot(report, out)


def plot(report: dict, out: Path) -> None:
    points = []
    for dep in report["deployments"]:
        ppl = (dep.get("deployed_ppl") or {}).get("ppl", {}).get("wikitext2")
        for engine, cell in dep.get("engines", {}).items():
            if ppl is not None and "tokens_per_s" in cell:
                points.append((cell["tokens_per_s"], ppl, dep["name"], engine))
    fig, ax = plt.subplots(figsize=(8, 5))
    if not points:
        ax.text(0.5, 0.5, "not measured: no deployment has both a decode figure and a deployed perplexity",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
    # neighbouring labels (the q4_k_m deployments sit within 2 tok/s of each other) take turns above and below
    offsets = [(8, 14), (8, -18), (-110, 22), (-110, -24)]
    for i, (tps, ppl, name, engine) in enumerate(sorted(points, key=lambda p: (round(p[0] / 3), p[1]))):
        peer = name == PEER and engine == PEER_ENGINE
        pruned = DEPLOYMENTS.get(name, ("dense",))[0] != "dense"
        ax.scatter(tps, ppl, marker="*" if peer else ("s" if pruned else "o"),
                   s=160 if peer else 40, color="crimson" if peer else None, zorder=3)
        ax.annotate(f"{name} {SHORT_ENGINE.get(engine, engine)}" + (" (peer)" if peer else ""), (tps, ppl),
                    fontsize=7, xytext=offsets[i % len(offsets)], textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"})
    front = pareto(points)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", lw=1, ls="--",
                label="Pareto front")
    peer = next((p for p in points if p[2] == PEER and p[3] == PEER_ENGINE), None)
    if peer:
        ax.axhline(peer[1] * QUALITY_LIMIT, color="crimson", lw=0.8, ls=":",
                   label=f"{QUALITY_LIMIT}x the peer's perplexity")
        ax.axvline(peer[0], color="crimson", lw=0.8, ls=":")
    if front or peer:
        ax.legend(fontsize=7)
    ax.set_xlabel("decode tokens/s (higher is better)")
    ax.set_ylabel("deployed WikiText-2 perplexity (lower is better)")
    if points and max(p[1] for p in points) > 3 * min(p[1] for p in points):
        ax.set_yscale("log")
    ax.set_title(f"{MODEL}: speed against quality (o dense, s pruned, * the source Q4_K_M)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)
    plt.close(fig)


def pareto(points: list[tuple]) -> list[tuple]:
    """The points no other is both faster and lower in perplexity than, by speed descending."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (-p[0], p[1])):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return sorted(front)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the run folder of scripts/qwen_study.sh")
    ap.add_argument("--out", type=Path, required=True, help="report folder (README.md, study.json, bench.json, tradeoff.png)")
    args = ap.parse_args(argv)
    report = build(args.run)
    write(report, args.run, args.out)
    print(report["verdict"]["text"])
    return report


if __name__ == "__main__":
    main()
