"""ONNX export of RoPE decoders (LLaMA, Mistral, Qwen2/3, Gemma-2/3, Phi-3, OLMo-2 shapes) with an external KV
cache, in DeepSparse's text-generation contract.

The graph is built from the HF model's own modules (embeddings, norms, MLPs, projections, lm_head) found by
structure, around an attention written here (blocks.py): plain MatMul/Softmax with the `causal_mask` input (and a
sliding band derived from it), GQA by folding each KV head's query heads into rows (no repeated K/V), and RoPE
gathered from cos/sin tables made by the model's own rotary module. proof.py checks the result against the model
before anything is written.
"""
from __future__ import annotations

import contextlib

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models import decoder_layers
from .blocks import LayerSpec, block_forward, is_norm_like, layer_spec, softcap
from .proof import prove
from .trace import Trace, rope_tables, trace_model

OPSET = 17
INPUT_NAMES_FIXED = ("input_ids", "attention_mask", "positions", "causal_mask")
EXTERNAL_DATA_FILE = "model.data"
_PROTOBUF_LIMIT = 2**31 - 2**20  # stay clear of protobuf's hard 2 GiB ceiling

PROOF_TOLERANCE = 1e-4  # relative L2 error of a rewritten block (or the whole graph) against the HF forward, fp32
PROOF_LENGTH = 16
MAX_PROOF_LENGTH = 512  # sliding windows up to this are exercised by the proof


# ---------------------------------------------------------------- structural discovery

@dataclass
class DecoderSpec:
    embed: nn.Module
    blocks: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    rope: list[tuple[torch.Tensor, torch.Tensor]]
    layers: list[LayerSpec] = field(default_factory=list)
    final_softcap: float | None = None
    trace: Trace | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def cache_layers(self) -> list[LayerSpec]:
        """The blocks with attention, in order: one past/present key and value each (MLP-only blocks have none)."""
        return [s for s in self.layers if s.attention]

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed.weight

    def describe(self) -> dict:
        windows = [s.window for s in self.layers]
        mlp_only = [i for i, s in enumerate(self.layers) if not s.attention]
        return {
            "num_layers": self.num_layers,
            "num_heads": [s.num_heads for s in self.layers],
            "num_kv_heads": [s.num_kv_heads for s in self.layers],
            "head_dim": sorted({s.head_dim for s in self.cache_layers}),
            "vocab_size": int(self.lm_head.weight.shape[0]),
            "hidden_size": int(self.embed.weight.shape[1]),
            "wiring": sorted({s.wiring for s in self.layers}),
            "fused_qkv": any(s.fused_qkv for s in self.layers),
            "qk_norm": sorted({s.qk_norm for s in self.layers if s.qk_norm}),
            "attention_softcap": next((s.softcap for s in self.layers if s.softcap), None),
            "final_logit_softcap": self.final_softcap,
            "sliding_window": windows if any(windows) else None,
            "rope_tables": len(self.rope),
            "tied_embeddings": self.tied,
            **({"mlp_only_layers": mlp_only, "kv_cache_layers": len(self.cache_layers)} if mlp_only else {}),
        }


