"""INT8 deployments: static W8A8 in the integer-MatMul form, zeros kept, validation by agreement and perplexity on
every engine; a deployment's own perplexity through an engine."""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import json

import numpy as np
import pytest

from dlp_deploy.export.deployment import QualityCheck, QuantizeOptions, ValidationError, export_deployment
from dlp_deploy.export.quantize import activation_qparams, quantize_weight
from dlp_deploy.runtime import engines as engines_mod
from dlp_deploy.testing import run_cli

needs_deepsparse = pytest.mark.skipif(not engines_mod.deepsparse_available(), reason="deepsparse not installed")
GQA = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2)
QUICK = QuantizeOptions(calib_samples=4, calib_seqlen=64)
CHECK = QualityCheck(seqlen=96, windows=3)


def test_weight_quantization_keeps_zeros_and_bounds():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 32)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0
    w[:, 3] = 0  # an all-zero output channel
    q, scale = quantize_weight(w)
    assert q.dtype == np.int8 and np.all(q[w == 0] == 0) and np.abs(q).max() == 127
    assert np.allclose(q * scale[None], w, atol=scale.max() / 2 + 1e-7)
    scale, zp = activation_qparams(-1.0, 3.0)
    assert zp == 64 and np.isclose(scale * (255 - zp), 3.0, rtol=1e-2)  # zero exactly representable


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, data_root):
    from dlp_deploy.prune.to_folder import prune_to_folder
    from dlp_deploy.prune.pipeline import PruneSettings
    from dlp_deploy.testing import save_tiny

    root = tmp_path_factory.mktemp("int8")
    src = save_tiny(root / "src", seed=4, **GQA)
    prune_to_folder(str(src), root / "pruned", PruneSettings(0.5, "wanda", "dlp", alpha=0.1), nsamples=4, seqlen=32,
                    data_root=str(data_root))
    return root


@needs_deepsparse
def test_int8_export_keeps_the_mask_and_validates_on_every_engine(pruned):
    info = export_deployment(pruned / "pruned", pruned / "int8", seq_len=160, num_cores=1, quantize=QUICK, quality=CHECK)
    sparsity = info["weight_sparsity"]
    assert sparsity["int8"]["mask_preserved"] and sparsity["global"] >= sparsity["pytorch_global"] > 0.49
    q = info["quantization"]
    assert q["matmuls_quantized"] == 4 * 7 and q["lm_head"] == "fp32" and q["smoothquant"]["groups_smoothed"] == 8
    v = info["validation"]
    assert v["exact"] is False and v["quality"]["reference_ppl"] > 1
    for engine in ("onnxruntime", "deepsparse-external", "openvino"):
        assert abs(v[engine]["ppl_vs_reference"]) < 0.05, engine
        assert 0.5 <= v[engine]["greedy_agreement"] <= 1.0
    assert v["deepsparse"]["fraction_of_supported_ops"] == 1.0  # DeepSparse compiles all of the integer graph
    # the int8 weights are in the file, 1 byte each, and they are what the bandwidth ideal counts
    from dlp_deploy.export.onnx import onnx_weight_sparsity

    per = onnx_weight_sparsity(pruned / "int8" / "model.onnx")["per_initializer"]
    assert per["model.layers.0.mlp.down_proj.weight.T"]["bytes_per_weight"] == 1
    assert per["lm_head.weight.T"]["bytes_per_weight"] == 4


def test_int8_fails_validation_beyond_the_ppl_tolerance_and_publishes_nothing(pruned):
    with pytest.raises(ValidationError, match=r"perplexity .* above the PyTorch source's .*tolerance 0%"):
        export_deployment(pruned / "pruned", pruned / "strict", seq_len=160, num_cores=1, quantize=QUICK,
                          quality=QualityCheck(seqlen=96, windows=3, tolerance=0.0), engines=("onnxruntime",))
    assert not (pruned / "strict").exists()


