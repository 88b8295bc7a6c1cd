"""scripts/alpha_proxy.py (issue 25): the one-shot proxy of --alpha auto against the sequential prune over an
alpha grid, on a tiny random LLaMA (3 alphas, tiny windows): the JSON and README, Spearman checked against an
independent computation, the cache read on a rerun with nothing recomputed."""
from __future__ import annotations

import json
import math

import pytest

from dlp_deploy.testing import load_script, save_tiny, short_eval_texts



def _reference_rho(a, b):
    try:
        from scipy.stats import spearmanr
    except ImportError:  # no ties in these series: the textbook formula
        n = len(a)
        ra = {v: i for i, v in enumerate(sorted(a))}
        rb = {v: i for i, v in enumerate(sorted(b))}
        d2 = sum((ra[x] - rb[y]) ** 2 for x, y in zip(a, b))
        return 1 - 6 * d2 / (n * (n * n - 1))
    return float(spearmanr(a, b).statistic)


def test_spearman_ranks_and_pick_by_hand():
    ap = load_script('alpha_proxy')
    assert list(ap.ranks([3.0, 1.0, 3.0, math.inf])) == [2.5, 1.0, 2.5, 4.0]
    # ranks of b: 1, 2, 3.5, 5, 3.5; sum of centred products 8, squares 10 and 9.5
    got = ap.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert got["rho"] == pytest.approx(8 / math.sqrt(95))
    perfect = ap.spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert perfect["rho"] == pytest.approx(1.0) and perfect["p_exact"] == pytest.approx(2 / 120)
    assert ap.spearman([1, 2, 3], [3, 2, 1])["rho"] == pytest.approx(-1.0)
    assert ap.spearman([1, 2, 3], [4, 4, 4])["rho"] is None
    assert ap.pick([0.0, 0.05, 0.1], [5.0, 4.0, 4.0]) == 0.05


def test_tiny_model_grid_json_readme_and_resume(tmp_path, data_root, monkeypatch):
    short_eval_texts(monkeypatch)
    ap = load_script('alpha_proxy')
    src = save_tiny(tmp_path / "src", seed=4)
    out = tmp_path / "report"
    argv = [str(src), "--sparsity", "0.5", "--grid", "0,0.05,0.1", "--nsamples", "2", "--seqlen", "32",
            "--val-windows", "2", "--eval-windows", "2", "--eval-seqlen", "32", "--data-dir", str(data_root),
            "--out", str(out), "--work", str(tmp_path / "work"), "--gate", str(src / "config.json")]
    assert ap.main(argv) == 0
    result = json.loads((out / "alpha_proxy.json").read_text())
    assert result["schema"] == "dlp-deploy/alpha-proxy/1" and "provenance" in result
    assert set(result["dense"]["test_ppl"]) == {"wikitext2", "c4"}
    (block,) = result["sparsities"]
    proxy, comparison = block["proxy"], block["comparison"]
    assert proxy["grid"] == [0.0, 0.05, 0.1] and len(proxy["validation_ppl"]) == 3
    assert proxy["choice"] == comparison["picks"]["proxy_validation"]
    assert [r["alpha"] for r in block["sequential"]] == [0.0, 0.05, 0.1]
    for row in block["sequential"]:
        assert row["global_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert set(row["test_ppl"]) == {"wikitext2", "c4"} and row["validation_ppl"] > 0
    series = comparison["series"]
    for pair, value in comparison["spearman"].items():
        x, y = pair.split(" vs ")
        assert value["rho"] == pytest.approx(_reference_rho(series[x], series[y]))
    assert set(comparison["spearman"]) == {
        "proxy_validation vs sequential_validation", "proxy_validation vs sequential_wikitext2",
        "proxy_validation vs sequential_c4", "sequential_validation vs sequential_wikitext2",
        "sequential_validation vs sequential_c4"}
    readme = (out / "README.md").read_text()
    assert "## Sparsity 0.5" in readme and "Reproduce" in readme and "Spearman" in readme
    assert not any((tmp_path / "work").iterdir())  # pruned models removed once scored

    def refuse(*_a, **_k):
        raise AssertionError("a cached result was computed again")

    import dlp_deploy.models
    import dlp_deploy.prune.to_folder

    monkeypatch.setattr(dlp_deploy.prune.to_folder, "prune_to_folder", refuse)
    monkeypatch.setattr(dlp_deploy.prune.to_folder, "tune_before_pruning", refuse)
    monkeypatch.setattr(dlp_deploy.models, "load", refuse)
    (out / "alpha_proxy.json").unlink()
    assert ap.main(argv) == 0
    again = json.loads((out / "alpha_proxy.json").read_text())
    assert again["sparsities"][0]["comparison"] == comparison

    (out / "cache" / "s0.5" / "alpha-0.1.json").unlink()  # --cached-only: a partial report, nothing computed
    assert ap.main(argv + ["--cached-only"]) == 0
    partial = json.loads((out / "alpha_proxy.json").read_text())["sparsities"][0]
    assert partial["missing_alphas"] == [0.1] and partial["comparison"]["grid"] == [0.0, 0.05]
    assert "**Partial:**" in (out / "README.md").read_text()
