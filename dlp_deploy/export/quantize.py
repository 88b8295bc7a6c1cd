"""Static W8A8 INT8 for an exported deployment graph, in the integer-MatMul form sparseml exported for DeepSparse:
QuantizeLinear(x) -> MatMulInteger(x_u8, W_s8) -> Cast -> Mul(s_x * s_w). DeepSparse compiles all of it
(fraction of supported ops 1.0; the same graph with QuantizeLinear/DequantizeLinear pairs around each MatMul
compiled only 92% of its ops on a tiny LLaMA), and ONNX Runtime and OpenVINO run it as integer MatMuls too.

- Weights: int8, symmetric, per output channel (scale = max|W[:, j]| / 127, zero point 0), so an exact zero stays
  an exact zero and the pruning mask survives quantization bit for bit.
- Activations (`act_scales`):
  - `static`: uint8, per tensor, asymmetric, from min/max observed on calibration windows (C4, not random input)
    run through the fp32 graph with ONNX Runtime. One range for every token is the known weak point of W8A8: an
    outlier token stretches it for all the others.
  - `dynamic-token`: one symmetric scale per row (token) of the activation, max|x_row| / 127, computed in the
    graph at run time (as vLLM's dynamic per-token W8A8 does); `dynamic-tensor`: one such scale per call.
    The int8 values are stored shifted by 128 as uint8 with a constant zero point of 128, so the MatMulInteger is
    still u8 x s8: the fast integer path on x86 (VNNI and AMX), and the only one some engines take.
- Decoder-block Linears only: lm_head (and the embeddings, which are a Gather) stay fp32 unless asked.

The graph is rewritten with the `onnx` package alone (helper/numpy_helper of onnx 1.14.1, which DeepSparse pins):
onnxruntime's quantization tools need a newer onnx and ml_dtypes, and would force a second environment.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.deployment import MODEL_FILE
from ..runtime.engines import engines_refusing as refusals_of
from .onnx import export_onnx, initializer_array, load_graph, save_model

QMIN, QMAX = -127, 127  # symmetric int8 weights (-128 unused, as the reference W8A8 recipes do)


@dataclass(frozen=True)
class QuantTarget:
    node: str  # MatMul node name
    activation: str  # its input 0
    weight: str  # initializer name (input 1)


def quant_targets(proto, weight_names: set[str]) -> list[QuantTarget]:
    """MatMuls whose weight input is one of `weight_names` (initializers of [in, out] layout)."""
    inits = {i.name for i in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[1] in weight_names:
            out.append(QuantTarget(node.name, node.input[0], node.input[1]))
    return out


def untie_head(proto, weight_names: set[str], base_dir: Path | None = None) -> list[str]:
    """Give a tied head its own [in, out] weight so a quantizer can rewrite it: the exporter computes a tied head as
    Gemm(hidden, embedding, transB=1) on the embedding the Gather also reads, and an in-place rewrite of that
    initializer would quantize the embedding lookup too. Each such Gemm (B in `weight_names`) becomes
    MatMul(hidden, `B.T`) (+ Add of its bias when that is not zero), `B.T` a transposed copy; returns the copies'
    names. The copy costs the vocabulary matrix once more in the quantized type (llama.cpp's tied models pay it
    in token_embd instead)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    nodes, copies = [], []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not (node.op_type == "Gemm" and node.input[1] in inits and node.input[1] in weight_names
                and attrs.get("transB", 0) == 1 and not attrs.get("transA", 0)
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
            nodes.append(node)
            continue
        name = f"{node.input[1]}.T"
        if name not in inits:
            weight = initializer_array(inits[node.input[1]], base_dir)
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            proto.graph.initializer.append(inits[name])
            copies.append(name)
        bias = _constant_value(proto, inits, node.input[2], base_dir) if len(node.input) > 2 and node.input[2] else 0
        if bias is not None and not np.any(bias):
            nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=f"{node.name}.MatMul"))
        else:
            nodes += [helper.make_node("MatMul", [node.input[0], name], [f"{node.name}.matmul"],
                                       name=f"{node.name}.MatMul"),
                      helper.make_node("Add", [f"{node.name}.matmul", node.input[2]], list(node.output),
                                       name=f"{node.name}.Add")]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return copies