def test_deployment_perplexity_through_an_engine_equals_pytorch(pruned, data_root):
    export_deployment(pruned / "pruned", pruned / "fp32", seq_len=160, validate=False)
    out = pruned / "ev.json"
    proc = run_cli("eval", pruned / "fp32", "--engine", "onnxruntime", "--ppl", "wikitext2", "--seqlen", "128",
                   "--max-windows", "3", "--json", out, "--data-dir", data_root)
    assert proc.returncode == 0, proc.stderr
    engine_ppl = json.loads(out.read_text())["perplexity"]["wikitext2"]
    proc = run_cli("eval", pruned / "pruned", "--ppl", "wikitext2", "--seqlen", "128", "--max-windows", "3",
                   "--json", pruned / "ev-torch.json", "--data-dir", data_root)
    assert proc.returncode == 0, proc.stderr
    torch_ppl = json.loads((pruned / "ev-torch.json").read_text())["perplexity"]["wikitext2"]
    assert engine_ppl == pytest.approx(torch_ppl, rel=1e-4)
    proc = run_cli("eval", pruned / "fp32", "--json", pruned / "x.json")
    assert proc.returncode == 2 and "give --engine" in proc.stderr


def test_sweep_in_both_precisions_reports_both_baselines(tmp_path, data_root):
    from dlp_deploy.pipeline.levels import SweepSettings
    from dlp_deploy.pipeline.sweep import run_sweep
    from dlp_deploy.report.render import make_report
    from dlp_deploy.testing import save_tiny

    model = save_tiny(tmp_path / "tiny", seed=2, **GQA)
    settings = SweepSettings.from_flat(model=str(model), sparsities=[0.5], method="wanda", allocations=["dlp"],
                                       engines=["onnxruntime", "openvino"], nsamples=2, calib_seqlen=32, eval_seqlen=64,
                                       max_windows=2, seq_len=96, validate=False, cores=1, prompt_len=8, gen_len=8,
                                       runs=2, warmup=0, precisions=["fp32", "int8"], rounds=1,
                                       order="shuffle")  # one round: the interleaving is tested in test_bench (CI time)
    result = run_sweep(settings, tmp_path / "run", log=lambda *_: None)
    rows = {(r["label"], r["engine"]): r for r in result["results"] if not r.get("aa_control")}
    assert set(rows) == {(f"{m}{p}", e) for m in ("dense", "wanda-dlp-0.50") for p in ("", ".int8")
                         for e in ("onnxruntime", "openvino")}
    sparse_int8 = rows[("wanda-dlp-0.50.int8", "onnxruntime")]
    assert sparse_int8["precision"] == "int8" and sparse_int8["speedup"]["baseline"] == "dense"
    assert sparse_int8["speedup_vs_int8"]["baseline"] == "dense.int8"
    assert rows[("dense.int8", "onnxruntime")]["speedup_vs_int8"]["decode"] == pytest.approx(1.0)
    # every row carries the deployment's own perplexity (one protocol for both precisions)
    quality = {q["label"]: q for q in result["quality"]}
    deployed = quality["wanda-dlp-0.50"]["deployment_perplexity"]
    assert sparse_int8["perplexity"] == deployed["int8"] and deployed["fp32"]["wikitext2"] > 1
    assert sparse_int8["weights"]["ideal_speedup"] > 4  # a quarter of the bytes, half of them zeros
    md = (make_report([tmp_path / "run"], tmp_path / "report") / "report.md").read_text()
    assert "vs dense INT8" in md and "wanda-dlp-0.50.int8" in md and "AMX-INT8" in md


