"""Sweeps on a Ray cluster (pipeline/executors.py), on a local 2-CPU cluster: the same results.json as a local sweep,
a killed task retried into a complete sweep, a rerun that redoes nothing, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from dlp_deploy.errors import UserError
from dlp_deploy.pipeline.levels import SweepSettings
from dlp_deploy.pipeline.sweep import run_sweep
from dlp_deploy.testing import assert_one_line_error, run_cli, save_tiny

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray  # each test starts or uses a local Ray cluster: one at a time (tests/conftest.py)


def tiny_settings(model, **overrides) -> SweepSettings:
    """Two levels (dense, DLP 50%), one engine, one run in one round: seconds per step."""
    return SweepSettings.from_flat(model=str(model), sparsities=[0.5], method="wanda", allocations=["dlp"],
                                   engines=["onnxruntime"], nsamples=2, calib_seqlen=32, eval_seqlen=64, max_windows=2,
                                   seq_len=64, validate=False, cores=1, prompt_len=8, gen_len=8, runs=1, warmup=0,
                                   rounds=1, **overrides)


LABELS = {"dense", "wanda-dlp-0.50"}
# the DLP level's prepare task dies after its prune was published (at `perplexity`), and dense's only measurement
# at its start, each on its first attempt, as if their machines went away
FAULTS = "prepare:wanda-dlp-0.50:perplexity,bench:dense.onnxruntime.r0"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data_root):
    os.environ["DLP_DEPLOY_DATA"] = str(data_root)
    return save_tiny(tmp_path_factory.mktemp("ray") / "tiny", seed=2)


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The same sweep computed twice from scratch, each in its own run folder: locally, and on a Ray cluster the
    sweep starts itself, with two tasks killed once and a half-written temp folder of the DLP prune (an earlier
    death's) lying in the run folder."""
    root = tmp_path_factory.mktemp("runs")
    local = run_sweep(tiny_settings(tiny_model), root / "local", log=quiet)
    stale = root / "ray" / "models" / ".wanda-dlp-0.50.abcd_123.tmp"
    (stale / "half").mkdir(parents=True)
    owned = not ray.is_initialized()
    os.environ["DLP_DEPLOY_FAULT"] = FAULTS
    try:
        remote = run_sweep(tiny_settings(tiny_model), root / "ray", log=quiet, executor="ray",
                           executor_options={"retries": 1})
    finally:
        del os.environ["DLP_DEPLOY_FAULT"]
    return {"local": local, "ray": remote, "run": root / "ray", "stale": stale, "owned": owned}


def test_ray_sweep_matches_a_local_sweep(runs):
    local, remote = runs["local"], runs["ray"]
    if runs["owned"]:
        assert not ray.is_initialized()  # the cluster the sweep started is gone with it
    assert set(remote) == set(local) and remote["schema"] == local["schema"]
    assert set(remote["machine"]) == set(local["machine"])
    assert remote["machine"]["cpu_model"] == local["machine"]["cpu_model"]
    q_local, q_ray = ({q["label"]: q for q in r["quality"]} for r in (local, remote))
    assert set(q_ray) == set(q_local) == LABELS
    for label in LABELS:  # the same prune on the same windows: the same figures
        assert set(q_ray[label]) == set(q_local[label])
        assert q_ray[label]["perplexity"] == q_local[label]["perplexity"]
        assert q_ray[label]["sparsity"] == q_local[label]["sparsity"]
    assert [r["label"] for r in remote["results"]] == [r["label"] for r in local["results"]]
    for a, b in zip(remote["results"], local["results"]):
        assert set(a) == set(b) and a["perplexity"] == b["perplexity"] and a["sparsity"] == b["sparsity"]
        assert a["machine"] == b["machine"] and set(a["machine"]) == {"cpu_model", "isa", "hostname"}
        assert a["rounds"][0]["hostname"] == b["rounds"][0]["hostname"]
        assert a["speedup"]["baseline"] == "dense"
    run = runs["run"]
    assert sorted(p.name for p in run.iterdir()) == ["bench", "deploy", "eval", "executor.json", "models",
                                                      "results.json", "run.json"]  # no attempts, no Ray files


