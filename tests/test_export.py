"""ONNX export stage: tiny random LLaMA-family models exported, validated on both engines, and bad input refused."""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dlp_deploy.runtime import engines as engines_mod
from dlp_deploy.runtime.decode import generate
from dlp_deploy.runtime.engines import ENGINES
from dlp_deploy.errors import UserError
from dlp_deploy.export import deployment as dep
from dlp_deploy.export.deployment import ValidationError, export_deployment
from dlp_deploy.runtime.deployment import load_deployment
from dlp_deploy.export.onnx import export_onnx, onnx_weight_sparsity
from dlp_deploy.models import decoder_layers, linear_modules, model_sparsity
from dlp_deploy.testing import save_tiny, tiny_llama, tiny_tokenizer

SEQ_LEN = 64
needs_deepsparse = pytest.mark.skipif(not engines_mod.deepsparse_available(), reason="deepsparse not installed")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prune_half(model) -> None:
    """Zero the smaller-magnitude half of every row of every block Linear weight."""
    with torch.no_grad():
        for block in decoder_layers(model):
            for linear in linear_modules(block).values():
                w = linear.weight
                k = w.shape[1] // 2
                idx = w.abs().argsort(dim=1)[:, :k]
                w.scatter_(1, idx, 0.0)


def save_sparse_tiny(folder: Path, **overrides) -> Path:
    model = tiny_llama(0, **overrides)
    prune_half(model)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    # the shape `dlp-deploy prune` writes (settings nested), trimmed
    (folder / "pruning.json").write_text(json.dumps({"settings": {"sparsity": 0.5, "method": "magnitude",
                                                                  "allocation": "uniform"},
                                                     "global_sparsity": 0.5, "layers": []}))
    return folder


# ---------------------------------------------------------------- graph numerics, all attention variants (ORT only)

@pytest.mark.parametrize("kv_heads,bias", [(4, False), (4, True), (2, False), (2, True), (1, False)],
                         ids=["mha", "mha-bias", "gqa", "gqa-bias", "mqa"])
def test_graph_matches_hf_generate(tmp_path, kv_heads, bias):
    model = tiny_llama(1, num_key_value_heads=kv_heads, attention_bias=bias)
    path = tmp_path / "model.onnx"
    export_onnx(model, path)
    prompt = torch.randint(1, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
    with torch.no_grad():
        ref_logits = model(prompt).logits[0].numpy()
    gen = generate(ENGINES["onnxruntime"].compile(path, SEQ_LEN), prompt[0].tolist(), 16)
    assert gen.tokens == ref
    assert np.abs(gen.first_logits - ref_logits).max() < 1e-4
    assert len(gen.decode_s) == 15 and gen.prefill_s > 0


def test_layers_of_different_widths_export(tmp_path):
    """Per-layer widths come from each layer's own Linear shapes (e.g. after structured pruning)."""
    model = tiny_llama(2)
    block = decoder_layers(model)[1]
    with torch.no_grad():  # drop one KV group (2 query heads + 1 KV head) and half the MLP of layer 1
        attn, mlp = block.self_attn, block.mlp
        for name, keep in (("q_proj", 32), ("k_proj", 16), ("v_proj", 16)):
            old = getattr(attn, name)
            new = torch.nn.Linear(old.in_features, keep, bias=False)
            new.weight.copy_(old.weight[:keep])
            setattr(attn, name, new)
        o = torch.nn.Linear(32, attn.o_proj.out_features, bias=False)
        o.weight.copy_(attn.o_proj.weight[:, :32])
        attn.o_proj = o
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, 64, bias=False)
            new.weight.copy_(old.weight[:64])
            setattr(mlp, name, new)
        down = torch.nn.Linear(64, mlp.down_proj.out_features, bias=False)
        down.weight.copy_(mlp.down_proj.weight[:, :64])
        mlp.down_proj = down
    info = export_onnx(model, tmp_path / "model.onnx")
    assert info["spec"].describe()["num_heads"] == [4, 2, 4, 4]
    prompt = list(range(1, 10))
    with torch.no_grad():
        ref_logits = model(torch.tensor([prompt])).logits[0].numpy()
    gen = generate(ENGINES["onnxruntime"].compile(tmp_path / "model.onnx", SEQ_LEN), prompt, 2)
    assert np.abs(gen.first_logits - ref_logits).max() < 1e-4


# ---------------------------------------------------------------- full deployments on both engines

