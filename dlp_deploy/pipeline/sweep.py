"""A sparsity sweep: prune -> eval -> export -> bench for every level and allocation plus the dense model.

Every finished step leaves its file in RUN_DIR and is skipped on the next start, so an interrupted sweep resumes.
Layout: run.json (settings), models/<label>/, eval/<label>.json, deploy/<label>/, bench/<label>.<engine>.json,
and results.json, the one file `dlp-deploy report` reads. A sweep on a Ray cluster (pipeline/executors.py) adds
executor.json (its nodes and every task's attempts) and, where its nodes are of several CPU kinds, measures on
each kind into machines/<kind>/bench/.

This module runs a sweep (run_sweep) and writes its run.json and results.json; levels.py says what the sweep is,
steps.py does each step, executors.py says where the steps run.
"""
from __future__ import annotations

import json
import tomllib
import typing
from pathlib import Path

from ..bench.harness import machine_block
from ..bench.records import (RESULT_SCHEMA_VERSION, SWEEP_SCHEMA, fits, perplexity_by, q_of,
                             random_model_record)
from ..bench.schedule import merge_rounds
from ..bench.stats import AA_SUFFIX, attach_speedups, removed_from_source
from ..errors import UserError
from ..io import write_json_atomic
from ..provenance import provenance
from ..prune.masks import NM_COUNTS
from .executors import get_executor
from .levels import DENSE, Level, SweepSettings, check_sweep, flat_hints, levels, sweep_pairs

# what run.json keeps beside `settings`; a recipe (`dlp-deploy sweep --recipe`) may hold them and they are not read
RUN_RECORDS = ("nm_counts", "provenance", "recipe")


def run_record(sweep: SweepSettings, recipe: dict | None = None) -> dict:
    """run.json: the settings (a recipe that replays this run), the N:M meaning, provenance, and where the
    settings came from when a recipe gave them ({"file": its path, "overridden": the fields the command line
    set})."""
    return {"settings": sweep.to_flat(), "nm_counts": NM_COUNTS, "provenance": provenance(),
            **({"recipe": recipe} if recipe is not None else {})}


def read_recipe(path: Path) -> dict:
    """A sweep recipe's settings: a run.json, or a TOML file (.toml) with the same [settings] table. Keys that
    SweepSettings does not have, values of another type, and tables beside it are refused in one line; keys it
    leaves out take their default (the command line's, in `dlp-deploy sweep --recipe`)."""
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # TOML and JSON decode errors are ValueErrors
        raise UserError(f"--recipe {path} is not a readable recipe ({' '.join(str(exc).split())}); give a "
                        "sweep's run.json or a .toml file with a [settings] table") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise UserError(f"--recipe {path} has no [settings] table; give a sweep's run.json or a .toml file with "
                        "one")
    beside = sorted(set(data) - {"settings", *RUN_RECORDS})
    if beside:
        raise UserError(f"--recipe {path}: unknown key {', '.join(beside)} beside [settings] (a recipe holds "
                        f"settings, and what run.json keeps: {', '.join(RUN_RECORDS)})")
    hints = flat_hints()
    settings = data["settings"]
    unknown = sorted(set(settings) - set(hints))
    if unknown:
        raise UserError(f"--recipe {path}: unknown setting {', '.join(unknown)}; a sweep's settings are "
                        f"{', '.join(hints)}")
    for key, value in settings.items():
        if not fits(value, hints[key]):
            raise UserError(f"--recipe {path}: {key} = {value!r} is not of type {_type_text(hints[key])}")
    return dict(settings)


def _type_text(hint) -> str:
    if typing.get_origin(hint) is None and isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def apply_recipe(sweep: SweepSettings, recipe: dict, given: set[str]) -> SweepSettings:
    """`sweep` (built from the command line) with the recipe's values, except the fields in `given` (set by
    options the user typed, which override the recipe)."""
    return sweep.replace_flat(**{k: v for k, v in recipe.items() if k not in given})


def run_sweep(sweep: SweepSettings, run_dir: Path, progress=None, log=print, prepare_only: bool = False,
              executor: str = "local", executor_options: dict | None = None, recipe: dict | None = None) -> dict | None:
    """All models are prepared first (prune, eval, export: heavy, order-free), then benchmarked in interleaved
    rounds, so no preparation work shares the CPU with a measurement and drift spreads over every level.
    `prepare_only` stops before the benchmarks (they resume from the prepared folders on the next start).
    `executor` says where the work runs (pipeline/executors.py: local, this process; ray, a Ray cluster) with its
    `executor_options`; results.json has the same form whichever ran it. `recipe`: where the settings came from
    (run_record), kept in run.json."""
    run_dir = Path(run_dir)
    runner = get_executor(executor)(sweep, run_dir, progress, log, **(executor_options or {}))  # refuses before work
    check_sweep(sweep, run_dir)
    with runner:  # a cluster is reached (or started) before anything is written
        write_json_atomic(run_dir / "run.json", run_record(sweep, recipe), force=True)
        prepared = runner.prepare(levels(sweep))
        if prepare_only:
            log(f"prepared {len(prepared)} levels in {run_dir}; run the same command without --prepare-only to "
                "measure")
            return None
        measured = runner.measure(sweep_pairs(sweep, prepared), sweep.rounds, sweep.order, sweep.order_seed)
    return write_results(sweep, run_dir, prepared, measured.pairs, measured.rounds, measured.machine)


