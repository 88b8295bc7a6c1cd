"""Issue 13's overhead figure: the SmolLM2 demo sweep (`make demo`'s options) run from scratch with
`--executor local` and then with `--executor ray` (a local Ray cluster on this machine's CPUs), each in a fresh
run folder and a fresh process, timed end to end. Both results.json are compared (the same levels and quality
figures) and a short report is written.

`--prepare-cpus` for the Ray run defaults to every usable core, so both runs prepare one level at a time with the
same threads and the difference is Ray's own cost (start, task dispatch, per-task imports and model loads).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dlp_deploy.io import atomic_dir
from dlp_deploy.provenance import machine_info, provenance

DEMO = ["smollm2-135m", "--sparsities", "0.5,0.7", "--allocation", "dlp", "--baseline", "none", "--nsamples", "16",
        "--calib-seqlen", "512", "--max-windows", "4", "--runs", "3", "--gen-len", "64"]


def timed_sweep(out: Path, executor: list[str]) -> float:
    cli = Path(sys.executable).with_name("dlp-deploy")
    t0 = time.perf_counter()
    subprocess.run([str(cli), "sweep", *DEMO, "--out", str(out), *executor], check=True)
    return time.perf_counter() - t0


def stage_seconds(run: Path) -> dict:
    """Ray's own record of where its time went (executor.json), where there is one."""
    path = run / "executor.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def compare(local: dict, ray: dict) -> dict:
    q_local = {q["label"]: q["perplexity"] for q in local["quality"]}
    q_ray = {q["label"]: q["perplexity"] for q in ray["quality"]}
    decode = {}
    for a in local["results"]:
        b = next(r for r in ray["results"] if (r["label"], r["engine"]) == (a["label"], a["engine"]))
        decode[f"{a['label']} / {a['engine']}"] = {"local_ms": a["decode_ms"]["median"],
                                                   "ray_ms": b["decode_ms"]["median"],
                                                   "local_speedup": (a.get("speedup") or {}).get("decode"),
                                                   "ray_speedup": (b.get("speedup") or {}).get("decode")}
    return {"same_levels": sorted(q_local) == sorted(q_ray), "same_quality": q_local == q_ray,
            "same_keys": sorted(local) == sorted(ray), "keys_only_local": sorted(set(local) - set(ray)),
            "keys_only_ray": sorted(set(ray) - set(local)), "decode": decode}


def key_note(comparison: dict) -> str:
    only = [f"only in {name}: {', '.join(keys)}" for name, keys in (("local", comparison.get("keys_only_local")),
                                                                    ("ray", comparison.get("keys_only_ray"))) if keys]
    return f" ({'; '.join(only)})" if only else ""


def markdown(record: dict) -> str:
    t, m = record["seconds"], record["machine"]
    lines = [f"# `--executor ray` against `local`: SmolLM2 demo sweep, {m['cpu_model']}, {m['usable_cores']} cores",
             "", "The demo sweep (`make demo`: dense + DLP-Wanda 50/70%, validated exports, DeepSparse and ONNX "
             "Runtime, 2 interleaved rounds), from scratch in fresh folders, one after the other on this machine.",
             "", "| executor | wall time | vs local |", "|---|---|---|",
             f"| local | {t['local'] / 60:.1f} min | 1.00x |",
             f"| ray (local cluster, --prepare-cpus {record['prepare_cpus']}) | {t['ray'] / 60:.1f} min | "
             f"{t['ray'] / t['local']:.2f}x |", "",
             f"Overhead: {t['ray'] - t['local']:+.0f} s ({(t['ray'] / t['local'] - 1):+.1%}). Same levels: "
             f"{record['comparison']['same_levels']}; identical perplexities: {record['comparison']['same_quality']}; "
             f"same results.json keys: {record['comparison']['same_keys']}" + key_note(record['comparison'])
             + ".", "",
             "| model / engine | decode ms local | decode ms ray | speedup local | speedup ray |",
             "|---|---|---|---|---|"]
    for name, d in record["comparison"]["decode"].items():
        fmt = (lambda x: "—" if x is None else f"{x:.2f}x")
        lines.append(f"| {name} | {d['local_ms']:.2f} | {d['ray_ms']:.2f} | {fmt(d['local_speedup'])} | "
                     f"{fmt(d['ray_speedup'])} |")
    counts = record["ray_executor"].get("counts")
    if counts:
        lines += ["", f"Ray tasks: {json.dumps(counts)}"]
    lines += ["", "Speeds compare within this run only (one machine, one session); the two sweeps ran "
              "sequentially, so the second also found the OS file cache warm."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/executor-timing"))
    ap.add_argument("--out", type=Path, default=Path("reports/smollm2-135m-ray"))
    ap.add_argument("--prepare-cpus", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--rewrite", action="store_true",
                    help="time nothing: recompute the comparison and README.md from the runs and timing.json in --out")
    args = ap.parse_args()
    if args.rewrite:
        record = json.loads((args.out / "timing.json").read_text())
        seconds, args.prepare_cpus, machine = record["seconds"], record["prepare_cpus"], record["machine"]
        timed_by, args.force = record["provenance"], True
    else:
        for name in ("local", "ray"):
            if (args.runs_dir / name).exists():
                sys.exit(f"error: {args.runs_dir / name} exists; this script times sweeps from scratch: remove it")
        seconds = {"local": timed_sweep(args.runs_dir / "local", ["--executor", "local"]),
                   "ray": timed_sweep(args.runs_dir / "ray", ["--executor", "ray",
                                                              "--prepare-cpus", str(args.prepare_cpus)])}
        machine, timed_by = machine_info(), None
    local, ray = (json.loads((args.runs_dir / n / "results.json").read_text()) for n in ("local", "ray"))
    record = {"schema": "dlp-deploy/executor-timing/1", "sweep": DEMO, "prepare_cpus": args.prepare_cpus,
              "seconds": seconds, "comparison": compare(local, ray), "machine": machine,
              "ray_executor": stage_seconds(args.runs_dir / "ray"),
              **({"provenance": timed_by, "rewritten_by": provenance()} if timed_by else {"provenance": provenance()})}
    with atomic_dir(args.out, args.force) as tmp:
        (tmp / "timing.json").write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
