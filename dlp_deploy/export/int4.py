"""Weight-only INT4 and INT8 for an exported deployment graph: each decoder-block weight MatMul becomes ONNX
Runtime's com.microsoft `MatMulNBits` (bits=4, `--quantize int4`; bits=8, `--quantize w8`), which ONNX Runtime runs
natively and OpenVINO's ONNX frontend reads as a compressed-weight FullyConnected.

`w8` is llama.cpp q8_0's form on the ONNX engines: int8 weights in blocks of 32 along K, one scale each. At
accuracy_level 4 (its default) both engines quantize the activations to int8 per block at run time and multiply
in integers (ORT's 8-bit MatMulNBits kernel; OpenVINO's dynamic quantization of compressed-weight layers), so
the activations get a scale per token and block, finer than W8A8's per-token one. At accuracy_level 0 ONNX
Runtime 1.32 dequantizes the 8-bit weights on every call (11x slower than fp32 on a 24-layer stack of SmolLM2's
MLP shape, measured while this was written), so 4 is the default there.

Layout (onnxruntime/core/graph/contrib_ops/contrib_defs.cc, MatMulNBits; the same as onnxruntime's own
matmul_nbits_quantizer.py writes), for an [K, N] MatMul weight quantized in blocks of `block_size` along K:
- B: uint8 [N, n_blocks, block_size / 2]; two 4-bit values a byte, the even k in the low nibble (8 bits: one value a
  byte, [N, n_blocks, block_size]); K is padded with zeros to n_blocks * block_size.
- scales: float [N * n_blocks] (row n's blocks together).
- zero_points (asymmetric only): uint8 [N * ceil(n_blocks / 2)], each row's nibbles packed the same way and the
  row padded to a whole byte; or float [N * n_blocks] (minmax), read the same way by ONNX Runtime and OpenVINO
  (checked: (q - zp) * s). Without it ORT uses 2^(bits-1) = 8 (128 for 8 bits; 8-bit zero points are one a byte).
Dequantized: W[k, n] = (q[n, k] - zp[n, k // block_size]) * scale[n, k // block_size].

- symmetric: q = clip(round(w / s), -8, 7) + 8 with s = the block's extreme value / -8 (the sign carried by the
  scale, as ORT's and NNCF's symmetric INT4 do, so the block's largest magnitude lands on -8 and uses the whole
  range). No zero_points input: the implicit 8 is the zero, so an exact 0 stays an exact 0 and a pruning mask
  survives bit for bit.
- asymmetric: s = (max - min) / 15 over [min(w, 0), max(w, 0)], zp = round(-min / s) (an integer in [0, 15],
  since the range holds 0), q = clip(round(w / s) + zp, 0, 15): a 0 weight lands on zp itself, so it too
  dequantizes to exactly 0. The mask check counts rather than assumes this (pruned weights not exact zeros).
- minmax: llama.cpp Q4_1's grid, w = min + q * s with s = (max - min) / 15 over the block's own range and a float
  zero point -min / s: the finest grid for the block, but 0 is generally not on it, so pruned weights become small
  non-zeros (counted). A model shipped as Q4_1 (SmolLM2) is reproduced exactly by it, where the grids above
  round its weights a second time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .onnx import initializer_array, load_graph
from .quantize import fp32_scratch_graph

BITS = 4
SCHEME_BITS = {"int4": 4, "w8": 8}  # --quantize scheme -> MatMulNBits bits
DEFAULT_ACCURACY_LEVEL = {"int4": 0, "w8": 4}  # see the module docstring for w8's
GROUP_SIZES = (32, 64, 128)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # ORT: 0 unset (fp32 here), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
INT4_SCHEMES = ("sym", "asym", "minmax")
SCHEME_WORDS = {"sym": "symmetric", "asym": "asymmetric, integer zero points",
                "minmax": "min-max (Q4_1's grid), float zero points"}


@dataclass(frozen=True)
class BlockQuant:
    """One [K, N] weight in MatMulNBits form."""

    k: int
    n: int
    block_size: int
    packed: np.ndarray  # uint8 [N, n_blocks, block_size // 2]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(n_blocks / 2)] (asym), float32 [N * n_blocks] (minmax), None
    bits: int = BITS  # 8: packed is [N, n_blocks, block_size] and asym zero points are one a byte

    @property
    def n_blocks(self) -> int:
        return self.packed.shape[1]


def _blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [N, n_blocks, block_size], K zero-padded."""
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_blocks * block_size, n), np.float32)
    padded[:k] = weight
    return padded.T.reshape(n, n_blocks, block_size)


