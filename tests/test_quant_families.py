"""Quantized deployments of every supported family (issue 24: INT8, w8 and INT4 were tested on tiny LLaMA only).

Each family's tiny random model, half of every block weight zeroed by hand, is exported in four forms through
export_deployment: INT8 with dynamic per-token and with static activation scales, w8 (with --quantize-head, so one
form checks the head) and symmetric INT4 in blocks of 32 (the tiny widths, 64 and 128, are whole blocks). Each must
- validate on ONNX Runtime and OpenVINO: logits within the form's bound, greedy agreement and perplexity as the
  validation records them;
- quantize exactly the block Linears' MatMuls (Phi-3's fused qkv_proj and gate_up_proj are one MatMul each: 4 a
  block, 7 in the others), plus the head where the record says it is quantized, and nothing else;
- keep every zeroed weight an exact zero in the stored weights (read back here, beside the export's own check);
- for w8 and INT4, be MatMulNBits nodes of the form's bits, each on an OpenVINO compressed-weight kernel, and for
  INT4 (fp32 accumulation) compute what the source computes with its weights dequantized, to float rounding;
- have been judged against the source model as it is on disk: the validation's reference tokens and perplexity
  are those of a second, untouched copy (SmoothQuant changes the model in place before that reference is taken).

Speed (32 exports): the engines' validation task runs in this process instead of a fresh worker interpreter per
engine and export (1.5-2 s of imports each; the worker is tested in test_engine_isolation.py); the corpora are cut
short (testing.short_eval_texts); PyTorch runs on one thread. DeepSparse is left out: its two engines took 22-31 s
per static INT8 model here (test_int8.py validates INT8 on it with tiny LLaMA).
"""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import importlib
import json
import math

import numpy as np
import pytest
import torch

from dlp_deploy.export.deployment import (VALIDATION_PROMPT, QualityCheck, QuantizeOptions, export_deployment,
                                          reference)
from dlp_deploy.runtime.engines import ENGINES
from dlp_deploy.testing import FAMILIES, FAMILY_BASE, family_model, short_eval_texts, tiny_tokenizer

SEQ_LEN = 96
QUALITY = QualityCheck(seqlen=64, windows=2, agreement_tokens=32)
CALIBRATION = dict(calib_samples=2, calib_seqlen=32)
GROUP = 32
FORMS = {
    "int8-dynamic-token": QuantizeOptions("int8", act_scales="dynamic-token", **CALIBRATION),
    "int8-static": QuantizeOptions("int8", act_scales="static", **CALIBRATION),
    "w8": QuantizeOptions("w8", head=True, group_size=GROUP),
    "int4": QuantizeOptions("int4", group_size=GROUP, int4_scheme="sym"),
}
# max |logit - PyTorch's| over the prompt, relative to max(1, the largest |logit|), and the least greedy agreement.
# The tiny random models' logits are nearly flat, so rounding flips argmaxes: INT4 agrees on 15 of 32 tokens on
# OLMo-2, the other forms on 27 or more everywhere. The INT4 graph computes what PyTorch does with the same
# dequantized weights to float rounding (checked below), so those flips are the 4-bit weights' own
LOGIT_BOUND = {"int8-dynamic-token": 0.05, "int8-static": 0.2, "w8": 0.03, "int4": 0.25}
MIN_AGREEMENT = {"int8-dynamic-token": 0.85, "int8-static": 0.7, "w8": 0.85, "int4": 0.4}
PPL_BOUND = 0.02  # |deployed perplexity / PyTorch's - 1|: tighter than the export's own tolerance (5%, INT4 10%)
LINEARS_PER_BLOCK = {"phi3-sliding": 4}  # qkv_proj, o_proj, gate_up_proj, down_proj; 7 elsewhere
BITS = {"w8": 8, "int4": 4}
ENGINES_CHECKED = tuple(e for e in ("onnxruntime", "openvino") if e in ENGINES.usable())
IN_PROCESS = ("onnxruntime", "openvino")


class SourceChanged(AssertionError):
    """The validation's PyTorch reference is not the source model on disk."""


class HeadRecordMismatch(AssertionError):
    """export.json's lm_head entry says something other than what the graph computes."""