def discover(model: nn.Module, max_positions: int) -> DecoderSpec:
    """Find the parts of a RoPE decoder by structure, or raise UserError naming what is missing."""
    arch = type(model).__name__
    embed = _call_or_none(model, "get_input_embeddings")
    lm_head = _call_or_none(model, "get_output_embeddings")
    if not isinstance(embed, nn.Embedding):
        raise UserError(f"{arch}: no nn.Embedding input embeddings (get_input_embeddings); "
                        "only decoder-only causal LMs can be exported")
    if not isinstance(lm_head, nn.Linear):
        raise UserError(f"{arch}: no nn.Linear output head (get_output_embeddings); "
                        "only causal LMs with an lm_head can be exported")
    blocks = decoder_layers(model)
    config = getattr(model, "config", None)
    layers = [layer_spec(block, config, i, arch) for i, block in enumerate(blocks)]
    final_norm = _final_norm(model, blocks, arch)
    trace = trace_model(model, blocks, proof_length(layers, max_positions))
    rope, index = rope_tables(model, trace, max_positions, arch)
    for i, (layer, r) in enumerate(zip(layers, index)):
        layer.rope = r
        if layer.attention and rope[r][0].shape[-1] != layer.head_dim:
            raise UserError(f"{arch}: block {i} rotates {rope[r][0].shape[-1]} of {layer.head_dim} head dims; "
                            "partial rotary embeddings are not supported")
    cap = getattr(config, "final_logit_softcapping", None)
    return DecoderSpec(embed, blocks, final_norm, lm_head, rope, layers, float(cap) if cap else None, trace)


def proof_length(layers: list[LayerSpec], max_positions: int) -> int:
    """Long enough to slide past the smallest window when that stays cheap."""
    windows = [s.window for s in layers if s.window and s.window + 8 <= MAX_PROOF_LENGTH]
    return min(max_positions, max([PROOF_LENGTH, *(w + 8 for w in windows)]))


