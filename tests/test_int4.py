"""INT4 weight-only deployments (issue 24): MatMulNBits packing against a plain numpy reference, the graph on ONNX
Runtime and OpenVINO against the dequantized model, pruned zeros kept, DeepSparse refused, the CLI record."""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import json

import numpy as np
import pytest
import torch

from dlp_deploy.export.deployment import QualityCheck, QuantizeOptions, export_deployment
from dlp_deploy.export.int4 import dequantize, insert_matmul_nbits, int4_weights, quantize_matmul_weight
from dlp_deploy.testing import assert_one_line_error, run_cli

CHECK = QualityCheck(seqlen=96, windows=3)


def numpy_blockwise_qdq(w: np.ndarray, block: int, scheme: str, bits: int = 4) -> np.ndarray:
    """Quantize-dequantize one column block at a time, written out plainly (8 bits, sym: q8_0's grid)."""
    top, half = 2.0 ** bits - 1, 2.0 ** (bits - 1)  # 15 and 8 for 4 bits
    out = np.zeros_like(w)
    for n in range(w.shape[1]):
        for k0 in range(0, w.shape[0], block):
            x = w[k0:k0 + block, n]
            if scheme == "minmax":
                lo, hi = x.min(), x.max()
                s = np.float32((hi - lo) / top) if hi > lo else np.float32(1)
                out[k0:k0 + block, n] = np.clip(np.rint((x - lo) / s), 0, top) * s + lo
            elif scheme == "sym":
                extreme = x[np.argmax(np.abs(x))]
                s = np.float32(extreme / -half) if extreme else np.float32(1)
                out[k0:k0 + block, n] = np.clip(np.rint(x / s), -half, half - 1) * s
            else:
                lo, hi = min(x.min(), 0), max(x.max(), 0)
                s = np.float32((hi - lo) / top) if hi > lo else np.float32(1)
                zp = np.clip(np.rint(-lo / s), 0, top)
                out[k0:k0 + block, n] = (np.clip(np.rint(x / s) + zp, 0, top) - zp) * s
    return out


