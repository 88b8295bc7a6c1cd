"""The results schema (bench/records.py, issue 26): every committed results.json loads through it, files from before
schema_version through its one adapter, and a row that breaks it is refused in one line naming the file."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dlp_deploy.bench.records import (BENCH_SCHEMA, RESULT_SCHEMA_VERSION, QualityEntry, SweepRow, check_results,
                                      check_row, load_results)
from dlp_deploy.errors import UserError

REPORTS = Path(__file__).resolve().parents[1] / "reports"
COMMITTED = sorted(p.relative_to(REPORTS).as_posix() for p in REPORTS.glob("*/results.json"))
SWEEP = REPORTS / "smollm2-135m-headline-rep" / "results.json"  # rows of every kind, a replicated_from block


def test_there_are_committed_results():
    assert len(COMMITTED) >= 10, COMMITTED


@pytest.mark.parametrize("name", COMMITTED)
def test_every_committed_results_file_loads_through_the_schema(name):
    data = load_results(REPORTS / name)
    assert data["schema_version"] == RESULT_SCHEMA_VERSION and check_results(data) == []
    # what the adapter makes of it is a file of the current version: written out, it loads again unchanged
    again = load_results(json.loads(json.dumps(data)))
    assert again == json.loads(json.dumps(data))


def test_the_adapter_fills_what_older_writers_left_out():
    raw = json.loads((REPORTS / "smollm2-135m-sweep" / "results.json").read_text())  # the oldest committed
    assert "schema_version" not in raw and all("precision" not in r for r in raw["results"])
    data = load_results(raw, name="sweep")
    assert {r["precision"] for r in data["results"]} == {"fp32"} and all(r["rounds"] == [] for r in data["results"])
    assert all(q["recovered"] is False and q["form"] is None for q in data["quality"])
    assert "schema_version" not in raw and "precision" not in raw["results"][0]  # the caller's dict stays
    for r in raw["results"]:  # a row from before rows recorded their core count: the run's
        r.pop("cores")
    assert {r["cores"] for r in load_results(raw)["results"]} == {raw["machine"]["cores_used"]}


def _sweep() -> dict:
    data = load_results(SWEEP)
    return copy.deepcopy(data)


def _refused(data: dict, *words: str) -> str:
    with pytest.raises(UserError) as info:
        load_results(data, name="x/results.json")
    message = str(info.value)
    assert "\n" not in message and "x/results.json" in message, message
    for w in words:
        assert w in message, message
    return message


def test_an_unknown_key_is_refused():
    data = _sweep()
    data["results"][3]["decode_tok_s"] = 1.0
    _refused(data, "results[3]", "unknown key 'decode_tok_s'")


def test_a_wrong_type_or_a_missing_required_key_is_refused():
    data = _sweep()
    data["results"][0]["decode_tokens_per_s"] = "fast"
    _refused(data, "results[0]: decode_tokens_per_s is str, expected float")
    data = _sweep()
    del data["quality"][1]["perplexity"]
    _refused(data, "quality[1]: perplexity missing")
    data = _sweep()
    data["replicated_from"]["results"][0]["win"] = None
    _refused(data, "replicated_from.results[0]: win is NoneType, expected bool")


def test_a_missing_optional_key_is_fine_and_speedups_per_format_are_known():
    data = _sweep()
    row = data["results"][0]
    for key in ("core_scaling", "aa_control", "perplexity_by", "remeasured"):
        row.pop(key, None)
    row["speedup_vs_q4_1"] = None
    assert load_results(data)["results"][0] == row
    assert check_row({**row, "speedup_vs_q8_0": {"decode": 1.0}}, SweepRow) == []
    assert check_row({**row, "perplexity": 1.0}, SweepRow) == ["row: perplexity is float, expected dict"]


def test_ints_count_as_floats_and_bools_do_not():
    row = _sweep()["quality"][0]
    assert check_row({**row, "target_sparsity": 0}, QualityEntry) == []
    assert check_row({**row, "target_sparsity": True}, QualityEntry) == [
        "row: target_sparsity is bool, expected float"]


def test_other_versions_kinds_and_files_are_refused_in_one_line():
    data = _sweep()
    data["schema_version"] = RESULT_SCHEMA_VERSION + 1
    _refused(data, f"schema_version {RESULT_SCHEMA_VERSION + 1}", "the version that wrote it")
    message = _refused({"machine": {}, "results": []}, "no schema_version", "dlp-deploy sweep --out RUN_DIR")
    assert "--rewrite" not in message  # a report's --rewrite reads a results.json, it does not write one
    with pytest.raises(UserError, match=f"expected {BENCH_SCHEMA!r}"):
        load_results(_sweep(), BENCH_SCHEMA)
    with pytest.raises(UserError, match="not a readable results file"):
        load_results(REPORTS / "no-such-report" / "results.json")


def test_the_bench_writer_stamps_the_version():
    from dlp_deploy.bench.harness import bench_report

    report = bench_report([], {"cpu_model": "AMD EPYC", "isa": ["avx2"]})
    assert report["schema"] == BENCH_SCHEMA and report["schema_version"] == RESULT_SCHEMA_VERSION
    assert load_results(report) == report
    # a sweep's own results.json is read back through the schema wherever a test reports a tiny sweep
    # (test_bench, test_replicate, test_cores: make_report -> load_runs -> load_results)