def _call_or_none(model, method):
    fn = getattr(model, method, None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        return None


def _final_norm(model: nn.Module, blocks: nn.ModuleList, arch: str) -> nn.Module:
    """The norm that owns-by-sibling the block stack: a weighted leaf module next to the ModuleList."""
    for parent in model.modules():
        if any(child is blocks for child in parent.children()):
            norms = [child for child in parent.children() if child is not blocks and is_norm_like(child)]
            if len(norms) == 1:
                return norms[0]
            raise UserError(f"{arch}: expected one final norm beside the decoder blocks, found {len(norms)}; "
                            "only decoder-only causal LMs with a final norm can be exported")
    raise UserError(f"{arch}: cannot find the module holding the decoder blocks")


# ---------------------------------------------------------------- the exported module

class KVCacheDecoder(nn.Module):
    """forward(input_ids, attention_mask, positions, causal_mask, *past) -> (logits, *present).

    past/present alternate key, value per attention layer (MLP-only blocks have no entry, so entry j belongs to
    the j-th block with attention); keys are stored after RoPE; present = concat(past, new) on axis 2.
    RoPE is gathered from cos/sin tables precomputed by the model's own rotary module (runtime Sin/Cos split the
    graph into two DeepSparse subgraphs and break the engine's internal KV cache).
    """

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        # registered so the exporter sees the HF modules' parameters; not copied
        self.embed, self.blocks, self.norm, self.lm_head = spec.embed, spec.blocks, spec.final_norm, spec.lm_head
        for i, (cos, sin) in enumerate(spec.rope):
            self.register_buffer(f"rope_cos_{i}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{i}", sin, persistent=False)
        self.windows = sorted({s.window for s in spec.layers if s.window})

    def mask_biases(self, attention_mask, causal_mask, positions) -> dict:
        """Additive mask per window (None: full attention). A key may be masked by the causal structure or by
        padding; a sliding layer also masks keys `window` or more slots behind the query. The runtime's window
        keeps a row's visible slots contiguous, so the keys out of reach are the causal mask shifted left by
        `window` slots (Slice + Concat: DeepSparse asserts on a CumSum-derived mask and falls back on Pad)."""
        allowed = causal_mask * attention_mask[:, None, None, :]
        biases = {None: _bias(allowed)}
        for window in self.windows:
            # columns shifted left by `window`, zero-filled (whichever side is shorter, the widths add to the total)
            out_of_reach = torch.cat((causal_mask[..., window:], causal_mask[..., :window] * 0), dim=-1)
            biases[window] = _bias(allowed * (1 - out_of_reach))
        return biases

    def forward(self, input_ids, attention_mask, positions, causal_mask, *past):
        biases = self.mask_biases(attention_mask, causal_mask, positions)
        hidden = self.embed(input_ids)
        presents = []
        for block, layer in zip(self.blocks, self.spec.layers):
            if not layer.attention:
                hidden = block_forward(block, layer, hidden, None, None, None, None, None)[0]
                continue
            slot = len(presents)  # this block's key, value among the cache entries
            cos, sin = self.rope_at(layer, positions)
            hidden, key, value = block_forward(block, layer, hidden, cos, sin, biases[layer.window],
                                               past[slot], past[slot + 1])
            presents += [key, value]
        return (self.logits(self.norm(hidden)), *presents)

    def rope_at(self, layer: LayerSpec, positions):
        """The layer's cos/sin rows for `positions`, shaped to broadcast over heads."""
        return (getattr(self, f"rope_cos_{layer.rope}")[positions].unsqueeze(1),
                getattr(self, f"rope_sin_{layer.rope}")[positions].unsqueeze(1))

    def logits(self, hidden):
        if self.spec.tied:
            # Gemm(transB) reads the stored [vocab, hidden] embedding itself; a MatMul (what a Linear without bias
            # exports to) would get a transposed copy folded in and store the vocabulary twice. The exporter emits
            # Gemm only for a 2-D input with a bias, hence the reshape and the zero bias.
            batch, length, width = hidden.shape
            weight = self.lm_head.weight
            bias = self.lm_head.bias if self.lm_head.bias is not None else weight.new_zeros(weight.shape[0])
            logits = F.linear(hidden.reshape(batch * length, width), weight, bias).reshape(batch, length, -1)
        else:
            logits = self.lm_head(hidden)
        return softcap(logits, self.spec.final_softcap)


def _bias(allowed: torch.Tensor) -> torch.Tensor:
    return (1 - allowed).to(torch.float32) * torch.finfo(torch.float32).min


# ---------------------------------------------------------------- export

def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return [*INPUT_NAMES_FIXED, *past], ["logits", *present]


@contextlib.contextmanager
def _distinct_initializers():
    """The TorchScript exporter merges initializers with equal values into one. A pruned model has such weights: a
    block that mixed N:M leaves with N = 0 is all zeros, so its same-shaped projections became one tensor under one
    name, and the others were missing from the graph (every per-weight check, the sparsity count and the INT8/INT4
    rewrites read weights by name). Its only switch, keep_initializers_as_inputs, also turns every weight into a
    graph input, which stops the weight transposes from folding; so the pass is skipped for this export alone."""
    from torch import _C

    original = _C._jit_pass_onnx_deduplicate_initializers
    _C._jit_pass_onnx_deduplicate_initializers = lambda graph, params, training: params
    try:
        yield
    finally:
        _C._jit_pass_onnx_deduplicate_initializers = original


def _dummy_inputs(spec: DecoderSpec, length: int = 3, past_len: int = 2):
    total = past_len + length
    input_ids = torch.zeros(1, length, dtype=torch.long)
    attention_mask = torch.ones(1, total, dtype=torch.long)
    positions = torch.arange(past_len, total, dtype=torch.long)[None]
    causal_mask = torch.tril(torch.ones(length, total, dtype=torch.long), diagonal=past_len)[None, None]
    past = []
    for layer in spec.cache_layers:
        shape = (1, layer.num_kv_heads, past_len, layer.head_dim)
        past += [torch.zeros(shape), torch.zeros(shape)]
    return (input_ids, attention_mask, positions, causal_mask, *past)


def _dynamic_axes(inputs: list[str], outputs: list[str]) -> dict:
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "total"},
            "positions": {0: "batch", 1: "length"}, "causal_mask": {0: "batch", 2: "length", 3: "total"},
            "logits": {0: "batch", 1: "length"}}
    axes.update({n: {0: "batch", 2: "past"} for n in inputs if n.startswith("past_key_values")})
    axes.update({n: {0: "batch", 2: "total"} for n in outputs if n.startswith("present")})
    return axes


