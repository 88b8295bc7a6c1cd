"""`--cores` as a list: parsing, the error for too many cores, pairing within one count, the machine's bandwidth
per thread count, and the report's scaling table. Synthetic rows where the figures are pure arithmetic; the tiny
end-to-end cases run real workers."""
import json
import re

import pytest

from dlp_deploy.bench.stats import attach_speedups
from dlp_deploy.errors import UserError
from dlp_deploy.provenance import machine_info

USABLE = machine_info()["usable_cores"]
needs_two_cores = pytest.mark.skipif(USABLE < 2, reason="scaling needs at least two usable cores")


def test_cores_option_takes_one_count_or_a_list():
    from dlp_deploy.commands.options import parse_cores as _cores

    assert _cores(None) is None
    assert _cores("1") == 1  # a single count stays an int: older sweep folders resume with the same settings
    assert _cores("1,1") == 1
    if USABLE >= 2:
        assert _cores(" 2, 1 ,2") == [1, 2]
    with pytest.raises(UserError, match="not a core count"):
        _cores("1,two")
    with pytest.raises(UserError, match=rf"--cores {USABLE + 1} is not available: .* use {USABLE} cores"):
        _cores(f"1,{USABLE + 1}")
    with pytest.raises(UserError, match="--cores 0 is not available"):
        _cores("0")


@pytest.mark.parametrize("command", ["bench", "sweep"])
def test_too_many_cores_is_one_line_before_any_work(tmp_path, command):
    from dlp_deploy.testing import assert_one_line_error, run_cli

    out = tmp_path / "out"
    # the folder given is no deployment and no model: the cores check must answer first, having done nothing
    args = ([tmp_path, "--json", out] if command == "bench" else [tmp_path / "no-model", "--out", out])
    proc = run_cli(command, *args, "--cores", f"1,{USABLE + 1}")
    assert_one_line_error(proc, f"--cores {USABLE + 1} is not available", f"use {USABLE} cores")
    assert not out.exists()


def _row(label, cores, ms, pruned=None, precision="fp32", runs=None):
    """A result row as a sweep writes it, with only the fields pairing, speedups and the report read."""
    return {"label": label, "model": f"deploy/{label}", "engine": "ds", "kv_cache": "internal", "seq_len": 512,
            "cores": cores, "settings": {"cores": cores, "prompt_len": 64, "gen_len": 64},
            "machine": {"cpu_model": "AMD EPYC", "isa": ["avx2"]}, "precision": precision,
            "sparsity": pruned or 0.0, "target_sparsity": pruned or 0.0, "allocation": "dlp" if pruned else None,
            "form": "unstructured" if pruned else "dense", "variant": "dlp" if pruned else None,
            "source": {"pruning": {"global_sparsity": pruned} if pruned else None}, "sparse_kernels": True,
            "decode_ms": {"median": ms, "p90": ms, "p99": ms}, "decode_tokens_per_s": 1e3 / ms,
            "decode_ms_runs": runs or [ms * 0.99, ms, ms * 1.01], "prefill_ms": 10 * ms, "e2e_tokens_per_s": 1e3 / ms,
            "weights": {"dense_bytes": 1000, "sparse_bytes": 500 if pruned else 1000},
            "perplexity": {"wikitext2": 30.0 if pruned else 20.0}}


