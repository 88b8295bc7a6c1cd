"""An engine that crashes never takes the toolkit down: export validation, `eval --engine`, `generate` and `bench`
run every engine in a worker process (runtime/worker.py). DLP_DEPLOY_FAULT="crash:ENGINE" makes a worker die of
SIGSEGV before it compiles that engine, as DeepSparse's internal cache does on Gemma-3-270M."""
from __future__ import annotations

import json
import signal
import time

import pytest

from dlp_deploy.errors import UserError
from dlp_deploy.runtime import engines as engines_mod
from dlp_deploy.runtime.worker import FAULT_ENV, EngineFailure, EngineTimeout, fatal_signal, run_in_worker
from dlp_deploy.testing import assert_one_line_error, run_cli, save_tiny

SEQ_LEN = 64
needs_deepsparse = pytest.mark.skipif(not engines_mod.deepsparse_available(), reason="deepsparse not installed")


@pytest.fixture(scope="module")
def crashed_export(tmp_path_factory, data_root):
    """A tiny LLaMA exported with validation on ONNX Runtime and DeepSparse, DeepSparse's worker crashing."""
    tmp = tmp_path_factory.mktemp("isolation")
    src = save_tiny(tmp / "src")
    out = tmp / "deploy"
    proc = run_cli("export", src, "--out", out, "--seq-len", SEQ_LEN, "--num-cores", 1,
                   "--engines", "onnxruntime,deepsparse", "--ppl-windows", 1, "--ppl-seqlen", 32,
                   env={FAULT_ENV: "crash:deepsparse", "DLP_DEPLOY_DATA": str(data_root)})
    return tmp, out, proc


@needs_deepsparse
def test_a_crash_in_export_validation_is_one_line_and_recorded(crashed_export):
    tmp, out, proc = crashed_export
    assert_one_line_error(proc, "deepsparse crashed with SIGSEGV", "export validation", "--external-cache",
                          "--engines onnxruntime", "export.json records the failure")
    validation = json.loads((out / "export.json").read_text())["validation"]
    assert validation["deepsparse"]["failed"] == "crashed" and validation["deepsparse"]["signal"] == "SIGSEGV"
    assert "deepsparse crashed" in validation["deepsparse"]["error"]
    ort = validation["onnxruntime"]  # the other engine still validated, with every figure
    assert ort["greedy_match"] and ort["max_abs_logit_diff"] < validation["logit_tolerance"]
    assert ort["ppl_vs_reference"] < 1e-3 and ort["greedy_agreement"] == 1.0
    assert sorted(p.name for p in tmp.iterdir()) == ["deploy", "src"]  # no .deploy.XXXX.tmp left behind


@needs_deepsparse
def test_a_crash_in_generate_and_eval_is_a_user_error(crashed_export, monkeypatch, data_root):
    from dlp_deploy.commands.generate import generate_cmd
    from dlp_deploy.eval.evaluate import evaluate_deployment

    _, out, _ = crashed_export
    monkeypatch.setenv(FAULT_ENV, "crash:deepsparse-external")
    with pytest.raises(EngineFailure, match="deepsparse-external crashed with SIGSEGV .* on deploy \\(generation\\)"):
        generate_cmd(out, prompt="Hi", engine="deepsparse-external", max_new_tokens=4, num_cores=1)
    with pytest.raises(EngineFailure, match="deepsparse-external crashed with SIGSEGV .*perplexity.*--engine"):
        evaluate_deployment(str(out), "deepsparse-external", ["wikitext2"], 32, 1, 1, str(data_root))
    proc = run_cli("generate", out, "--engine", "deepsparse-external", "--prompt", "Hi", "--max-new-tokens", 4,
                   env={FAULT_ENV: "crash:deepsparse-external"})
    assert_one_line_error(proc, "deepsparse-external crashed with SIGSEGV", "generation", "--engine")


@needs_deepsparse
def test_bench_names_a_crashed_pair_unmeasured(crashed_export, tmp_path, monkeypatch):
    from dlp_deploy.commands.bench import bench_cmd

    _, out, _ = crashed_export
    monkeypatch.setenv(FAULT_ENV, "crash:deepsparse")
    bench_cmd([out], tmp_path / "bench.json", engine=["onnxruntime", "deepsparse"], cores="1", prompt_len=4,
              gen_len=4, runs=1, warmup=0, rounds=1)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["label"], r["engine"]) for r in report["results"]] == [("deploy", "onnxruntime")]
    [missed] = report["unmeasured"]
    assert (missed["label"], missed["engine"], missed["kv_cache"], missed["signal"]) == \
        ("deploy", "deepsparse", "internal", "SIGSEGV")
    assert "crashed with SIGSEGV" in missed["reason"] and "--external-cache" in missed["reason"]


def test_a_worker_past_its_limit_is_killed(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "hang:stuck")
    t0 = time.perf_counter()
    with pytest.raises(EngineTimeout, match=r"stuck on onnxruntime did not finish in 2 s \(compile and runs"):
        run_in_worker("bench", {}, engine="onnxruntime", label="stuck", during="compile and runs", timeout=2)
    assert time.perf_counter() - t0 < 20


def test_a_user_error_in_the_worker_stays_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is not a folder") as caught:
        run_in_worker("generate", {"deploy_dir": str(tmp_path / "missing")}, engine="onnxruntime", label="x",
                      during="generation")
    assert not isinstance(caught.value, EngineFailure)


def test_the_signal_is_named_however_the_worker_ended():
    assert fatal_signal(-signal.SIGSEGV, "") == signal.SIGSEGV
    assert fatal_signal(-signal.SIGKILL, "") == signal.SIGKILL  # what the out-of-memory killer sends
    # DeepSparse's own handler prints the signal and a native stack trace, then exits 1
    handled = "Thread: 0x7f3b43be4b80\n\nReceived signal: Segmentation fault (signal addr: 0000000000000000)\n"
    assert fatal_signal(1, handled) == signal.SIGSEGV
    assert fatal_signal(1, "Traceback ...\nValueError: x") is None and fatal_signal(0, handled) is None


def test_an_out_of_memory_kill_is_named(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "kill:openvino")
    with pytest.raises(EngineFailure, match=r"openvino was killed \(SIGKILL\) on big \(generation\), as the "
                                            "kernel's out-of-memory killer does") as caught:
        run_in_worker("generate", {}, engine="openvino", label="big", during="generation")
    assert caught.value.record == {"failed": "killed", "signal": "SIGKILL", "timeout_s": None}
