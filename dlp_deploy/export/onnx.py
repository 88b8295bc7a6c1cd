"""ONNX export of LLaMA-family decoders with an external KV cache, in DeepSparse's text-generation contract.

The graph is built from the HF model's own modules (embeddings, norms, MLPs, q/k/v/o Linears, lm_head) found by
structure, around an attention written here: plain MatMul/Softmax with the `causal_mask` input, GQA by folding each
KV head's query heads into rows (no repeated K/V), and RoPE gathered from cos/sin tables precomputed by the model's own rotary module (runtime Sin/Cos split
the graph into two DeepSparse subgraphs and break the engine's internal KV cache).
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..models import decoder_layers

OPSET = 17
INPUT_NAMES_FIXED = ("input_ids", "attention_mask", "positions", "causal_mask")
EXTERNAL_DATA_FILE = "model.data"
_PROTOBUF_LIMIT = 2**31 - 2**20  # stay clear of protobuf's hard 2 GiB ceiling

_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_BLOCK_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


# ---------------------------------------------------------------- structural discovery

@dataclass
class LayerSpec:
    """One decoder block's attention geometry, read from its own Linear shapes (layers may differ)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float


@dataclass
class DecoderSpec:
    embed: nn.Module
    blocks: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module
    layers: list[LayerSpec] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def describe(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "num_heads": [s.num_heads for s in self.layers],
            "num_kv_heads": [s.num_kv_heads for s in self.layers],
            "head_dim": sorted({s.head_dim for s in self.layers}),
            "vocab_size": int(self.lm_head.weight.shape[0]),
            "hidden_size": int(self.embed.weight.shape[1]),
        }


def discover(model: nn.Module) -> DecoderSpec:
    """Find the parts of a LLaMA-family causal LM, or raise UserError naming what is missing."""
    arch = type(model).__name__
    embed = _call_or_none(model, "get_input_embeddings")
    lm_head = _call_or_none(model, "get_output_embeddings")
    if not isinstance(embed, nn.Embedding):
        raise UserError(f"{arch}: no nn.Embedding input embeddings (get_input_embeddings); "
                        "only LLaMA-family decoders can be exported")
    if not isinstance(lm_head, nn.Linear):
        raise UserError(f"{arch}: no nn.Linear output head (get_output_embeddings); "
                        "only causal LMs with an lm_head can be exported")
    blocks = decoder_layers(model)
    for i, block in enumerate(blocks):
        _check_block(block, i, arch)
    final_norm = _final_norm(model, blocks, arch)
    rotary = _rotary(model, arch)
    config = getattr(model, "config", None)
    layers = [_layer_spec(block.self_attn, config, i, arch) for i, block in enumerate(blocks)]
    return DecoderSpec(embed, blocks, final_norm, lm_head, rotary, layers)