def test_calibration_reads_a_graph_with_external_data(tmp_path, monkeypatch):
    """Over 2 GB a graph cannot pass through one protobuf (the 1.1B INT8 export failed so): calibration must run
    the graph from its file, weights in the external data file, and see the same ranges as an inline graph."""
    from dlp_deploy.export import onnx as onnx_mod
    from dlp_deploy.export.deployment import _prefill_feeds
    from dlp_deploy.export.onnx import export_onnx
    from dlp_deploy.export.quantize import observe_ranges
    from dlp_deploy.testing import tiny_llama
    import torch

    model = tiny_llama(2)
    (tmp_path / "inline").mkdir()
    export_onnx(model, tmp_path / "inline" / "model.onnx")
    monkeypatch.setattr(onnx_mod, "_PROTOBUF_LIMIT", 0)
    (tmp_path / "external").mkdir()
    assert export_onnx(model, tmp_path / "external" / "model.onnx")["external_data"] is True
    windows = [torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    import onnx

    tensor = next(n.output[0] for n in onnx.load(str(tmp_path / "inline" / "model.onnx")).graph.node
                  if n.op_type == "Mul")
    real_load = onnx.load

    def load_graph_only(path, *args, **kwargs):  # pulling the weights into the proto is what breaks over 2 GB
        assert kwargs.get("load_external_data") is False, "calibration loaded the weights into the protobuf"
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", load_graph_only)
    ranges = {where: observe_ranges(tmp_path / where / "model.onnx", [tensor],
                                    _prefill_feeds(tmp_path / where / "model.onnx", windows))
              for where in ("inline", "external")}
    assert ranges["inline"] == ranges["external"]
    assert sorted(p.name for p in (tmp_path / "external").iterdir()) == ["model.data", "model.onnx"]


def test_int8_folder_over_the_protobuf_limit_holds_only_its_own_weights(tmp_path, monkeypatch, data_root):
    """The fp32 graph calibration runs on must not leave its weights behind (it left 4.4 GB of model.data beside a
    1.1B INT8 graph) nor share a data file with the INT8 graph."""
    from dlp_deploy.export import onnx as onnx_mod
    from dlp_deploy.runtime.decode import generate
    from dlp_deploy.runtime.engines import ENGINES
    from dlp_deploy.testing import save_tiny

    monkeypatch.setattr(onnx_mod, "_PROTOBUF_LIMIT", 0)  # stand-in for a > 2 GB model: both graphs external
    src = save_tiny(tmp_path / "src")
    fp32 = export_deployment(str(src), tmp_path / "fp32", seq_len=64, validate=False)
    int8 = export_deployment(str(src), tmp_path / "int8", seq_len=64, validate=False, data_root=str(data_root),
                             quantize=QuantizeOptions(calib_samples=2, calib_seqlen=32))
    assert fp32["format"]["external_data"] and int8["format"]["external_data"]
    names = sorted(p.name for p in (tmp_path / "int8").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fp32").iterdir())  # no scratch file or folder left
    assert (tmp_path / "int8" / "model.data").stat().st_size < 0.5 * (tmp_path / "fp32" / "model.data").stat().st_size
    tokens = generate(ENGINES["onnxruntime"].compile(tmp_path / "int8" / "model.onnx", 64), [5, 6, 7], 4).tokens
    assert len(tokens) == 4


@pytest.mark.parametrize("tied", [False, True])
def test_pytorch_calibration_sees_what_the_graph_matmuls_read(tmp_path, tied):
    """Static ranges are observed on the PyTorch model's Linear inputs (an inference session on the fp32 graph held
    a second copy of the weights: 21 GB at 1.5B). They must be the ranges of the MatMul inputs of the graph itself,
    as ONNX Runtime sees them, head included (a tied head is a Gemm, not a target)."""
    import torch

    from dlp_deploy.export.deployment import _block_weight_names, _param_name, _prefill_feeds
    from dlp_deploy.export.onnx import export_onnx, load_graph
    from dlp_deploy.export.quantize import activation_ranges, linear_input_ranges, observe_ranges, quant_targets
    from dlp_deploy.testing import tiny_llama

    model = tiny_llama(3, tie_word_embeddings=tied, **GQA)
    path = tmp_path / "model.onnx"
    export_onnx(model, path)
    names = _block_weight_names(model) | {_param_name(model, model.get_output_embeddings().weight)}
    targets = quant_targets(load_graph(path), {f"{n}.T" for n in names} | names)
    assert len(targets) == 4 * 7 + (0 if tied else 1)
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    torch_side = activation_ranges(targets, linear_input_ranges(model, windows, names))
    graph_side = observe_ranges(path, sorted(torch_side), _prefill_feeds(path, windows))
    assert len(torch_side) == 4 * 4 + (0 if tied else 1)  # q/k/v share one input, gate/up another
    for name, (lo, hi) in graph_side.items():
        assert np.allclose(torch_side[name], (lo, hi), rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("static", [True, False])
def test_int8_rewrite_reads_external_weights_one_at_a_time(tmp_path, static):
    """Over 2 GB the fp32 weights are in a data file; the rewrite must read each from there and leave the ones it
    does not quantize where they are (loading them all put a second fp32 copy of a 1.5B model in memory)."""
    import onnx
    from onnx import TensorProto

    from dlp_deploy.export.onnx import initializer_array, load_graph
    from dlp_deploy.export.quantize import (QuantTarget, insert_dynamic_matmul_integer, insert_matmul_integer,
                                            quantize_weight)

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 48)).astype(np.float32)
    proto = _one_matmul_graph(weight)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "spare"))
    onnx.save_model(proto, str(tmp_path / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="g.data", size_threshold=0)
    graph = load_graph(tmp_path / "g.onnx")
    targets = [QuantTarget("mm", "x", "w")]
    if static:
        insert_matmul_integer(graph, targets, {"x": (-3.0, 3.0)}, base_dir=tmp_path)
    else:
        insert_dynamic_matmul_integer(graph, targets, base_dir=tmp_path)
    inits = {i.name: i for i in graph.graph.initializer}
    assert inits["spare"].data_location == TensorProto.EXTERNAL and not inits["spare"].HasField("raw_data")
    assert np.array_equal(initializer_array(inits["w"], tmp_path), quantize_weight(weight)[0])
    assert np.array_equal(initializer_array(inits["spare"], tmp_path),
                          onnx.numpy_helper.to_array(onnx.load(str(tmp_path / "g.onnx")).graph.initializer[1]))


# ---------------------------------------------------------------- dynamic activation scales

def _one_matmul_graph(weight: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, n])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("per_token", [True, False])
def test_dynamic_activation_scales_equal_a_numpy_reference(per_token):
    """Per-token: one scale max|x_row|/127 per row, computed in the graph; the result equals the integer product
    of numpy's quantized rows and columns, rescaled, to float rounding."""
    import onnxruntime as ort

    from dlp_deploy.export.quantize import QuantTarget, insert_dynamic_matmul_integer

    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 24)).astype(np.float32)
    x = rng.normal(size=(1, 7, 48)).astype(np.float32)
    x[0, 2] *= 40  # an outlier token: per-tensor scales suffer from it, per-token ones do not
    proto = _one_matmul_graph(w)
    info = insert_dynamic_matmul_integer(proto, [QuantTarget("mm", "x", "w")], per_token=per_token)
    assert info["activations"].startswith("int8 symmetric, dynamic per " + ("token" if per_token else "tensor"))
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    amax = np.abs(x).max(axis=-1, keepdims=True) if per_token else np.abs(x).max(keepdims=True)
    s_x = (amax / 127).astype(np.float32)
    xq = np.clip(np.rint(x / s_x), -127, 127).astype(np.int64)
    wq, s_w = quantize_weight(w)
    want = (xq @ wq.astype(np.int64)).astype(np.float32) * s_x * s_w
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    err = np.abs(got - x @ w).max(axis=-1)
    if per_token:  # rows other than the outlier keep their own precision
        assert err[0, 0] < 0.05 * np.abs(x[0, 0] @ w).max()