def export_onnx(model: nn.Module, path: str | Path, max_positions: int | None = None) -> dict:
    """Prove the rewritten graph against the model, then export it to `path` (external data in model.data beside
    it when over 2 GB). Returns a summary."""
    import onnx

    path = Path(path)
    max_positions = max_positions or int(getattr(model.config, "max_position_embeddings"))
    spec = discover(model, max_positions)
    wrapper = KVCacheDecoder(spec).eval()
    proof = prove(model, wrapper, PROOF_TOLERANCE)  # refuses before anything is written
    inputs, outputs = io_names(len(spec.cache_layers))
    with tempfile.TemporaryDirectory(prefix="dlp-export-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), _distinct_initializers():
            torch.onnx.export(wrapper, _dummy_inputs(spec), str(raw), dynamo=False, opset_version=OPSET,
                              input_names=inputs, output_names=outputs,
                              dynamic_axes=_dynamic_axes(inputs, outputs), do_constant_folding=True)
        # weights stay in the exporter's files until save_model streams them, one at a time, to their place
        proto = onnx.load(str(raw), load_external_data=False)
        renamed = name_weight_initializers(proto, model, Path(tmp))
        external = save_model(proto, path, Path(tmp))
    return {"spec": spec, "external_data": external, "named_initializers": renamed, "proof": proof,
            "opset": OPSET, "ir_version": int(proto.ir_version)}


def tensor_bytes(proto) -> int:
    """Bytes of the graph's tensors (initializers and Constant values), counted from the tensors: protobuf cannot even measure (ByteSize) or
    serialise a message over 2 GB, so the decision to go external must not ask it to."""
    from onnx import TensorProto, helper

    total = 0
    for t in all_tensors(proto):
        length = next((e.value for e in t.external_data if e.key == "length"), None)
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        elif t.data_location == TensorProto.EXTERNAL and length is not None:
            total += int(length)
        else:  # inline typed values, or a whole external file (torch's exporter writes one per tensor, no length)
            count = 1
            for d in t.dims:
                count *= d
            total += count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def all_tensors(proto):
    """Initializers and the tensors of Constant nodes (the exporter writes large ones externally too)."""
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def save_model(proto, path: Path, base_dir: Path | None = None) -> bool:
    """Save inline when it fits in one protobuf, else with every tensor in one external data file, streamed one
    tensor at a time. `base_dir` is where tensors the proto stores externally live now (the exporter's files)."""
    import onnx

    external = tensor_bytes(proto) > _PROTOBUF_LIMIT
    if external:
        _stream_to_external_file(proto, path.parent / EXTERNAL_DATA_FILE, base_dir)
    elif base_dir is not None:
        onnx.load_external_data_for_model(proto, str(base_dir))
    onnx.save_model(proto, str(path))
    return external


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
_INLINE_BELOW = 1024  # small constants stay in the graph, as onnx's own external-data writer does


def _stream_to_external_file(proto, data_path: Path, base_dir: Path | None) -> None:
    """Move every initializer's bytes into `data_path` (one tensor in memory at a time), pointing the proto there."""
    from onnx import TensorProto

    with open(data_path, "wb") as out:
        for t in all_tensors(proto):
            blob = _initializer_bytes(t, base_dir)
            for name in _TYPED_FIELDS:
                t.ClearField(name)
            del t.external_data[:]
            if len(blob) < _INLINE_BELOW:
                t.data_location = TensorProto.DEFAULT
                t.raw_data = blob
                continue
            t.ClearField("raw_data")
            offset = out.seek(-(-out.tell() // 4096) * 4096)  # page-aligned, so engines may map tensors
            out.write(blob)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value


def initializer_array(t, base_dir: Path | str | None) -> np.ndarray:
    """A tensor's values, read from its external data file under `base_dir` when stored there. Unlike
    numpy_helper.to_array, the proto is left as it was: to_array copies the bytes into the tensor, so walking a
    graph of external weights with it ends with every weight in memory (6 GB at 1.5B in fp32)."""
    from onnx import TensorProto, helper, numpy_helper

    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.frombuffer(_initializer_bytes(t, Path(base_dir or ".")), dtype=dtype).reshape(tuple(t.dims))


def load_graph(path: str | Path):
    """The graph with its weights left in their external data file (read them with initializer_array)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _initializer_bytes(t, base_dir: Path | None) -> bytes:
    from onnx import TensorProto, numpy_helper

    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        with open(Path(base_dir or ".") / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def name_weight_initializers(proto, model: nn.Module, base_dir: Path | None = None) -> int:
    """Give the exporter's anonymous folded weights (onnx::MatMul_123) their PyTorch names.

    Constant folding turns each Linear weight into a transposed initializer; matching by content lets
    export.json report sparsity per named weight. Returns how many initializers were renamed.
    """
    # equal tensors (a block pruned to all zeros has several) each take the next unused name of that content
    by_digest: dict[tuple, list[str]] = {}
    for name, param in model.named_parameters():
        if param.dim() != 2:
            continue
        w = param.detach().float().cpu().numpy()
        by_digest.setdefault(_digest(w), []).append(name)
        by_digest.setdefault(_digest(np.ascontiguousarray(w.T)), []).append(f"{name}.T")
    named = {n for names in by_digest.values() for n in names}
    # a weight is one initializer, either way round: an all-zero W.T has the digest of another all-zero W
    taken = {init.name.removesuffix(".T") for init in proto.graph.initializer}
    renames = {}
    for init in proto.graph.initializer:
        if len(init.dims) != 2 or init.name in named:
            continue
        array = initializer_array(init, base_dir)  # not to_array: it would keep every weight in the proto
        target = next((n for n in by_digest.get(_digest(array), []) if n.removesuffix(".T") not in taken), None)
        if target:
            renames[init.name] = target
            taken.add(target.removesuffix(".T"))
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in proto.graph.node:
        for j, name in enumerate(node.input):
            if name in renames:
                node.input[j] = renames[name]
    return len(renames)


def _digest(array: np.ndarray) -> tuple:
    return array.shape, hashlib.blake2b(np.ascontiguousarray(array, dtype=np.float32).tobytes(),
                                        digest_size=16).hexdigest()


# ---------------------------------------------------------------- sparsity as DeepSparse sees it

def onnx_weight_sparsity(path: str | Path) -> dict:
    """Exact-zero share of every weight initializer of a MatMul/Gemm (fp32) or MatMulInteger (int8), and overall.

    DeepSparse sees sparsity only this way, so it is measured on the file, not trusted from PyTorch. Each entry
    also says how many bytes a weight takes (4 fp32, 1 int8), which the bandwidth-bound ideal needs.
    """
    proto = load_graph(path)
    inits = {init.name: init for init in proto.graph.initializer}
    weights = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger") and len(node.input) > 1 and node.input[1] in inits:
            weights[node.input[1]] = inits[node.input[1]]
    per, zeros, total = {}, 0, 0
    for name, init in weights.items():
        if init.data_type not in _WEIGHT_BYTES:
            continue
        arr = initializer_array(init, Path(path).parent)
        z = int(arr.size - np.count_nonzero(arr))
        per[name] = {"shape": list(arr.shape), "zeros": z, "sparsity": z / arr.size,
                     "bytes_per_weight": _WEIGHT_BYTES[init.data_type]}
        zeros, total = zeros + z, total + arr.size
    return {"per_initializer": per, "zeros": zeros, "params": total,
            "overall": zeros / total if total else 0.0}


_WEIGHT_BYTES = {1: 4, 3: 1}  # onnx.TensorProto.FLOAT, INT8