@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("block", [32, 128])
def test_packing_round_trips_against_numpy(scheme, block):
    symmetric = scheme == "sym"
    rng = np.random.default_rng(block)
    k, n = 160, 37  # K not a multiple of 128 (the last block padded), odd N
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    w[:, 5] = 0  # an all-zero column
    bq = quantize_matmul_weight(w, block, scheme)
    n_blocks = -(-k // block)
    assert bq.packed.dtype == np.uint8 and bq.packed.shape == (n, n_blocks, block // 2)
    assert bq.scales.shape == (n * n_blocks,)
    assert (bq.zero_points is None) == symmetric
    if not symmetric:
        assert bq.zero_points.shape == (n * -(-n_blocks // 2),)
    got = dequantize(bq)
    want = numpy_blockwise_qdq(w, block, scheme)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.all(got[w == 0] == 0)  # every zero an exact zero
    scales = np.abs(bq.scales).reshape(n, n_blocks)
    err = np.abs(got - w).reshape(-1, n)  # within one step of each block's grid
    assert err.max() <= scales.max() + 1e-6 and np.abs(got - w).mean() < 0.1 * np.abs(w).mean() * 4
    # the nibble order ORT reads: element 2j of a block in the low nibble, 2j+1 in the high one
    zp = 8 if symmetric else bq.zero_points[0] & 0x0F
    q = np.clip(np.rint(w[:2, 0] / bq.scales[0]) + zp, 0, 15).astype(np.uint8)
    assert bq.packed[0, 0, 0] == q[0] | (q[1] << 4)


@pytest.mark.parametrize("block", [32, 128])
def test_minmax_round_trips_and_reproduces_weights_already_on_its_grid(block):
    rng = np.random.default_rng(block)
    w = rng.normal(size=(160, 37)).astype(np.float32)
    bq = quantize_matmul_weight(w, block, "minmax")
    n_blocks = -(-160 // block)
    assert bq.zero_points.dtype == np.float32 and bq.zero_points.shape == (37 * n_blocks,)
    q4 = dequantize(bq)
    np.testing.assert_allclose(q4, numpy_blockwise_qdq(w, block, "minmax"), rtol=0, atol=1e-5)
    # weights on a min + q * d grid (a Q4_1 GGUF's, as SmolLM2 ships) come back as they are; the grids that hold 0
    # round them again
    np.testing.assert_allclose(dequantize(quantize_matmul_weight(q4, block, "minmax")), q4, rtol=0, atol=1e-5)
    for scheme in ("sym", "asym"):
        assert np.abs(dequantize(quantize_matmul_weight(q4, block, scheme)) - q4).max() > 1e-2


def _int4_graph(tmp_path, scheme: str, block: int = 32):
    import onnx

    from dlp_deploy.export.deployment import _block_weight_names
    from dlp_deploy.export.onnx import export_onnx, save_model
    from dlp_deploy.export.quantize import quant_targets
    from dlp_deploy.testing import tiny_llama

    model = tiny_llama(3)
    export_onnx(model, tmp_path / "fp32.onnx", max_positions=512)
    proto = onnx.load(str(tmp_path / "fp32.onnx"))
    names = _block_weight_names(model)
    targets = quant_targets(proto, {f"{n}.T" for n in names})
    info = insert_matmul_nbits(proto, targets, block, scheme, accuracy_level=0)
    save_model(proto, tmp_path / "int4.onnx")
    # the same fp32 graph with each weight replaced by what the INT4 one dequantizes to
    reference = onnx.load(str(tmp_path / "fp32.onnx"))
    dequantized = int4_weights(proto)
    for init in reference.graph.initializer:
        if init.name in dequantized:
            init.CopyFrom(onnx.numpy_helper.from_array(dequantized[init.name].astype(np.float32), init.name))
    save_model(reference, tmp_path / "dequantized.onnx")
    return info, len(targets)


@pytest.mark.parametrize("scheme", ["sym", "asym", "minmax"])
def test_int4_graph_matches_the_dequantized_model_on_onnxruntime_and_openvino(tmp_path, scheme):
    import onnxruntime as ort

    from dlp_deploy.export.deployment import _prefill_feeds
    from dlp_deploy.runtime.openvino_engine import (openvino_available, openvino_config, openvino_kernel_record,
                                                    activation_quantization_config)

    info, n_targets = _int4_graph(tmp_path, scheme)
    assert info["matmuls_quantized"] == n_targets == 4 * 7 and info["matmuls_with_a_padded_block"] == 0
    feed = _prefill_feeds(tmp_path / "int4.onnx", [torch.arange(3, 40)])[0]

    def logits(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]

    want, got, fp32 = logits(tmp_path / "dequantized.onnx"), logits(tmp_path / "int4.onnx"), \
        logits(tmp_path / "fp32.onnx")
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-4 * scale  # accuracy_level 0: the dequantized weights, fp32 sums
    assert np.abs(fp32 - want).max() > 100 * np.abs(got - want).max()  # ...and 4-bit weights do move logits
    if not openvino_available():
        pytest.skip("openvino not installed")
    import openvino as ov

    config = {**openvino_config(None, None, False), **activation_quantization_config(tmp_path / "int4.onnx")}
    compiled = ov.Core().compile_model(str(tmp_path / "int4.onnx"), "CPU", config)
    ov_logits = compiled(feed)[compiled.outputs[0]]
    # OpenVINO reads com.microsoft MatMulNBits; with its default int8 activation quantization switched off it
    # computes what ONNX Runtime does
    assert np.abs(ov_logits - want).max() < 1e-4 * scale
    record = openvino_kernel_record(tmp_path / "int4.onnx", {"prefill": feed})
    assert record["dynamic_activation_quantization"] == "off"
    kernels = record["prefill"]["kernels"]
    compressed = sum(c for k, c in kernels.items() if k.startswith("FullyConnectedCompressed"))
    assert compressed == n_targets, kernels  # every INT4 MatMul on a compressed-weight kernel, none decompressed
    assert record["prefill"]["fully_connected_weight_types"].get("u4") == n_targets


def _masked_tiny(folder, seed=5):
    from dlp_deploy.testing import tiny_llama, tiny_tokenizer

    model = tiny_llama(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.mul_((torch.rand(p.shape, generator=gen) > 0.5).to(p.dtype))
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_pruned_model_keeps_every_zero_under_symmetric_int4_and_validates(tmp_path, data_root):
    src = _masked_tiny(tmp_path / "src")
    info = export_deployment(str(src), tmp_path / "int4", seq_len=160, num_cores=1, data_root=str(data_root),
                             quantize=QuantizeOptions("int4", group_size=32), quality=CHECK)
    sparsity = info["weight_sparsity"]
    assert sparsity["int4"]["mask_preserved"] and sparsity["int4"]["pruned_weights_not_exact_zero"] == 0
    assert sparsity["global"] >= sparsity["pytorch_global"] > 0.45
    q = info["quantization"]
    assert (q["scheme"], q["bits"], q["block_size"], q["symmetric"], q["accuracy_level"]) == ("int4", 4, 32, True, 0)
    assert q["lm_head"] == "fp32" and q["matmuls_quantized"] == 4 * 7
    v = info["validation"]
    assert v["exact"] is False
    for engine in ("onnxruntime", "openvino"):
        assert v[engine]["ppl_vs_reference"] < 0.10 and v[engine]["greedy_agreement"] > 0.8, engine
    for engine in ("deepsparse", "deepsparse-external"):
        assert "runs no 4-bit weights" in v[engine]["skipped"] and "onnxruntime or openvino" in v[engine]["skipped"]
    kernels = q["openvino_kernels"]["one_token"]["kernels"]
    assert sum(c for k, c in kernels.items() if k.startswith("FullyConnectedCompressed")) == 4 * 7

    from dlp_deploy.errors import UserError
    from dlp_deploy.runtime.deployment import load_deployment

    with pytest.raises(UserError, match="cannot run the INT4 deployment .* use|onnxruntime or openvino"):
        load_deployment(tmp_path / "int4").check_engine("deepsparse")
    load_deployment(tmp_path / "int4").check_engine("openvino")


@pytest.mark.parametrize("scheme", ["asym", "minmax"])
def test_asymmetric_int4_counts_pruned_weights_that_are_not_exact_zeros(tmp_path, data_root, scheme):
    src = _masked_tiny(tmp_path / "src")
    info = export_deployment(str(src), tmp_path / "int4", seq_len=64, validate=False, data_root=str(data_root),
                             quantize=QuantizeOptions("int4", group_size=128, int4_scheme=scheme), quality=None)
    record = info["weight_sparsity"]["int4"]
    pruned = round(info["weight_sparsity"]["pytorch_global"] * info["weight_sparsity"]["block_params"])
    if scheme == "asym":  # the zero point is an integer and the range holds 0: a zero lands on it exactly
        assert record["pruned_weights_not_exact_zero"] == 0 and record["mask_preserved"]
    else:  # 0 is not on a min + q * d grid: nearly every pruned weight is a small non-zero, counted, not refused
        assert 0.9 * pruned < record["pruned_weights_not_exact_zero"] <= pruned and not record["mask_preserved"]
    assert f"{scheme}: zeros are checked and counted" in record["note"]
    q = info["quantization"]
    assert (q["int4_scheme"], q["symmetric"], q["block_size"]) == (scheme, False, 128)
    assert q["matmuls_with_a_padded_block"] == 4 * 6  # every input of 64; down_proj's is 128


def test_cli_exports_int4_and_records_it(tiny_dir, tmp_path):
    out = tmp_path / "int4"
    proc = run_cli("export", tiny_dir, "--out", out, "--seq-len", "64", "--no-validate", "--quantize", "int4",
                   "--group-size", "64")
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "export.json").read_text())
    q = info["quantization"]
    assert (q["scheme"], q["block_size"], q["symmetric"], q["accuracy_level"]) == ("int4", 64, True, 0)
    assert info["weight_sparsity"]["int4"]["mask_preserved"]
    assert info["provenance"]
    import onnx

    inits = onnx.load(str(out / "model.onnx")).graph.initializer
    block_params = info["weight_sparsity"]["block_params"]
    assert sum(len(i.raw_data) for i in inits if i.name.endswith(".q4")) == block_params // 2  # 4 bits a weight
    assert sum(len(i.raw_data) for i in inits if i.name.endswith(".q4_scales")) == block_params // 64 * 4
    assert not any(i.name.endswith(".q4_zero_points") for i in inits)  # symmetric: ORT's implicit zero point 8
    bad = run_cli("export", tiny_dir, "--out", tmp_path / "bad", "--no-validate", "--quantize", "int4",
                  "--group-size", "48")
    assert_one_line_error(bad, "--group-size 48", "32, 64, 128")


def test_int8_export_records_which_openvino_kernels_run_its_matmuls(tiny_dir, tmp_path, data_root):
    """The kernel record is not INT4's alone: an INT8 MatMulInteger graph gets one too (issue 24 asks whether
    OpenVINO runs it on integer kernels)."""
    from dlp_deploy.runtime.openvino_engine import openvino_available

    if not openvino_available():
        pytest.skip("openvino not installed")
    info = export_deployment(str(tiny_dir), tmp_path / "int8", seq_len=64, validate=False, data_root=str(data_root),
                             quantize=QuantizeOptions(calib_samples=2, calib_seqlen=32, act_scales="dynamic-token"))
    record = info["quantization"]["openvino_kernels"]
    assert record["dynamic_activation_quantization"] == "plugin default"  # not an INT4 graph: left alone
    for step in ("prefill", "one_token"):
        kernels = record[step]["kernels"]
        # the 28 block MatMuls and lm_head, whichever kernel ran them, and the 8 attention MatMuls
        assert sum(c for k, c in kernels.items() if k.startswith("FullyConnected")) == 4 * 7 + 1, kernels
        assert sum(record[step]["fully_connected_weight_types"].values()) == 4 * 7 + 1


def test_a_sweep_pairs_int4_with_the_engines_that_run_it():
    from dlp_deploy.pipeline.levels import runs_on

    assert runs_on("onnxruntime", "int4") and runs_on("openvino", "int4")
    assert not runs_on("deepsparse", "int4") and not runs_on("deepsparse-external", "int4")
    assert runs_on("deepsparse", "int8")


def _one_matmul_nbits(tmp_path, bits: int, level: int, seed: int):
    """A graph of one MatMulNBits (K 256, N 48, blocks of 32, symmetric), a 5-token input, the product with the
    dequantized weight, and the outputs of ONNX Runtime and OpenVINO (compiled as the openvino engine does)."""
    import onnx
    import onnxruntime as ort
    import openvino as ov
    from onnx import TensorProto, helper, numpy_helper

    from dlp_deploy.runtime.openvino_engine import openvino_config, activation_quantization_config

    rng = np.random.default_rng(seed)
    k, n = 256, 48
    bq = quantize_matmul_weight(rng.normal(size=(k, n)).astype(np.float32), 32, "sym", bits=bits)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=32, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, n])],
                              [numpy_helper.from_array(bq.packed, "b"), numpy_helper.from_array(bq.scales, "s")])
    path = tmp_path / "one.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(path))
    x = rng.normal(size=(1, 5, k)).astype(np.float32)
    got_ort = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    compiled = ov.Core().compile_model(str(path), "CPU", {**openvino_config(None), **activation_quantization_config(path)})
    return path, x, x @ dequantize(bq), got_ort, compiled({"x": x})[compiled.outputs[0]]