def quantize_blocks(weight: np.ndarray, block_size: int, scheme: str,
                    bits: int = BITS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unsigned `bits`-bit values [N, n_blocks, block_size], scales and zero points [N, n_blocks] of a [K, N]
    weight."""
    blocks = _blocks(weight, block_size)
    top, half = 2 ** bits - 1, 2 ** (bits - 1)  # 15 and 8 for 4 bits
    if scheme == "minmax":
        lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
        scale = np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32)
        q = np.clip(np.rint((blocks - lo[..., None]) / scale[..., None]), 0, top)
        return q.astype(np.uint8), scale, (-lo / scale).astype(np.float32)
    if scheme == "sym":
        lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
        extreme = np.where(np.abs(lo) >= np.abs(hi), lo, hi)
        scale = np.where(extreme != 0, extreme / -half, 1.0).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[..., None]), -half, half - 1) + half
        zp = np.full(scale.shape, half, np.uint8)
    else:
        lo, hi = np.minimum(blocks.min(axis=-1), 0), np.maximum(blocks.max(axis=-1), 0)
        scale = np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32)
        zp = np.clip(np.rint(-lo / scale), 0, top).astype(np.uint8)
        q = np.clip(np.rint(blocks / scale[..., None]) + zp[..., None], 0, top)
    return q.astype(np.uint8), scale, zp


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis, two a byte, the even index in the low nibble; an odd count is padded
    with 0."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :count]


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    return pack_nibbles(values) if bits == 4 else values.astype(np.uint8)


def _unpack(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    return unpack_nibbles(packed, count) if bits == 4 else packed[..., :count]


def quantize_matmul_weight(weight: np.ndarray, block_size: int, scheme: str, bits: int = BITS) -> BlockQuant:
    k, n = weight.shape
    q, scale, zp = quantize_blocks(weight.astype(np.float32), block_size, scheme, bits)
    zero_points = {"sym": None, "asym": _pack(zp, bits).reshape(-1) if scheme == "asym" else None,
                   "minmax": zp.reshape(-1)}[scheme]
    return BlockQuant(k, n, block_size, _pack(q, bits), scale.reshape(-1), zero_points, bits)


def dequantize(bq: BlockQuant) -> np.ndarray:
    """The [K, N] weight MatMulNBits computes with, from its packed inputs alone."""
    q = _unpack(bq.packed, bq.block_size, bq.bits).astype(np.float32)  # [N, n_blocks, block_size]
    if bq.zero_points is None:
        zp = np.full((bq.n, bq.n_blocks), 2.0 ** (bq.bits - 1), np.float32)
    elif bq.zero_points.dtype == np.float32:
        zp = bq.zero_points.reshape(bq.n, bq.n_blocks)
    else:
        zp = _unpack(bq.zero_points.reshape(bq.n, -1), bq.n_blocks, bq.bits).astype(np.float32)
    w = (q - zp[..., None]) * bq.scales.reshape(bq.n, bq.n_blocks)[..., None]
    return w.reshape(bq.n, -1)[:, :bq.k].T


def insert_matmul_nbits(proto, targets, block_size: int, scheme: str, accuracy_level: int, bits: int = BITS,
                        base_dir: Path | None = None) -> dict:
    """Rewrite the graph in place: each target MatMul(x, W) becomes MatMulNBits(x, B, scales[, zero_points]) with
    the same output; the fp32 weight initializers are dropped (one stored externally is read from `base_dir`)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    by_name = {t.node: t for t in targets}
    new_inits, nodes, dropped, padded = [], [], set(), 0
    for node in proto.graph.node:
        t = by_name.get(node.name)
        if t is None:
            nodes.append(node)
            continue
        bq = quantize_matmul_weight(initializer_array(inits[t.weight], base_dir), block_size, scheme, bits)
        inputs = [t.activation, f"{t.weight}.q{bits}", f"{t.weight}.q{bits}_scales"]
        new_inits += [numpy_helper.from_array(bq.packed, inputs[1]), numpy_helper.from_array(bq.scales, inputs[2])]
        if bq.zero_points is not None:
            inputs.append(f"{t.weight}.q{bits}_zero_points")
            new_inits.append(numpy_helper.from_array(bq.zero_points, inputs[3]))
        nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{t.node}.MatMulNBits",
                                      domain="com.microsoft", K=bq.k, N=bq.n, bits=bits, block_size=block_size,
                                      accuracy_level=accuracy_level))
        dropped.add(t.weight)
        padded += bq.k % block_size != 0
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    kept = [i for i in proto.graph.initializer if i.name not in dropped]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + new_inits)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"matmuls_quantized": len(targets), "bits": bits, "block_size": block_size,
            "int4_scheme": scheme, "symmetric": scheme == "sym", "accuracy_level": accuracy_level,
            # OpenVINO 2026.4 decompresses these to f32 weights at compile time (reports/smollm2-135m-int4)
            "matmuls_with_a_padded_block": padded,
            "weights": f"int{bits} {SCHEME_WORDS[scheme]}, blocks of {block_size} along K",
            "activations": "int8 per block at run time (accuracy_level 4)" if accuracy_level == 4
            else "fp32 (weight-only)", "format": "com.microsoft MatMulNBits"}


