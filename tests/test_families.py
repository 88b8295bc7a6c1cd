"""Export of every supported family's tiny random model, proved block by block against the HF forward and validated
on ONNX Runtime and DeepSparse; blocks of unknown wiring are refused with the module named."""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import json

import pytest
import torch
import transformers as T
from torch import nn

from dlp_deploy.errors import UserError
from dlp_deploy.export.deployment import export_deployment
from dlp_deploy.export.onnx import export_onnx
from dlp_deploy.runtime import engines as engines_mod
from dlp_deploy.testing import FAMILY_BASE, FAMILY_WINDOW, family_model, tiny_tokenizer

BASE, WINDOW = FAMILY_BASE, FAMILY_WINDOW
EXPECTED_WIRING = {"gemma2": "sandwich", "gemma3": "sandwich", "olmo2": "post-norm"}
build = family_model


needs_deepsparse = pytest.mark.skipif(not engines_mod.deepsparse_available(), reason="deepsparse not installed")


@needs_deepsparse
@pytest.mark.parametrize("family", ["mistral-sliding", "qwen3-layer-types", "gemma2", "gemma3", "phi3-sliding",
                                    "olmo2"])
def test_family_deploys_and_validates_on_both_engines(family, tmp_path):
    src = tmp_path / "src"
    build(family).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    # perplexity through the engines is validated on LLaMA elsewhere; here the graph's numerics and tokens
    info = export_deployment(src, tmp_path / "deploy", seq_len=64, num_cores=1, quality=None)
    for engine in ("onnxruntime", "deepsparse", "deepsparse-external"):
        assert info["validation"][engine]["greedy_match"] is True, engine
        assert info["validation"][engine]["max_abs_logit_diff"] < 1e-3, engine
    assert info["validation"]["deepsparse"]["fraction_of_supported_ops"] == 1.0
    record = json.loads((tmp_path / "deploy" / "export.json").read_text())
    assert record["graph_proof"]["logits_error"] < 1e-5


def test_unknown_wiring_is_refused_naming_the_module(tmp_path):
    """Granite keeps LLaMA's module names but scales each residual branch: the proof names the block."""
    cfg = T.GraniteConfig(**BASE, residual_multiplier=0.5)
    model = T.GraniteForCausalLM(cfg).eval()
    with pytest.raises(UserError, match=r"block 0 \(model\.layers\.0\).*pre-norm wiring.*nothing was written"):
        export_onnx(model, tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_logit_scaling_outside_the_blocks_is_refused(tmp_path):
    cfg = T.GraniteConfig(**BASE, logits_scaling=4.0)
    with pytest.raises(UserError, match="logits differ.*logit scaling"):
        export_onnx(T.GraniteForCausalLM(cfg).eval(), tmp_path / "model.onnx")


def test_unknown_norm_layout_and_attention_parts_are_refused(tmp_path):
    model = build("llama")
    model.model.layers[1].extra_norm = T.models.llama.modeling_llama.LlamaRMSNorm(64)
    with pytest.raises(UserError, match="block 1 has norms .*extra_norm.* match no known wiring"):
        export_onnx(model, tmp_path / "model.onnx")
    model = build("llama")
    model.model.layers[2].self_attn.sinks = nn.Parameter(torch.zeros(4))
    with pytest.raises(UserError, match="attention of block 2 has weighted parts.*sinks"):
        export_onnx(model, tmp_path / "model.onnx")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_tied_vocabulary_is_stored_once(family, tmp_path):
    """Embedding and head read one stored matrix (Gemma's embedding scale kept); the untied case stores two."""
    import onnx

    model = build(family)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    info = export_onnx(model, tmp_path / "model.onnx", max_positions=64)
    assert info["spec"].describe()["tied_embeddings"] is True
    proto = onnx.load(str(tmp_path / "model.onnx"))
    vocabulary = [t for t in proto.graph.initializer if BASE["vocab_size"] in t.dims]
    assert len(vocabulary) == 1 and info["proof"]["logits_error"] < 1e-5
