"""Benchmark harness, sweep and report on tiny deployments: real engines, real files, no absolute times asserted."""
import base64
import json
import os
import re

import numpy as np
import pytest

from dlp_deploy.bench.harness import BenchSettings, check_settings, prompt_ids, run_pair
from dlp_deploy.bench.stats import attach_speedups, latency_summary, weight_bytes_per_token
from dlp_deploy.errors import UserError
from dlp_deploy.models import decoder_layers, linear_modules
from dlp_deploy.provenance import machine_info
from dlp_deploy.prune.masks import per_output_mask
from dlp_deploy.testing import tiny_llama, tiny_tokenizer

SEQ_LEN = 96


@pytest.fixture(scope="module")
def deployments(tmp_path_factory):
    """A dense and a 50%-sparse tiny deployment (exported without validation; test_export covers that)."""
    from dlp_deploy.export.deployment import export_deployment

    root = tmp_path_factory.mktemp("bench")
    out = {}
    for name, ratio in (("dense", 0.0), ("sparse50", 0.5)):
        model = tiny_llama(seed=11)
        for block in decoder_layers(model):
            for m in linear_modules(block).values():
                m.weight.data = m.weight.data.masked_fill(per_output_mask(m.weight.abs(), ratio), 0)
        hf = root / "hf" / name
        model.save_pretrained(hf)
        tiny_tokenizer().save_pretrained(hf)
        export_deployment(str(hf), root / name, seq_len=SEQ_LEN, validate=False)
        out[name] = root / name
    return out


SETTINGS = dict(prompt_len=16, gen_len=12, runs=2, warmup=1)