@dataclass
class ScratchGraph:
    """The fp32 graph a quantizer rewrites: its proto (weights left in `base_dir`'s data file), the MatMuls whose
    weights it was asked to quantize, and the tied head's transposed copies made for them."""

    exported: dict
    proto: object
    base_dir: Path
    targets: list[QuantTarget]
    tied_copies: list[str] = field(default_factory=list)

    def tied_head_record(self) -> dict:
        return {"lm_head_tied_copy": f"{self.tied_copies[0]}: the head reads a transposed quantized copy of the tied "
                                     "embedding, which the fp32 Gather keeps reading"} if self.tied_copies else {}


@contextlib.contextmanager
def fp32_scratch_graph(model, onnx_path: Path, max_positions: int, weight_names: set[str], head: bool, prefix: str):
    """Export the fp32 graph into a scratch folder beside `onnx_path`, load it with its weights left on disk (read
    one at a time: no second fp32 copy in memory), give a tied head its own copy when `head`, and find the target
    MatMuls; after the caller's rewrite, save the graph to `onnx_path`, streaming the weights still in scratch. A
    folder of its own: over 2 GB the fp32 weights go to an external data file of the deployment's name, which must
    neither stay behind (4.4 GB of dead weight beside a 1.1B INT8 graph) nor be mixed with the quantized graph's own."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=onnx_path.parent) as scratch:
        base_dir = Path(scratch)
        exported = export_onnx(model, base_dir / MODEL_FILE, max_positions=max_positions)
        proto = load_graph(base_dir / MODEL_FILE)
        tied = untie_head(proto, weight_names, base_dir) if head else []
        targets = quant_targets(proto, {f"{n}.T" for n in weight_names} | weight_names)
        graph = ScratchGraph(exported, proto, base_dir, targets, tied)
        yield graph
        exported["external_data"] = save_model(proto, onnx_path, base_dir)


def _constant_value(proto, inits: dict, name: str, base_dir: Path | None):
    """The value of an initializer or Constant node output, or None where it is computed."""
    from onnx import helper, numpy_helper

    if name in inits:
        return initializer_array(inits[name], base_dir)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = next((a for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(helper.get_attribute_value(value)) if value is not None else None
    return None


def weight_scales(weight: np.ndarray) -> np.ndarray:
    """Per output channel (axis 1 of an [in, out] MatMul weight) symmetric scales; all-zero columns get 1."""
    amax = np.abs(weight).max(axis=0).astype(np.float32)
    return np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = weight_scales(weight)
    q = np.clip(np.rint(weight / scale[None, :]), QMIN, QMAX).astype(np.int8)
    return q, scale


def activation_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """uint8 asymmetric scale and zero point covering [min(lo, 0), max(hi, 0)] (zero exactly representable)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = int(np.clip(np.rint(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero_point)


def observe_ranges(onnx_path, tensors: list[str], feeds) -> dict[str, tuple[float, float]]:
    """Min/max of each named intermediate tensor over the calibration feeds, run on ONNX Runtime (fp32 graph)."""
    import onnx
    import onnxruntime as ort

    # the graph only, weights left where they are: a model over 2 GB cannot pass through one protobuf, so the
    # copy with extra outputs is saved beside the original and reads the same external data file
    proto = onnx.load(str(onnx_path), load_external_data=False)
    have = {o.name for o in proto.graph.output}
    for name in tensors:
        if name not in have:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = Path(onnx_path).with_suffix(".outputs.onnx")
    onnx.save_model(proto, str(probe))
    try:
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    finally:
        probe.unlink()
    names = [o.name for o in session.get_outputs()]
    ranges = {t: [np.inf, -np.inf] for t in tensors}
    for feed in feeds:
        outs = dict(zip(names, session.run(None, feed)))
        for t in tensors:
            ranges[t][0] = min(ranges[t][0], float(outs[t].min()))
            ranges[t][1] = max(ranges[t][1], float(outs[t].max()))
    return {t: (lo, hi) for t, (lo, hi) in ranges.items()}


def linear_input_ranges(model, windows, weight_names: set[str]) -> dict[str, tuple[float, float]]:
    """Min/max of the input of every Linear whose weight is one of `weight_names` (parameter names; a tied head is
    found by its weight) over the calibration windows, run through the PyTorch model. These are the values the fp32
    graph's MatMuls read (observe_ranges measures them there, tests/test_int8.py holds the two together), without a
    second copy of the weights in an inference session: at 1.5B that copy took the INT8 export past 21 GB."""
    import torch

    params = dict(model.named_parameters())
    wanted = {id(params[n]): n for n in weight_names}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m.weight) in wanted]
    ranges: dict[str, list[float]] = {}

    def observe(module, args) -> None:
        r = ranges.setdefault(wanted[id(module.weight)], [float("inf"), float("-inf")])
        r[0], r[1] = min(r[0], float(args[0].min())), max(r[1], float(args[0].max()))

    run_hooked(model, windows, [m.register_forward_pre_hook(observe) for m in linears])
    missing = sorted(set(weight_names) - set(ranges))
    if missing:
        raise ValueError(f"no Linear read {missing[0]} during calibration; its MatMul input cannot be observed")
    return {n: (lo, hi) for n, (lo, hi) in ranges.items()}