@needs_deepsparse
def test_sparse_gqa_bias_deployment(tmp_path):
    src = save_sparse_tiny(tmp_path / "src", attention_bias=True)
    out = tmp_path / "deploy"
    info = export_deployment(src, out, seq_len=SEQ_LEN, num_cores=1)

    # the folder, as published
    assert {"model.onnx", "export.json", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".deploy.*"))
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["validation"]["onnxruntime"]["greedy_match"] is True
    assert "provenance" in on_disk and on_disk["source"]["pruning"] == {
        "global_sparsity": 0.5, "method": "magnitude", "allocation": "uniform"}

    # validation on both engines (plus DeepSparse's internal cache)
    val = info["validation"]
    for name in ("onnxruntime", "deepsparse", "deepsparse-external"):
        assert val[name]["greedy_match"] is True, name
        assert val[name]["max_abs_logit_diff"] < 1e-3, name
    assert val["deepsparse"]["fraction_of_supported_ops"] == 1.0
    assert val["deepsparse"]["fraction_of_supported_ops_prefill"] == 1.0

    # zeros survive: measured on the ONNX file, equal to the torch model's
    from transformers import AutoModelForCausalLM

    torch_sparsity = model_sparsity(AutoModelForCausalLM.from_pretrained(src))["global_sparsity"]
    assert info["weight_sparsity"]["global"] == pytest.approx(0.5)
    assert info["weight_sparsity"]["global"] == torch_sparsity
    measured = onnx_weight_sparsity(out / "model.onnx")["per_initializer"]
    q0 = measured["model.layers.0.self_attn.q_proj.weight.T"]
    assert q0["sparsity"] == 0.5 and info["weight_sparsity"]["per_initializer"]["lm_head.weight.T"] < 0.01

    # offline loading of config and tokenizer
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).num_key_value_heads == 2
    assert AutoTokenizer.from_pretrained(out)("hi")["input_ids"] == [104, 105]

    # running DeepSparse on the deployed folder never rewrites model.onnx
    before = _sha(out / "model.onnx")
    deployment = load_deployment(out)
    session = ENGINES["deepsparse"].compile(deployment.onnx_path, deployment.seq_len, num_cores=1)
    gen = generate(session, [72, 105], 4)
    assert gen.tokens == generate(ENGINES["onnxruntime"].compile(deployment.onnx_path, SEQ_LEN), [72, 105], 4).tokens
    assert _sha(out / "model.onnx") == before


@needs_deepsparse
def test_deepsparse_logits_match_pytorch_token_by_token(tmp_path):
    """Independent of the exporter's validation record: a sparse GQA deployment exported without validation,
    stepped here on DeepSparse (KV cache inside the engine: a prefill, then one token at a time), against the
    PyTorch logits of the same tokens computed here in one forward pass."""
    from transformers import AutoModelForCausalLM

    from dlp_deploy.runtime.decode import step_inputs

    src = save_sparse_tiny(tmp_path / "src", num_key_value_heads=2)
    out = tmp_path / "deploy"
    export_deployment(src, out, seq_len=SEQ_LEN, validate=False)
    tokens = [5, 17, 99, 3, 42, 250, 8, 61, 120, 7]
    prompt = 6
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src).eval()(torch.tensor([tokens])).logits[0].numpy()

    deployed = load_deployment(out)
    session = ENGINES["deepsparse"].compile(deployed.onnx_path, deployed.seq_len, num_cores=1)
    past = session.init_past(prompt)
    logits, present = session.run(np.asarray([tokens[:prompt]], np.int64),
                                  *step_inputs(session.window(0, prompt), 0, prompt), past)
    rows = [logits[0]]
    for filled in range(prompt, len(tokens)):  # each later token at its position, after the cache so far
        logits, present = session.run(np.asarray([[tokens[filled]]], np.int64),
                                      *step_inputs(session.window(filled, 1), filled, 1),
                                      session.advance(present, 1))
        rows.append(logits[0])
    got = np.concatenate(rows)
    assert got.shape == ref.shape == (len(tokens), 256)
    # fp32 sums in another order: ~4e-7 here. A random tiny model's logits are small, so the bound is absolute
    # 1e-4 (scaled up with larger logits): a position off by one in the decode steps moves them by 2e-3
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@needs_deepsparse
def test_dense_mha_deployment_and_generate_cli(tmp_path, capsys):
    src = save_tiny(tmp_path / "src", seed=3, num_key_value_heads=4)
    out = tmp_path / "deploy"
    # the perplexity check and OpenVINO are exercised by the sparse deployment above (CI time)
    info = export_deployment(src, out, seq_len=SEQ_LEN, num_cores=1, quality=None,
                             engines=("onnxruntime", "deepsparse"))
    val = info["validation"]
    assert val["deepsparse"]["fraction_of_supported_ops"] == 1.0
    assert val["onnxruntime"]["greedy_match"] and val["deepsparse"]["greedy_match"]
    assert info["weight_sparsity"]["global"] == 0.0
    assert info["format"] == {"opset": 17, "ir_version": 8, "external_data": False,
                              "dynamic_axes": ["batch", "length", "total"]}

    from dlp_deploy.commands.generate import generate_cmd

    before = _sha(out / "model.onnx")
    for engine in ("onnxruntime", "deepsparse"):
        generate_cmd(out, prompt="Hello", engine=engine, max_new_tokens=8, num_cores=1)
    streamed = capsys.readouterr().out.splitlines()
    assert len(streamed) == 2 and streamed[0] == streamed[1]
    assert _sha(out / "model.onnx") == before