def write_results(sweep: SweepSettings, run_dir: Path, prepared: list[tuple], pairs: list[tuple],
                  measured: list[list[dict]], machine: dict | None = None) -> dict:
    """`machine`: the measuring machine's block where an executor measured it (a cluster's bench node); None
    measures this one."""
    quality, meta = [], {}
    for level, q, deploys, deploy_quality in prepared:
        export_info = json.loads((Path(deploys[sweep.precisions[0]]) / "export.json").read_text())
        form = {"form": level.form, "variant": level.variant, "importance": level.importance,
                "recovered": level.recovered}
        entry = {"label": level.label, "allocation": level.allocation, **form,
                 "target_sparsity": level.sparsity or 0.0, "sparsity": q["weight_sparsity"],
                 "removed": removed_from_source(export_info["source"]),
                 "perplexity": q["perplexity"], "perplexity_details": q["perplexity_details"],
                 "validation": _validation_summary(export_info),
                 "deployment_perplexity": {p: (dq or {}).get("perplexity") for p, dq in deploy_quality.items()},
                 "deployment_perplexity_details": {p: (dq or {}).get("perplexity_details")
                                                   for p, dq in deploy_quality.items()},
                 **model_records(run_dir, level)}
        quality.append(entry)
        meta[level.label] = (form, entry)
    settings = sweep.to_flat()
    results, unmeasured = [], []
    for (level, precision, *_), rounds in zip(pairs, measured):
        form, entry = meta[DENSE if level.aa_control else level.label]
        missed = next((r for r in rounds if "unmeasured" in r), None)
        if missed is not None:  # a pair with a round that never finished has no figures to merge or compare
            unmeasured.append({"label": level.label, "precision": precision, "engine": missed["engine"],
                               "kv_cache": missed["kv_cache"], "cores": missed["cores"],
                               "reason": missed["unmeasured"],
                               **({"machine": missed["machine"]} if "kind" in missed["machine"] else {})})
            continue
        results.append({**merge_rounds(rounds), "allocation": level.allocation, **form, "precision": precision,
                        "target_sparsity": level.sparsity or 0.0, "removed": entry["removed"],
                        "perplexity": q_of(entry, precision), "perplexity_by": perplexity_by(settings, entry, precision),
                        **({"label": DENSE + AA_SUFFIX, "aa_control": True} if level.aa_control else {})})
    attach_speedups(results)
    report = {"schema": SWEEP_SCHEMA, "schema_version": RESULT_SCHEMA_VERSION, "settings": settings,
              "machine": machine or machine_block(sweep.cores), "quality": quality, "results": results,
              "unmeasured": unmeasured, "provenance": provenance(),
              "random_weights": random_model_record(sweep.model), **replicates_record(run_dir)}
    write_json_atomic(run_dir / "results.json", report, force=True)
    return report


def model_records(run_dir: Path, level: Level) -> dict:
    """What the depth cut and the recovery fine-tune did, from the level's model folder, for the report."""
    folder = run_dir / "models" / level.label
    out = {}
    if level.replacement or (level.recovered and (folder / "streamline.json").is_file()):
        record = json.loads((folder / "streamline.json").read_text())
        training = record.get("training") or {}
        out["depth"] = {"layers_removed": record["removed"]["count"], "num_layers": record["num_layers"],
                        "span": [record["removed"]["start"], record["removed"]["end"]],
                        "replacement": record["replacement"]["kind"], "cosine": record["selected_cosine"],
                        "mse_after": training.get("mse_after"), "mse_drop_span": training.get("mse_drop_span"),
                        "train_tokens": training.get("tokens"), "seconds": sum(record["timings"].values())
                        + (training.get("seconds") or 0.0)}
    if level.recovered:
        record = json.loads((folder / "recovery.json").read_text())
        out["recovery"] = {"base": level.base, "steps": record["training"]["steps"],
                           "tokens": record["training"]["tokens"], "wall_s": record["wall_s"],
                           "held_out_perplexity": record["perplexity"], "zeros": record["mask"]}
    return out


def replicates_record(run_dir: Path) -> dict:
    """{"replicates": the earlier run's folder} where this run re-measures one (pipeline/replicate.py)."""
    path = run_dir / "replicates.json"
    return {"replicates": json.loads(path.read_text())["run"]} if path.is_file() else {}


def _validation_summary(export_info: dict) -> dict | None:
    v = export_info.get("validation")
    if not v:
        return None
    return {engine: {k: v[engine].get(k) for k in ("max_abs_logit_diff", "greedy_match", "fraction_of_supported_ops")
                     if k in v[engine]} for engine in v if isinstance(v[engine], dict) and "greedy_match" in v[engine]}