def _cases():
    for family in FAMILIES:
        for form in FORMS:
            yield pytest.param(family, form, id=f"{family}-{form}")


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
    """Short corpora, one PyTorch thread, and the validation task of ONNX Runtime and OpenVINO in this process
    (answered through JSON as the worker answers)."""
    from dlp_deploy.runtime import worker

    short_eval_texts(monkeypatch, chars=4000)  # QUALITY reads 128 tokens of one byte each
    real = worker.run_in_worker

    def run_here(task, args, engine, label, during, timeout=None, on_event=None, hint=None):
        if engine not in IN_PROCESS:
            return real(task, args, engine, label, during, timeout, on_event, hint)
        module, _, name = worker.TASKS[task].partition(":")
        task_of = getattr(importlib.import_module(module), name)
        return json.loads(json.dumps(task_of(json.loads(json.dumps(args)), on_event or (lambda event: None))))

    monkeypatch.setattr(worker, "run_in_worker", run_here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_SOURCES: dict[str, dict] = {}


def _source(family: str, tmp_path_factory, data_root) -> dict:
    """The family's tiny model with half of each block weight zeroed, on disk; its zeros, and what an untouched
    copy loaded from disk computes for validation: prompt logits, greedy tokens, perplexity on QUALITY's windows.
    Built once per process (pytest-xdist workers each build their own)."""
    if family in _SOURCES:
        return _SOURCES[family]
    from dlp_deploy import data
    from dlp_deploy.eval.perplexity import corpus_ids, perplexity
    from dlp_deploy.models import load

    model = family_model(family, seed=7)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.mul_((torch.rand(p.shape, generator=gen) > 0.5).to(p.dtype))
    folder = tmp_path_factory.mktemp(family) / "src"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    loaded, tokenizer = load(str(folder))
    masks = {name: (p.detach().numpy() == 0) for name, p in loaded.named_parameters()
             if ".layers." in name and p.dim() == 2}
    prompt = tokenizer(VALIDATION_PROMPT, return_tensors="pt")["input_ids"][0].tolist()
    logits, tokens = reference(loaded, prompt, 32)
    ids = corpus_ids(tokenizer, data.eval_text(QUALITY.corpus, data.data_dir(str(data_root))).text)
    ppl = perplexity(loaded, ids, QUALITY.seqlen, QUALITY.windows)["ppl"]
    _SOURCES[family] = {"folder": folder, "masks": masks, "tokens": tokens,
                        "tied": loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight,
                        "logit_scale": max(1.0, float(np.abs(logits).max())), "ppl": ppl}
    return _SOURCES[family]


def _stored_block_weights(proto, form: str, names) -> dict[str, np.ndarray]:
    """Each block weight as the graph stores it, [out, in]: the int8 codes, or what MatMulNBits dequantizes."""
    from onnx import TensorProto, numpy_helper

    from dlp_deploy.export.int4 import int4_weights

    out = {}
    if form in BITS:
        weights = int4_weights(proto)
        for name in names:
            assert f"{name}.T" in weights, f"{name} is no MatMulNBits weight"
            out[name] = weights[f"{name}.T"].T
        return out
    inits = {i.name: i for i in proto.graph.initializer}
    for name in names:
        init = inits.get(f"{name}.T")
        assert init is not None and init.data_type == TensorProto.INT8, f"{name} is no int8 initializer"
        out[name] = numpy_helper.to_array(init).T
    return out


def _int4_graph_error(src: dict, path, proto) -> float:
    """max |logits| difference, on one 40-token prefill, between the INT4 graph on ONNX Runtime and the source model
    in PyTorch with every quantized weight replaced by what MatMulNBits dequantizes it to."""
    import onnxruntime as ort

    from dlp_deploy.export.deployment import _prefill_feeds
    from dlp_deploy.export.int4 import int4_weights
    from dlp_deploy.models import load

    model, _ = load(str(src["folder"]))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in int4_weights(proto).items():
            params[name.removesuffix(".T")].copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
        ids = torch.arange(3, 43)
        want = model(ids[None]).logits[0].numpy()
    feed = _prefill_feeds(path, [ids])[0]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0][0]
    return float(np.abs(got - want).max())


