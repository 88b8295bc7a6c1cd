"""scripts/qwen_report.py (issue 25): the 1.5B report reads a run folder of scripts/qwen_study.sh. Built here with a
tiny random LLaMA in the same file formats: a real `dlp-deploy prune --alpha auto`, real exports (fp32 ONNX, GGUF)
and one real `dlp-deploy bench` timed by GNU time; the perplexity files are written in `dlp-deploy eval --json`'s
shape with chosen values, so the verdict's answer is known. The report's numbers must be the inputs', a verdict
that the data says no to must say no (and yes where the data says yes), and every step that left no file is a row
that says "not measured"."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dlp_deploy.runtime.llamacpp_engine import llamacpp_available
from dlp_deploy.testing import run_cli, save_tiny

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "qwen_report.py"
pytestmark = pytest.mark.skipif(not llamacpp_available(),
                                reason="llama-cpp-python not installed (optional extra: dlp-deploy[llamacpp])")
GNU_TIME = Path("/usr/bin/time")
# PyTorch and deployed perplexities (WikiText-2, C4): the pruned q4_k_m is 1.33x / 1.29x the peer's, over 1.25x
PPL = {"dense": (20.0, 30.0), "dlp-0.50": (26.0, 36.0), "deploy-source-q4_k_m": (21.0, 31.0),
       "deploy-dlp-0.50.q4_k_m": (28.0, 40.0)}


def _script():
    spec = importlib.util.spec_from_file_location("qwen_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_eval(path: Path, wt2: float, c4: float, engine: str | None = None) -> None:
    """A `dlp-deploy eval --json` record (schema dlp-deploy/eval/1) with chosen perplexities."""
    details = {c: {"ppl": v, "windows": 8, "seqlen": 512, "tokens_scored": 8 * 511, "source": "test"}
               for c, v in (("wikitext2", wt2), ("c4", c4))}
    record = {"schema": "dlp-deploy/eval/1", "model": path.stem, "seqlen": 512,
              "perplexity": {"wikitext2": wt2, "c4": c4}, "perplexity_details": details}
    if engine:
        record["engine"] = engine
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root) -> Path:
    from dlp_deploy.export.deployment import export_deployment, export_gguf_deployment
    from dlp_deploy.prune.settings import prune_settings
    from dlp_deploy.prune.to_folder import prune_to_folder

    root = tmp_path_factory.mktemp("qwen-report")
    run = root / "run"
    src = save_tiny(root / "src")
    pruned = run / "models" / "dlp-0.50"
    # `dlp-deploy prune --method wanda --allocation dlp --alpha auto`, in this process
    prune_to_folder(str(src), pruned, prune_settings(0.5, "wanda", "dlp", None, auto="alpha", val_windows=1), nsamples=1,
                    seqlen=32, data_root=str(data_root))
    deploy = run / "deploy"
    export_deployment(str(src), deploy / "dense", seq_len=64, validate=False)
    export_gguf_deployment(str(src), deploy / "source-q4_k_m", "q8_0", seq_len=64, validate=False)
    export_gguf_deployment(str(pruned), deploy / "dlp-0.50.q4_k_m", "q4_k_m", seq_len=64, validate=False)
    for name, (wt2, c4) in PPL.items():
        write_eval(run / "eval" / f"{name}.json", wt2, c4, "llamacpp" if name.startswith("deploy") else None)
    (run / "costs").mkdir()
    bench = ["bench", *(deploy / d for d in ("dense", "source-q4_k_m", "dlp-0.50.q4_k_m")), "--engine",
             "onnxruntime", "--engine", "llamacpp", "--runs", "2", "--rounds", "1", "--gen-len", "8",
             "--prompt-len", "8", "--json", run / "bench.json"]
    timed = [GNU_TIME, "-v", "-o", run / "costs" / "bench.txt"] if GNU_TIME.exists() else []
    proc = run_cli(*bench) if not timed else _run(*timed, sys.executable, "-m", "dlp_deploy", *bench)
    assert proc.returncode == 0, proc.stderr
    return run


def _run(*args):
    import os
    import subprocess

    return subprocess.run(list(map(str, args)), capture_output=True, text=True, env=dict(os.environ), timeout=600)


def _report(run: Path, out: Path) -> tuple[dict, str]:
    _script().main(["--run", str(run), "--out", str(out)])
    assert (out / "tradeoff.png").stat().st_size > 0
    return json.loads((out / "study.json").read_text()), (out / "README.md").read_text()


def _dep(report: dict, name: str) -> dict:
    return next(d for d in report["deployments"] if d["name"] == name)


def test_numbers_are_the_inputs_and_the_verdict_says_no(run, tmp_path):
    report, readme = _report(run, tmp_path / "report")
    # quality: PyTorch perplexities and their ratios to dense; alpha as pruning.json chose it
    dlp = next(q for q in report["quality"] if q["model"] == "dlp-0.50")
    assert dlp["vs_dense"] == {"wikitext2": 26.0 / 20.0, "c4": 36.0 / 30.0}
    assert "| 26.00 (1.30x) | 36.00 (1.20x) |" in readme
    record = json.loads((run / "models" / "dlp-0.50" / "pruning.json").read_text())
    assert dlp["pruning"]["auto"]["choice"] == record["auto"]["choice"] == record["settings"]["alpha"]
    assert f"dlp, α = {record['auto']['choice']} (--alpha auto)" in readme

    bench = json.loads((run / "bench.json").read_text())
    rows = {(r["label"], r["engine"]): r for r in bench["results"]}
    source, pruned = rows[("source-q4_k_m", "llamacpp")], rows[("dlp-0.50.q4_k_m", "llamacpp")]
    cell = _dep(report, "dlp-0.50.q4_k_m")["engines"]["llamacpp"]
    assert cell["tokens_per_s"] == pruned["decode_tokens_per_s"]
    # the ratio to the peer: median per-run decode step of the peer over the pruned one's, with an interval
    runs = lambda r: np.concatenate([x["decode_ms_runs"] for x in r["rounds"]])  # noqa: E731
    assert cell["vs_peer"]["decode"] == pytest.approx(np.median(runs(source)) / np.median(runs(pruned)))
    lo, hi = cell["vs_peer"]["decode_ci95"]
    assert lo <= hi
    # deployed perplexity against the peer's
    assert _dep(report, "dlp-0.50.q4_k_m")["deployed_ppl"]["vs_peer"] == {"wikitext2": 28.0 / 21.0,
                                                                         "c4": 40.0 / 31.0}
    assert "| 28.00 (1.33x), deployment on llama.cpp | 40.00 (1.29x) |" in readme
    # fp32 ONNX stands with its PyTorch model's perplexity, marked; its own engine's dense fp32 is its baseline
    dense = _dep(report, "dense")
    assert dense["deployed_ppl"]["ppl"] == {"wikitext2": 20.0, "c4": 30.0} and "PyTorch" in dense["deployed_ppl"]["who"]
    assert "--no-validate: not checked" in dense["deployed_ppl"]["who"]  # the fixture exported it unvalidated
    assert dense["engines"]["onnxruntime"]["vs_dense_fp32"] == {"decode": 1.0, "baseline": True}
    assert dense["engines"]["onnxruntime"]["floor"]["source"] == "A/A, this engine"

    # bytes per token: the file's headers, equal to the bench's own count of the same matrices (lm_head included)
    for name, engine in (("source-q4_k_m", "llamacpp"), ("dense", "onnxruntime")):
        dep = _dep(report, name)
        assert dep["streamed"]["bytes"] == rows[(name, engine)]["weights"]["dense_bytes"]
        assert dep["streamed"]["lm_head_bytes"] > 0
        b = dep["engines"][engine]["bytes_per_token"]
        assert b["gb_per_s"] == pytest.approx(b["bytes"] / rows[(name, engine)]["decode_ms"]["median"] / 1e6)
    best = max(c["bytes_per_token"]["gb_per_s"] for d in report["deployments"] for c in d["engines"].values()
               if "bytes_per_token" in c)
    assert report["bandwidth"]["best_effective_gb_per_s"]["gb_per_s"] == best
    assert "**as the best effective GB/s observed**" in readme

    # costs: GNU time's own figures
    if GNU_TIME.exists():
        text = (run / "costs" / "bench.txt").read_text()
        kib = int(next(x for x in text.splitlines() if "Maximum resident set size" in x).rsplit(":", 1)[1])
        cost = next(c for c in report["costs"] if c["step"] == "bench")
        assert cost["peak_rss_bytes"] == kib * 1024 and cost["wall_s"] > 0 and "dlp_deploy bench" in cost["command"]

    verdict = report["verdict"]
    assert verdict["answer"] is False and verdict["text"].startswith("No.")
    assert verdict["closest"]["deployment"] == "dlp-0.50.q4_k_m"
    assert "over 1.25x the peer's" in verdict["text"] and "bytes per token" in verdict["text"]
    # the bytes bound runs at the closest deployment's own engine's best rate, not another engine's
    assert verdict["bound"]["best_effective_gb_per_s"] == report["bandwidth"]["by_engine"]["llamacpp"]["gb_per_s"]
    assert "observed here on llama.cpp" in verdict["text"]
    assert verdict["text"] in readme
    assert report["provenance"]["machine"]["cpu_model"] and report["machine_measured"]["isa"] is not None


def test_the_verdict_says_yes_when_the_data_does(run, tmp_path):
    """The pruned q4_k_m within 1.25x of the peer's perplexity and exactly twice as fast in every run (the A/A
    control equal to dense: no noise): the verdict says yes, 2.00x [2.00, 2.00]."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    write_eval(copy / "eval" / "deploy-dlp-0.50.q4_k_m.json", 23.0, 34.0, "llamacpp")
    bench = json.loads((copy / "bench.json").read_text())
    _set_decode_ms(bench, {"source-q4_k_m": 10.0, "dlp-0.50.q4_k_m": 5.0})
    (copy / "bench.json").write_text(json.dumps(bench))
    report, readme = _report(copy, tmp_path / "report")
    verdict = report["verdict"]
    assert verdict["answer"] is True and verdict["best"]["deployment"] == "dlp-0.50.q4_k_m"
    assert verdict["best"]["vs_peer"]["decode"] == 2.0 and verdict["best"]["vs_peer"]["decode_ci95"] == [2.0, 2.0]
    assert verdict["text"].startswith("Yes.") and "2.00x [2.00, 2.00]" in verdict["text"]
    assert "200.0 against 100.0 tok/s" in verdict["text"]


