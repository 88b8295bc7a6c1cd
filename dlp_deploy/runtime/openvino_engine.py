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
import os
import re
import sys

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


def matmul_nbits_attributes(onnx_path) -> tuple[set[int], set[int]]:
    """The accuracy levels and block sizes of a graph's MatMulNBits nodes (empty sets: none)."""
    import onnx
    from onnx import helper

    levels, blocks = set(), set()
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            levels.add(int(attrs.get("accuracy_level", 0)))
            blocks.add(int(attrs["block_size"]))
    return levels, blocks


def activation_quantization_config(onnx_path) -> dict:
    """OpenVINO's dynamic activation quantization for a MatMulNBits graph (w8, int4), set to what the graph asks.

    The CPU plugin runs a compressed-weight FullyConnected (u8/u4 weights) either in f32 (weights unpacked into the
    f32 kernel) or, with dynamic_quantization_group_size G > 0 on a CPU with AVX512-VNNI or AVX-VNNI, on oneDNN's
    `brgemm:*_vnni` kernel: activations quantized to int8 per group of G along K at run time and multiplied with
    the u8 weights in integers. Its perf counters name both `brgemm_avx512_f32` (the exec type carries the input
    precision, f32 either way); oneDNN's verbose log and the numerics tell them apart (onednn_matmul_kernels;
    reports/smollm2-135m-quant/OPENVINO_KERNELS.md). The plugin's own default is G = 32 for every such layer.

    - accuracy_level 0 anywhere (the graph asks for fp32 activations): G = 0, the f32 kernel, which matches the
      dequantized weights to 1e-6 where G 32 moved a MatMul's output by 0.5% of its scale.
    - accuracy_level 4 everywhere: G = the graph's block size, as ONNX Runtime's level-4 kernel quantizes
      activations per weight block; the plugin takes G only where it divides the weight block, so the block size
      is the coarsest G that still runs on the integer kernel.
    - no MatMulNBits: {} (the plugin's default touches compressed-weight layers only)."""
    import openvino.properties.hint as hints

    levels, blocks = matmul_nbits_attributes(onnx_path)
    if not levels:
        return {}
    if levels != {4}:
        return {hints.dynamic_quantization_group_size: 0}
    return {hints.dynamic_quantization_group_size: min(blocks)}


def compiled_config(compiled) -> dict:
    """The settings a compiled model really runs with (read back, not what was asked), for the records."""
    import openvino.properties as props
    import openvino.properties.hint as hints

    def read(prop):
        try:
            value = compiled.get_property(prop)
        except RuntimeError:
            return None
        if isinstance(value, (int, float, bool)):
            return value
        return value.get_type_name() if hasattr(value, "get_type_name") else str(value)

    return {"inference_precision": read(hints.inference_precision),
            "dynamic_quantization_group_size": read(hints.dynamic_quantization_group_size),
            "inference_num_threads": read(props.inference_num_threads),
            "performance_mode": read(hints.performance_mode)}


def plain_config(config: dict) -> dict:
    """A compile config as JSON: property names and plain values (enums by name), as OpenVINO also accepts it."""
    return {str(k): v if isinstance(v, (int, float, bool, str)) else getattr(v, "name", str(v))
            for k, v in config.items()}


def _dq_description(config: dict) -> str:
    import openvino.properties.hint as hints

    group = config.get(hints.dynamic_quantization_group_size)
    if group is None:
        return "plugin default"
    return "off" if group == 0 else f"int8 per group of {group}"


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


# oneDNN's verbose line: onednn_verbose,v1,primitive,<create:cache_miss|exec>,cpu,<kind>,<implementation>,<prop>,
# <memory descs>,<attrs>,...
_MATMUL_PRIMITIVES = ("inner_product", "matmul")


def parse_onednn_log(lines) -> dict[str, int]:
    """Counts of `<primitive> <implementation> src:<type> wei:<type>[ int8 activations per G]` over oneDNN verbose
    lines (primitive creation or execution) of MatMul-like primitives (inner_product, matmul). An integer multiply
    shows as s8/u8 src, or as src_dyn_quant_group_size (f32 src quantized to int8 inside the kernel) on a
    *_vnni/*_amx implementation."""
    out: dict[str, int] = {}
    for line in lines:
        fields = line.strip().split(",")
        if len(fields) < 10 or fields[0] != "onednn_verbose" or fields[2] != "primitive":
            continue
        if not (fields[3] == "exec" or fields[3].startswith("create")) or fields[5] not in _MATMUL_PRIMITIVES:
            continue
        kind, impl, descs, attrs = fields[5], fields[6], fields[8], fields[9]
        types = dict(re.findall(r"\b(src|wei):([a-z0-9]+):", descs))
        group = re.search(r"src_dyn_quant_group_size:(\d+)", attrs)
        key = (f"{kind} {impl} src:{types.get('src', '?')} wei:{types.get('wei', '?')}"
               + (f" int8 activations per {group.group(1)}" if group else ""))
        out[key] = out.get(key, 0) + 1
    return out