# ---------------------------------------------------------------- failures

def test_validation_failure_does_not_publish(tmp_path, monkeypatch):
    src = save_tiny(tmp_path / "src")
    monkeypatch.setattr(dep, "VALIDATION_ENGINES", ("onnxruntime",))
    monkeypatch.setattr(dep, "logit_tolerance", lambda ref: -1.0)
    with pytest.raises(ValidationError, match="onnxruntime max"):
        export_deployment(src, tmp_path / "deploy", seq_len=SEQ_LEN, quality=None)
    assert not (tmp_path / "deploy").exists()
    assert not list(tmp_path.glob(".deploy*"))


def test_existing_output_needs_force(tmp_path, monkeypatch):
    src = save_tiny(tmp_path / "src")
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--force"):
        export_deployment(src, out, seq_len=SEQ_LEN)
    assert (out / "keep.txt").exists()
    export_deployment(src, out, seq_len=SEQ_LEN, validate=False, force=True)
    assert (out / "model.onnx").is_file() and not (out / "keep.txt").exists()
    assert json.loads((out / "export.json").read_text())["validation"] is None


@pytest.mark.parametrize("seq_len,match", [(16, "too small"), (1024, "max_position_embeddings")])
def test_seq_len_out_of_range(tmp_path, seq_len, match):
    src = save_tiny(tmp_path / "src")
    with pytest.raises(UserError, match=match):
        export_deployment(src, tmp_path / "deploy", seq_len=seq_len)
    assert not (tmp_path / "deploy").exists()


