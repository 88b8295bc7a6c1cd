"""GGUF export of every family the ONNX exporter handles, each loaded by the real llama.cpp and compared with
PyTorch on a tiny random model: logits within the format's bound, greedy agreement and perplexity through export
validation. Norm weights are randomised so Gemma's (1 + w) convention and the folded query scale are exercised;
prompts are longer than the Gemma windows, so the sliding window binds. Layouts llama.cpp cannot read are refused
in one line naming the architecture."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

from dlp_deploy.errors import UserError
from dlp_deploy.export.gguf import GGUF_QUANTS, gguf_layout
from dlp_deploy.runtime.llamacpp_engine import llamacpp_available
from dlp_deploy.testing import FAMILY_BASE, tiny_tokenizer

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(),
                                    reason="llama-cpp-python not installed (optional extra: dlp-deploy[llamacpp])")
WINDOW = 16  # the Gemma windows: shorter than PROMPT, so llama.cpp's sliding window must bind as HF's does
SEQ_LEN = 64
PROMPT = [int(t) for t in np.random.RandomState(0).randint(1, 256, 48)]
# family -> (config, model class, config extras, llama.cpp architecture expected); the non-Gemma windows exceed
# SEQ_LEN: llama.cpp's graphs for those apply no window, so export caps --seq-len at it (tested below)
FAMILIES = {
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 128}, "llama"),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}, "qwen2"),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}, "qwen3"),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"sliding_window": WINDOW}, "gemma2"),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"sliding_window": WINDOW, "sliding_window_pattern": 2},
               "gemma3"),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}, "phi3"),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, {}, "olmo2"),
}


def family_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**FAMILY_BASE, **extra, **overrides})).eval()
    with torch.no_grad():  # HF initialises norms to one (zero for Gemma): random ones test the conventions
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.3)
    model.config.use_cache = False
    return model


def save(model, folder):
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def llamacpp_logits(gguf_path, ids, seq_len=SEQ_LEN):
    from dlp_deploy.runtime.engines import ENGINES

    session = ENGINES["llamacpp"].compile(gguf_path, seq_len, num_cores=1)
    session.init_past(len(ids))
    logits, _ = session.run(np.asarray([ids]), None, None, None, [])
    return logits[0]


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@needs_llamacpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_to_its_llamacpp_architecture_and_validates(family, tmp_path, data_root):
    """The deployment as users make it: f32, validated on llama.cpp (logits, greedy agreement, perplexity)."""
    from dlp_deploy.export.deployment import export_gguf_deployment

    model = family_model(family)
    src = save(model, tmp_path / "src")
    info = export_gguf_deployment(str(src), tmp_path / "gguf", "f32", seq_len=SEQ_LEN, data_root=str(data_root))
    assert info["format"]["architecture"] == FAMILIES[family][3]
    llamacpp = info["validation"]["llamacpp"]
    assert llamacpp["greedy_agreement"] >= 0.9 and abs(llamacpp["ppl_vs_reference"]) <= GGUF_QUANTS["f32"].ppl_tolerance
    ref = torch_logits(model, PROMPT)
    got = llamacpp_logits(tmp_path / "gguf" / "model.gguf", PROMPT)
    assert np.abs(got - ref).max() <= GGUF_QUANTS["f32"].logit_tolerance * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@needs_llamacpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_q8_0_logits_are_within_the_formats_bound(family, tmp_path):
    from dlp_deploy.export.gguf import write_gguf

    model = family_model(family, seed=1)
    src = save(model, tmp_path / "src")
    info = write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", GGUF_QUANTS["q8_0"], src)
    assert info["tensor_types"].get("Q8_0", 0) > 0
    ref = torch_logits(model, PROMPT)
    got = llamacpp_logits(tmp_path / "m.gguf", PROMPT)
    assert np.abs(got - ref).max() <= GGUF_QUANTS["q8_0"].logit_tolerance * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.85


@needs_llamacpp
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_window_and_query_scale_are_the_models_own(family, tmp_path):
    """The window binds on PROMPT (the model without it gives other logits), llama.cpp follows the windowed model,
    and the model's query scale (query_pre_attn_scalar, not the head size llama.cpp assumes) is carried."""
    from dlp_deploy.export.gguf import write_gguf

    model = family_model(family)
    assert model.config.query_pre_attn_scalar != model.config.head_dim
    src = save(model, tmp_path / "src")
    info = write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", GGUF_QUANTS["f32"], src)
    assert info["sliding_window"] == WINDOW
    ref = torch_logits(model, PROMPT)
    unwindowed = torch_logits(family_model(family, sliding_window=len(PROMPT) + 1), PROMPT)
    got = llamacpp_logits(tmp_path / "m.gguf", PROMPT)
    scale = np.abs(ref).max()
    assert np.abs(unwindowed - ref).max() > 0.05 * scale  # the window changes the answer on this prompt
    assert np.abs(got - ref).max() <= 0.01 * scale