def _call_or_none(model, method):
    fn = getattr(model, method, None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        return None


def _check_block(block: nn.Module, index: int, arch: str) -> None:
    missing = [name for name in _BLOCK_PARTS if not isinstance(getattr(block, name, None), nn.Module)]
    if missing:
        raise UserError(f"{arch}: decoder block {index} ({type(block).__name__}) has no {', '.join(missing)}; "
                        f"export supports pre-norm LLaMA-family blocks ({', '.join(_BLOCK_PARTS)})")
    attn = block.self_attn
    missing = [name for name in _ATTENTION_PROJECTIONS if not isinstance(getattr(attn, name, None), nn.Linear)]
    if missing:
        raise UserError(f"{arch}: attention of block {index} ({type(attn).__name__}) has no nn.Linear "
                        f"{', '.join(missing)}; export needs separate q/k/v/o projections")
    # anything else with weights inside attention (q_norm/k_norm, sinks, ...) would be silently dropped by our
    # re-implemented attention, so refuse rather than export a wrong graph
    extra = [name for name, child in attn.named_children()
             if name not in _ATTENTION_PROJECTIONS and any(True for _ in child.parameters())]
    extra += [name for name, _ in attn.named_parameters(recurse=False)]
    if extra:
        raise UserError(f"{arch}: attention of block {index} has extra weighted parts ({', '.join(extra)}) "
                        "that the exporter does not implement; only plain LLaMA/Mistral/Qwen2 attention is supported")
    if any(isinstance(m, nn.Linear) for m in block.mlp.modules()) is False:
        raise UserError(f"{arch}: MLP of block {index} has no nn.Linear layers")


def _final_norm(model: nn.Module, blocks: nn.ModuleList, arch: str) -> nn.Module:
    """The norm that owns-by-sibling the block stack: a weighted leaf module next to the ModuleList."""
    for parent in model.modules():
        if any(child is blocks for child in parent.children()):
            norms = [child for child in parent.children()
                     if child is not blocks and _is_norm_like(child)]
            if len(norms) == 1:
                return norms[0]
            raise UserError(f"{arch}: expected one final norm beside the decoder blocks, found {len(norms)}; "
                            "only LLaMA-family decoders can be exported")
    raise UserError(f"{arch}: cannot find the module holding the decoder blocks")


def _is_norm_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (not list(module.children()) and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and not isinstance(module, (nn.Embedding, nn.Linear)))


def _rotary(model: nn.Module, arch: str) -> nn.Module:
    rotaries = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not rotaries:
        raise UserError(f"{arch}: no rotary position embedding module (a module with an inv_freq buffer); "
                        "export supports RoPE decoders only")
    if len({tuple(m.inv_freq.flatten().tolist()) for m in rotaries}) > 1:
        raise UserError(f"{arch}: several different rotary embeddings found; per-layer RoPE is not supported")
    return rotaries[0]


def _layer_spec(attn: nn.Module, config, index: int, arch: str) -> LayerSpec:
    head_dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    if not head_dim and config is not None:
        head_dim = config.hidden_size // config.num_attention_heads
    if not head_dim:
        raise UserError(f"{arch}: cannot tell the attention head size of block {index} (no head_dim)")
    q, k, v, o = (getattr(attn, name) for name in _ATTENTION_PROJECTIONS)
    if q.out_features % head_dim or k.out_features % head_dim or k.out_features != v.out_features:
        raise UserError(f"{arch}: block {index} projections q={q.out_features}, k={k.out_features}, "
                        f"v={v.out_features} are not whole heads of size {head_dim}")
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if kv_heads == 0 or heads % kv_heads:
        raise UserError(f"{arch}: block {index} has {heads} query heads for {kv_heads} KV heads; "
                        "grouped-query attention needs a whole number of query heads per KV head")
    if o.in_features != q.out_features:
        raise UserError(f"{arch}: block {index} o_proj takes {o.in_features} features but attention yields "
                        f"{q.out_features}")
    scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
    return LayerSpec(heads, kv_heads, head_dim, scaling)


# ---------------------------------------------------------------- the exported module

def rope_tables(rotary: nn.Module, max_positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every absolute position, from the model's own rotary module (so RoPE scaling variants hold)."""
    positions = torch.arange(max_positions, dtype=torch.long)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()
    if cos.shape != (max_positions, head_dim):
        raise UserError(f"rotary tables have shape {tuple(cos.shape)}, expected ({max_positions}, {head_dim}); "
                        "partial rotary embeddings are not supported")
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCacheDecoder(nn.Module):
    """forward(input_ids, attention_mask, positions, causal_mask, *past) -> (logits, *present).

    past/present alternate key, value per layer; keys are stored after RoPE; present = concat(past, new) on axis 2.
    """

    def __init__(self, spec: DecoderSpec, max_positions: int):
        super().__init__()
        self.spec = spec
        # registered so the exporter sees the HF modules' parameters; not copied
        self.embed, self.blocks, self.norm, self.lm_head = spec.embed, spec.blocks, spec.final_norm, spec.lm_head
        head_dims = {s.head_dim for s in spec.layers}
        for d in head_dims:
            cos, sin = rope_tables(spec.rotary, max_positions, d)
            self.register_buffer(f"rope_cos_{d}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{d}", sin, persistent=False)

    def forward(self, input_ids, attention_mask, positions, causal_mask, *past):
        # a key may be masked by either the causal structure or padding in attention_mask
        allowed = causal_mask * attention_mask[:, None, None, :]
        mask_bias = (1 - allowed).to(torch.float32) * torch.finfo(torch.float32).min
        hidden = self.embed(input_ids)
        presents = []
        for i, (block, layer) in enumerate(zip(self.blocks, self.spec.layers)):
            cos = getattr(self, f"rope_cos_{layer.head_dim}")[positions].unsqueeze(1)
            sin = getattr(self, f"rope_sin_{layer.head_dim}")[positions].unsqueeze(1)
            attn_out, key, value = self._attention(block.self_attn, layer, block.input_layernorm(hidden),
                                                   cos, sin, mask_bias, past[2 * i], past[2 * i + 1])
            presents += [key, value]
            hidden = hidden + attn_out
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        logits = self.lm_head(self.norm(hidden))
        return (logits, *presents)

    @staticmethod
    def _attention(attn, layer: LayerSpec, x, cos, sin, mask_bias, past_key, past_value):
        """GQA without repeating K/V: each KV head attends for its `group` query heads stacked along the rows.

        Keeping Concat(past, new) -> MatMul free of Expand/Reshape is what DeepSparse's internal KV cache needs
        (its cached-concat fusion asserts otherwise), and it avoids materialising repeated keys.
        """
        batch, length = x.shape[0], x.shape[1]
        heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
        q = attn.q_proj(x).reshape(batch, length, heads, dim).transpose(1, 2)
        k = attn.k_proj(x).reshape(batch, length, kv_heads, dim).transpose(1, 2)
        v = attn.v_proj(x).reshape(batch, length, kv_heads, dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        key = torch.cat((past_key, k), dim=2)
        value = torch.cat((past_value, v), dim=2)
        group = heads // kv_heads
        if group == 1:
            scores = torch.matmul(q, key.transpose(2, 3)) * layer.scaling + mask_bias
            probs = torch.softmax(scores, dim=-1)
        else:
            # query head h uses KV head h // group, so heads of one group are contiguous: fold them into rows, and
            # add the mask in 5-D (tiling it with Concat instead makes DeepSparse's compiler assert)
            q = q.reshape(batch, kv_heads, group * length, dim)
            scores = torch.matmul(q, key.transpose(2, 3)) * layer.scaling
            scores = scores.reshape(batch, kv_heads, group, length, -1) + mask_bias[:, :, None]
            probs = torch.softmax(scores, dim=-1).reshape(batch, kv_heads, group * length, -1)
        out = torch.matmul(probs, value).reshape(batch, heads, length, dim)
        out = out.transpose(1, 2).reshape(batch, length, heads * dim)
        return attn.o_proj(out), key, value


# ---------------------------------------------------------------- export

def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return [*INPUT_NAMES_FIXED, *past], ["logits", *present]


def _dummy_inputs(spec: DecoderSpec, length: int = 3, past_len: int = 2):
    total = past_len + length
    input_ids = torch.zeros(1, length, dtype=torch.long)
    attention_mask = torch.ones(1, total, dtype=torch.long)
    positions = torch.arange(past_len, total, dtype=torch.long)[None]
    causal_mask = torch.tril(torch.ones(length, total, dtype=torch.long), diagonal=past_len)[None, None]
    past = []
    for layer in spec.layers:
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
    """Export `model` to `path` (external data in model.data beside it when over 2 GB). Returns a summary."""
    import onnx

    path = Path(path)
    spec = discover(model)
    max_positions = max_positions or int(getattr(model.config, "max_position_embeddings"))
    wrapper = KVCacheDecoder(spec, max_positions).eval()
    inputs, outputs = io_names(spec.num_layers)
    with tempfile.TemporaryDirectory(prefix="dlp-export-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(wrapper, _dummy_inputs(spec), str(raw), dynamo=False, opset_version=OPSET,
                              input_names=inputs, output_names=outputs,
                              dynamic_axes=_dynamic_axes(inputs, outputs), do_constant_folding=True)
        proto = onnx.load(str(raw), load_external_data=True)
    renamed = name_weight_initializers(proto, model)
    external = save_model(proto, path)
    return {"spec": spec, "external_data": external, "named_initializers": renamed,
            "opset": OPSET, "ir_version": int(proto.ir_version)}


def tensor_bytes(proto) -> int:
    """Bytes of the graph's initializers, counted from the tensors: protobuf cannot even measure (ByteSize) or
    serialise a message over 2 GB, so the decision to go external must not ask it to."""
    from onnx import TensorProto, helper

    total = 0
    for t in proto.graph.initializer:
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        elif t.data_location == TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0) or 0)
        else:
            count = 1
            for d in t.dims:
                count *= d
            total += count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def save_model(proto, path: Path) -> bool:
    """Save inline when it fits in one protobuf, else with every tensor in one external data file."""
    import onnx

    external = tensor_bytes(proto) > _PROTOBUF_LIMIT
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return external


def name_weight_initializers(proto, model: nn.Module) -> int:
    """Give the exporter's anonymous folded weights (onnx::MatMul_123) their PyTorch names.

    Constant folding turns each Linear weight into a transposed initializer; matching by content lets
    export.json report sparsity per named weight. Returns how many initializers were renamed.
    """
    from onnx import numpy_helper

    by_digest: dict[tuple, str] = {}
    for name, param in model.named_parameters():
        if param.dim() != 2:
            continue
        w = param.detach().float().cpu().numpy()
        by_digest.setdefault(_digest(w), name)
        by_digest.setdefault(_digest(np.ascontiguousarray(w.T)), f"{name}.T")
    renames, taken = {}, {init.name for init in proto.graph.initializer}
    for init in proto.graph.initializer:
        if len(init.dims) != 2 or init.name in by_digest.values():
            continue
        target = by_digest.get(_digest(numpy_helper.to_array(init)))
        if target and target not in taken:
            renames[init.name] = target
            taken.add(target)
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
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=True)
    inits = {init.name: init for init in proto.graph.initializer}
    weights = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger") and len(node.input) > 1 and node.input[1] in inits:
            weights[node.input[1]] = inits[node.input[1]]
    per, zeros, total = {}, 0, 0
    for name, init in weights.items():
        if init.data_type not in _WEIGHT_BYTES:
            continue
        arr = numpy_helper.to_array(init)
        z = int(arr.size - np.count_nonzero(arr))
        per[name] = {"shape": list(arr.shape), "zeros": z, "sparsity": z / arr.size,
                     "bytes_per_weight": _WEIGHT_BYTES[init.data_type]}
        zeros, total = zeros + z, total + arr.size
    return {"per_initializer": per, "zeros": zeros, "params": total,
            "overall": zeros / total if total else 0.0}


_WEIGHT_BYTES = {1: 4, 3: 1}  # onnx.TensorProto.FLOAT, INT8
