"""Every committed sweep report regenerates from its own results.json with the same tables (issue 26): the
report is a function of the record, nothing else."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dlp_deploy.report.render import SCHEMA, load_runs, report_markdown, rewrite_report

REPORTS = Path(__file__).resolve().parents[1] / "reports"
SWEEP_REPORTS = sorted(p.parent.name for p in REPORTS.glob("*/results.json")
                       if json.loads(p.read_text()).get("schema") == SCHEMA)


def test_there_are_sweep_reports():
    assert len(SWEEP_REPORTS) >= 5, SWEEP_REPORTS


@pytest.mark.parametrize("name", SWEEP_REPORTS)
def test_committed_report_regenerates_from_results(name):
    folder = REPORTS / name
    assert report_markdown(load_runs([folder])) == (folder / "report.md").read_text()


def test_rewrite_keeps_notes_and_replaces_generated_files(tmp_path):
    source = REPORTS / "smollm2-135m-int8"
    folder = tmp_path / "r"
    shutil.copytree(source, folder)
    (folder / "NOTES.md").write_text("kept")
    (folder / "report.md").write_text("stale")
    rewrite_report(folder)
    assert (folder / "NOTES.md").read_text() == "kept"
    assert (folder / "report.md").read_text() == (source / "report.md").read_text()
    assert (folder / "pareto.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _row(label, precision, engine, ppl, tok_s, dense):
    return {"label": label, "precision": precision, "engine": engine, "kv_cache": "internal",
            "perplexity": {"wikitext2": ppl}, "decode_tokens_per_s": tok_s, "allocation": "dense" if dense else "dlp",
            "form": "dense" if dense else "unstructured", "target_sparsity": 0.0 if dense else 0.5,
            "sparsity": 0.0 if dense else 0.5}


def test_verdict_reads_tolerances_against_dense_fp32():
    """SmolLM2's deploy report: a quantized dense row is not 'within 5%' because it is dense. q4_1 (+5.7%) is
    within 25% only, q8_0 (+0.5%) is the fastest within 5%, and INT8 (+78%) is within neither."""
    from dlp_deploy.report.render import fastest_within

    rows = [_row("dense", "fp32", "deepsparse", 29.64, 48.3, True),
            _row("dense.int8", "int8", "deepsparse", 52.66, 75.0, True),
            _row("dense.q4_1", "q4_1", "llamacpp", 31.34, 126.8, True),
            _row("dense.q8_0", "q8_0", "llamacpp", 29.80, 111.5, True)]
    five, quarter = (fastest_within(rows, "wikitext2", t) for t in (0.05, 0.25))
    assert "fastest: **dense.q8_0 (q8_0) 111.5 tok/s, ppl 29.80 (+0.5%)" in five
    assert "fastest: **dense.q4_1 (q4_1) 126.8 tok/s, ppl 31.34 (+5.7%)" in quarter
    assert "int8): none" in five and "int8): none" in quarter