def integer_kernel_count(onednn: dict[str, int]) -> int:
    """How many of parse_onednn_log's MatMul primitives multiply in integers."""
    return sum(c for key, c in onednn.items()
               if "int8 activations per" in key or re.search(r"src:(s8|u8)\b", key))


def _probe_child(spec_path: str) -> None:
    """In a child with oneDNN's verbose log on: per step, a fresh compile (so every MatMul primitive the step
    runs is created, and logged, during it), a marker, one inference, a marker (C stdio flushed before each, so
    oneDNN's lines land in order)."""
    import ctypes
    import json

    import openvino as ov

    spec = json.loads(open(spec_path, encoding="utf-8").read())
    feeds = np.load(spec["feeds"])
    libc = ctypes.CDLL(None)

    def mark(text: str) -> None:
        libc.fflush(None)
        sys.stdout.flush()
        os.write(1, f"@@dlp {text}\n".encode())

    core = ov.Core()
    for step in spec["steps"]:
        compiled = core.compile_model(core.read_model(spec["onnx"]), "CPU", spec["config"])
        request = compiled.create_infer_request()
        mark("compiled")
        request.infer({k.split("/", 1)[1]: feeds[k] for k in feeds.files if k.startswith(step + "/")})
        mark(f"step {step}")


def onednn_matmul_kernels(onnx_path, feeds: dict[str, dict], config: dict, timeout: float = 600) -> dict | None:
    """parse_onednn_log of the MatMul primitives each named feed's inference creates, compiled with `config` in a
    child process with oneDNN's verbose log on (it prints to stdout for the whole process, so never in an engine
    worker). Creation lines only (ONEDNN_VERBOSE=profile_create): with execution lines on, OpenVINO 2026.4's u4
    FullyConnected intermittently fails ("could not execute a primitive"), which it never does without them.
    None where the OpenVINO build prints no oneDNN log."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onednn-probe-") as tmp:
        arrays = {f"{step}/{name}": value for step, feed in feeds.items() for name, value in feed.items()}
        np.savez(f"{tmp}/feeds.npz", **arrays)
        spec = {"onnx": str(onnx_path), "feeds": f"{tmp}/feeds.npz", "steps": list(feeds),
                "config": plain_config(config)}
        with open(f"{tmp}/spec.json", "w", encoding="utf-8") as fh:
            json.dump(spec, fh)
        env = {**os.environ, "ONEDNN_VERBOSE": "profile_create"}
        done = subprocess.run([sys.executable, "-m", __name__, f"{tmp}/spec.json"], env=env, capture_output=True,
                              text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"oneDNN probe failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    if "onednn_verbose" not in done.stdout:
        return None
    out, lines = {}, []
    for line in done.stdout.splitlines():
        if line == "@@dlp compiled":
            lines = []
        elif line.startswith("@@dlp step "):
            out[line.split(" ", 2)[2]] = parse_onednn_log(lines)
        else:
            lines.append(line)
    return out


def openvino_kernel_record(onnx_path, feeds: dict[str, dict], num_cores: int | None = None,
                           onednn: bool = True) -> dict:
    """matmul_kernels after one inference of each named feed (e.g. a prefill and a one-token step), compiled as
    the engine compiles a deployment, the settings it ran with, and (onednn) the oneDNN kernels that ran the
    MatMuls, with the count that multiplied in integers: the perf counters' exec types cannot say that."""
    import openvino as ov

    core = ov.Core()
    asked = activation_quantization_config(onnx_path)
    config = {**openvino_config(num_cores, None, True), **asked}
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
    out = {"openvino": ov.__version__, "dynamic_activation_quantization": _dq_description(asked),
           "config": compiled_config(compiled)}
    for name, feed in feeds.items():
        request = compiled.create_infer_request()
        request.infer(feed)
        out[name] = matmul_kernels(compiled, request)
    if onednn:
        found = onednn_matmul_kernels(onnx_path, feeds, config)
        for name in feeds:
            kernels = (found or {}).get(name)
            out[name]["onednn"] = kernels
            out[name]["integer_matmuls"] = None if kernels is None else integer_kernel_count(kernels)
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
        self._asked = activation_quantization_config(onnx_path)
        config = {**openvino_config(num_cores, sparse_rate, True), **self._asked}
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
        """Executed kernel types of the MatMul/FullyConnected nodes (FullyConnectedCompressed included) from the
        last inference's counters, and the settings the model was compiled with (the dynamic activation
        quantization group among them: whether w8/int4 layers multiply in int8 is set there, and their exec type
        reads the same either way)."""
        exec_types: dict[str, int] = {}
        for info in self._request.profiling_info:
            if "MatMul" in info.node_type or "FullyConnected" in info.node_type:
                exec_types[info.exec_type] = exec_types.get(info.exec_type, 0) + 1
        return {"matmul_exec_types": exec_types,
                "sparse_kernel_used": any("sparse" in t for t in exec_types),
                "sparse_rate": self.sparse_rate,
                "dynamic_activation_quantization": _dq_description(self._asked),
                "config": compiled_config(self._compiled)}


if __name__ == "__main__":  # onednn_matmul_kernels' child
    _probe_child(sys.argv[1])