@pytest.mark.parametrize("level", [0, 4])
def test_accuracy_level_means_the_same_on_onnxruntime_and_openvino(tmp_path, level):
    """Level 4 quantizes activations to int8 per block at run time in ONNX Runtime; OpenVINO's CPU plugin does the
    same by default (dynamic quantization, group 32), which the engine keeps only for level-4 graphs."""
    from dlp_deploy.runtime.openvino_engine import openvino_available

    if not openvino_available():
        pytest.skip("openvino not installed")
    _, _, want, got_ort, got_ov = _one_matmul_nbits(tmp_path, 4, level, seed=0)
    scale = np.abs(want).max()
    assert np.abs(got_ov - got_ort).max() < 1e-4 * scale  # the two engines agree at either level
    if level == 0:
        assert np.abs(got_ort - want).max() < 1e-5 * scale
    else:  # int8 activations: a visible, bounded error
        assert 1e-3 * scale < np.abs(got_ort - want).max() < 2e-2 * scale


# ---------------------------------------------------------------- w8: the same MatMulNBits with bits=8

@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_w8_packing_round_trips_against_numpy(scheme):
    rng = np.random.default_rng(8)
    k, n = 160, 37
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    bq = quantize_matmul_weight(w, 32, scheme, bits=8)
    assert bq.packed.dtype == np.uint8 and bq.packed.shape == (n, 5, 32)  # one value a byte
    if scheme == "asym":
        assert bq.zero_points.shape == (n * 5,)  # one zero point a byte
    got = dequantize(bq)
    np.testing.assert_allclose(got, numpy_blockwise_qdq(w, 32, scheme, bits=8), rtol=0, atol=1e-6)
    assert np.all(got[w == 0] == 0)
    # 8 bits: 16x finer than the 4-bit grid on the same blocks
    err8 = np.abs(got - w).mean()
    err4 = np.abs(dequantize(quantize_matmul_weight(w, 32, scheme)) - w).mean()
    assert err8 < err4 / 8


