"""scripts/speculative_estimate.py (issue 25): a draft equal to the target is always accepted and gives gamma + 1
tokens per iteration; a 50% magnitude-pruned draft is not always accepted. Tiny random LLaMA, GGUF f16, llama.cpp.
The replay of accept/reject sequences and the formula are checked on hand-made cases."""
from __future__ import annotations

import json

import pytest

from dlp_deploy.runtime.llamacpp_engine import llamacpp_available
from dlp_deploy.testing import load_script, save_tiny, short_eval_texts

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(),
                                    reason="llama-cpp-python not installed (optional extra: dlp-deploy[llamacpp])")


def test_replay_of_accept_reject_sequences():
    spec = load_script('speculative_estimate')
    seq = [True, True, False, True, False, False, True, True, True]
    # gamma 2: p0 accepts 2 (+1) -> p3; p3 accepts 1, rejects at 4 (+1) -> p5; p5 rejects (+1) -> p6;
    # p6 accepts 2 (+1) -> p9: 3 + 2 + 1 + 3 = 9 tokens in 4 iterations
    assert spec.simulate([seq], 2) == {"tokens": 9, "iterations": 4, "tokens_per_iteration": 2.25}
    assert spec.simulate([[True] * 10], 3)["tokens_per_iteration"] == 4.0  # whole iterations only
    assert spec.simulate([[False] * 5], 4)["tokens_per_iteration"] == 1.0
    runs = spec.run_lengths([seq])
    assert runs["histogram"] == {"0": 1, "1": 1, "2": 1} and runs["censored_tail_runs"] == [3]
    assert spec.expected_tokens(1.0, 4) == 5.0
    assert spec.expected_tokens(0.5, 1) == pytest.approx(1.5)
    by_gamma = spec.speedups([[True] * 12], c_target=10.0, c_draft=1.0, c_verify={1: 11.0, 2: 12.0, 3: 30.0})
    assert by_gamma[2]["speedup"] == pytest.approx(3 * 10.0 / (2 * 1.0 + 12.0))
    assert spec.best_gamma(by_gamma) == 2


@needs_llamacpp
def test_equal_draft_is_always_accepted_and_pruned_draft_is_not(tmp_path, data_root, monkeypatch):
    from dlp_deploy.export.deployment import export_gguf_deployment
    from dlp_deploy.prune.pipeline import PruneSettings
    from dlp_deploy.prune.to_folder import prune_to_folder

    short_eval_texts(monkeypatch)
    src = save_tiny(tmp_path / "src", seed=2)
    pruned = tmp_path / "pruned-hf"
    prune_to_folder(str(src), pruned, PruneSettings(0.5, "magnitude", "uniform"), nsamples=1, seqlen=32,
                    data_root=str(data_root))
    for name, folder in (("target", src), ("same", src), ("pruned", pruned)):  # GGUF deployments
        export_gguf_deployment(str(folder), tmp_path / name, "f16", seq_len=128, validate=False)
    spec = load_script('speculative_estimate')
    kwargs = dict(prompts=2, prompt_tokens=16, new_tokens=24, max_k=4, repeats=2, cores=1,
                  data_root=str(data_root), log=lambda _m: None)

    out = tmp_path / "same.json"
    assert spec.main([str(tmp_path / "target"), str(tmp_path / "same"), "--prompts", "2", "--prompt-tokens", "16",
                      "--new-tokens", "24", "--max-k", "4", "--repeats", "2", "--cores", "1",
                      "--data-dir", str(data_root), "--out", str(out)]) == 0
    same = json.loads(out.read_text())
    for field in ("draft", "target", "engines", "acceptance", "run_lengths", "c_target_ms", "c_draft_ms",
                  "c_verify_ms", "speedup_by_gamma", "best_gamma", "provenance", "prompts"):
        assert field in same
    assert same["acceptance"]["alpha"] == 1.0 and same["acceptance"]["positions"] == 2 * 24
    assert sorted(same["c_verify_ms"], key=int) == ["1", "2", "3", "4"]
    for gamma, row in same["speedup_by_gamma"].items():
        assert row["tokens_per_iteration"] == int(gamma) + 1
        assert row["tokens_per_iteration_formula"] == int(gamma) + 1
    assert same["run_lengths"]["rejections"] == 0
    assert all(v > 0 for v in same["c_verify_ms"].values()) and same["c_target_ms"] > 0

    worse = spec.estimate(tmp_path / "target", tmp_path / "pruned", **kwargs)
    assert worse["acceptance"]["alpha"] < 1.0 and worse["run_lengths"]["rejections"] > 0
    for gamma, row in worse["speedup_by_gamma"].items():
        assert 1.0 <= row["tokens_per_iteration"] < int(gamma) + 1
    assert worse["prompts"]["token_offsets"] == same["prompts"]["token_offsets"]