@needs_deepsparse
def test_dynamic_per_token_int8_keeps_the_mask_and_validates_on_every_engine(pruned):
    options = QuantizeOptions(calib_samples=4, calib_seqlen=64, act_scales="dynamic-token")
    info = export_deployment(pruned / "pruned", pruned / "int8-token", seq_len=160, num_cores=1, quantize=options,
                             quality=CHECK)
    assert info["weight_sparsity"]["int8"]["mask_preserved"]
    q = info["quantization"]
    assert q["act_scales"] == "dynamic-token" and q["matmuls_quantized"] == 4 * 7
    v = info["validation"]
    for engine in ("onnxruntime", "deepsparse-external", "openvino"):
        assert abs(v[engine]["ppl_vs_reference"]) < 0.05, engine
        assert v[engine]["greedy_agreement"] > 0.9, engine
    # DeepSparse runs part of the dynamic-scale graph outside its engine: recorded, not refused
    assert 0.5 < v["deepsparse-external"]["fraction_of_supported_ops"] < 1.0
    assert "wrong logits" in v["deepsparse"]["skipped"]  # its internal-cache engine miscomputes this graph


def test_an_engine_scored_through_another_must_compute_what_it_does():
    """DeepSparse's internal cache is scored through its external one (same graph); if their logits disagree, the
    stand-in's perplexity says nothing about it and validation fails instead of passing silently."""
    from dlp_deploy.export.deployment import validation_failures

    stand_in = {"max_abs_logit_diff": 0.015, "greedy_match": True, "ppl": 10.0, "ppl_vs_reference": 0.01}
    scored = {"max_abs_logit_diff": 1.09, "greedy_match": False,
              "quality_scored_on": "deepsparse-external (same graph; the internal cache cannot be scored)"}
    validation = {"exact": False, "logit_tolerance": 1.0, "engines": ["deepsparse", "deepsparse-external"],
                  "deepsparse": scored, "deepsparse-external": stand_in, "full_support_required": False}
    assert any("differ from PyTorch's by 1.09" in f for f in validation_failures(validation))
    scored["max_abs_logit_diff"] = 0.02
    assert validation_failures(validation) == []