def run_hooked(model, windows, handles) -> None:
    """Run each calibration window through the model (no cache, no grad) with the given hooks attached, then
    remove them, also when a forward fails."""
    import torch

    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for w in windows:
                model(w.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def activation_ranges(targets: list[QuantTarget], by_weight: dict[str, tuple[float, float]]
                      ) -> dict[str, tuple[float, float]]:
    """Per graph activation, the range over the Linears reading it (their weights are the targets'; `.T` names the
    exporter's transposed copy of a parameter)."""
    out: dict[str, tuple[float, float]] = {}
    for t in targets:
        lo, hi = by_weight[t.weight.removesuffix(".T")]
        seen = out.get(t.activation, (lo, hi))
        out[t.activation] = (min(seen[0], lo), max(seen[1], hi))
    return out


ACT_SCALES = ("static", "dynamic-token", "dynamic-tensor")


def engines_refusing(act_scales: str) -> dict[str, str]:
    """Engines that cannot run an INT8 deployment with these activation scales, with the reason (the rule the
    deployment itself is later checked by)."""
    return refusals_of({"scheme": "int8", "act_scales": act_scales})


def insert_dynamic_matmul_integer(proto, targets: list[QuantTarget], per_token: bool = True,
                                  codes: dict | None = None, base_dir: Path | None = None) -> dict:
    """Rewrite the graph in place with activation scales computed at run time: for each quantized activation x
    (once, shared by the MatMuls reading it) s = max(|x|, over the last axis or all) / 127,
    x_u8 = clip(round(x / s), -127, 127) + 128; then MatMulInteger(x_u8, W_s8, 128, 0) -> Cast -> Mul(s) ->
    Mul(s_w[j])."""
    from onnx import TensorProto, helper, numpy_helper

    shared = {"dq.127": np.float32(QMAX), "dq.eps": np.float32(1e-8), "dq.lo": np.float32(QMIN),
              "dq.hi": np.float32(QMAX), "dq.shift": np.float32(128), "dq.zero_point": np.uint8(128)}
    new_inits = [numpy_helper.from_array(np.array(v), k) for k, v in shared.items()]
    reduce = {"axes": [-1], "keepdims": 1} if per_token else {"keepdims": 1}

    def quantize_activation(x: str) -> tuple[list, str, str]:
        b = f"{x}_dq"
        nodes = [
            helper.make_node("Abs", [x], [f"{b}.abs"], name=f"{b}.Abs"),
            helper.make_node("ReduceMax", [f"{b}.abs"], [f"{b}.amax"], name=f"{b}.ReduceMax", **reduce),
            helper.make_node("Max", [f"{b}.amax", "dq.eps"], [f"{b}.amax_safe"], name=f"{b}.Max"),
            helper.make_node("Div", [f"{b}.amax_safe", "dq.127"], [f"{b}.scale"], name=f"{b}.Scale"),
            helper.make_node("Div", [x, f"{b}.scale"], [f"{b}.scaled"], name=f"{b}.Div"),
            helper.make_node("Round", [f"{b}.scaled"], [f"{b}.rounded"], name=f"{b}.Round"),
            helper.make_node("Clip", [f"{b}.rounded", "dq.lo", "dq.hi"], [f"{b}.clipped"], name=f"{b}.Clip"),
            helper.make_node("Add", [f"{b}.clipped", "dq.shift"], [f"{b}.shifted"], name=f"{b}.Shift"),
            helper.make_node("Cast", [f"{b}.shifted"], [f"{b}.quantized"], name=f"{b}.Cast", to=TensorProto.UINT8)]
        return nodes, f"{b}.quantized", "dq.zero_point"

    def rescale(t: QuantTarget, out: str, w_scale: np.ndarray) -> tuple[list, list]:
        return ([helper.make_node("Mul", [f"{t.node}.float", f"{t.activation}_dq.scale"], [f"{t.node}.rows"],
                                  name=f"{t.node}.RowScale"),
                 helper.make_node("Mul", [f"{t.node}.rows", f"{t.weight}.scale"], [out], name=f"{t.node}.Rescale")],
                [numpy_helper.from_array(w_scale, f"{t.weight}.scale")])

    counts = _rewrite_to_integer(proto, targets, quantize_activation, rescale, new_inits, codes, base_dir)
    return {**counts, "weights": "int8 symmetric per output channel",
            "activations": f"int8 symmetric, dynamic per {'token' if per_token else 'tensor'} (uint8 + 128)",
            "format": "dynamic scale + MatMulInteger + Cast + Mul"}


def insert_matmul_integer(proto, targets: list[QuantTarget], ranges: dict[str, tuple[float, float]],
                          codes: dict | None = None, base_dir: Path | None = None) -> dict:
    """Rewrite the graph in place in the integer-MatMul form sparseml exports for DeepSparse: each quantized
    activation through one QuantizeLinear (shared by the MatMuls reading it), then
    MatMulInteger(x_u8, W_s8, zp_x, 0) -> Cast(float) -> Mul(s_x * s_w[j])."""
    from onnx import helper, numpy_helper

    new_inits: list = []
    scales: dict[str, np.float32] = {}

    def quantize_activation(x: str) -> tuple[list, str, str]:
        scale, zp = activation_qparams(*ranges[x])
        b = f"{x}_q"
        scales[x] = scale
        new_inits.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{b}.scale"),
                          numpy_helper.from_array(np.array(zp, np.uint8), f"{b}.zero_point")])
        return ([helper.make_node("QuantizeLinear", [x, f"{b}.scale", f"{b}.zero_point"], [f"{b}.quantized"],
                                  name=f"{b}.QuantizeLinear")], f"{b}.quantized", f"{b}.zero_point")

    def rescale(t: QuantTarget, out: str, w_scale: np.ndarray) -> tuple[list, list]:
        combined = (w_scale * scales[t.activation]).astype(np.float32)  # one constant: s_x is fixed
        return ([helper.make_node("Mul", [f"{t.node}.float", f"{t.weight}.rescale"], [out], name=f"{t.node}.Rescale")],
                [numpy_helper.from_array(combined, f"{t.weight}.rescale")])

    counts = _rewrite_to_integer(proto, targets, quantize_activation, rescale, new_inits, codes, base_dir)
    return {**counts, "weights": "int8 symmetric per output channel", "activations": "uint8 asymmetric per tensor",
            "format": "MatMulInteger + Cast + Mul"}


