"""A whole prune job: model + calibration in, a reloadable HF folder with pruning.json out (atomically)."""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import data, models
from ..errors import UserError
from ..io import atomic_dir, check_writable, write_json_atomic
from ..models import STREAMLINE_FILE, STRUCTURE_FILE, decoder_layers
from ..models.shapes import structure_record
from ..provenance import PeakRSS, provenance
from ..pruning_record import SCHEMA as PRUNING_SCHEMA
from .allocate import MAX_RATIO, get_allocator
from .masks import parse_pattern
from .pipeline import (PruneResult, PruneSettings, needs_calibration, prune_model, validate_for_model,
                       validate_settings)
from .offload import Checkpoint, NotStreamable, StreamedModel, streaming_refusal


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(device: str) -> str:
    """`auto`: CUDA when present, else the CPU; anything else must be a torch device this machine has."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible here; use --device auto or cpu")
    return device


def checkpoint_dtype(folder: Path | None, config) -> tuple[torch.dtype, str]:
    """The dtype the input stores its weights in, and where that was read: the safetensors headers of a local
    folder (what is really on disk), else config.json's dtype, else fp32."""
    checkpoint = Checkpoint.find(folder) if folder is not None else None
    stored = checkpoint.float_dtype() if checkpoint else None
    if stored in DTYPE_NAMES:
        return stored, "weights"
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if declared in DTYPE_NAMES:
        return declared, "config"
    return torch.float32, "default"


def native_matmul(dtype: torch.dtype, device: str) -> bool:
    """Whether `device` multiplies `dtype` matrices natively. CPUs without AVX-512 (bf16/fp16 through oneDNN) run
    half-precision matmuls in a scalar fallback: on an AVX2 EPYC 70x slower than fp32 (0.5 vs 37 GFLOPS)."""
    if dtype == torch.float32 or torch.device(device).type != "cpu":
        return True
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(name: str, stored: torch.dtype, device: str) -> tuple[torch.dtype, str]:
    """--dtype NAME, or for auto the checkpoint's dtype, except half precision on a CPU without native kernels for
    it, which computes in fp32 (out of core that costs one block in fp32, not the model). The reason is recorded."""
    if name != "auto":
        return DTYPES[name], "--dtype"
    if native_matmul(stored, device):
        return stored, "auto: the checkpoint's dtype"
    return torch.float32, (f"auto: the checkpoint is {DTYPE_NAMES[stored]}, which this CPU has no native matmul "
                           "for; fp32 instead")


