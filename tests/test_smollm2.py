"""The real model: SmolLM2-135M-Instruct as `make setup` fetches it (dequantized from the PyPI GGUF).

Small calibration and one evaluation window keep this to about a minute on 2 cores; the figures it checks are the
ones the committed reports rest on (a sane dense perplexity, exact sparsity, perplexity rising with sparsity).
"""
import pytest
import torch

from dlp_deploy import data
from dlp_deploy.eval.perplexity import corpus_ids, perplexity
from dlp_deploy.models import decoder_layers, load, model_sparsity
from dlp_deploy.prune.allocate import default_dlp_alpha
from dlp_deploy.prune.pipeline import PruneSettings, prune_model

pytestmark = pytest.mark.slow
SEQLEN = 512
# The committed dense figure: WikiText-2 perplexity 29.637 on the first 8 windows of 511 tokens
# (reports/smollm2-135m-int8/results.json, quality "dense", deployment_perplexity fp32; README "dense fp32: 29.6").
# It was scored by the fp32 ONNX graph on ONNX Runtime with the windows and scoring of eval.perplexity, and that
# graph matches PyTorch to 1e-3 of the logit scale, so PyTorch scores the same figure here.
COMMITTED_DENSE_PPL, COMMITTED_WINDOWS, COMMITTED_SEQLEN = 29.63699540039354, 8, 511
# 1%: fp32 summation order (AVX2 against AVX-512 kernels, ONNX Runtime against PyTorch) moves this figure by about
# 1e-5 relative; a change to the weights' dequantization, the tokenizer, the corpus text or the scoring moves it
# by far more than 1%, and passing anything within a 12x band hid all of those.
PPL_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def corpus(smollm2_dir, data_root):
    _, tok = load(str(smollm2_dir))
    ids = corpus_ids(tok, data.eval_text("wikitext2", data_root).text)
    windows = data.calibration("c4", tok, 2, 256, 0, data_root).windows
    return ids, windows


def _ppl(model, ids) -> float:
    return perplexity(model, ids, SEQLEN, max_windows=2)["ppl"]


def test_dequantized_model_is_the_real_smollm2(smollm2_dir, corpus):
    model, _ = load(str(smollm2_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and len(decoder_layers(model)) == 30
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    dense = perplexity(model, corpus[0], COMMITTED_SEQLEN, max_windows=COMMITTED_WINDOWS)
    assert dense["windows"] == COMMITTED_WINDOWS
    assert dense["ppl"] == pytest.approx(COMMITTED_DENSE_PPL, rel=PPL_TOLERANCE)
    assert model_sparsity(model)["global_sparsity"] < 0.001  # only the GGUF dequantization's stray zeros


def test_dlp_wanda_on_smollm2_realises_the_target_and_costs_perplexity(smollm2_dir, corpus):
    ids, windows = corpus
    dense, _ = load(str(smollm2_dir))
    dense_ppl = _ppl(dense, ids)
    ppl = {}
    for sparsity in (0.3, 0.6):
        model, _ = load(str(smollm2_dir))
        result = prune_model(model, windows, PruneSettings(sparsity, "wanda", "dlp", default_dlp_alpha(sparsity)))
        realised = model_sparsity(model)["global_sparsity"]
        assert realised == pytest.approx(sparsity, abs=0.005)
        ratios = torch.tensor(result.allocation.ratios)
        assert ratios.std() > 0  # DLP gives the layers different ratios on a real model
        ppl[sparsity] = _ppl(model, ids)
    assert dense_ppl < ppl[0.3] < ppl[0.6]