def _rewrite_to_integer(proto, targets: list[QuantTarget], quantize_activation, rescale, new_inits: list,
                        codes: dict | None = None, base_dir: Path | None = None) -> dict:
    """The rewrite both forms share: each target MatMul becomes MatMulInteger(x_q, W_s8, zp_x, 0) -> Cast(float)
    -> the form's rescale(target, output name, weight scales) -> (nodes, initializers); each activation is quantized once (quantize_activation(x) -> nodes, quantized name,
    zero-point name), right before the first MatMul that reads it; the weights become int8 in place (an fp32
    weight in an external data file is read from `base_dir`, one at a time, and its int8 codes stored inline)."""
    from onnx import TensorProto, helper

    inits = {i.name: i for i in proto.graph.initializer}
    by_name = {t.node: t for t in targets}
    quantized: dict[str, tuple[str, str]] = {}
    nodes = []
    for node in proto.graph.node:
        t = by_name.get(node.name)
        if t is None:
            nodes.append(node)
            continue
        if t.activation not in quantized:
            added, q_name, zp_name = quantize_activation(t.activation)
            nodes += added
            quantized[t.activation] = (q_name, zp_name)
        q_in, zp_in = quantized[t.activation]
        w_scale, weight_inits = _quantize_weight_initializer(inits[t.weight], (codes or {}).get(t.weight),
                                                                  base_dir)
        rescale_nodes, rescale_inits = rescale(t, node.output[0], w_scale)
        new_inits += weight_inits + rescale_inits
        nodes += [helper.make_node("MatMulInteger", [q_in, t.weight, zp_in, f"{t.weight}.zero_point"],
                                   [f"{t.node}.int32"], name=f"{t.node}.MatMulInteger"),
                  helper.make_node("Cast", [f"{t.node}.int32"], [f"{t.node}.float"], name=f"{t.node}.Cast",
                                   to=TensorProto.FLOAT),
                  *rescale_nodes]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(new_inits)
    return {"matmuls_quantized": len(targets), "activations_quantized": len(quantized)}