@needs_llamacpp
def test_structured_qwen2_is_written_as_deci_with_per_layer_widths(tmp_path, data_root):
    """Qwen2's own llama.cpp loader sizes every block like the first; deci reads per-layer widths and q/k/v
    biases, so a structured Qwen2 keeps its biases there (q/k rows reordered for deci's rope)."""
    import json

    from dlp_deploy.export.deployment import export_gguf_deployment
    from dlp_deploy.prune.to_folder import prune_to_folder
    from dlp_deploy.prune.pipeline import PruneSettings

    src = save(family_model("qwen2", seed=3), tmp_path / "src")
    pruned = tmp_path / "pruned"
    prune_to_folder(str(src), pruned, PruneSettings(0.4, "wanda", "dlp", alpha=0.2, structure="heads,channels"),
                    nsamples=4, seqlen=32, data_root=str(data_root))
    shapes = json.loads((pruned / "structure.json").read_text())["layers"]
    assert len({(s["num_attention_heads"], s["intermediate_size"]) for s in shapes}) > 1
    info = export_gguf_deployment(str(pruned), tmp_path / "gguf", "f32", seq_len=SEQ_LEN, data_root=str(data_root))
    fmt = info["format"]
    assert fmt["architecture"] == "deci" and fmt["hf_model_type"] == "qwen2"
    assert fmt["feed_forward_length"] == [s["intermediate_size"] for s in shapes]
    assert fmt["head_count"] == [s["num_attention_heads"] for s in shapes]
    from dlp_deploy.models import load

    model, _ = load(str(pruned))
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    ref = torch_logits(model, PROMPT)
    got = llamacpp_logits(tmp_path / "gguf" / "model.gguf", PROMPT)
    assert np.abs(got - ref).max() <= 0.01 * np.abs(ref).max()


def _narrow_mlp(model, block: int, width: int):
    """Block `block`'s MLP cut to its first `width` channels, as structured pruning leaves it."""
    mlp = model.model.layers[block].mlp
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        setattr(mlp, name, torch.nn.Linear(old.in_features, width, bias=False))
    mlp.down_proj = torch.nn.Linear(width, mlp.down_proj.out_features, bias=False)
    return model


@pytest.mark.parametrize("family,arch", [("qwen3", "qwen3"), ("gemma2", "gemma2"), ("olmo2", "olmo2")])
def test_per_layer_widths_are_refused_where_the_loader_reads_one(family, arch):
    model = _narrow_mlp(family_model(family), 1, 96)
    with pytest.raises(UserError, match=f"llama.cpp's {arch} loader sizes every block like the first") as err:
        gguf_layout(model)
    assert "\n" not in str(err.value)


def test_window_beyond_what_llamacpp_applies_is_refused(tmp_path):
    from dlp_deploy.testing import assert_one_line_error, run_cli

    src = save(family_model("mistral", sliding_window=WINDOW), tmp_path / "src")
    proc = run_cli("export", src, "--out", tmp_path / "x", "--format", "gguf", "--quant", "f32", "--seq-len", "64")
    assert_one_line_error(proc, "sliding attention window (16)", "llama.cpp's llama architecture",
                          "--seq-len 16")
    assert not (tmp_path / "x").exists()


def test_unmapped_family_and_foreign_parts_are_refused():
    granite = T.GraniteForCausalLM(T.GraniteConfig(**FAMILY_BASE)).eval()
    with pytest.raises(UserError, match="'granite' is not mapped.*--format onnx"):
        gguf_layout(granite)
    gemma = family_model("gemma2", tie_word_embeddings=False)
    from dlp_deploy.export.gguf import _named_tensors

    with pytest.raises(UserError, match="gemma2 architecture reads the LM head from the embedding"):
        list(_named_tensors(gemma, gguf_layout(gemma)))