def int4_weights(proto, base_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Dequantized [K, N] weight of every MatMulNBits node, by its original weight initializer's name."""
    return dict(iter_int4_weights(proto, base_dir))


def iter_int4_weights(proto, base_dir: Path | None = None):
    """(original weight name, dequantized [K, N] weight) of each MatMulNBits node, one at a time."""
    from onnx import helper

    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        zp = initializer_array(inits[node.input[3]], base_dir) if len(node.input) > 3 and node.input[3] else None
        bits = attrs.get("bits", BITS)
        bq = BlockQuant(attrs["K"], attrs["N"], attrs["block_size"], initializer_array(inits[node.input[1]], base_dir),
                        initializer_array(inits[node.input[2]], base_dir), zp, bits)
        yield node.input[1].removesuffix(f".q{bits}"), dequantize(bq)


# ---------------------------------------------------------------- export and mask check

def check_int4_options(options) -> None:
    from ..errors import UserError

    if options.group_size not in GROUP_SIZES:
        raise UserError(f"--group-size {options.group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")
    if options.int4_scheme not in INT4_SCHEMES:
        raise UserError(f"--int4-scheme {options.int4_scheme!r} is not one of {', '.join(INT4_SCHEMES)}")
    if accuracy_level(options) not in ACCURACY_LEVELS:
        raise UserError(f"--accuracy-level {options.accuracy_level} is not one of 0-4 (0: fp32 accumulation)")


def accuracy_level(options) -> int:
    """The MatMulNBits accuracy_level asked for, or the scheme's default."""
    if options.accuracy_level is None:
        return DEFAULT_ACCURACY_LEVEL[options.scheme]
    return options.accuracy_level


def export_int4(model, tokenizer, onnx_path: Path, max_positions: int, options, root, progress) -> tuple[dict, dict]:
    """fp32 export beside the target, then every decoder-block weight MatMul (and lm_head with `options.head`)
    rewritten to MatMulNBits of the scheme's bits into `onnx_path`. No calibration: round-to-nearest per block."""
    from .deployment import _block_weight_names, _param_name  # here: deployment.py imports this module

    check_int4_options(options)
    names = _block_weight_names(model) | ({_param_name(model, model.get_output_embeddings().weight)}
                                          if options.head else set())
    bits = SCHEME_BITS[options.scheme]
    with fp32_scratch_graph(model, onnx_path, max_positions, names, options.head, "fp32-for-int4-") as g:
        progress(f"{options.scheme}: {len(g.targets)} MatMuls to {bits}-bit MatMulNBits (blocks of "
                 f"{options.group_size})")
        summary = insert_matmul_nbits(g.proto, g.targets, options.group_size, options.int4_scheme,
                                      accuracy_level(options), bits, base_dir=g.base_dir)
    return g.exported, {"scheme": options.scheme, **summary, "lm_head": options.scheme if options.head else "fp32",
                        **g.tied_head_record(), "embeddings": "fp32 (Gather)",
                        "accuracy_level_meaning": "ONNX Runtime's MatMulNBits accuracy_level: 0 = unset, which runs "
                                                  "fp32 on CPU; 4 = activations quantized to int8 at run time"}


def check_int4_mask(model, onnx_path: Path, record: dict) -> dict:
    """Every PyTorch zero of a block weight must dequantize to exactly 0 from the packed MatMulNBits inputs (the
    symmetric form guarantees it; the others are counted, not refused); zeros rounding adds are counted."""
    from ..models import model_sparsity
    from .deployment import ValidationError, _block_weight_names

    block_names = _block_weight_names(model)
    params = dict(model.named_parameters())
    lost = extra = zeros = total = 0
    checked = set()
    for key, weight in iter_int4_weights(load_graph(onnx_path), onnx_path.parent):
        name = key.removesuffix(".T")
        if name not in block_names:
            continue
        checked.add(name)
        deq = weight.T if key.endswith(".T") else weight
        mask = params[name].detach().cpu().numpy() == 0
        lost += int(np.count_nonzero(deq[mask]))
        extra += int(np.count_nonzero((deq == 0) & ~mask))
        zeros, total = zeros + int(deq.size - np.count_nonzero(deq)), total + deq.size
    missing = sorted(block_names - checked)
    if missing:
        raise ValidationError(f"block weight {missing[0]} is not a MatMulNBits weight in the {record['scheme']} graph")
    symmetric = record["symmetric"]
    if lost and symmetric:
        raise ValidationError(f"{lost} pruned weights dequantize to non-zero values in the symmetric "
                              f"{record['scheme']} graph; the mask did not survive")
    return {"global": zeros / total, "pytorch_global": model_sparsity(model)["global_sparsity"], "block_params": total,
            record.get("scheme", "int4"): {"mask_preserved": lost == 0, "pruned_weights_not_exact_zero": lost,
                     "zeros_added_by_rounding": extra,
                     "checked": "every block weight dequantized from the packed MatMulNBits inputs",
                     "note": None if symmetric else f"{record['int4_scheme']}: zeros are checked and counted, "
                                                    "not required"}}