def test_killed_tasks_are_retried_into_a_complete_sweep(runs):
    run = runs["run"]
    assert (run / "models" / "wanda-dlp-0.50" / "pruning.json").is_file()
    assert (run / "deploy" / "wanda-dlp-0.50" / "export.json").is_file()
    assert (run / "eval" / "wanda-dlp-0.50.json").is_file() and (run / "bench" / "dense.onnxruntime.r0.json").is_file()
    assert not runs["stale"].exists() and not list((run / "models").glob(".*"))  # nothing half-written is left
    record = json.loads((run / "executor.json").read_text())
    assert record["status"] == "complete" and len(record["nodes"]) == 1
    tasks = {(t["stage"], t["key"]): t for t in record["tasks"]}
    dlp = tasks[("prepare", "wanda-dlp-0.50")]
    assert dlp["attempts"] == 2 and dlp["retried"]
    assert dlp["steps"] == ["[wanda-dlp-0.50] perplexity", "[wanda-dlp-0.50] export"]  # the prune was kept
    assert tasks[("bench", "dense.onnxruntime.r0")]["attempts"] == 2
    assert tasks[("prepare", "dense")]["attempts"] == 1 and tasks[("bench", "wanda-dlp-0.50.onnxruntime.r0")][
        "attempts"] == 1
    assert tasks[("bench", "dense-aa.onnxruntime.r0")]["attempts"] == 1  # the A/A control: the dense one again
    assert record["stages"]["prepare"] == {"tasks": 2, "cached": 0, "failed": 0, "retried": 1}
    assert record["stages"]["bench"] == {"tasks": 3, "cached": 0, "failed": 0, "retried": 1}


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of 2 CPUs for the rest of the module: the executor uses a connected one and leaves it
    running."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 2**20)
    yield
    if started:
        ray.shutdown()


def test_a_resumed_sweep_redoes_nothing(runs, cluster, tiny_model):
    run, first = runs["run"], runs["ray"]
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.parent != run}
    second = run_sweep(tiny_settings(tiny_model), run, log=quiet, executor="ray")
    record = json.loads((run / "executor.json").read_text())
    assert record["stages"]["prepare"] == {"tasks": 0, "cached": 2, "failed": 0, "retried": 0}
    assert record["stages"]["bench"] == {"tasks": 0, "cached": 3, "failed": 0, "retried": 0}  # with the A/A pair
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no prune, eval, export or bench file rewritten
    assert [r["decode_ms"] for r in second["results"]] == [r["decode_ms"] for r in first["results"]]
    assert ray.is_initialized()  # a cluster the sweep did not start is left running


def test_a_user_error_in_a_task_is_reported_not_retried(cluster, tiny_model, tmp_path):
    """An unknown perplexity corpus: every level's task fails with the same UserError, at its first attempt."""
    with pytest.raises(UserError, match="unknown perplexity corpus 'no-such-corpus'"):
        run_sweep(tiny_settings(tiny_model, ppl=["no-such-corpus"]), tmp_path / "run", log=quiet, executor="ray",
                  executor_options={"retries": 3}, prepare_only=True)
    record = json.loads((tmp_path / "run" / "executor.json").read_text())
    assert record["status"].startswith("failed in prepare") and record["stages"]["prepare"]["failed"] == 2
    assert all(t["attempts"] == 1 and "no-such-corpus" in t["error"] for t in record["tasks"])


def test_executor_errors_are_one_line(tiny_model, tmp_path, monkeypatch):
    common = ["sweep", tiny_model, "--sparsities", "0.5", "--calib-seqlen", "32", "--eval-seqlen", "64"]
    proc = run_cli(*common, "--out", tmp_path / "a", "--executor", "dask")
    assert_one_line_error(proc, "unknown executor 'dask'", "local, ray")
    proc = run_cli(*common, "--out", tmp_path / "b", "--address", "auto")
    assert_one_line_error(proc, "--address belongs to --executor ray")
    # Ray not installed: the import fails as it would without the extra
    code = ("import sys; sys.modules['ray'] = None; sys.argv[0] = 'dlp-deploy'; "
            "from dlp_deploy.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, common), "--out", tmp_path / "c",
                           "--executor", "ray"], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "pip install 'dlp-deploy[ray]'")
    assert not any((tmp_path / d).exists() for d in "abc")  # refused before anything was written

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"pip install 'dlp-deploy\[ray\]'"):
        run_sweep(tiny_settings(tiny_model), tmp_path / "d", executor="ray")
    assert not (tmp_path / "d").exists()