def _quantize_weight_initializer(init, codes: tuple[np.ndarray, np.ndarray] | None = None,
                                 base_dir: Path | None = None) -> tuple[np.ndarray, list]:
    """Replace an fp32 [in, out] weight initializer by its int8 values in place (RTN, or `codes` (int8 [in, out],
    scales [out]) chosen before export, e.g. by GPTQ: re-rounding those would not give them back); its
    per-column scales and the zero-point initializer the MatMulInteger reads."""
    from onnx import numpy_helper

    q, scale = codes if codes is not None else quantize_weight(initializer_array(init, base_dir))
    init.CopyFrom(numpy_helper.from_array(q, init.name))
    return scale, [numpy_helper.from_array(np.zeros((), np.int8), f"{init.name}.zero_point")]


# ---------------------------------------------------------------- SmoothQuant (PyTorch side, before export)

def smoothing_scales(act_absmax, weight_absmax, alpha: float):
    """SmoothQuant's per-input-channel s_j = max|X_j|^a / max|W_:,j|^(1-a): X/s is easier to quantize, W*s
    absorbs the difficulty (Xiao et al., 2023, eq. 4)."""
    import torch

    s = act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).clamp(min=1e-5)


def norm_readers(model, window) -> list[tuple[int, object, list]]:
    """(block index, norm, the Linears reading that norm's output) for every norm of every decoder block, found by
    running one window: a Linear whose input is the very tensor a norm returned reads it. Wiring, not names:
    OLMo-2's post_attention_layernorm normalises the attention output (no Linear reads it), Gemma's
    pre_feedforward_layernorm feeds the MLP, Phi-3's input norm feeds one fused qkv_proj."""
    import torch

    from ..models import decoder_layers
    from .blocks import is_norm_like

    blocks = decoder_layers(model)
    outputs: dict[int, tuple[torch.Tensor, int, object]] = {}  # data_ptr -> (the norm's output, block, norm)
    readers: dict[int, tuple[int, object, list]] = {}  # id(norm) -> group

    def remember(index):
        def hook(module, _args, out) -> None:
            if isinstance(out, torch.Tensor):
                outputs[out.data_ptr()] = (out, index, module)  # holding it keeps its memory from being reused
        return hook

    def read(module, args) -> None:
        x = args[0] if args else None
        seen = outputs.get(x.data_ptr()) if isinstance(x, torch.Tensor) else None
        if seen is not None and seen[0].shape == x.shape and seen[0].stride() == x.stride():
            group = readers.setdefault(id(seen[2]), (seen[1], seen[2], []))
            if module not in group[2]:
                group[2].append(module)

    handles = []
    for i, block in enumerate(blocks):
        for module in block.modules():
            if is_norm_like(module):
                handles.append(module.register_forward_hook(remember(i)))
            elif isinstance(module, torch.nn.Linear):
                handles.append(module.register_forward_pre_hook(read))
    try:
        run_hooked(model, [window], handles)
    finally:
        outputs.clear()
    return sorted(readers.values(), key=lambda g: g[0])