@pytest.mark.parametrize("family, form", list(_cases()))
def test_quantized_family_deploys_validates_and_keeps_its_zeros(family, form, tmp_path, tmp_path_factory, data_root):
    import onnx

    src = _source(family, tmp_path_factory, data_root)
    options = FORMS[form]
    info = export_deployment(str(src["folder"]), tmp_path / "deploy", seq_len=SEQ_LEN, num_cores=1, quantize=options,
                             quality=QUALITY, data_root=str(data_root), engines=ENGINES_CHECKED)
    assert "onnxruntime" in ENGINES_CHECKED

    # validation judged the source as it is on disk (its PyTorch reference is taken after SmoothQuant)
    v, record = info["validation"], info["quantization"]
    if v["reference_tokens"] != src["tokens"] or not math.isclose(v["quality"]["reference_ppl"], src["ppl"],
                                                                  rel_tol=1e-4):
        raise SourceChanged(f"validation's reference: tokens {v['reference_tokens'][:8]}..., perplexity "
                            f"{v['quality']['reference_ppl']:.4f}; the source on disk: {src['tokens'][:8]}..., "
                            f"{src['ppl']:.4f} (SmoothQuant: {record.get('smoothquant')})")

    # validation, engine by engine
    for engine in ENGINES_CHECKED:
        entry = v[engine]
        assert "skipped" not in entry and "failed" not in entry, (engine, entry)
        assert entry["max_abs_logit_diff"] <= LOGIT_BOUND[form] * src["logit_scale"], (engine, entry)
        assert entry["greedy_agreement"] >= MIN_AGREEMENT[form], (engine, entry)
        assert abs(entry["ppl_vs_reference"]) <= PPL_BOUND, (engine, entry)

    # exactly the block Linears' MatMuls quantized, in the form's node
    blocks = FAMILY_BASE["num_hidden_layers"] * LINEARS_PER_BLOCK.get(family, 7)
    assert len(src["masks"]) == blocks
    proto = onnx.load(str(tmp_path / "deploy" / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    quantized_op = "MatMulNBits" if form in BITS else "MatMulInteger"
    head_in_graph = ops.count(quantized_op) - blocks
    assert head_in_graph in (0, 1), ops.count(quantized_op)
    assert record["matmuls_quantized"] == ops.count(quantized_op)
    block_inits = {f"{n}.T" for n in src["masks"]} | set(src["masks"])
    assert not [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and block_inits & set(n.input)]
    if form in BITS:
        nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
        attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
        assert {(a["bits"], a["block_size"]) for a in attrs} == {(BITS[form], GROUP)}
        assert (record["scheme"], record["bits"], record["symmetric"]) == (form, BITS[form], True)
        assert record["matmuls_with_a_padded_block"] == 0
        kernels = (record.get("openvino_kernels") or {}).get("one_token", {}).get("kernels")
        if "openvino" in ENGINES_CHECKED:  # every quantized MatMul on a compressed-weight kernel
            assert sum(c for k, c in kernels.items() if k.startswith("FullyConnectedCompressed")) == \
                ops.count(quantized_op), kernels
    else:
        assert record["act_scales"] == options.act_scales
    assert info["graph_proof"]["logits_error"] < 1e-5  # the fp32 graph the rewrite started from
    if form == "int4":  # fp32 accumulation: the graph is the source with its weights dequantized, to float rounding
        assert _int4_graph_error(src, tmp_path / "deploy" / "model.onnx", proto) < 1e-4 * src["logit_scale"]

    # every zero of the source is an exact zero of the stored weights, and the export's own check says so
    stored = _stored_block_weights(proto, form, src["masks"])
    lost = sum(int(np.count_nonzero(stored[n][mask])) for n, mask in src["masks"].items())
    assert lost == 0
    sparsity = info["weight_sparsity"]
    key = form.split("-")[0]
    assert sparsity[key]["mask_preserved"] and sparsity[key].get("pruned_weights_not_exact_zero", 0) == 0
    assert sparsity["global"] >= sparsity["pytorch_global"] > 0.45
    assert json.loads((tmp_path / "deploy" / "export.json").read_text())["weight_sparsity"] == sparsity

    # the head: quantized in the graph exactly when asked and when the record says so; a tied head through its own
    # transposed copy, the embedding's Gather still reading the fp32 matrix
    says_quantized = record["lm_head"] == key
    if says_quantized != bool(head_in_graph):
        raise HeadRecordMismatch(f"export.json: lm_head {record['lm_head']!r}; the graph: {ops.count(quantized_op)} "
                                 f"{quantized_op} nodes for {blocks} block weights")
    assert says_quantized == options.head, record["lm_head"]
    assert ("lm_head_tied_copy" in record) == (options.head and src["tied"]), record
    assert "Gather" in ops


# what reads each norm, by family: (norm name, names of the Linears reading its output) in block 0
NORM_READERS = {
    "pre-norm": {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")},
    "phi3-sliding": {"input_layernorm": ("self_attn.qkv_proj",), "post_attention_layernorm": ("mlp.gate_up_proj",)},
    "sandwich": {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj")},
    "olmo2": {},  # post-norm: its norms read the sublayers' outputs; no Linear reads a norm, nothing to smooth
}


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_smooths_the_norms_that_feed_linears_and_keeps_the_model(family):
    """SmoothQuant's groups come from the wiring the model runs (not from norm names), and smoothing leaves each
    family's logits where they were."""
    from dlp_deploy.export.quantize import norm_readers, smooth_model
    from dlp_deploy.models import decoder_layers

    model = family_model(family).eval()
    window = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    block = decoder_layers(model)[0]
    names = {id(m): n for n, m in block.named_modules()}
    found = {names[id(norm)]: tuple(names[id(lin)] for lin in lins)
             for index, norm, lins in norm_readers(model, window) if index == 0}
    wiring = family if family in NORM_READERS else "sandwich" if family.startswith("gemma") else "pre-norm"
    assert found == NORM_READERS[wiring]

    with torch.no_grad():
        before = model(window[None]).logits
        record = smooth_model(model, [window, window.flip(0)], alpha=0.5)
        after = model(window[None]).logits
    assert "undone" not in record and record["groups"] == len(NORM_READERS[wiring]) * len(decoder_layers(model))
    # Gemma's norms scale by 1 + w, not w: those groups are left as they are
    assert record["groups_smoothed"] == (0 if wiring == "sandwich" else record["groups"])
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
