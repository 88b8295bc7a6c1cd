"""Deployment folders: model.onnx (+ model.data when over 2 GB), config.json, tokenizer files, export.json.

A folder is published only after the ONNX file's sparsity matches the PyTorch model's and (unless skipped) its
numerics and greedy tokens match PyTorch on ONNX Runtime and DeepSparse.
"""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # DeepSparse phones home on import otherwise

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from ..io import atomic_dir, check_writable, write_json_atomic
from ..models import decoder_layers, linear_modules, load, model_sparsity
from ..provenance import provenance
from .onnx import EXTERNAL_DATA_FILE, export_onnx, onnx_weight_sparsity

MODEL_FILE = "model.onnx"
EXPORT_FILE = "export.json"
VALIDATION_PROMPT = "The capital of France is"
VALIDATION_NEW_TOKENS = 32
PRUNING_KEYS = ("form", "global_sparsity", "target_sparsity")
PRUNING_SETTINGS = ("method", "allocation", "alpha", "reducer", "granularity", "pattern", "structure", "importance",
                    "multiple")
VALIDATION_ENGINES = ("onnxruntime", "deepsparse", "deepsparse-external", "openvino")


class ValidationError(UserError):
    """The exported graph disagrees with PyTorch; the folder is not published."""


Progress = Callable[[str], None]


def _no_progress(_: str) -> None:
    pass


# ---------------------------------------------------------------- export

def export_deployment(model_or_dir, out, seq_len: int = 512, validate: bool = True, force: bool = False,
                      tokenizer=None, progress: Progress | None = None, num_cores: int | None = None) -> dict:
    """Export a causal LM (an HF folder / alias, or a loaded model with `tokenizer`) to a deployment folder.

    Returns the export.json contents. Raises UserError on bad input and ValidationError when a check fails.
    """
    progress = progress or _no_progress
    out = Path(out)
    check_writable(out, force)  # fail before the slow load
    timings: dict[str, float] = {}
    started = time.perf_counter()

    with _timed(timings, "load_s"):
        progress("loading model")
        model, tokenizer, source = _load_source(model_or_dir, tokenizer)
    max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    prompt_ids = tokenizer(VALIDATION_PROMPT, return_tensors="pt")["input_ids"][0].tolist()
    _check_seq_len(seq_len, max_positions, len(prompt_ids) if validate else 1, validate, model.config)

    with atomic_dir(out, force) as tmp:
        onnx_path = tmp / MODEL_FILE
        with _timed(timings, "export_s"):
            progress("exporting ONNX graph")
            exported = export_onnx(model, onnx_path, max_positions=max_positions)
        _save_hf_files(model, tokenizer, tmp)
        with _timed(timings, "sparsity_s"):
            progress("measuring sparsity in the ONNX file")
            sparsity = _check_sparsity(model, onnx_path)
            pattern = check_nm_pattern(model, onnx_path, _pruning_record(model_or_dir))
        validation = None
        if validate:
            validation = validate_deployment(model, onnx_path, prompt_ids, seq_len, timings, progress, num_cores)
        timings["total_s"] = time.perf_counter() - started
        info = {
            "source": source,
            "format": {"opset": exported["opset"], "ir_version": exported["ir_version"],
                       "external_data": exported["external_data"], "dynamic_axes": ["batch", "length", "total"]},
            "seq_len": seq_len,
            "max_position_embeddings": max_positions,
            "architecture": exported["spec"].describe(),
            "sizes": _sizes(tmp),
            "weight_sparsity": sparsity,
            "nm_pattern": pattern,
            "validation": validation,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "provenance": provenance(),
        }
        write_json_atomic(tmp / EXPORT_FILE, info, force=True)
        failures = validation_failures(validation) if validation else []
        if failures:
            raise ValidationError("export validation failed, folder not published: " + "; ".join(failures))
    return info


class _timed:
    def __init__(self, timings: dict, key: str):
        self.timings, self.key = timings, key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = time.perf_counter() - self.t0


def _load_source(model_or_dir, tokenizer):
    if isinstance(model_or_dir, torch.nn.Module):
        if tokenizer is None:
            raise UserError("exporting an in-memory model needs its tokenizer (tokenizer=...)")
        model_or_dir.eval()
        return model_or_dir, tokenizer, {"model": type(model_or_dir).__name__, "pruning": None}
    model, tok = load(str(model_or_dir))
    return model, tok, {"model": str(model_or_dir), "pruning": _pruning_summary(model_or_dir)}


def _pruning_record(model_or_dir) -> dict | None:
    if isinstance(model_or_dir, torch.nn.Module):
        return None
    path = Path(str(model_or_dir)) / "pruning.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc}); fix or remove it") from None


def _pruning_summary(model_dir) -> dict | None:
    data = _pruning_record(model_dir)
    if data is None:
        return None
    settings = data.get("settings") or {}
    summary = {k: settings[k] for k in PRUNING_SETTINGS if k in settings}
    summary.update({k: data[k] for k in PRUNING_KEYS if k in data})
    return summary


