"""`dlp-deploy models random`: a real model's shape with random weights, for speed in the DRAM regime."""
from __future__ import annotations

import json

from dlp_deploy.testing import RANDOM_SHAPES, assert_one_line_error, random_llama_folder, run_cli


def test_unknown_shape_is_refused_in_one_line(tmp_path):
    proc = run_cli("models", "random", "llama-70b", "--out", tmp_path / "m")
    assert_one_line_error(proc, "llama-70b", "llama-1b")
    assert not (tmp_path / "m").exists()


def test_random_folder_loads_with_the_shape_and_says_it_is_random(tmp_path, monkeypatch):
    from dlp_deploy.models import load
    from dlp_deploy.report.render import random_weights_note

    small = dict(RANDOM_SHAPES["llama-350m"], hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    monkeypatch.setitem(RANDOM_SHAPES, "small", small)
    folder = random_llama_folder(tmp_path / "m", "small", seed=3)
    model, tok = load(str(folder))
    assert model.config.vocab_size == 1000 and model.config.num_hidden_layers == 2
    assert json.loads((folder / "random.json").read_text())["seed"] == 3
    assert "Random weights" in random_weights_note({"settings": {"model": str(folder)}})
    # a committed run keeps the record in its results.json, the model folder long gone
    kept = random_weights_note({"settings": {"model": str(tmp_path / "gone")}, "random_weights": {"shape": "small",
                                                                                                  "seed": 3}})
    assert "Random weights" in kept and "seed 3" in kept
    assert random_weights_note({"settings": {"model": str(tmp_path / "gone")}}) is None


def test_the_1b_shape_is_about_a_billion_parameters():
    s = RANDOM_SHAPES["llama-1b"]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    attn = s["hidden_size"] * head_dim * (2 * s["num_attention_heads"] + 2 * s["num_key_value_heads"])
    mlp = 3 * s["hidden_size"] * s["intermediate_size"]
    total = s["num_hidden_layers"] * (attn + mlp) + 2 * s["vocab_size"] * s["hidden_size"]
    assert 1.0e9 < total < 1.2e9