def test_speedups_divide_only_within_one_core_count():
    # no dense run at 1 core: the 1-core sparse run must not be divided by the 2-core dense one
    rows = [_row("dense", 2, 20.0), _row("p50", 1, 30.0, 0.5), _row("p50", 2, 15.0, 0.5)]
    attach_speedups(rows)
    assert rows[1]["speedup"] is None
    assert rows[2]["speedup"]["decode"] == pytest.approx(20 / 15)

    rows = [_row("dense", 1, 40.0), _row("dense", 2, 20.0), _row("p50", 1, 30.0, 0.5), _row("p50", 2, 16.0, 0.5)]
    attach_speedups(rows)
    assert rows[2]["speedup"]["decode"] == pytest.approx(40 / 30)  # dense at 1 core is sparse at 1 core's baseline
    assert rows[3]["speedup"]["decode"] == pytest.approx(20 / 16)
    # and each model against itself at the smallest count
    assert "core_scaling" not in rows[0] and rows[1]["core_scaling"]["decode"] == pytest.approx(2.0)
    assert rows[3]["core_scaling"]["baseline_cores"] == 1
    assert rows[3]["core_scaling"]["decode"] == pytest.approx(30 / 16)
    lo, hi = rows[3]["core_scaling"]["decode_ci95"]
    assert lo <= 30 / 16 <= hi


def test_a_default_run_pairs_with_an_explicit_run_of_the_same_count():
    from dlp_deploy.bench.stats import pair_key

    default, explicit = _row("dense", 2, 20.0), _row("p50", 2, 15.0, 0.5)
    default["settings"]["cores"] = None  # `--cores` not given: the row still records the count it ran with
    assert pair_key(default) == pair_key(explicit)


def test_machine_block_measures_bandwidth_at_each_count():
    from dlp_deploy.bench.harness import machine_block

    counts = [1, 2] if USABLE >= 2 else [1]
    m = machine_block(counts)
    assert m["cores_used"] == max(counts) and m["cores_measured"] == counts
    assert set(m["copy_bandwidth_gbs_by_threads"]) == {str(n) for n in counts}
    assert all(v > 0 for v in m["copy_bandwidth_gbs_by_threads"].values())
    assert m["copy_bandwidth_gbs"] == m["copy_bandwidth_gbs_by_threads"]["1"]


def _data(rows, by_threads=None):
    machine = {"cpu_model": "AMD EPYC", "isa": ["avx2"], "cores_used": 2, "usable_cores": 2, "memory_gib": 8,
               "copy_bandwidth_gbs": 20.0, "copy_bandwidth_gbs_by_threads": by_threads or {"1": 20.0, "2": 30.0}}
    quality = [{"label": "dense", "allocation": None, "target_sparsity": 0.0,
                "perplexity": {"wikitext2": 20.0},
                "perplexity_details": {"wikitext2": {"windows": 2, "seqlen": 64, "source": "test"}}}]
    settings = {"model": "tiny", "method": "wanda", "allocations": ["dlp"], "ppl": ["wikitext2"], "prompt_len": 64,
                "gen_len": 64, "runs": 3, "warmup": 1, "nsamples": 2, "calib": "c4", "calib_seqlen": 32, "seed": 0}
    return {"settings": settings, "machine": machine, "results": rows, "quality": quality,
            "provenance": {"versions": {"numpy": "1"}}}


def _markdown(data):
    from dlp_deploy.report.render import build_sections, to_markdown

    attach_speedups(data["results"])
    return to_markdown(build_sections(data, "wikitext2", set()), {})


def test_report_shows_scaling_with_cores_and_bandwidth_per_core():
    rows = [_row("dense", 1, 40.0), _row("dense", 2, 20.0), _row("p50", 1, 30.0, 0.5), _row("p50", 2, 16.0, 0.5)]
    md = _markdown(_data(rows))
    assert "## Scaling with cores" in md
    assert ("| model | precision | 1 core: tokens/s | 1 core: vs dense | 2 cores: tokens/s | 2 cores: vs 1 core | "
            "2 cores: vs dense |") in md
    assert "| dense | fp32 | 25.0 | 1.00x [" in md and "| 50.0 | 2.00x [" in md
    assert "| p50 | fp32 | 33.3 | 1.33x [" in md and "| 62.5 | 1.88x [" in md and "| 1.25x [" in md
    # the machine's bandwidth at each thread count and per core, read back as numbers from the sentence
    said = {int(n): float(gbs) for gbs, n in re.findall(r"([\d.]+) GB/s with (\d+) threads?", md)}
    assert said == {1: 20.0, 2: 30.0}
    assert [float(x) for x in re.findall(r"\(([\d.]+) GB/s per core\)", md)] == [30.0 / 2]
    assert "| AMD EPYC | avx2 | 1, 2 / 2 |" in md  # every count measured, in the machine table
    # the other sections read the largest count only: the summary's speedup is the 2-core one (20 / 16 ms)
    assert [float(x) for x in re.findall(r"at 50% ([\d.]+)x decode", md)] == [pytest.approx(20 / 16, abs=0.005)]