@pytest.mark.parametrize("level", [0, 4])
def test_w8_graph_matches_its_dequantized_weights_on_onnxruntime_and_openvino(tmp_path, level):
    from dlp_deploy.runtime.openvino_engine import openvino_kernel_record

    path, x, want, got_ort, got_ov = _one_matmul_nbits(tmp_path, 8, level, seed=1)
    scale = np.abs(want).max()
    if level == 0:
        assert np.abs(got_ort - want).max() < 1e-5 * scale and np.abs(got_ov - want).max() < 1e-4 * scale
    else:  # int8 activations per block at run time, in both engines
        assert 1e-4 * scale < np.abs(got_ort - want).max() < 2e-2 * scale
        assert np.abs(got_ov - want).max() < 2e-2 * scale
    record = openvino_kernel_record(path, {"prefill": {"x": x}})
    kernels = record["prefill"]["kernels"]
    assert sum(c for key, c in kernels.items() if key.startswith("FullyConnectedCompressed")) == 1, kernels
    assert set(record["prefill"]["fully_connected_weight_types"]) <= {"u8", "i8"}, record  # 8-bit weights kept


def test_pruned_model_keeps_every_zero_under_w8_and_validates_within_one_percent(tmp_path, data_root):
    src = _masked_tiny(tmp_path / "src")
    info = export_deployment(str(src), tmp_path / "w8", seq_len=160, num_cores=1, data_root=str(data_root),
                             quantize=QuantizeOptions("w8"), quality=CHECK)
    sparsity = info["weight_sparsity"]
    assert sparsity["w8"]["mask_preserved"] and sparsity["w8"]["pruned_weights_not_exact_zero"] == 0
    q = info["quantization"]
    assert (q["scheme"], q["bits"], q["block_size"], q["symmetric"], q["accuracy_level"]) == ("w8", 8, 32, True, 4)
    v = info["validation"]
    for engine in ("onnxruntime", "openvino"):
        assert abs(v[engine]["ppl_vs_reference"]) < 0.01 and v[engine]["greedy_agreement"] > 0.95, (engine, v)
    assert "blockwise 8-bit" in v["deepsparse"]["skipped"]
    kernels = q["openvino_kernels"]["one_token"]["kernels"]
    assert sum(c for k, c in kernels.items() if k.startswith("FullyConnectedCompressed")) == 4 * 7, kernels

    from dlp_deploy.pipeline.levels import runs_on

    assert runs_on("onnxruntime", "w8") and runs_on("openvino", "w8") and not runs_on("deepsparse", "w8")


