"""A whole prune job: model + calibration in, a reloadable HF folder with pruning.json out (atomically)."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import data, models
from ..io import atomic_dir, check_writable, write_json_atomic
from ..provenance import provenance
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
    result = prune_model(model, calibration.windows if calibration else None, settings, progress)
    report = pruning_report(model_ref, settings, result, calibration, calib, nsamples, seqlen, seed, device,
                            {"load_s": t_load, "calibration_data_s": t_calib, **result.timings})
    t0 = time.perf_counter()
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        report["timings"]["save_s"] = time.perf_counter() - t0
        write_json_atomic(tmp / "pruning.json", report)
    return report


def pruning_report(model_ref, settings: PruneSettings, result: PruneResult, calibration, calib, nsamples, seqlen,
                   seed, device, timings) -> dict:
    alloc = result.allocation
    layers = []
    for i, (target, realized) in enumerate(zip(alloc.ratios, result.realized)):
        entry = {"index": i, "target": target, "realized": realized}
        entry.update({k: v[i] for k, v in alloc.extras.items()})
        layers.append(entry)
    sizes = result.block_sizes
    return {
        "schema": "dlp-deploy/pruning/1",
        "model": model_ref,
        "settings": asdict(settings),
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