def _set_decode_ms(bench: dict, ms_by_label: dict, default: float = 20.0) -> None:
    """Every run of each row at a fixed decode step, and every A/A control's ratio at 1 (no noise)."""
    for r in bench["results"]:
        ms = ms_by_label.get(r["label"], default)
        r["decode_ms_runs"] = [ms] * len(r["decode_ms_runs"])
        for x in r["rounds"]:
            x["decode_ms_runs"], x["decode_ms_median"] = [ms] * len(x["decode_ms_runs"]), ms
        r["decode_ms"]["median"], r["decode_tokens_per_s"] = ms, 1e3 / ms
        for key, block in r.items():
            if key.startswith("speedup") and isinstance(block, dict):
                block.update(decode=1.0, decode_ci95=[1.0, 1.0])


def test_the_verdict_names_the_closest_within_the_bound_and_the_fastest_beyond_it(run, tmp_path):
    """A second pruned deployment within 1.25x of the peer's perplexity that only ties with it, beside the 50% one,
    twice as fast at 1.33x: the answer is no, the closest is the one within the bound, and the faster one is named
    with its speed and its perplexity (the study's 30% q4_k_m beside a structured model)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.copytree(copy / "deploy" / "dlp-0.50.q4_k_m", copy / "deploy" / "uniform-0.30.q4_k_m")
    write_eval(copy / "eval" / "deploy-uniform-0.30.q4_k_m.json", 22.0, 32.0, "llamacpp")
    bench = json.loads((copy / "bench.json").read_text())
    row = next(r for r in bench["results"] if r["label"] == "dlp-0.50.q4_k_m")
    twin = json.loads(json.dumps(row))
    twin.update(label="uniform-0.30.q4_k_m", model=str(copy / "deploy" / "uniform-0.30.q4_k_m"))
    bench["results"].append(twin)
    _set_decode_ms(bench, {"source-q4_k_m": 10.0, "dlp-0.50.q4_k_m": 5.0, "uniform-0.30.q4_k_m": 10.0})
    (copy / "bench.json").write_text(json.dumps(bench))
    report, readme = _report(copy, tmp_path / "report")
    verdict = report["verdict"]
    assert verdict["answer"] is False and verdict["text"].startswith("No.")
    assert verdict["closest"]["deployment"] == "uniform-0.30.q4_k_m" and verdict["closest"]["qualifies"]
    assert verdict["fastest"]["deployment"] == "dlp-0.50.q4_k_m"
    assert "Closest: `uniform-0.30.q4_k_m`" in verdict["text"] and "1.00x [1.00, 1.00]" in verdict["text"]
    assert ("Fastest at any quality: `dlp-0.50.q4_k_m` on llama.cpp at 200.0 tok/s, 2.00x [2.00, 2.00] the peer's "
            "speed (a win), at 1.33x the peer's WikiText-2 perplexity (21.00)") in verdict["text"]
    assert verdict["text"] in readme


def test_missing_steps_are_named_not_measured(run, tmp_path):
    report, readme = _report(run, tmp_path / "report")
    assert "| OWL-Wanda 50% | not measured: models/owl-0.50/pruning.json absent (prune not run)" in readme
    assert "not measured: deploy/dense.w8/export.json absent (export not run)" in readme
    assert "| prune-owl50 | prune OWL-Wanda 50% | not measured: costs/prune-owl50.txt absent (step not run) |" \
        in readme
    assert "| fetch |" in readme and "not measured: fetch.log absent" in readme
    assert "Not measured: speculative.json absent (scripts/speculative_estimate.py not run)." in readme
    # the w8 deployment, the fetch and the speculative estimate carry no invented figure
    assert "tokens_per_s" not in json.dumps(_dep(report, "dense.w8"))

    # an empty run folder: every table says so, nothing crashes, no number is made up
    empty = tmp_path / "empty"
    empty.mkdir()
    report, readme = _report(empty, tmp_path / "empty-report")
    assert report["verdict"]["answer"] is None and report["verdict"]["text"].startswith("Not measured")
    assert "not measured: deploy/source-q4_k_m/export.json absent (export not run)" in readme
    assert "has no decode figure (bench.json absent (bench step not run))" in readme
    assert "not measured: dense.json absent (step not run)" in readme
    assert report["bandwidth"]["best_effective_gb_per_s"] is None
    assert all("wall_s" not in c for c in report["costs"])

    # a run without its bench: the deployments are there, their speed is not
    nobench = tmp_path / "nobench"
    shutil.copytree(run, nobench)
    (nobench / "bench.json").unlink()
    report, readme = _report(nobench, tmp_path / "nobench-report")
    cell = _dep(report, "dlp-0.50.q4_k_m")["engines"]["llamacpp"]
    assert cell == {"missing": "bench.json absent (bench step not run)"}
    assert report["verdict"]["answer"] is None