def test_bench_runs_each_deployment_on_the_engines_that_run_it_and_names_the_rest(tmp_path):
    """A w8 folder beside an fp32 one on DeepSparse and ONNX Runtime: the w8 pair on DeepSparse is not run (named
    with DeepSparse's reason), the others are measured; a folder that no given engine runs is refused in one
    line."""
    from dlp_deploy.bench.run import runnable_pairs
    from dlp_deploy.bench.harness import BenchSettings
    from dlp_deploy.errors import UserError
    from dlp_deploy.runtime.deployment import Deployment

    fp32 = Deployment(tmp_path / "fp32", tmp_path / "fp32" / "model.onnx", {})
    w8 = Deployment(tmp_path / "w8", tmp_path / "w8" / "model.onnx", {"quantization": {"scheme": "w8"}})
    plan = [(d, BenchSettings(e)) for d in (fp32, w8) for e in ("deepsparse", "onnxruntime")]
    keep, not_run = runnable_pairs(plan)
    assert [(d.folder.name, s.engine) for d, s in keep] == [("fp32", "deepsparse"), ("fp32", "onnxruntime"),
                                                             ("w8", "onnxruntime")]
    assert [(u["label"], u["engine"]) for u in not_run] == [("w8", "deepsparse")]
    assert "blockwise 8-bit" in not_run[0]["reason"]
    with pytest.raises(UserError, match="cannot run the w8 deployment"):
        runnable_pairs([(w8, BenchSettings("deepsparse"))])
    # dynamic activation scales: DeepSparse's internal-cache engine is refused, its external cache is not
    dynamic = Deployment(tmp_path / "dyn", tmp_path / "dyn" / "model.onnx",
                         {"quantization": {"scheme": "int8", "act_scales": "dynamic-token"}})
    static = Deployment(tmp_path / "st", tmp_path / "st" / "model.onnx", {"quantization": {"act_scales": "static"}})
    keep, not_run = runnable_pairs([(d, BenchSettings("deepsparse", external_cache=ext))
                                    for d in (dynamic, static) for ext in (False, True)])
    assert [(d.folder.name, s.session_kind) for d, s in keep] == [("dyn", "deepsparse-external"),
                                                                  ("st", "deepsparse"), ("st", "deepsparse-external")]
    assert "wrong logits for dynamic activation scales" in not_run[0]["reason"]


