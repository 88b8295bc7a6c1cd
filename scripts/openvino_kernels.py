"""Which kernels OpenVINO's CPU plugin runs each quantized MatMul form on, per dynamic-quantization setting, how far
its output is from the numpy reference, and how long one call takes (issue 24; reports/smollm2-135m-quant/
OPENVINO_KERNELS.md is this script's output).

One MatMul of K x N (default 4096 x 4096) with a dynamic token axis, as the exported decoders have, in each form the
project writes: fp32 MatMul; INT8 MatMulInteger with a static per-tensor or a dynamic per-token activation scale
(export/quantize.py); w8 and int4 g32 MatMulNBits at accuracy_level 0 and 4 (export/int4.py). Each is compiled as
the openvino engine compiles a deployment (runtime/openvino_engine.openvino_config: f32, LATENCY, the thread count
given) plus each DYNAMIC_QUANTIZATION_GROUP_SIZE setting. Reported per cell: the perf counters' node type and exec
type of the MatMul node, the FullyConnected weight precision of the runtime model, max |error| against the numpy
reference (x @ the weight the graph encodes, dequantized, in float64) relative to max |reference|, and the median
latency of one call (decode: 1 token; prefill: --prefill tokens).

    .venv/bin/python scripts/openvino_kernels.py --k 4096 --n 4096 --iters 300 --threads 1 --out FILE.md
    (or in parts: --forms "fp32,int8 static" --out FILE.md, then --forms ... --out FILE.md --append)

Waits while /tmp/bench.lock exists (another benchmark owns the CPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LOCK = Path("/tmp/bench.lock")
CONFIGS = {"default": None, "dq 0": 0, "dq 32": 32, "dq 64": 64, "dq 128": 128}


def wait_for_quiet_cpu() -> None:
    while LOCK.exists():
        print("bench.lock present: waiting", file=sys.stderr)
        time.sleep(60)


def build_forms(folder: Path, k: int, n: int, seed: int = 0) -> dict:
    """form name -> (onnx path, the [K, N] float64 weight the graph computes with, activation fn or None).
    The activation fn gives what the graph does to x before the integer MatMul (static/dynamic INT8), so the
    reference is exact for the graph as written; None: x is used as is (fp32 and MatMulNBits reference)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dlp_deploy.export.int4 import insert_matmul_nbits, int4_weights
    from dlp_deploy.export.quantize import (activation_qparams, insert_dynamic_matmul_integer,
                                            insert_matmul_integer, quant_targets, quantize_weight)

    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)

    def fp32_graph():
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", n])],
                                  [numpy_helper.from_array(w, "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    forms = {}

    def save(name, proto, weight, act=None):
        path = folder / f"{name.replace(' ', '_')}.onnx"
        onnx.save(proto, str(path))
        forms[name] = (path, weight.astype(np.float64), act)

    save("fp32", fp32_graph(), w)
    q, s = quantize_weight(w)
    w_int8 = q.astype(np.float32) * s[None, :]
    # static: the range the calibration would see on N(0, 1) activations
    lo, hi = -4.0, 4.0
    proto = fp32_graph()
    insert_matmul_integer(proto, quant_targets(proto, {"w"}), {"x": (lo, hi)})
    sx, zp = activation_qparams(lo, hi)
    save("int8 static", proto, w_int8,
         lambda x: (np.clip(np.rint(x / sx) + int(zp), 0, 255) - int(zp)) * np.float64(sx))
    proto = fp32_graph()
    insert_dynamic_matmul_integer(proto, quant_targets(proto, {"w"}), per_token=True)

    def per_token(x):
        scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-8).astype(np.float32) / np.float32(127)
        return np.clip(np.rint(x / scale), -127, 127) * scale.astype(np.float64)

    save("int8 dynamic-token", proto, w_int8, per_token)
    for bits, form in ((8, "w8"), (4, "int4 g32")):
        for level in (0, 4):
            proto = fp32_graph()
            insert_matmul_nbits(proto, quant_targets(proto, {"w"}), 32, "sym", level, bits)
            save(f"{form} L{level}", proto, next(iter(int4_weights(proto).values())))
    proto = fp32_graph()
    insert_matmul_nbits(proto, quant_targets(proto, {"w"}), 128, "sym", 4, 4)
    save("int4 g128 L4", proto, next(iter(int4_weights(proto).values())))
    return forms


def onednn_kinds(path: Path, config: dict, x: np.ndarray) -> str:
    """The oneDNN implementations that ran the MatMul (engine's probe: a child with oneDNN's verbose log)."""
    from dlp_deploy.runtime.openvino_engine import onednn_matmul_kernels

    found = onednn_matmul_kernels(path, {"prefill": {"x": x}}, config)
    return "; ".join(sorted(found["prefill"])) if found else "(no oneDNN log)"


def matmul_rows(compiled, request) -> tuple[str, str, str]:
    """node type, exec type (of the MatMul-like nodes, joined) and FullyConnected weight precisions."""
    seen = []
    for info in request.profiling_info:
        if "MatMul" in info.node_type or "FullyConnected" in info.node_type:
            seen.append((info.node_type, info.exec_type))
    weights = sorted({str(op.input(1).get_element_type().get_type_name())
                      for op in compiled.get_runtime_model().get_ops()
                      if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"})
    return (", ".join(sorted({t for t, _ in seen})), ", ".join(sorted({e for _, e in seen})),
            "/".join(weights) or "-")


def measure(path: Path, config: dict, x: np.ndarray, iters: int) -> tuple[np.ndarray, float]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    for _ in range(max(5, iters // 20)):
        request.infer({"x": x})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        request.infer({"x": x})
        times.append(time.perf_counter() - t0)
    return np.array(request.get_output_tensor(0).data), statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--forms", default="", help="comma-separated subset of forms")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--out", default="", help="write the markdown table here too")
    ap.add_argument("--append", action="store_true", help="append the rows only to --out (a run in parts)")
    args = ap.parse_args()

    import openvino as ov
    import openvino.properties.hint as hints

    from dlp_deploy.provenance import machine_info
    from dlp_deploy.runtime.openvino_engine import openvino_config

    rng = np.random.default_rng(1)
    decode = rng.normal(size=(1, 1, args.k)).astype(np.float32)
    prefill = rng.normal(size=(1, args.prefill, args.k)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        forms = build_forms(Path(tmp), args.k, args.n)
        wanted = [f for f in args.forms.split(",") if f] or list(forms)
        for name in wanted:
            path, weight, act = forms[name]
            ref_in = (lambda x: act(x) if act else x.astype(np.float64))
            refs = {"decode": ref_in(decode) @ weight, "prefill": ref_in(prefill) @ weight}
            for label in args.configs.split(","):
                config = openvino_config(args.threads, None, True)
                if CONFIGS[label] is not None:
                    config[hints.dynamic_quantization_group_size] = CONFIGS[label]
                wait_for_quiet_cpu()
                core = ov.Core()
                compiled = core.compile_model(str(path), "CPU", config)
                request = compiled.create_infer_request()
                request.infer({"x": prefill})
                node_type, exec_type, weights = matmul_rows(compiled, request)
                dq = compiled.get_property(hints.dynamic_quantization_group_size)
                onednn = ("none: MLAS, not oneDNN" if "mlas" in exec_type
                          else onednn_kinds(path, config, prefill).replace("inner_product ", ""))
                errors, times = {}, {}
                for step, x in (("decode", decode), ("prefill", prefill)):
                    got, times[step] = measure(path, config, x, args.iters)
                    errors[step] = float(np.abs(got - refs[step]).max() / np.abs(refs[step]).max())
                row = (name, label, dq, node_type, exec_type, weights, onednn, max(errors.values()),
                       times["decode"], times["prefill"])
                print(" | ".join(map(str, row)), flush=True)
                rows.append(row)
    m = machine_info()
    head = [f"CPU: {m['cpu_model']}; flags: {' '.join(m['isa'])}; OpenVINO {ov.__version__}; "
            f"{args.threads} inference thread(s); K {args.k}, N {args.n}; median of {args.iters} calls; "
            f"decode = 1 token, prefill = {args.prefill} tokens; error = max |out - ref| / max |ref| "
            f"(worse of the two steps)", "",
            "| form | config | DQ group (compiled) | node type | exec type | FC weights | oneDNN kernel | "
            "rel. max error | decode ms | prefill ms |", "|" + "---|" * 10]
    body = [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} | {r[7]:.1e} | {r[8]:.3f} | "
            f"{r[9]:.2f} |" for r in rows]
    text = "\n".join((head if not args.append else []) + body) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w", encoding="utf-8") as fh:
            fh.write(text)


if __name__ == "__main__":
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    main()