def _check_seq_len(seq_len: int, max_positions: int, prompt_len: int, validate: bool, config) -> None:
    need = prompt_len + VALIDATION_NEW_TOKENS if validate else 2
    if seq_len < need:
        what = (f"the {prompt_len}-token validation prompt plus {VALIDATION_NEW_TOKENS} generated tokens"
                if validate else "one prompt token plus one new token")
        raise UserError(f"--seq-len {seq_len} is too small for {what}; use --seq-len {need} or more")
    if max_positions and seq_len > max_positions:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({max_positions}); "
                        f"use --seq-len {max_positions} or less")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and seq_len > window:
        raise UserError(f"--seq-len {seq_len} exceeds the model's sliding attention window ({window}), "
                        f"which the export does not implement; use --seq-len {window} or less")


def _save_hf_files(model, tokenizer, folder: Path) -> None:
    """config.json + tokenizer files so AutoConfig/AutoTokenizer (and DeepSparse's pipeline) load the folder offline."""
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = True  # the deployed graph has a KV cache
    try:
        model.config.save_pretrained(folder)
    finally:
        model.config.use_cache = use_cache
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _sizes(folder: Path) -> dict:
    onnx_bytes = (folder / MODEL_FILE).stat().st_size
    data = folder / EXTERNAL_DATA_FILE
    data_bytes = data.stat().st_size if data.exists() else 0
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"model_onnx_bytes": onnx_bytes, "external_data_bytes": data_bytes, "folder_bytes": total}


# ---------------------------------------------------------------- sparsity