def test_not_a_causal_lm_folder(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        export_deployment(tmp_path, tmp_path / "deploy")
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    from transformers import AutoModel

    AutoModel.from_config(BertConfig.from_pretrained(bert)).save_pretrained(bert)
    with pytest.raises(UserError):
        export_deployment(bert, tmp_path / "deploy2")


def test_generate_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not a deployment folder"):
        load_deployment(tmp_path)
    src = save_tiny(tmp_path / "src")
    out = tmp_path / "deploy"
    export_deployment(src, out, seq_len=SEQ_LEN, validate=False)
    from dlp_deploy.commands.generate import generate_cmd

    with pytest.raises(UserError, match="exceed"):
        generate_cmd(out, prompt="x" * 60, engine="onnxruntime", max_new_tokens=8)
    with pytest.raises(UserError, match="unknown engine"):
        generate_cmd(out, prompt="x", engine="tensorrt", max_new_tokens=8)
    # without deepsparse: a clear message, and ONNX Runtime still works
    monkeypatch.setattr(engines_mod, "deepsparse_available", lambda: False)
    with pytest.raises(UserError, match="deepsparse is not installed.*ONNX Runtime still works"):
        ENGINES["deepsparse"]
    generate_cmd(out, prompt="x", engine="onnxruntime", max_new_tokens=2)


@needs_deepsparse
def test_external_data_when_over_the_protobuf_limit(tmp_path, monkeypatch):
    """Graphs over 2 GB keep weights in model.data; both engines load it and DeepSparse leaves it untouched."""
    from dlp_deploy.export import onnx as onnx_mod

    monkeypatch.setattr(onnx_mod, "_PROTOBUF_LIMIT", 0)  # stand-in for a > 2 GB model
    model = tiny_llama(4)
    prune_half(model)
    path = tmp_path / "model.onnx"
    assert export_onnx(model, path)["external_data"] is True
    assert (tmp_path / "model.data").stat().st_size > path.stat().st_size
    sparsity = onnx_weight_sparsity(path)["per_initializer"]
    assert sparsity["model.layers.3.mlp.down_proj.weight.T"]["sparsity"] == 0.5
    before = {p.name: _sha(p) for p in tmp_path.iterdir()}
    prompt = [5, 6, 7]
    ort_tokens = generate(ENGINES["onnxruntime"].compile(path, SEQ_LEN), prompt, 4).tokens
    ds_tokens = generate(ENGINES["deepsparse"].compile(path, SEQ_LEN, num_cores=1), prompt, 4).tokens
    assert ort_tokens == ds_tokens
    assert {p.name: _sha(p) for p in tmp_path.iterdir()} == before


def test_export_records_what_pruned_the_source(tmp_path):
    from dlp_deploy.export.deployment import _pruning_summary

    (tmp_path / "pruning.json").write_text(json.dumps({
        "settings": {"sparsity": 0.7, "method": "wanda", "allocation": "dlp", "alpha": 0.15, "reducer": "median",
                     "granularity": "per-output"}, "global_sparsity": 0.7001, "target_sparsity": 0.7}))
    assert _pruning_summary(tmp_path) == {"method": "wanda", "allocation": "dlp", "alpha": 0.15, "reducer": "median",
                                          "granularity": "per-output", "global_sparsity": 0.7001,
                                          "target_sparsity": 0.7}
    assert _pruning_summary(tmp_path / "nothing") is None


def test_external_data_decision_counts_tensor_bytes(tmp_path):
    """Protobuf cannot size a message over 2 GB, so the decision counts the initializers' bytes itself."""
    import onnx
    from onnx import numpy_helper

    from dlp_deploy.export.onnx import all_tensors, tensor_bytes

    export_onnx(tiny_llama(4), tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    expected = sum(numpy_helper.to_array(t).nbytes for t in all_tensors(proto))
    assert tensor_bytes(proto) == expected and expected > 100_000
    # torch's exporter, over 2 GB, writes each tensor to a file of its own and records no length: counted from
    # its shape (counted as 0 before, the > 2 GB graph was judged small and failed to serialise)
    weight = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).nbytes)
    size = numpy_helper.to_array(weight).nbytes
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "a_file_of_its_own"
    assert tensor_bytes(proto) == expected and size > 10_000


@needs_deepsparse
def test_export_over_two_gigabytes_loads_and_validates_on_both_engines(tmp_path):
    """A real > 2 GB graph (protobuf's ceiling): a 262k vocabulary with an untied head is enough. Exported with
    external data streamed tensor by tensor, loaded and validated on ONNX Runtime and DeepSparse (one DeepSparse
    compile: the engine-kept cache reads the same external data; CI time)."""
    src = save_tiny(tmp_path / "src", vocab_size=262_400, hidden_size=1024, intermediate_size=1024,
                    num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2)
    info = export_deployment(src, tmp_path / "deploy", seq_len=SEQ_LEN, num_cores=1, quality=None,
                             engines=("onnxruntime", "deepsparse-external"))
    assert info["format"]["external_data"] is True
    data_file = tmp_path / "deploy" / "model.data"
    assert data_file.stat().st_size > 2**31 and (tmp_path / "deploy" / "model.onnx").stat().st_size < 2**24
    assert set(info["validation"]["engines"]) == {"onnxruntime", "deepsparse-external"}
    for name in ("onnxruntime", "deepsparse-external"):
        assert info["validation"][name]["greedy_match"] is True, name
        assert info["validation"][name]["max_abs_logit_diff"] < 1e-3, name
    peak = info["memory"]["export"]["rss_peak_bytes"]
    print(f"\n> 2 GB export: model.data {data_file.stat().st_size / 2**30:.2f} GiB, export peak RSS "
          f"{peak / 2**30:.2f} GiB, validation peak {info['memory']['validation']['rss_peak_bytes'] / 2**30:.2f} GiB")
    # measured 3.0x the weights (the model itself, the TorchScript exporter's copy and its constant-folded
    # transposes; saving adds one tensor at a time): a regression guard against a proto of everything on top
    # (growth, not the absolute peak: the test process may hold memory from earlier tests)
    assert info["memory"]["export"]["rss_growth_bytes"] < 3.5 * data_file.stat().st_size
