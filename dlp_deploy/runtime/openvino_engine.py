"""OpenVINO's CPU plugin as an engine: the maintained one (DeepSparse 1.8 is end-of-life and evaluation-only).

It reads the deployment's model.onnx directly and runs it with dynamic shapes, so the cache grows one slot per
token as in ONNX Runtime. Precision is pinned to f32 (on CPUs with AMX or AVX512-BF16 OpenVINO would otherwise
run fp32 graphs in bf16 by default and quietly change the numerics). For INT8 deployments the sparse-weights
path (`CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE`) is switched on where the CPU has AMX-INT8, the only ISA with
OpenVINO's sparse INT8 kernel; the executed kernel types are read back from the performance counters, so a result
says whether a sparse kernel really ran.
"""
from __future__ import annotations

import importlib.util

import numpy as np

OPENVINO_MISSING = "openvino is not installed; `pip install openvino` (or use --engine onnxruntime)"


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def has_amx_int8() -> bool:
    from ..provenance import machine_info

    return "amx_int8" in machine_info().get("isa", [])


def openvino_config(num_cores: int | None, sparse_rate: float | None = None, perf_counters: bool = False) -> dict:
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {hints.performance_mode: hints.PerformanceMode.LATENCY,
              hints.inference_precision: "f32", props.enable_profiling: perf_counters}
    if num_cores:
        config[props.inference_num_threads] = int(num_cores)
    if sparse_rate is not None:
        config["CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE"] = float(sparse_rate)
    return config


def weight_only_config(onnx_path) -> dict:
    """For a weight-only INT4 graph (MatMulNBits): OpenVINO's CPU plugin by default quantizes the activations of
    every compressed-weight FullyConnected to int8 at run time (dynamic_quantization_group_size 32), which moved
    logits by 0.5% of their scale on a single 64x48 MatMulNBits (tests/test_int4.py) where ONNX Runtime at
    accuracy_level 0 matches the dequantized weights to 1e-5. It is kept only where the graph asks for int8
    activations itself (accuracy_level 4, where ONNX Runtime's outputs and OpenVINO's default ones agree to 1e-4),
    so both engines compute what the graph says."""
    import onnx
    import openvino.properties.hint as hints
    from onnx import helper

    levels = {helper.get_attribute_value(a) for n in onnx.load(str(onnx_path), load_external_data=False).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    if not levels or levels == {4}:
        return {}
    return {hints.dynamic_quantization_group_size: 0}


def matmul_kernels(compiled, request) -> dict:
    """What ran the MatMuls in the last inference: counts of node type: exec type of every MatMul or
    FullyConnected (FullyConnectedCompressed: weights kept compressed) from the perf counters, and the weight
    precisions of the FullyConnected layers in the compiled (runtime) model."""
    kernels: dict[str, int] = {}
    for info in request.profiling_info:
        if "MatMul" in info.node_type or "FullyConnected" in info.node_type:
            key = f"{info.node_type}: {info.exec_type}"
            kernels[key] = kernels.get(key, 0) + 1
    weights: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        if op.get_rt_info()["layerType"].astype(str) == "FullyConnected":
            key = str(op.input(1).get_element_type().get_type_name())
            weights[key] = weights.get(key, 0) + 1
    return {"kernels": kernels, "fully_connected_weight_types": weights}


def openvino_kernel_record(onnx_path, feeds: dict[str, dict], num_cores: int | None = None) -> dict:
    """matmul_kernels after one inference of each named feed (e.g. a prefill and a one-token step), compiled as
    the engine compiles a deployment."""
    import openvino as ov

    core = ov.Core()
    config = {**openvino_config(num_cores, None, True), **weight_only_config(onnx_path)}
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
    out = {"openvino": ov.__version__, "dynamic_activation_quantization": "off" if weight_only_config(onnx_path)
           else "plugin default"}
    for name, feed in feeds.items():
        request = compiled.create_infer_request()
        request.infer(feed)
        out[name] = matmul_kernels(compiled, request)
    return out


class OpenVinoSessionMixin:
    """The engine part; the cache handling comes from the growing-cache base it is combined with."""

    name = "openvino"
    internal_cache = False

    def _open(self, onnx_path, num_cores: int | None, sparse_rate: float | None = None) -> None:
        import openvino as ov

        self.sparse_rate = sparse_rate
        core = ov.Core()
        model = core.read_model(str(onnx_path))
        config = {**openvino_config(num_cores, sparse_rate, True), **weight_only_config(onnx_path)}
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._outputs = list(self._compiled.outputs)

    def prepare(self, length: int) -> None:
        """Dynamic shapes: nothing to compile per length."""

    def run(self, input_ids, attention_mask, positions, causal_mask, past_kv):
        feed = dict(zip(self.io.input_names, (input_ids, attention_mask, positions, causal_mask, *past_kv)))
        self._request.infer(feed, share_inputs=True)
        # copies: OpenVINO reuses its output buffers on the next infer
        logits, *present = (np.array(self._request.get_tensor(o).data) for o in self._outputs)
        return logits, present

    def kernel_report(self) -> dict:
        """Executed kernel types of the MatMul/FullyConnected nodes from the last inference's counters."""
        exec_types: dict[str, int] = {}
        for info in self._request.profiling_info:
            if info.node_type in ("FullyConnected", "MatMul"):
                exec_types[info.exec_type] = exec_types.get(info.exec_type, 0) + 1
        return {"matmul_exec_types": exec_types,
                "sparse_kernel_used": any("sparse" in t for t in exec_types),
                "sparse_rate": self.sparse_rate}