def smooth_model(model, windows, alpha: float = 0.5) -> dict:
    """Migrate activation outliers into the weights for every group of Linears that reads a norm's output (found
    by norm_readers): the norm's weight is divided by s and the Linears' input columns multiplied by it, which
    leaves the model's function unchanged and every zero weight zero. Checked per group on a probe and then on the
    whole model's logits: if the model moved (the norm's output also reaches something else), every group is
    undone and the record says so. Returns what was smoothed."""
    import torch

    groups = norm_readers(model, windows[0])
    absmax = {id(lins[0]): torch.zeros(lins[0].in_features) for _, _, lins in groups}

    def observe(module, inp, _out) -> None:  # a forward hook that returned a value would replace the output
        seen = inp[0].detach().abs().reshape(-1, module.in_features).amax(0).float().cpu()
        torch.maximum(absmax[id(module)], seen, out=absmax[id(module)])

    run_hooked(model, windows, [lins[0].register_forward_hook(observe) for _, _, lins in groups])
    device = next(model.parameters()).device
    first = windows[0].unsqueeze(0).to(device)
    with torch.no_grad():
        reference = model(first, use_cache=False).logits.float()
        applied = [(norm, lins, s) for _, norm, lins in groups
                   if (s := _smooth_group(norm, lins, absmax[id(lins[0])], alpha, device)) is not None]
        moved = float((model(first, use_cache=False).logits.float() - reference).norm() / reference.norm())
        if moved > 1e-3:
            for norm, lins, s in applied:
                _scale_group(norm, lins, 1 / s)
    record = {"alpha": alpha, "groups_smoothed": len(applied) if moved <= 1e-3 else 0, "groups": len(groups),
              "logits_moved": moved}
    if moved > 1e-3:
        record["undone"] = (f"smoothing moved the logits by {moved:.2e} (relative): a norm's output reaches more "
                            "than the Linears that read it; the model is left unsmoothed")
    return record


def _scale_group(norm, lins, s) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    for lin in lins:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


def _smooth_group(norm, lins, act_absmax, alpha: float, device):
    """Smooth one norm -> Linears group in place and return s, or leave it and return None when the norm is not a
    plain elementwise scale (e.g. Gemma's 1 + w): checked on a random probe."""
    import torch

    probe = torch.randn(1, 8, lins[0].in_features, generator=torch.Generator().manual_seed(0)).to(device)
    before = [lin(norm(probe)) for lin in lins]
    w_absmax = torch.stack([lin.weight.abs().amax(dim=0).float().cpu() for lin in lins]).amax(0)
    s = smoothing_scales(act_absmax, w_absmax, alpha).to(device)
    _scale_group(norm, lins, s)
    after = [lin(norm(probe)) for lin in lins]
    err = max(float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(after, before))
    if err > 1e-3:
        _scale_group(norm, lins, 1 / s)
        return None
    return s
