"""Speedups that replicate (issue 23): the worker process as the bootstrap's unit, the A/A control and its floor,
the replicated flag, and --replicate's machine check. No wall-clock times asserted."""
import json
import os
import re

import numpy as np
import pytest

from dlp_deploy.bench.stats import (attach_speedups, bootstrap_ratio_ci, cluster_bootstrap_medians, noise_floor,
                                    process_runs, process_spread, replicated, replication)


def test_cluster_bootstrap_with_identical_runs_is_the_process_level_bootstrap():
    """Two processes, runs identical within each: a resample draws each process or not, so the only medians are a1,
    (a1 + a2) / 2 and a2; the 95% interval of the ratio is then exactly [min a / max b, max a / min b] (each
    extreme has probability 1/16 > 2.5%)."""
    a, b = [[18.7] * 3, [22.1] * 3], [[10.0] * 3, [12.0] * 3]
    medians = cluster_bootstrap_medians(a, 4000, np.random.default_rng(1))
    assert set(np.round(medians, 9)) == {18.7, 20.4, 22.1}
    lo, hi = bootstrap_ratio_ci(a, b, n=4000)
    assert lo == pytest.approx(18.7 / 12.0) and hi == pytest.approx(22.1 / 10.0)


def test_bimodal_processes_widen_the_interval_that_pooled_runs_narrow():
    """The audit's case: dense bimodal across processes, the 'model' the same deployment. Pooling the runs as
    independent gives a narrow interval; resampling processes spans the disagreement."""
    rng = np.random.default_rng(0)
    dense = [list(18.7 + rng.normal(0, 0.05, 3)), list(22.1 + rng.normal(0, 0.05, 3)),
             list(18.7 + rng.normal(0, 0.05, 3))]
    again = [list(22.1 + rng.normal(0, 0.05, 3)), list(18.7 + rng.normal(0, 0.05, 3)),
             list(22.1 + rng.normal(0, 0.05, 3))]
    pooled = bootstrap_ratio_ci(sum(dense, []), sum(again, []))  # a flat list: one process each
    clustered = bootstrap_ratio_ci(dense, again)
    assert clustered[1] - clustered[0] > 1.5 * (pooled[1] - pooled[0])
    assert clustered[0] < 18.7 / 22.1 + 0.01 and clustered[1] > 22.1 / 18.7 - 0.01


def test_process_runs_from_rounds_or_split_in_round_order():
    assert process_runs({"decode_ms_runs": [1, 2, 3, 4], "rounds": [{"decode_ms_runs": [1, 2]},
                                                                    {"decode_ms_runs": [3, 4]}]}) == [[1, 2], [3, 4]]
    assert process_runs({"decode_ms_runs": [1, 2, 3, 4], "rounds": [{}, {}]}) == [[1, 2], [3, 4]]  # older rows
    assert process_runs({"decode_ms_runs": [1, 2, 3]}) == [[1, 2, 3]]
    spread = process_spread({"decode_ms_runs": [18, 19, 22, 23], "rounds": [{}, {}]})
    assert spread["processes"] == 2 and spread["medians"] == [18.5, 22.5]
    assert spread["range"] == pytest.approx(4 / 20.5)


def _row(label, runs_by_process, sparsity=0.0, aa=False, engine="ort"):
    runs = [x for p in runs_by_process for x in p]
    ms = float(np.median(runs))
    return {"label": label, "engine": engine, "kv_cache": "external", "sparsity": sparsity, "sparse_kernels": False,
            "decode_ms": {"median": ms}, "prefill_ms": ms, "e2e_tokens_per_s": 1e3 / ms, "decode_ms_runs": runs,
            "rounds": [{"decode_ms_runs": p} for p in runs_by_process], "allocation": None if not sparsity else "dlp",
            "source": {"pruning": {"global_sparsity": sparsity} if sparsity else None},
            **({"aa_control": True} if aa else {})}


def test_aa_row_sets_the_floor_a_win_must_clear():
    dense = _row("dense", [[20.0, 20.1], [21.0, 21.2], [20.5, 20.4]])
    aa = _row("dense (A/A)", [[20.2, 20.0], [21.4, 21.0], [19.8, 20.0]], aa=True)
    fast = _row("p70", [[10.0, 10.1], [10.3, 10.2], [10.1, 10.0]], 0.7)
    marginal = _row("p10", [[19.0, 19.2], [19.5, 19.4], [19.1, 19.3]], 0.1)
    rows = [dense, aa, fast, marginal]
    attach_speedups(rows)
    assert aa["speedup"]["baseline"] == "dense" and dense["speedup"]["baseline"] == "dense"  # never a baseline
    lo, hi = aa["speedup"]["decode_ci95"]
    floor = noise_floor(rows, fast)
    assert floor["source"] == "A/A" and floor["value"] == pytest.approx(max(abs(1 - lo), abs(hi - 1)))
    assert fast["win"] and fast["noise_floor"]["value"] == floor["value"]
    assert marginal["speedup"]["decode_ci95"][0] > 1.0  # clears 1.0x ...
    assert marginal["speedup"]["decode_ci95"][0] <= 1 + floor["value"] and not marginal["win"]  # ... not the floor
    assert not aa["win"]


