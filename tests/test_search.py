"""The allocation search (DSA Alg. 1 as evolve.py reads it), its held-out validation text, the one-shot dense
snapshot it scores with, saved allocations, and --alpha/--owl-lambda auto."""
import json
import random

import pytest
import torch

from dlp_deploy import data
from dlp_deploy.errors import UserError
from dlp_deploy.prune import evolve
from dlp_deploy.prune.allocate import default_dlp_alpha
from dlp_deploy.prune.expressions import parse
from dlp_deploy.prune.to_folder import prune_to_folder
from dlp_deploy.prune.oneshot import DenseSnapshot
from dlp_deploy.prune.pipeline import PruneSettings, capture_block_inputs, dense_layer_statistics
from dlp_deploy.prune.search import SearchSettings, run_search
from dlp_deploy.testing import tiny_llama, tiny_tokenizer

TINY = dict(nsamples=4, seqlen=32, val_windows=2, population=4, top_k=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DLP_DEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- held-out text

def test_validation_slice_is_disjoint_from_calibration_and_evaluation(data_root):
    tok = tiny_tokenizer()
    calib = data.calibration("c4", tok, 16, 256, 0, data_root)
    val = data.validation_windows(tok, calib, 64, 256, data_root)
    assert calib.docs and len(val.docs) > 1 and val.ids.shape == (64, 256)
    assert not set(val.docs) & set(calib.used)  # no document a calibration window came from
    assert set(calib.used) <= set(calib.docs)
    assert not set(val.docs) & set(data.C4_EVAL_DOCS)  # nor a C4 evaluation document
    assert set(val.docs) <= set(data.C4_CALIB_DOCS)
    # the same at the text level: no calibration window and no evaluation text holds a validation window
    docs = data.c4_documents(data_root, range(0, 2000), "validation")
    val_text = [tok.decode(w) for w in val.ids]
    calib_text = " ".join(docs[i] for i in calib.docs)
    for corpus in ("c4", "wikitext2", "ptb"):
        evaluation = data.eval_text(corpus, data_root).text
        assert not any(w in evaluation for w in val_text), corpus
    assert not any(w in calib_text for w in val_text)
    assert val_text[0] in " ".join(docs[i] for i in val.docs)  # and the windows really come from those docs


def test_validation_slice_refuses_more_text_than_it_has(data_root):
    tok = tiny_tokenizer()
    calib = data.calibration("c4", tok, 2, 64, 0, data_root)
    with pytest.raises(UserError, match="fewer --val-windows"):
        data.validation_windows(tok, calib, 10**6, 512, data_root)


# ---------------------------------------------------------------- the dense snapshot

def test_snapshot_statistics_are_prunes_and_one_shot_pruning_restores_exactly():
    model = tiny_llama()
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    params = {"alpha": 0.05, "reducer": "median", "method": "wanda"}
    expected = dense_layer_statistics(model, capture_block_inputs(model, windows), "dlp", params)
    snap = DenseSnapshot.collect(model, windows)
    assert snap.statistics("dlp", params) == expected
    ids = windows[0:1]
    dense_logits = model(ids).logits
    ratios = [0.2, 0.4, 0.6, 0.8]
    snap.apply(ratios)
    realized = [float(sum((m.weight == 0).sum() for m in b.mlp.children() if hasattr(m, "weight"))
                      / sum(m.weight.numel() for m in b.mlp.children() if hasattr(m, "weight")))
                for b in model.model.layers]
    assert realized == pytest.approx(ratios, abs=0.02)
    assert not torch.equal(model(ids).logits, dense_logits)
    snap.restore()
    assert torch.equal(model(ids).logits, dense_logits)


# ---------------------------------------------------------------- evolution operators

def _cand(text, alpha=0.1):
    return evolve.Candidate(parse(text), alpha)


def test_crossover_takes_each_part_from_a_parent_and_mutation_changes_one():
    rng = random.Random(0)
    a, b = _cand("abs>median>atan", 0.02), _cand("log,tanh>entropy>sin,cos", 0.2)
    for _ in range(50):
        c = evolve.crossover(rng, a, b)
        e = c.expression
        assert e.pre in (a.expression.pre, b.expression.pre) and e.post in (a.expression.post, b.expression.post)
        assert e.reduce in ("median", "entropy") and c.alpha in (0.02, 0.2)
        m = evolve.mutate(rng, c, evolve.ALPHA_GRID)
        changed = [m.expression.pre != e.pre, m.expression.reduce != e.reduce or
                   m.expression.reduce_arg != e.reduce_arg, m.expression.post != e.post, m.alpha != c.alpha]
        assert sum(changed) <= 1  # one part changed (or replaced by an equal token)
        assert len(m.expression.pre) <= evolve.MAX_PRE and len(m.expression.post) <= evolve.MAX_POST
        assert parse(str(m.expression)) == m.expression  # every child is a valid, printable expression


def test_parents_are_the_top_k_of_a_sample():
    population = [(_cand("median"), 5.0), (_cand("mean"), 1.0), (_cand("var"), 3.0), (_cand("std"), 2.0),
                  (_cand("max"), 4.0)]
    picked = evolve.parents(random.Random(1), population, 1.0, 2)
    assert [str(c.expression) for c in picked] == ["mean", "std"]
    for seed in range(20):  # a 0.8 sample of 5 leaves one out: never more than the best two of four
        chosen = evolve.parents(random.Random(seed), population, 0.8, 2)
        assert len(chosen) == 2 and {str(c.expression) for c in chosen} <= {"mean", "std", "var"}


# ---------------------------------------------------------------- the search

def _search(folder, out, candidates, seed=0, name=None):
    settings = SearchSettings(str(folder), 0.5, seed=seed, **TINY)
    return run_search(settings, out, name, candidates=candidates)


def _history(out):
    return [(h["key"], h["fitness"]) for h in map(json.loads, (out / "history.jsonl").read_text().splitlines())]


def test_search_is_deterministic_and_resumes_where_it_stopped(tiny_dir, tmp_path, cache):
    straight = _search(tiny_dir, tmp_path / "a", 9)
    _search(tiny_dir, tmp_path / "b", 5, name="b-part")
    resumed = _search(tiny_dir, tmp_path / "b", 9, name="b-part")
    assert _history(tmp_path / "a") == _history(tmp_path / "b")
    assert resumed["new_candidates"] == 4 and resumed["candidates"] == 9
    assert (resumed["expression"], resumed["fitness"]) == (straight["expression"], straight["fitness"])
    history = _history(tmp_path / "a")
    assert history[0][0] == f"median|{default_dlp_alpha(0.5):g}"  # seeded with DLP and OWL (DSA's mapping)
    assert history[1][0].startswith("outlier>neg|")
    assert straight["fitness"] == min(f for _, f in history if f is not None)
    assert straight["fitness"] <= history[0][1]  # never worse than DLP on the validation text
    other = _search(tiny_dir, tmp_path / "c", 9, seed=1)
    assert _history(tmp_path / "c")[2:] != history[2:]
    assert other["candidates"] == 9


def test_search_refuses_other_settings_in_its_folder_and_taken_names(tiny_dir, tmp_path, cache):
    _search(tiny_dir, tmp_path / "s", 2)
    with pytest.raises(UserError, match="other settings .*sparsity"):
        run_search(SearchSettings(str(tiny_dir), 0.6, **TINY), tmp_path / "s", candidates=2)
    with pytest.raises(UserError, match="already saved"):
        run_search(SearchSettings(str(tiny_dir), 0.6, **TINY), tmp_path / "t", name="s", candidates=2)
    with pytest.raises(UserError, match="built-in"):
        run_search(SearchSettings(str(tiny_dir), 0.6, **TINY), tmp_path / "dlp", candidates=2)


def test_a_saved_search_is_an_allocation_by_name(tiny_dir, tmp_path, cache):
    best = _search(tiny_dir, tmp_path / "found", 6)
    settings = PruneSettings(0.5, "wanda", "found")
    report = prune_to_folder(str(tiny_dir), tmp_path / "pruned", settings, nsamples=4, seqlen=32)
    assert best["expression"] in report["allocation_source"]
    direct = prune_to_folder(str(tiny_dir), tmp_path / "direct",
                             PruneSettings(0.5, "wanda", f"expr:{best['expression']}", best["alpha"]),
                             nsamples=4, seqlen=32)
    assert [x["target"] for x in report["layers"]] == [x["target"] for x in direct["layers"]]
    assert report["global_sparsity"] == pytest.approx(0.5, abs=2e-3)


# ---------------------------------------------------------------- --alpha auto, --owl-lambda auto

@pytest.mark.parametrize("allocation,parameter", [("dlp", "alpha"), ("owl", "owl_lambda")])
def test_auto_picks_the_grid_value_with_the_best_validation_perplexity(tiny_dir, tmp_path, allocation, parameter):
    settings = PruneSettings(0.6, "wanda", allocation, 0.04 if allocation == "dlp" else None, auto=parameter,
                             val_windows=2)
    report = prune_to_folder(str(tiny_dir), tmp_path / "out", settings, nsamples=4, seqlen=32)
    auto = report["auto"]
    assert auto["parameter"] == parameter and 0.0 in auto["grid"] and len(auto["validation_ppl"]) == len(
        auto["grid"])
    best = min(range(len(auto["grid"])), key=lambda i: (auto["validation_ppl"][i], auto["grid"][i]))
    assert auto["choice"] == auto["grid"][best] == report["settings"][parameter]
    assert report["loading"]["mode"] == "in-memory" and "auto" in report["loading"]["why_in_memory"]
    assert "no calibration window came from" in auto["validation"]["source"]


def test_auto_is_refused_where_it_means_nothing():
    from dlp_deploy.prune.pipeline import validate_settings

    with pytest.raises(UserError, match="has no alpha"):
        validate_settings(PruneSettings(0.5, "wanda", "uniform", auto="alpha"))
    with pytest.raises(UserError, match="--allocation owl"):
        validate_settings(PruneSettings(0.5, "wanda", "dlp", 0.1, auto="owl_lambda"))


def test_sweep_levels_take_expressions_and_saved_searches(tiny_dir, tmp_path, cache):
    from dlp_deploy.pipeline.levels import SweepSettings, level_settings, levels

    _search(tiny_dir, tmp_path / "mine", 2)
    s = SweepSettings.from_flat(model=str(tiny_dir), sparsities=[0.5], method="wanda",
                                allocations=["dlp", "expr:abslog>var>atan,asin", "mine", "owl"], alpha=0.07)
    plan = levels(s)[1:]
    assert [lv.label for lv in plan] == ["wanda-dlp-0.50", "wanda-expr_abslog_var_atan_asin-0.50",
                                         "wanda-mine-0.50", "wanda-owl-0.50"]
    alphas = [level_settings(s, lv).alpha for lv in plan]
    assert alphas == [0.07, 0.07, None, None]  # --alpha is the spread of the allocations that have one


def test_search_and_auto_from_the_command_line(tiny_dir, tmp_path, cache):
    from dlp_deploy.testing import assert_one_line_error, run_cli

    env = {"DLP_DEPLOY_CACHE": str(cache)}
    common = ["--nsamples", 2, "--seqlen", 32, "--val-windows", 1]
    ok = run_cli("search", tiny_dir, "--sparsity", 0.5, "--out", tmp_path / "s", "--name", "cli-found",
                 "--candidates", 3, "--population", 2, "--top-k", 2, *common, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "saved as --allocation cli-found" in " ".join((ok.stdout + ok.stderr).split())  # rich logs to stderr
    pruned = run_cli("prune", tiny_dir, "--sparsity", 0.5, "--allocation", "cli-found", "--out", tmp_path / "p",
                     "--nsamples", 2, "--seqlen", 32, env=env)
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads((tmp_path / "p" / "pruning.json").read_text())
    assert "saved by the search" in report["allocation_source"]
    assert_one_line_error(run_cli("search", tiny_dir, "--sparsity", 0.5, "--out", tmp_path / "bad", "--top-k", 1,
                                  env=env), "--top-k 1")
    assert_one_line_error(run_cli("prune", tiny_dir, "--sparsity", 0.5, "--alpha", "auto", "--owl-lambda", "auto",
                                  "--out", tmp_path / "q", env=env), "one of them")