def prune_to_folder(model_ref: str, out: Path, settings: PruneSettings, calib: str = "c4", nsamples: int = 128,
                    seqlen: int | None = None, seed: int = 0, device: str = "auto", data_root: str | None = None,
                    force: bool = False, progress=None, dtype: str = "auto", stream: bool | None = None) -> dict:
    """`dtype`: the weights and activations while pruning (auto: the checkpoint's; statistics and Hessians are
    fp32 regardless); the output keeps the input's dtype. `stream`: None prunes out of core where the input
    allows it (a local safetensors folder, an unstructured or N:M form) and in memory otherwise; True insists,
    False keeps the whole model in memory."""
    validate_settings(settings)
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose from auto, {', '.join(DTYPES)}")
    check_writable(out, force)
    root = data.data_dir(data_root)
    device = resolve_device(device)
    with atomic_dir(out, force) as tmp:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        # the whole job: loading the model is most of what pruning out of core saves
        with PeakRSS() as memory:
            report = _prune_into(model_ref, tmp, settings, calib, nsamples, seqlen, seed, device, root, dtype,
                                 stream, progress)
        report["memory"] = {**memory.as_dict(), "scope": "process RSS over the whole job: load, calibration, "
                                                         "prune, save"}
        if device.startswith("cuda"):
            report["memory"]["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        write_json_atomic(tmp / "pruning.json", report)
    return report


def _prune_into(model_ref, tmp: Path, settings: PruneSettings, calib, nsamples, seqlen, seed, device, root,
                dtype_name, stream, progress) -> dict:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    ref, config = models.load_config(model_ref)
    folder = Path(ref) if Path(ref).is_dir() else None
    stored, stored_from = checkpoint_dtype(folder, config)
    dtype, dtype_why = compute_dtype(dtype_name, stored, device)
    refusal = streaming_refusal(folder, bool(settings.structure))
    if settings.auto and refusal is None:
        refusal = f"--{settings.auto.replace('_', '-')} auto scores candidates on the whole model"
    streamed = None
    if refusal is None and stream is not False:
        try:
            streamed = StreamedModel(folder, config, dtype, device)
        except NotStreamable as exc:
            refusal = str(exc)
    if stream and streamed is None:
        raise UserError(f"--stream: {refusal}; leave --stream out to prune in memory")
    if streamed is not None:
        model, tok = streamed.model, AutoTokenizer.from_pretrained(ref)
    else:
        model, tok = models.load(model_ref, device, dtype)
    t_load = time.perf_counter() - t0
    validate_for_model(settings, model)  # e.g. MoE experts it cannot prune: refuse before any calibration work
    if settings.structure and folder is not None and (folder / models.STREAMLINE_FILE).is_file():
        raise UserError(f"{model_ref} is depth-pruned (streamline.json); structured pruning of its blocks is not "
                        "supported: prune the original model, then streamline it")
    seqlen = seqlen or data.default_seqlen(model.config)  # None: min(2048, the model's context)

    t0 = time.perf_counter()
    calibration = data.calibration(calib, tok, nsamples, seqlen, seed, root) if needs_calibration(settings) else None
    t_calib = time.perf_counter() - t0

    tuning = None
    if settings.auto:
        t0 = time.perf_counter()
        settings, tuning = tune_before_pruning(model, tok, settings, calibration, calib, seqlen, root, progress)
        tuning["seconds"] = time.perf_counter() - t0
    torch.manual_seed(seed)
    if streamed is not None:
        streamed.begin_output(tmp)
    result = prune_model(model, calibration.windows if calibration else None, settings, progress, streamed)
    report = pruning_report(model_ref, settings, result, calibration, calib, nsamples, seqlen, seed, device,
                            {"load_s": t_load, "calibration_data_s": t_calib, **result.timings})
    if tuning:
        report["auto"] = tuning
    report["dtype"] = {"compute": DTYPE_NAMES[dtype], "saved": DTYPE_NAMES[stored], "input_from": stored_from,
                       "why": dtype_why, "statistics": "fp32"}
    report["loading"] = {"mode": "in-memory" if streamed is None else "streamed", "why_in_memory": refusal}
    t0 = time.perf_counter()
    if streamed is None:
        if dtype != stored:
            model.to(stored)  # the output keeps the input's dtype whatever was computed in
        checkpoint = Checkpoint.find(folder) if folder is not None else None
        sharding = {"max_shard_size": checkpoint.largest_shard_bytes()} if checkpoint and len(checkpoint.shards) > 1 \
            else {}
        model.save_pretrained(tmp, **sharding)
    tok.save_pretrained(tmp)
    save_layout_records(model, folder, tmp, bool(settings.structure))
    report["timings"]["save_s"] = time.perf_counter() - t0  # streamed: the shards were written block by block
    return report


def tune_before_pruning(model, tok, settings: PruneSettings, calibration, calib: str, seqlen: int, root,
                        progress) -> tuple[PruneSettings, dict]:
    """--alpha auto / --owl-lambda auto: the value from a small grid whose one-shot pruned model scores best on
    held-out C4 text (dense statistics collected once for the grid); the settings then carry that value."""
    from dataclasses import replace

    from .pipeline import allocation_params
    from .search import Scorer, tune

    scoring = settings.method if settings.method in ("wanda", "magnitude") else "wanda"
    scorer = Scorer.build(model, calibration, tok, settings.val_windows, seqlen, root, calib, scoring, progress)
    params = allocation_params(settings)
    tuning = tune(scorer, settings.allocation, settings.auto, settings.sparsity, params, progress,
                  parse_pattern(settings.pattern))
    if scoring != settings.method:
        tuning["scored_with"] = f"one-shot {scoring} ({settings.method} has no one-shot form here)"
    del scorer  # every score() restored the dense weights
    return replace(settings, **{settings.auto: tuning["choice"]}), tuning


def save_layout_records(model, source: Path | None, out: Path, structured_now: bool) -> None:
    """What config.json cannot hold travels with the weights: per-layer shapes (structure.json, written from the
    model: this prune's or the input's) and a depth-pruned stack's record (streamline.json, copied)."""
    if structured_now or (source is not None and (source / STRUCTURE_FILE).is_file()):
        save_structure(model, out)
    if source is not None and (source / STREAMLINE_FILE).is_file():
        shutil.copy2(source / STREAMLINE_FILE, out / STREAMLINE_FILE)


def save_structure(model, folder: Path) -> None:
    """structure.json: per-layer head counts and MLP widths, which config.json cannot hold (models.load reads it)."""
    write_json_atomic(folder / STRUCTURE_FILE, structure_record(decoder_layers(model),
                                                                getattr(model.config, "head_dim", None)))


def pruning_report(model_ref, settings: PruneSettings, result: PruneResult, calibration, calib, nsamples, seqlen,
                   seed, device, timings) -> dict:
    alloc = result.allocation
    extras = dict(result.extras)
    per_layer = {k: extras.pop(k) for k in ("n_per_layer", "continuous_ratios", "shapes") if k in extras}
    layers = []
    for i, (target, realized) in enumerate(zip(alloc.ratios, result.realized)):
        entry = {"index": i, "target": target, "realized": realized}
        entry.update({k: v[i] for k, v in alloc.extras.items()})
        if "n_per_layer" in per_layer:  # n: weights kept of every m
            entry.update(n=per_layer["n_per_layer"][i], m=extras["m"])
        if "continuous_ratios" in per_layer:
            entry["allocated"] = per_layer["continuous_ratios"][i]
        if "shapes" in per_layer:
            entry.update(per_layer["shapes"][i])
        layers.append(entry)
    sizes = result.block_sizes
    return {
        "schema": PRUNING_SCHEMA,
        "model": model_ref,
        "form": settings.form,
        "settings": asdict(settings),
        **({"pattern": extras} if not settings.structure else {"structure": extras}),
        "global_sparsity": sum(r * n for r, n in zip(result.realized, sizes)) / sum(sizes),
        "target_sparsity": settings.sparsity,
        "allocation_source": get_allocator(settings.allocation).source or None,
        # expressions, dsa, saved searches: which statistic-to-ratio mapping (expressions.MAPPINGS) was used
        "allocation_mapping": get_allocator(settings.allocation).mapping or None,
        "allocation_correction": alloc.correction,
        "layers_clipped": alloc.clipped,
        "ratio_bounds": [0.0, MAX_RATIO],
        "layers": layers,
        "calibration": None if calibration is None else {
            "corpus": calib, "source": calibration.source, "nsamples": nsamples, "seqlen": seqlen},
        "seed": seed,
        "device": device,
        "timings": timings,
        "provenance": provenance(),
    }