def _claim(ci, win=True):
    return {"label": "p70", "engine": "ort", "kv_cache": "external", "sparsity": 0.7, "win": win,
            "speedup": {"decode": sum(ci) / 2, "decode_ci95": list(ci)}}


def test_replicated_needs_two_wins_whose_intervals_overlap():
    assert replicated(_claim([1.20, 1.40]), _claim([1.30, 1.50]))
    assert not replicated(_claim([1.20, 1.30]), _claim([1.35, 1.50]))  # both wins, intervals apart
    assert not replicated(_claim([1.20, 1.40]), _claim([1.05, 1.35], win=False))  # the new run calls it noise
    pairs = replication([_claim([1.2, 1.4]), {**_claim([1.0, 1.1]), "label": "other"}], [_claim([1.3, 1.5])])
    assert [(p["new"]["label"], p["replicated"]) for p in pairs] == [("p70", True)]


def test_replicate_refuses_another_machine_kind(tmp_path):
    from dlp_deploy.provenance import machine_info
    from dlp_deploy.testing import run_cli, save_tiny

    model = save_tiny(tmp_path / "tiny", seed=2)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    here = machine_info()
    (earlier / "run.json").write_text(json.dumps({"settings": {"model": str(model), "sparsities": [0.5]}}))
    (earlier / "results.json").write_text(json.dumps({
        "schema": "dlp-deploy/sweep/1", "schema_version": 2, "settings": {"model": str(model), "sparsities": [0.5]},
        "machine": {"cpu_model": "Intel Xeon (another machine)", "isa": ["avx512f"]}, "quality": [], "results": [],
        "unmeasured": [], "provenance": {}}))
    proc = run_cli("sweep", "--replicate", earlier, "--out", tmp_path / "again")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Intel Xeon (another machine)" in proc.stderr and here["cpu_model"] in proc.stderr
    assert not (tmp_path / "again").exists()  # refused before anything was written


def test_aa_control_in_a_tiny_sweep_its_floor_in_the_report_and_a_replication(tmp_path, data_root):
    from dlp_deploy.pipeline.replicate import replicate_sweep_settings
    from dlp_deploy.pipeline.levels import SweepSettings
    from dlp_deploy.pipeline.sweep import run_sweep
    from dlp_deploy.report.render import make_report
    from dlp_deploy.testing import save_tiny

    model = save_tiny(tmp_path / "tiny", seed=2)
    settings = SweepSettings.from_flat(model=str(model), sparsities=[0.5], method="wanda", allocations=["dlp"],
                                       engines=["onnxruntime"], nsamples=2, calib_seqlen=32, eval_seqlen=64,
                                       max_windows=2, seq_len=64, validate=False, cores=1, prompt_len=8, gen_len=8,
                                       runs=2, warmup=0, rounds=2)
    os.environ["DLP_DEPLOY_DATA"] = str(data_root)
    run = tmp_path / "run"
    first = run_sweep(settings, run, log=lambda *_: None)
    aa = [r for r in first["results"] if r.get("aa_control")]
    assert [r["label"] for r in aa] == ["dense (A/A)"] and aa[0]["speedup"]["baseline"] == "dense"
    assert len(aa[0]["rounds"]) == 2 and (run / "bench" / "dense-aa.onnxruntime.r1.json").is_file()
    assert all(len(x["decode_ms_runs"]) == 2 for x in aa[0]["rounds"])  # each process keeps its own runs
    assert all(r["perplexity_by"]["who"] == "PyTorch" for r in first["results"])
    md = (make_report([run], tmp_path / "report") / "report.md").read_text()
    assert md.splitlines()[2].startswith("**Verdict**")
    # the floor the report states is the one the rows were judged against, and the A/A ratio it rests on
    floor = noise_floor(first["results"])
    said = re.search(r"Noise floor of this run: ±([\d.]+)%", md)
    assert said and float(said.group(1)) == pytest.approx(100 * floor["value"], abs=0.05)
    ratio = re.search(r"onnxruntime \(external KV, fp32\) ([\d.]+)x \[([\d.]+), ([\d.]+)\], floor", md)
    speed = aa[0]["speedup"]
    assert [float(x) for x in ratio.groups()] == pytest.approx([speed["decode"], *speed["decode_ci95"]], abs=0.005)
    assert "| dense (A/A) |" not in md.split("## Quality")[1]  # a control, not a level of the quality tables

    again = tmp_path / "again"
    second = run_sweep(replicate_sweep_settings(run, again), again, log=lambda *_: None)
    assert second["replicates"] == str(run.resolve()) and not (again / "models").resolve() == again / "models"
    assert len(second["results"]) == len(first["results"])
    md = (make_report([again], tmp_path / "report-again") / "report.md").read_text()
    assert "## Replication" in md and f"This run re-measures {run.resolve()}" in md
    # the counts it states are those of the replicated flags computed from the two runs' rows
    pairs = replication(first["results"], second["results"])
    claimed = [p for p in pairs if p["old"].get("win")]
    counts = re.search(r"Of the (\d+) speedups that run called wins, (\d+) replicated", md)
    assert counts and [int(x) for x in counts.groups()] == [len(claimed), sum(p["replicated"] for p in claimed)]
    assert "| wanda-dlp-0.50 | onnxruntime (external KV) | fp32 |" in md
