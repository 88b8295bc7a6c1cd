"""A whole prune job: model + calibration in, a reloadable HF folder with pruning.json out (atomically)."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import data, models
from ..io import atomic_dir, check_writable, write_json_atomic
from ..provenance import PeakRSS, provenance
from .allocate import MAX_RATIO
from .pipeline import PruneResult, PruneSettings, needs_calibration, prune_model, validate_settings


def prune_to_folder(model_ref: str, out: Path, settings: PruneSettings, calib: str = "c4", nsamples: int = 128,
                    seqlen: int = 2048, seed: int = 0, device: str = "cpu", data_root: str | None = None,
                    force: bool = False, progress=None) -> dict:
    validate_settings(settings)
    check_writable(out, force)
    root = data.data_dir(data_root)
    t0 = time.perf_counter()
    model, tok = models.load(model_ref, device)
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    calibration = data.calibration(calib, tok, nsamples, seqlen, seed, root) if needs_calibration(settings) else None
    t_calib = time.perf_counter() - t0

    torch.manual_seed(seed)
    with PeakRSS() as memory:
        result = prune_model(model, calibration.windows if calibration else None, settings, progress)
    report = pruning_report(model_ref, settings, result, calibration, calib, nsamples, seqlen, seed, device,
                            {"load_s": t_load, "calibration_data_s": t_calib, **result.timings})
    report["memory"] = {**memory.as_dict(), "note": "process RSS while pruning (model already loaded at start)"}
    t0 = time.perf_counter()
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if settings.structure:
            save_structure(model, tmp)
        report["timings"]["save_s"] = time.perf_counter() - t0
        write_json_atomic(tmp / "pruning.json", report)
    return report


def save_structure(model, folder: Path) -> None:
    """structure.json: per-layer head counts and MLP widths, which config.json cannot hold (models.load reads it)."""
    from ..models import decoder_layers
    from .structured.apply import STRUCTURE_FILE, structure_record

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
        if "n_per_layer" in per_layer:
            entry.update(n=per_layer["n_per_layer"][i], m=extras["m"], allocated=per_layer["continuous_ratios"][i])
        if "shapes" in per_layer:
            entry.update(per_layer["shapes"][i])
        layers.append(entry)
    sizes = result.block_sizes
    return {
        "schema": "dlp-deploy/pruning/1",
        "model": model_ref,
        "form": settings.form,
        "settings": asdict(settings),
        **({"pattern": extras} if not settings.structure else {"structure": extras}),
        "global_sparsity": sum(r * n for r, n in zip(result.realized, sizes)) / sum(sizes),
        "target_sparsity": settings.sparsity,
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