def test_latency_summary_percentiles():
    s = latency_summary([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["median"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)


def test_bandwidth_ideal_counts_nonzero_bytes():
    per = {"a": {"shape": [10, 10], "zeros": 75}, "lm_head": {"shape": [10, 5], "zeros": 0}}
    w = weight_bytes_per_token(per)
    assert w["dense_bytes"] == 600 and w["sparse_bytes"] == 300 and w["ideal_speedup"] == 2.0


def test_speedups_are_against_the_same_engine_and_cache_mode():
    rows = [{"label": l, "engine": e, "kv_cache": "x", "sparsity": s, "decode_ms": {"median": d}, "prefill_ms": p,
             "e2e_tokens_per_s": t} for l, e, s, d, p, t in [("dense", "ort", 0.0, 10.0, 100.0, 50.0),
                                                              ("s", "ort", 0.7, 5.0, 50.0, 80.0),
                                                              ("s", "ds", 0.7, 4.0, 40.0, 90.0)]]
    attach_speedups(rows)
    assert rows[1]["speedup"]["decode"] == 2.0 and rows[1]["speedup"]["e2e"] == pytest.approx(1.6)
    assert rows[2]["speedup"] is None  # no dense DeepSparse entry


def _row(label, sparsity, decode_ms, pruning=None):
    return {"label": label, "engine": "ds", "kv_cache": "internal", "sparsity": sparsity,
            "source": {"pruning": pruning}, "decode_ms": {"median": decode_ms}, "prefill_ms": 10.0,
            "e2e_tokens_per_s": 1.0}


def test_dense_baseline_tolerates_dequantization_zeros():
    """SmolLM2's dequantized GGUF holds 0.03% exact zeros: still the dense baseline; a pruned model is not."""
    rows = [_row("dense", 0.000315, 24.0), _row("dlp-0.10", 0.10, 20.0, {"global_sparsity": 0.10}),
            _row("light", 0.004, 23.0, {"global_sparsity": 0.004})]
    attach_speedups(rows)
    assert rows[1]["speedup"]["baseline"] == "dense" and rows[1]["speedup"]["decode"] == pytest.approx(1.2)
    assert rows[2]["speedup"]["baseline"] == "dense"  # a pruning record, however light, is never the baseline


def test_floor_without_an_aa_control_from_dense_drift_and_the_dense_kernel_control():
    from dlp_deploy.bench.stats import attach_remeasured, control_spread, dense_drift, noise_floor

    def row(label, engine, sparsity, ms, kernels):
        return {"label": label, "model": f"deploy/{label}", "engine": engine, "kv_cache": "k", "sparsity": sparsity,
                "sparse_kernels": kernels, "decode_ms": {"median": ms}, "prefill_ms": ms * 5,
                "decode_tokens_per_s": 1e3 / ms, "e2e_tokens_per_s": 1e3 / ms,
                "source": {"pruning": {"global_sparsity": sparsity} if sparsity else None}}

    rows = [row("dense", "ds", 0.0, 20.0, True), row("p70", "ds", 0.7, 10.0, True),
            row("dense", "ort", 0.0, 30.0, False), row("p70", "ort", 0.7, 25.0, False)]
    attach_remeasured(rows, [row("dense", "ds", 0.0, 22.0, True)])
    attach_speedups(rows)
    assert dense_drift(rows) == {("ds", "k"): pytest.approx(0.1)}
    assert rows[1]["speedup"]["decode"] == pytest.approx(2.1)  # against the mean of 20 and 22 ms
    assert control_spread(rows) == [pytest.approx(1.2)]  # ORT does the same work: its 1.2x is noise
    # a run from before the A/A control: its drift and control engines stand in for the floor
    assert noise_floor(rows) == {"value": pytest.approx(0.2), "source": "no A/A control: dense drift and control "
                                                                          "engines"}


@pytest.mark.parametrize("engine,external", [("onnxruntime", False), ("deepsparse", False), ("deepsparse", True),
                                             ("openvino", False)])
def test_run_pair_reports_the_schema(deployments, engine, external):
    r = run_pair(str(deployments["sparse50"]), BenchSettings(engine, cores=1, external_cache=external, **SETTINGS))
    assert r["kv_cache"] == ("internal" if engine == "deepsparse" and not external else "external")
    if engine == "openvino":  # fp32 weights: OpenVINO's sparse kernel is INT8-only, and the counters say so
        assert r["kernels"]["matmul_exec_types"] and r["sparse_kernels"] is False
    assert r["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert r["decode_ms"]["n"] == SETTINGS["runs"] * (SETTINGS["gen_len"] - 1)
    assert 0 < r["decode_ms"]["median"] <= r["decode_ms"]["p90"] <= r["decode_ms"]["p99"]
    assert r["decode_tokens_per_s"] == pytest.approx(1e3 / r["decode_ms"]["median"])
    assert r["prefill_ms"] > 0 and r["compile_s"] > 0 and r["peak_rss_mib"] > 50
    assert r["deterministic"] and len(r["tokens"]) == SETTINGS["gen_len"]
    assert 0 < r["harness_overhead"]["ms_per_token"] < r["decode_ms"]["median"]
    assert r["weights"]["ideal_speedup"] > 1.2  # half the block weights are zeros; lm_head is dense


def test_engines_get_identical_inputs_and_agree(deployments):
    tokens = {e: run_pair(str(deployments["dense"]), BenchSettings(e, cores=1, **SETTINGS))["tokens"]
              for e in ("onnxruntime", "deepsparse", "openvino")}
    assert tokens["onnxruntime"] == tokens["deepsparse"] == tokens["openvino"]
    tok = tiny_tokenizer()
    assert prompt_ids(tok, 16) == prompt_ids(tok, 16) and len(prompt_ids(tok, 300)) == 300


def test_bad_bench_input(deployments, tmp_path):
    from dlp_deploy.runtime.deployment import load_deployment

    with pytest.raises(UserError, match="not a deployment folder"):
        load_deployment(tmp_path)
    with pytest.raises(UserError, match="cores"):
        check_settings(BenchSettings("onnxruntime", cores=machine_info()["usable_cores"] + 1), SEQ_LEN)
    with pytest.raises(UserError, match="exceed"):
        check_settings(BenchSettings("onnxruntime", prompt_len=64, gen_len=64), SEQ_LEN)
    with pytest.raises(UserError, match="unknown engine"):
        check_settings(BenchSettings("tensorrt", prompt_len=8, gen_len=8), SEQ_LEN)


def test_bench_cli_writes_versioned_results_with_speedup(deployments, tmp_path):
    from dlp_deploy.testing import run_cli as cli

    out = tmp_path / "bench.json"
    # FOLDER@ENGINE: that folder on that engine only, whatever --engine lists (openvino here runs nothing)
    proc = cli("bench", f"{deployments['dense']}@onnxruntime", f"{deployments['sparse50']}@onnxruntime", "--engine",
               "openvino", "--json", out, "--prompt-len", "8", "--gen-len", "8", "--runs", "2", "--cores", "1",
               "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {r["engine"] for r in data["results"]} == {"onnxruntime"} and len(data["results"]) == 3
    assert data["schema"] == "dlp-deploy/bench/1"
    assert {"cpu_model", "isa", "cores_used", "copy_bandwidth_gbs"} <= set(data["machine"])
    assert data["machine"]["cores_measured"] == [1] and set(data["machine"]["copy_bandwidth_gbs_by_threads"]) == {"1"}
    sparse = next(r for r in data["results"] if r["label"] == "sparse50")
    assert sparse["cores"] == 1 and "core_scaling" not in sparse  # one count: nothing to scale against
    assert sparse["speedup"]["baseline"] == "dense" and sparse["speedup"]["decode"] > 0
    dense = next(r for r in data["results"] if r["label"] == "dense")
    assert len(dense["rounds"]) == 2 and len(dense["decode_ms_runs"]) == 4  # two interleaved worker processes
    aa = next(r for r in data["results"] if r["label"] == "dense (A/A)")  # two models: the A/A control too
    assert aa["aa_control"] and aa["speedup"]["baseline"] == "dense" and "win" in sparse
    assert sparse["speedup"]["decode_ci95"][0] <= sparse["speedup"]["decode"] <= sparse["speedup"]["decode_ci95"][1]
    proc = cli("bench", tmp_path, "--json", tmp_path / "x.json")
    assert proc.returncode == 2 and "not a deployment folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("bench", f"{deployments['dense']}@tensorrt", "--json", tmp_path / "x.json")
    assert proc.returncode == 2 and "'tensorrt' after @ is not an engine" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_resumes_and_report_renders(tmp_path, data_root):
    from dlp_deploy.pipeline.levels import SweepSettings
    from dlp_deploy.pipeline.sweep import run_sweep
    from dlp_deploy.report.render import make_report
    from dlp_deploy.testing import save_tiny

    model = save_tiny(tmp_path / "tiny", seed=2)
    settings = SweepSettings.from_flat(model=str(model), sparsities=[0.5], method="wanda",
                                       allocations=["dlp", "uniform"], engines=["onnxruntime"], nsamples=2,
                                       calib_seqlen=32, eval_seqlen=64, max_windows=2, seq_len=64, validate=False,
                                       cores=1, prompt_len=8, gen_len=8, runs=2, warmup=0, rounds=2)
    os.environ["DLP_DEPLOY_DATA"] = str(data_root)
    run = tmp_path / "run"
    first = run_sweep(settings, run, log=lambda *_: None)
    assert {q["label"] for q in first["quality"]} == {"dense", "wanda-dlp-0.50", "wanda-uniform-0.50"}
    assert len(first["results"]) == 4 and all(r["engine"] == "onnxruntime" for r in first["results"])
    # every pair measured in two worker processes, ABBA: dense first in round 1, last in round 2 (the A/A
    # control, the dense deployment again, at the other end)
    assert sorted(p.name for p in (run / "bench").iterdir())[:4] == [
        "dense-aa.onnxruntime.r0.json", "dense-aa.onnxruntime.r1.json", "dense.onnxruntime.r0.json",
        "dense.onnxruntime.r1.json"]
    for r in first["results"]:
        assert len(r["rounds"]) == 2 and len(r["decode_ms_runs"]) == 4
    assert all(r["speedup"]["baseline"] == "dense" for r in first["results"])
    ci = next(r for r in first["results"] if r["label"] != "dense")["speedup"]["decode_ci95"]
    assert ci[0] <= ci[1]
    stamp = (run / "models" / "wanda-dlp-0.50" / "pruning.json").stat().st_mtime_ns
    second = run_sweep(settings, run, log=lambda *_: None)  # everything cached: nothing is redone
    assert (run / "models" / "wanda-dlp-0.50" / "pruning.json").stat().st_mtime_ns == stamp
    assert [r["decode_ms"] for r in second["results"]] == [r["decode_ms"] for r in first["results"]]
    with pytest.raises(UserError, match="other settings"):
        run_sweep(settings.replace_flat(nsamples=3), run)

    report = make_report([run], tmp_path / "report")
    md = (report / "report.md").read_text()
    assert "| Sparsity | measured | Latency ms (p50)" in md and "| 50% |" in md and "dense" in md
    assert "interleaved rounds" in md and "what noise alone does here" in md
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and 'src="http' not in html
    png = base64.b64decode(html.split("data:image/png;base64,")[1].split('"')[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="already exists"):
        make_report([run], tmp_path / "report")

    other = tmp_path / "other"  # the same run, as if measured on another CPU: never merged into one table
    other.mkdir()
    data = json.loads((run / "results.json").read_text())
    data["machine"]["cpu_model"] = "Intel Xeon (another machine)"
    (other / "results.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="different machines"):
        make_report([run, other], tmp_path / "merged")

    # a worker that hangs (as DeepSparse's compiler has on one graph) is killed at --bench-timeout; its pair is
    # left out of the results and named, the others stand, and a longer limit measures it on resume
    for r in (0, 1):
        (run / "bench" / f"wanda-uniform-0.50.onnxruntime.r{r}.json").unlink()
    os.environ["DLP_DEPLOY_FAULT"] = "hang:wanda-uniform-0.50"
    said = []
    try:
        limited = run_sweep(settings.replace_flat(bench_timeout=8.0), run, log=said.append)
    finally:
        del os.environ["DLP_DEPLOY_FAULT"]
    # one timed-out round: the second round is not launched at the same limit (counted, not timed, so a loaded
    # machine cannot flake it)
    launched = [m for m in said if m.startswith("[wanda-uniform-0.50] bench on")]
    assert launched == ["[wanda-uniform-0.50] bench on onnxruntime, round 1/2"]
    assert any(m.startswith("[wanda-uniform-0.50] not measured on onnxruntime, round 2/2") for m in said)
    assert [u["label"] for u in limited["unmeasured"]] == ["wanda-uniform-0.50"]
    assert re.search(r"did not finish in ([\d.]+) s", limited["unmeasured"][0]["reason"]).group(1) == "8"
    assert sorted(r["label"] for r in limited["results"]) == ["dense", "dense (A/A)", "wanda-dlp-0.50"]
    md = (make_report([run], tmp_path / "report-limited") / "report.md").read_text()
    # the report names the unmeasured pair (label, precision, engine) and no table row carries it
    named = re.search(r"Not measured[^:]*: (\S+) \((\w+)\) on (\w+)", md)
    assert named and named.groups() == ("wanda-uniform-0.50", "fp32", "onnxruntime")
    again = run_sweep(settings.replace_flat(bench_timeout=8.0), run, log=lambda *_: None)
    assert [u["label"] for u in again["unmeasured"]] == ["wanda-uniform-0.50"]  # same limit: not retried
    longer = run_sweep(settings.replace_flat(bench_timeout=600.0), run, log=lambda *_: None)
    assert longer["unmeasured"] == [] and len(longer["results"]) == 4
    with pytest.raises(UserError, match="--bench-timeout"):
        run_sweep(settings.replace_flat(bench_timeout=0.0), run)


def test_interleaved_orders():
    from dlp_deploy.bench.schedule import interleaved_order

    assert interleaved_order(3, 4) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0),
                                       (2, 0), (2, 1), (2, 2), (3, 2), (3, 1), (3, 0)]
    shuffled = interleaved_order(5, 3, "shuffle", seed=7)
    assert shuffled == interleaved_order(5, 3, "shuffle", seed=7) != interleaved_order(5, 3, "shuffle", seed=8)
    for r in range(3):  # every item once per round
        assert sorted(i for rr, i in shuffled if rr == r) == list(range(5))


def test_pairing_refuses_mismatched_runs_and_baselines_per_precision():
    def row(label, ms, precision="fp32", gen_len=64, cpu="AMD EPYC", pruned=None):
        return {"label": label, "engine": "ort", "kv_cache": "external", "sparsity": 0.0, "seq_len": 512,
                "precision": precision, "settings": {"cores": 2, "prompt_len": 64, "gen_len": gen_len},
                "machine": {"cpu_model": cpu, "isa": ["avx2"]}, "decode_ms": {"median": ms}, "prefill_ms": ms,
                "e2e_tokens_per_s": 1e3 / ms, "decode_ms_runs": [ms * 0.98, ms, ms * 1.02],
                "source": {"pruning": {"global_sparsity": pruned} if pruned else None}}

    rows = [row("dense", 20.0), row("dense.int8", 10.0, "int8"), row("p50.int8", 8.0, "int8", pruned=0.5),
            row("p50-long", 15.0, gen_len=128, pruned=0.5), row("p50-xeon", 15.0, cpu="Intel Xeon", pruned=0.5)]
    attach_speedups(rows)
    assert rows[2]["speedup"]["decode"] == pytest.approx(2.5) and rows[2]["speedup_vs_int8"]["decode"] == 1.25
    lo, hi = rows[2]["speedup"]["decode_ci95"]
    assert lo < 2.5 < hi < 2.7
    assert rows[3]["speedup"] is None and rows[4]["speedup"] is None  # other gen_len, other machine: no baseline


def test_bootstrap_interval_narrows_with_more_runs():
    from dlp_deploy.bench.stats import bootstrap_ratio_ci

    rng = np.random.default_rng(0)
    few = bootstrap_ratio_ci(list(20 + rng.normal(0, 1, 4)), list(10 + rng.normal(0, 1, 4)))
    many = bootstrap_ratio_ci(list(20 + rng.normal(0, 1, 64)), list(10 + rng.normal(0, 1, 64)))
    assert few[0] < 2.0 < few[1] and many[0] < 2.0 < many[1]
    assert many[1] - many[0] < few[1] - few[0]


def test_pareto_front_keeps_only_undominated_points():
    from dlp_deploy.report.tables import pareto_front

    points = [(10, 20.0), (12, 25.0), (11, 30.0), (15, 40.0), (9, 19.0), (15, 45.0)]
    assert pareto_front(points) == [4, 0, 1, 3]  # (11, 30) loses to (12, 25); (15, 45) to (15, 40)


def test_structured_speedups_are_not_noise_and_their_ideal_is_against_dense_bytes():
    from dlp_deploy.bench.stats import control_spread

    def row(label, form, ms, dense_bytes, sparse_bytes, removed=None):
        return {"label": label, "engine": "ort", "kv_cache": "k", "sparsity": 0.0 if form != "nm" else 0.5,
                "sparse_kernels": False, "form": form, "decode_ms": {"median": ms}, "prefill_ms": ms,
                "e2e_tokens_per_s": 1e3 / ms, "weights": {"dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes},
                "source": {"pruning": {"global_sparsity": removed} if removed else None}}

    rows = [row("dense", None, 20.0, 1000, 1000), row("s30", "structured", 14.0, 700, 700, 0.3),
            row("nm", "nm", 21.0, 1000, 500, 0.5)]
    attach_speedups(rows)
    assert rows[1]["weights"]["ideal_speedup"] == pytest.approx(1000 / 700)  # not 700/700
    assert control_spread(rows) == [pytest.approx(20 / 21)]  # the smaller model's real gain is no noise


def test_sweep_over_forms_and_its_report(tmp_path, data_root):

    from dlp_deploy.pipeline.levels import SweepSettings
    from dlp_deploy.pipeline.sweep import run_sweep
    from dlp_deploy.report.render import make_report
    from dlp_deploy.testing import save_tiny

    model = save_tiny(tmp_path / "tiny", seed=2, hidden_size=128, intermediate_size=256, num_attention_heads=8)
    settings = SweepSettings.from_flat(model=str(model), sparsities=[0.5], method="wanda", allocations=["dlp"],
                                       engines=["onnxruntime"], nsamples=2, calib_seqlen=32, eval_seqlen=64,
                                       max_windows=2, seq_len=64, validate=False, cores=1, prompt_len=8, gen_len=8,
                                       runs=2, warmup=0, patterns=["2:4", "mixed:8"], structure="heads,channels",
                                       structure_sparsities=[0.3], structure_allocations=["uniform"],
                                       importances=["activation"])
    os.environ["DLP_DEPLOY_DATA"] = str(data_root)
    result = run_sweep(settings, tmp_path / "run", log=lambda *_: None)
    by_label = {q["label"]: q for q in result["quality"]}
    assert set(by_label) == {"dense", "wanda-2of4", "wanda-mixed8-dlp-0.50", "structured-activation-uniform-0.30"}
    assert by_label["wanda-2of4"]["form"] == "2:4" and by_label["wanda-2of4"]["sparsity"] == pytest.approx(0.5)
    structured = by_label["structured-activation-uniform-0.30"]
    assert structured["sparsity"] == 0.0 and structured["removed"] == pytest.approx(0.3, abs=0.02)
    pruning = json.loads((tmp_path / "run" / "models" / "wanda-mixed8-dlp-0.50" / "pruning.json").read_text())
    assert pruning["form"] == "mixed:8" and len(pruning["pattern"]) and "n" in pruning["layers"][0]

    md = (make_report([tmp_path / "run"], tmp_path / "report") / "report.md").read_text()
    assert "## Pruning forms compared" in md and "Table 15 form" in md and "Table 14 form" in md
    assert "![pareto.png](pareto.png)" in md and (tmp_path / "report" / "pareto.png").is_file()
    assert "| structured-activation-uniform-0.30 | structured activation, uniform | 30% |" in md
    # the summary's verdict per form, its figures read back and checked against the rows behind them
    from dlp_deploy.bench.stats import sparsity_speedup

    rows = {r["label"]: r for r in result["results"]}
    verdicts = dict(re.findall(r"(2:4|mixed:8|structured): (noise only|no level|from \d+% \([^)]*\))", md))
    assert verdicts["2:4"] == verdicts["mixed:8"] == "noise only"  # zeros on ONNX Runtime's dense kernels
    first = re.fullmatch(r"from (\d+)% \((\S+), ([\d.]+)x, ppl ([\d.]+)\)", verdicts["structured"])
    if first:  # the smaller model cleared the noise: the figures are its row's
        pct, label, speed, ppl = first.groups()
        assert label == "structured-activation-uniform-0.30" and pct == "30"
        assert float(speed) == pytest.approx(sparsity_speedup(rows[label])["decode"], abs=0.005)
        assert float(ppl) == pytest.approx(rows[label]["perplexity"]["wikitext2"], abs=0.05)
        assert rows[label]["win"]
    else:  # none did, and the row agrees
        assert verdicts["structured"] == "no level" and not rows["structured-activation-uniform-0.30"]["win"]


def test_int8_gain_is_not_counted_as_noise():
    from dlp_deploy.bench.stats import control_spread

    def row(label, ms, precision, pruned=None):
        return {"label": label, "engine": "ort", "kv_cache": "x", "sparsity": 0.5 if pruned else 0.0,
                "precision": precision, "sparse_kernels": False, "decode_ms": {"median": ms}, "prefill_ms": ms,
                "e2e_tokens_per_s": 1e3 / ms, "source": {"pruning": {"global_sparsity": pruned} if pruned else None}}

    rows = [row("dense", 20.0, "fp32"), row("dense.int8", 10.0, "int8"), row("p50.int8", 10.5, "int8", 0.5)]
    attach_speedups(rows)
    assert rows[2]["speedup"]["decode"] == pytest.approx(20 / 10.5)  # INT8 plus zeros against dense fp32
    assert control_spread(rows) == [pytest.approx(10 / 10.5)]  # the zeros alone, against dense INT8
