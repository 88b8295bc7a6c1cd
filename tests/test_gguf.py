"""GGUF export for llama.cpp and the llama.cpp engine: tiny random LLaMAs (uniform and structured with different
widths per layer) written, loaded by the real llama.cpp, and compared with PyTorch; bad input refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dlp_deploy.runtime.llamacpp_engine import llamacpp_available
from dlp_deploy.testing import assert_one_line_error, run_cli, save_tiny

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(),
                                    reason="llama-cpp-python not installed (optional extra: dlp-deploy[llamacpp])")
GQA = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
           num_hidden_layers=4)
PROMPT = [5, 17, 99, 3, 250, 42, 7, 7, 81]


def torch_logits(folder, ids):
    from dlp_deploy.models import load

    model, _ = load(str(folder))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy(), model


def llamacpp_logits(gguf_path, ids, seq_len=128):
    from dlp_deploy.runtime.engines import ENGINES

    session = ENGINES["llamacpp"].compile(gguf_path, seq_len, num_cores=1)
    session.init_past(len(ids))
    logits, _ = session.run(np.asarray([ids]), None, None, None, [])
    return logits[0]


@needs_llamacpp
@pytest.mark.parametrize("quant,rel_tol", [("f16", 0.02), ("q8_0", 0.1)])
def test_tiny_llama_gguf_loads_and_matches_pytorch(tmp_path, data_root, quant, rel_tol):
    from dlp_deploy.export.deployment import export_gguf_deployment

    src = save_tiny(tmp_path / "src", seed=1, **GQA)
    info = export_gguf_deployment(str(src), tmp_path / quant, quant, seq_len=128, data_root=str(data_root))
    assert info["format"]["architecture"] == "llama" and info["format"]["quant"] == quant
    assert info["validation"]["llamacpp"]["greedy_agreement"] >= 0.9
    ref, _ = torch_logits(src, PROMPT)
    got = llamacpp_logits(tmp_path / quant / "model.gguf", PROMPT)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= rel_tol * scale
    assert np.abs(got - ref).max() > 0  # llama.cpp really ran: its f16 cache never reproduces fp32 bit for bit
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.85


@needs_llamacpp
def test_structured_model_with_per_layer_widths_exports_and_matches(tmp_path, data_root):
    from dlp_deploy.export.deployment import export_gguf_deployment
    from dlp_deploy.prune.to_folder import prune_to_folder
    from dlp_deploy.prune.pipeline import PruneSettings

    src = save_tiny(tmp_path / "src", seed=3, **GQA)
    pruned = tmp_path / "pruned"
    prune_to_folder(str(src), pruned, PruneSettings(0.4, "wanda", "dlp", alpha=0.2, structure="heads,channels"),
                    nsamples=4, seqlen=32, data_root=str(data_root))
    shapes = json.loads((pruned / "structure.json").read_text())["layers"]
    assert len({(s["num_attention_heads"], s["intermediate_size"]) for s in shapes}) > 1  # widths really differ
    info = export_gguf_deployment(str(pruned), tmp_path / "gguf", "f32", seq_len=128, data_root=str(data_root))
    fmt = info["format"]
    assert fmt["architecture"] == "deci"  # the llama.cpp architecture that reads widths per layer
    assert fmt["feed_forward_length"] == [s["intermediate_size"] for s in shapes]
    assert fmt["head_count"] == [s["num_attention_heads"] for s in shapes]
    assert fmt["head_count_kv"] == [s["num_key_value_heads"] for s in shapes]
    ref, _ = torch_logits(pruned, PROMPT)
    got = llamacpp_logits(tmp_path / "gguf" / "model.gguf", PROMPT)
    assert np.abs(got - ref).max() <= 0.01 * np.abs(ref).max()


@needs_llamacpp
def test_llamacpp_generation_equals_hf_greedy_for_f16(tmp_path, data_root):
    from dlp_deploy.export.deployment import export_gguf_deployment, reference
    from dlp_deploy.runtime.decode import generate
    from dlp_deploy.runtime.engines import ENGINES

    src = save_tiny(tmp_path / "src", seed=5, **GQA)
    export_gguf_deployment(str(src), tmp_path / "f16", "f16", seq_len=128, validate=False)
    _, model = torch_logits(src, PROMPT)
    _, ref_tokens = reference(model, PROMPT, 32)
    session = ENGINES["llamacpp"].compile(tmp_path / "f16" / "model.gguf", 128, num_cores=1, all_logits=False)
    for _ in range(2):  # a second generation starts from a cleared cache
        assert generate(session, PROMPT, 32).tokens == ref_tokens


@needs_llamacpp
def test_engine_and_folder_format_must_match(tmp_path):
    from dlp_deploy.export.deployment import export_deployment, export_gguf_deployment

    src = save_tiny(tmp_path / "src")
    export_gguf_deployment(str(src), tmp_path / "gguf", "q8_0", seq_len=64, validate=False)
    export_deployment(str(src), tmp_path / "onnx", seq_len=64, validate=False)
    proc = run_cli("generate", tmp_path / "gguf", "--prompt", "hi", "--engine", "onnxruntime")
    assert_one_line_error(proc, "GGUF", "--engine llamacpp")
    proc = run_cli("generate", tmp_path / "onnx", "--prompt", "hi", "--engine", "llamacpp")
    assert_one_line_error(proc, "ONNX", "--format gguf")


def test_gguf_bad_input_is_refused_in_one_line(tmp_path, tiny_dir):
    proc = run_cli("export", tiny_dir, "--out", tmp_path / "x", "--format", "gguf", "--quant", "q3_xs")
    assert_one_line_error(proc, "q3_xs", "q8_0")
    proc = run_cli("export", tiny_dir, "--out", tmp_path / "x", "--format", "gguf", "--quantize", "int8")
    assert_one_line_error(proc, "--quant")
    assert not (tmp_path / "x").exists()


def test_sweep_refuses_a_gguf_precision_without_llamacpp(tmp_path, tiny_dir):
    proc = run_cli("sweep", tiny_dir, "--sparsities", "0.5", "--precision", "q4_1", "--engines", "onnxruntime",
                   "--out", tmp_path / "run")
    assert_one_line_error(proc, "q4_1", "llamacpp")


def test_rotary_permutation_pairs_the_halves_of_each_head():
    from dlp_deploy.export.gguf import permute_rotary

    head_dim, heads = 8, 2
    rows = torch.arange(heads * head_dim, dtype=torch.float32)[:, None]
    out = permute_rotary(rows, heads)[:, 0].tolist()
    # HF rotates row i with row i + head_dim/2 inside a head; llama.cpp rotates adjacent rows
    assert out[:head_dim] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert out[head_dim:] == [8, 12, 9, 13, 10, 14, 11, 15]


def test_square_mlp_of_a_structured_model_is_still_understood():
    """Structured pruning can keep exactly `hidden` MLP channels; the geometry must still find the down projection."""
    from dlp_deploy.models import decoder_layers
    from dlp_deploy.models.geometry import block_geometry
    from dlp_deploy.testing import tiny_llama

    model = tiny_llama(hidden_size=64, intermediate_size=64)
    geometry = block_geometry(decoder_layers(model)[0], 0)
    assert geometry.mlp_out == "mlp.down_proj" and geometry.intermediate == 64
    assert set(geometry.mlp_in) == {"mlp.gate_proj", "mlp.up_proj"}


@needs_llamacpp
def test_tiny_mistral_exports_as_llama_and_matches(tmp_path, data_root):
    """Mistral's blocks are LLaMA's: the same name map and rotary reorder must carry it."""
    from transformers import MistralConfig, MistralForCausalLM

    from dlp_deploy.export.deployment import export_gguf_deployment
    from dlp_deploy.testing import tiny_tokenizer

    torch.manual_seed(7)
    model = MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                             num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                                             max_position_embeddings=512, sliding_window=None, bos_token_id=0,
                                             eos_token_id=0, pad_token_id=0)).eval()
    src = tmp_path / "mistral"
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    info = export_gguf_deployment(str(src), tmp_path / "f32", "f32", seq_len=128, data_root=str(data_root))
    assert info["format"]["architecture"] == "llama"
    ref, _ = torch_logits(src, PROMPT)
    got = llamacpp_logits(tmp_path / "f32" / "model.gguf", PROMPT)
    assert np.abs(got - ref).max() <= 0.01 * np.abs(ref).max()


@needs_llamacpp
def test_source_gguf_deployment_is_the_fetched_file_unchanged(tmp_path, monkeypatch, data_root):
    """--quant source: the file a fetched model came from, byte for byte, validated on llama.cpp; refused for a
    model changed since (pruned) and for a folder that was never fetched from a GGUF."""
    from dlp_deploy.errors import UserError
    from dlp_deploy.export.deployment import export_gguf_deployment
    from dlp_deploy.models import fetch_gguf
    from test_reference_defaults import _write_gguf  # tests/ is on sys.path (no __init__.py)

    monkeypatch.setenv("DLP_DEPLOY_CACHE", str(tmp_path / "cache"))
    path, _ = _write_gguf(tmp_path, "q8_0")
    folder = fetch_gguf(path, "tiny-q8")
    info = export_gguf_deployment("tiny-q8", tmp_path / "peer", "source", seq_len=64, data_root=str(data_root))
    assert (tmp_path / "peer" / "model.gguf").read_bytes() == path.read_bytes()
    assert info["format"]["quant"] == "source" and info["format"]["source_file"] == str(path.resolve())
    assert info["format"]["tensor_types"]["Q8_0"] > 0
    assert info["validation"]["llamacpp"]["greedy_agreement"] >= 0.9
    assert info["quantization"]["scheme"] == "gguf-source"

    pruned = tmp_path / "pruned"
    proc = run_cli("prune", folder, "--sparsity", "0.5", "--method", "magnitude", "--out", pruned)
    assert proc.returncode == 0, proc.stderr
    (pruned / "gguf_source.json").write_text((folder / "gguf_source.json").read_text())  # as if carried along
    with pytest.raises(UserError, match="changed after its fetch .*pruning.json"):
        export_gguf_deployment(str(pruned), tmp_path / "x", "source", seq_len=64, validate=False)
    proc = run_cli("export", save_tiny(tmp_path / "plain"), "--out", tmp_path / "y", "--format", "gguf",
                   "--quant", "source")
    assert_one_line_error(proc, "gguf_source.json", "q4_k_m")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