def _block_weight_names(model) -> set[str]:
    """Parameter names of the decoder blocks' Linear weights (what model_sparsity counts)."""
    ids = {id(m.weight) for block in decoder_layers(model) for m in linear_modules(block).values()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def _check_sparsity(model, onnx_path: Path) -> dict:
    """Sparsity as DeepSparse sees it (zeros in MatMul/Gemm initializers) must equal the PyTorch model's."""
    measured = onnx_weight_sparsity(onnx_path)
    torch_side = model_sparsity(model)
    block_names = _block_weight_names(model)
    found = {name.removesuffix(".T"): entry for name, entry in measured["per_initializer"].items()}
    missing = sorted(block_names - set(found))
    if missing:
        raise ValidationError(f"{len(missing)} block weights are not plain MatMul/Gemm initializers in the ONNX file "
                              f"(e.g. {missing[0]}); DeepSparse could not see their sparsity")
    zeros = total = 0
    for name in block_names:
        entry = found[name]
        zeros, total = zeros + entry["zeros"], total + int(np.prod(entry["shape"]))
    onnx_global = zeros / total
    if zeros != round(torch_side["global_sparsity"] * torch_side["params"]) or total != torch_side["params"]:
        raise ValidationError(f"sparsity changed in export: PyTorch {torch_side['global_sparsity']:.6f}, "
                              f"ONNX {onnx_global:.6f}")
    return {
        "global": onnx_global,
        "pytorch_global": torch_side["global_sparsity"],
        "all_matmul_weights": measured["overall"],
        "block_params": total,
        "per_initializer": {name: round(e["sparsity"], 6) for name, e in measured["per_initializer"].items()},
    }


def nm_layer_counts(record: dict | None) -> tuple[int, list[int]] | None:
    """(m, n per layer) of an N:M or mixed N:M pruning record, else None."""
    from ..prune.masks import parse_pattern

    settings = (record or {}).get("settings") or {}
    if not settings.get("pattern") or settings.get("structure"):
        return None
    pattern = parse_pattern(settings["pattern"])
    if pattern.kind == "unstructured":
        return None
    layers = record.get("layers") or []
    return pattern.m, [pattern.n if pattern.kind == "nm" else int(layer["n"]) for layer in layers]


def check_nm_pattern(model, onnx_path: Path, record: dict | None) -> dict | None:
    """Every group of m consecutive inputs of every output row of every block weight, as stored in the ONNX file,
    holds at least the layer's n zeros; the folder is refused otherwise."""
    import onnx
    from onnx import numpy_helper

    from ..prune.masks import nm_group_zero_counts

    counts = nm_layer_counts(record)
    if counts is None:
        return None
    m, n_per_layer = counts
    if len(n_per_layer) != len(decoder_layers(model)):
        raise ValidationError(f"pruning.json lists {len(n_per_layer)} layers, the model has "
                              f"{len(decoder_layers(model))}; re-run the prune")
    layer_of = {id(mod.weight): i for i, block in enumerate(decoder_layers(model))
                for mod in linear_modules(block).values()}
    names = {name: layer_of[id(p)] for name, p in model.named_parameters() if id(p) in layer_of}
    proto = onnx.load(str(onnx_path), load_external_data=True)
    checked = violating = 0
    for init in proto.graph.initializer:
        name = init.name.removesuffix(".T")
        if name not in names:
            continue
        array = torch.from_numpy(numpy_helper.to_array(init).copy())
        weight = array.t() if init.name.endswith(".T") else array  # back to [out, in]
        zeros = nm_group_zero_counts(weight, m)
        checked += zeros.numel()
        violating += int((zeros < n_per_layer[names[name]]).sum())
    if violating:
        raise ValidationError(f"{violating} of {checked} groups of {m} in the ONNX weights hold fewer zeros than "
                              "the pruning record's N; the N:M pattern did not survive export")
    return {"pattern": record["settings"]["pattern"], "m": m, "n_per_layer": n_per_layer,
            "groups_checked": checked, "groups_violating": violating}


# ---------------------------------------------------------------- numerics

def reference(model, prompt_ids: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """PyTorch prompt logits [P, V] and HF generate()'s greedy continuation (no early stop on EOS)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float().numpy()
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=pad, use_cache=True)
    return logits, out[0, len(prompt_ids):].tolist()


def logit_tolerance(ref_logits: np.ndarray) -> float:
    """fp32 graphs reorder sums differently per engine; allow a small error relative to the logit scale."""
    return 1e-3 * max(1.0, float(np.abs(ref_logits).max()))


def validate_deployment(model, onnx_path: Path, prompt_ids: list[int], seq_len: int, timings: dict,
                        progress: Progress = _no_progress, num_cores: int | None = None) -> dict:
    from ..runtime.decode import generate
    from ..runtime.engines import ENGINES

    with _timed(timings, "reference_s"):
        progress("PyTorch reference (logits + HF generate)")
        ref_logits, ref_tokens = reference(model, prompt_ids, VALIDATION_NEW_TOKENS)
    result = {"prompt": VALIDATION_PROMPT, "prompt_tokens": len(prompt_ids), "new_tokens": VALIDATION_NEW_TOKENS,
              "reference_tokens": ref_tokens, "logit_tolerance": logit_tolerance(ref_logits)}
    for name in VALIDATION_ENGINES:
        if name not in ENGINES.usable():
            result[name] = {"skipped": "not installed"}
            continue
        t0 = time.perf_counter()
        progress(f"validating on {name}")
        session = ENGINES[name].compile(onnx_path, seq_len, num_cores=num_cores)
        session.prepare(len(prompt_ids))
        session.prepare(1)
        compile_s = time.perf_counter() - t0
        gen = generate(session, prompt_ids, VALIDATION_NEW_TOKENS)
        entry = {
            "max_abs_logit_diff": float(np.abs(gen.first_logits - ref_logits).max()),
            "greedy_match": gen.tokens == ref_tokens,
            "tokens": gen.tokens,
            "compile_s": round(compile_s, 3),
            "prefill_s": round(gen.prefill_s, 4),
            "decode_step_mean_s": round(float(np.mean(gen.decode_s)), 5) if gen.decode_s else None,
        }
        if hasattr(session, "fraction_of_supported_ops"):
            entry["fraction_of_supported_ops"] = session.fraction_of_supported_ops(1)
            entry["fraction_of_supported_ops_prefill"] = session.fraction_of_supported_ops(len(prompt_ids))
        del session
        timings[f"validate_{name}_s"] = time.perf_counter() - t0
        result[name] = entry
    return result


def validation_failures(validation: dict) -> list[str]:
    tol = validation["logit_tolerance"]
    failures = []
    for name in VALIDATION_ENGINES:
        entry = validation.get(name) or {}
        if "skipped" in entry or not entry:
            continue
        if not entry["max_abs_logit_diff"] <= tol:
            failures.append(f"{name} max |Δlogits| {entry['max_abs_logit_diff']:.3g} > {tol:.3g}")
        if not entry["greedy_match"]:
            failures.append(f"{name} greedy tokens differ from HF generate()")
        for key in ("fraction_of_supported_ops", "fraction_of_supported_ops_prefill"):
            if key in entry and entry[key] != 1.0:
                failures.append(f"{name} {key} is {entry[key]} (< 1.0: part of the graph falls back)")
    return failures


# ---------------------------------------------------------------- loading a deployment

@dataclass(frozen=True)
class Deployment:
    folder: Path
    onnx_path: Path
    info: dict

    @property
    def seq_len(self) -> int:
        return int(self.info.get("seq_len", 512))

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)


def load_deployment(folder) -> Deployment:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a deployment folder made by `dlp-deploy export`")
    missing = [name for name in (MODEL_FILE, EXPORT_FILE, "config.json") if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} is not a deployment folder (no {', '.join(missing)}); "
                        "create one with `dlp-deploy export MODEL --out DIR`")
    try:
        info = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder / EXPORT_FILE} is unreadable ({exc}); re-run `dlp-deploy export`") from None
    return Deployment(folder, folder / MODEL_FILE, info)