def test_report_with_one_core_count_has_no_scaling_section():
    md = _markdown(_data([_row("dense", 2, 20.0), _row("p50", 2, 16.0, 0.5)]))
    assert "Scaling with cores" not in md and "GB/s per core" not in md and "| AMD EPYC | avx2 | 2 / 2 |" in md


def test_report_of_a_run_from_before_core_lists(tmp_path):
    """A committed report's results.json (rows without `cores`, machine without the per-thread bandwidth) still
    renders: its rows resolve to the cores the run used and pair as before."""
    from pathlib import Path

    from dlp_deploy.report.render import load_runs

    old = Path(__file__).resolve().parent.parent / "reports" / "smollm2-135m-int8"
    # committed with the repository: a checkout without it has lost a report, which must not pass silently
    assert (old / "results.json").is_file(), f"the committed INT8 report's {old / 'results.json'} is missing"
    data = load_runs([old])
    assert {r["cores"] for r in data["results"]} == {data["machine"]["cores_used"]}
    assert all(r["speedup"] for r in data["results"])
    assert "Scaling with cores" not in _markdown(data)


@needs_two_cores
def test_sweep_measures_every_pair_at_each_count_and_reports_scaling(tmp_path, data_root, monkeypatch):
    """The dense model alone (each bench worker costs seconds): every count measured and recorded, each row
    divided by the dense run of its own count, the machine's bandwidth per count, the report's scaling table."""
    from dlp_deploy.pipeline.levels import SweepSettings
    from dlp_deploy.pipeline.sweep import run_sweep
    from dlp_deploy.report.render import make_report
    from dlp_deploy.testing import save_tiny

    monkeypatch.setenv("DLP_DEPLOY_DATA", str(data_root))
    model = save_tiny(tmp_path / "tiny", seed=2)
    settings = SweepSettings.from_flat(model=str(model), sparsities=[], method="wanda", allocations=["dlp"],
                                       engines=["onnxruntime"], eval_seqlen=64, max_windows=2, seq_len=64,
                                       validate=False, cores=[1, 2], prompt_len=8, gen_len=8, runs=2, warmup=0,
                                       rounds=1)
    result = run_sweep(settings, tmp_path / "run", log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "run" / "bench").iterdir()) == ["dense.onnxruntime.c1.r0.json",
                                                                             "dense.onnxruntime.c2.r0.json"]
    rows = sorted(result["results"], key=lambda r: r["cores"])
    assert [(r["cores"], r["settings"]["cores"]) for r in rows] == [(1, 1), (2, 2)]
    for r in rows:  # against the dense run of its own count, never the other one
        assert r["speedup"]["baseline_decode_ms"] == r["decode_ms"]["median"]
    assert "core_scaling" not in rows[0] and rows[1]["core_scaling"]["baseline_cores"] == 1
    assert result["machine"]["cores_measured"] == [1, 2]
    assert set(result["machine"]["copy_bandwidth_gbs_by_threads"]) == {"1", "2"}

    md = (make_report([tmp_path / "run"], tmp_path / "report") / "report.md").read_text()
    assert "## Scaling with cores" in md and "| dense | fp32 |" in md and "GB/s per core" in md
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert len(saved["results"]) == 2  # the report's copy keeps every count