def test_the_bench_aa_control_covers_every_engine(tmp_path):
    """bench loads a deployment once per (folder, engine) pair: the A/A control is the first dense folder again on
    every engine (it was on the first engine only, since the pairs' objects differ)."""
    from dlp_deploy.bench.harness import BenchSettings
    from dlp_deploy.bench.run import _aa_plan
    from dlp_deploy.runtime.deployment import Deployment

    def load(name, sparsity):
        return Deployment(tmp_path / name, tmp_path / name / "model.onnx",
                          {"weight_sparsity": {"global": sparsity, "pytorch_global": sparsity}})

    plan = [(load(name, s), BenchSettings(e)) for name, s in (("dense", 0.0), ("dlp", 0.5))
            for e in ("deepsparse", "onnxruntime", "openvino")]
    aa = _aa_plan(plan)
    assert [(d.folder.name, s.engine) for d, s in aa] == [("dense", "deepsparse"), ("dense", "onnxruntime"),
                                                         ("dense", "openvino")]
    # a GGUF folder runs on llama.cpp only: that engine's control is its own first dense folder, not none
    plan += [(load(name, s), BenchSettings("llamacpp")) for name, s in (("dlp-q4", 0.5), ("peer-q4", 0.0),
                                                                          ("peer-q8", 0.0))]
    assert [(d.folder.name, s.engine) for d, s in _aa_plan(plan)] == [
        ("dense", "deepsparse"), ("dense", "onnxruntime"), ("dense", "openvino"), ("peer-q4", "llamacpp")]
