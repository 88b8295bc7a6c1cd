"""GGUF files for llama.cpp: the peer deployment most CPU users pick.

One registry entry per HF model type (FAMILIES) says which llama.cpp architecture reads the model, which block
wiring, MLP activation and q/k norms that architecture's graph implements, whether its rope rotates adjacent pairs
(q/k rows reordered) or halves, and the hyper-parameters it needs beyond the common ones (soft-capping, sliding
windows). Everything else is read from the modules: widths per block, head size, attention scale, windows.
Tensors are named by gguf-py's own HF -> GGUF name map (the one llama.cpp's converter uses). A model whose blocks
differ in width (structured pruning) is written as an architecture whose loader reads `head_count`,
`head_count_kv` and `feed_forward_length` as per-layer arrays (`deci` for LLaMA-shaped blocks); llama.cpp's other
loaders size every block by layer 0, so such a model of those families is refused.

Quantization: f32, f16, q8_0, q4_0 and q4_1 come from gguf-py's quantizers; q4_k_m from llama.cpp's own
`llama_model_quantize` (in the installed llama-cpp-python) applied to an f32 GGUF written first, since gguf-py
has no k-quant quantizer. llama.cpp has no sparse kernels: unstructured zeros are stored and cost as much as any
other weight.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..models import GGUF_SOURCE_FILE, decoder_layers

TOKENIZER_PROBE = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
                   '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作'
                   '1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been '
                   '\'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
# llama.cpp names its BPE pre-tokenizers by a hash of the token ids of TOKENIZER_PROBE (from its converter's table);
# an unknown one is written as "default", which only matters when llama.cpp tokenizes text itself
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
}
@dataclass(frozen=True)
class GgufQuant:
    name: str
    tensor_type: str  # gguf GGMLQuantizationType name for 2-D weights ("" = produced by llama.cpp's quantizer)
    file_type: str  # gguf LlamaFileType name
    produced_by: str
    # max |Δlogit| against PyTorch on the validation prompt, relative to the largest |logit|: llama.cpp keeps its
    # KV cache in f16 and sums in its own order, so even f32 weights are not bit-close; the rest is the format's
    # rounding, measured on SmolLM2 and tiny random models with headroom
    logit_tolerance: float
    ppl_tolerance: float  # default for --ppl-tolerance: the deployment's perplexity over the PyTorch source's


GGUF_QUANTS = {q.name: q for q in (
    GgufQuant("f32", "F32", "ALL_F32", "gguf-py", 0.01, 0.01),
    GgufQuant("f16", "F16", "MOSTLY_F16", "gguf-py", 0.02, 0.01),
    GgufQuant("q8_0", "Q8_0", "MOSTLY_Q8_0", "gguf-py", 0.1, 0.03),
    # 4-bit: a max |Δlogit| bound says little (SmolLM2: 0.16-0.59 of the logit scale); agreement and perplexity
    # judge these. Q4_0 re-quantizes weights that were already 4-bit on another grid (SmolLM2 ships as Q4_1)
    GgufQuant("q4_1", "Q4_1", "MOSTLY_Q4_1", "gguf-py", 0.5, 0.15),
    GgufQuant("q4_k_m", "", "MOSTLY_Q4_K_M", "llama.cpp llama_model_quantize", 0.5, 0.15),
    GgufQuant("q4_0", "Q4_0", "MOSTLY_Q4_0", "gguf-py", 0.75, 0.5),
)}


# not a format but the file a GGUF-fetched model came from, unchanged: the peer its users run today. Not in
# GGUF_QUANTS, so a sweep cannot ask for it at a pruned level (whose weights that file does not hold). The file is
# compared with its own weights dequantized, yet llama.cpp multiplies k-quants with activations rounded to 8 bits:
# on Qwen2.5-Coder-1.5B's Q4_K_M that moved the largest logit by 0.38 and 0.58 of the logit scale on two prompts,
# so no max |Δlogit| bound separates a right file from a wrong one; greedy agreement and perplexity judge it
SOURCE_QUANT = GgufQuant("source", "", "", "the model's own GGUF file (models fetch), copied unchanged", 1.0, 0.05)


def gguf_quant(name: str) -> GgufQuant:
    if name == SOURCE_QUANT.name:
        return SOURCE_QUANT
    if name not in GGUF_QUANTS:
        raise UserError(f"unknown GGUF quantization {name!r}; choose one of {', '.join(GGUF_QUANTS)}, or source "
                        "(the GGUF a fetched model came from)")
    return GGUF_QUANTS[name]


def source_gguf(folder: Path, changed_by: list[str]) -> Path:
    """The GGUF file `folder` was dequantized from (its gguf_source.json), checked to be that file and to still
    hold `folder`'s weights: refused where `changed_by` names a record of pruning or recovery in the folder."""
    record_path = folder / GGUF_SOURCE_FILE
    if not record_path.is_file():
        raise UserError(f"--quant source: {folder} was not made by `dlp-deploy models fetch` from a GGUF (no "
                        f"{GGUF_SOURCE_FILE}); pick a format (q8_0, q4_k_m, ...)")
    if changed_by:
        raise UserError(f"--quant source: {folder} was changed after its fetch ({', '.join(changed_by)}), so its "
                        "source GGUF holds other weights; pick a format (q8_0, q4_k_m, ...)")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    path = Path(record["gguf"])
    if not path.is_file() or path.stat().st_size != record.get("bytes", path.stat().st_size):
        raise UserError(f"--quant source: the source GGUF {path} is missing or changed; run `dlp-deploy models "
                        "fetch` again")
    return path


def copy_source_gguf(source: Path, path: Path) -> dict:
    """Copy the source GGUF to `path` (a hard link where the file system allows); what export.json records."""
    import gguf

    try:
        os.link(source, path)
    except OSError:
        shutil.copyfile(source, path)
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    return {"architecture": arch, "quant": SOURCE_QUANT.name, "produced_by": SOURCE_QUANT.produced_by,
            "source_file": str(source), "tensor_types": _tensor_types(path), "sparse_kernels": False}


# ---------------------------------------------------------------- families

def _no_hparams(writer, config, layout) -> None:
    return None


def _softcap_hparams(writer, config, layout) -> None:
    """Gemma-2/3: tanh soft-capping of attention scores and of the final logits, where the config sets them."""
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _gemma_attention_scale(layout) -> float:
    """llama.cpp's Gemma-2/3 loaders scale queries by 1/sqrt(head size), or by 1/sqrt(hidden/heads) for the 27B
    models, which they recognise by block count (46 for Gemma-2, 62 for Gemma-3)."""
    if layout.blocks == {"gemma2": 46, "gemma3": 62}.get(layout.arch):
        return (layout.hidden / layout.heads[0]) ** -0.5
    return layout.head_dim ** -0.5


@dataclass(frozen=True)
class GgufFamily:
    """How llama.cpp's architecture for one HF model type reads it."""

    arch: str  # llama.cpp architecture (gguf MODEL_ARCH_NAMES value) for blocks of one width
    activation: str  # the MLP activation its graph applies (HF hidden_act / hidden_activation)
    wiring: str = "pre-norm"  # export.blocks.WIRINGS key: where its graph puts the norms
    qk_norm: str | None = None  # "head" / "full" q/k RMSNorms its graph applies (LayerSpec.qk_norm)
    per_layer_arch: str | None = None  # written instead when widths differ per block (reads per-layer arrays)
    sliding: bool = False  # its graph applies a sliding window (SWA layers from the per-layer pattern)
    attention_softcap: bool = False  # its graph tanh-caps attention scores (Gemma-2's)
    tied_head_only: bool = False  # its graph reads the LM head from token_embd, never a separate `output`
    norm_shift: float = 0.0  # added to every RMSNorm weight: Gemma's norm multiplies by (1 + w)
    hparams: Callable = _no_hparams  # keys beyond the common ones: (writer, config, layout)
    # the query scale its graph applies, (layout) -> float; the model's own is folded into q (or q's norm)
    attention_scale: Callable = lambda layout: layout.head_dim ** -0.5


# llama.cpp's rope for these rotates adjacent pairs (LLAMA_ROPE_TYPE_NORM); HF's and the others' rotate halves
ROTATES_PAIRS = frozenset({"llama", "deci"})

FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily("llama", "silu", per_layer_arch="deci"),
    # Mistral's blocks are LLaMA's; llama.cpp's llama graph has no sliding window (seq_len is capped at it)
    "mistral": GgufFamily("llama", "silu", per_layer_arch="deci"),
    # deci reads optional q/k/v biases, so a structured Qwen2 keeps them
    "qwen2": GgufFamily("qwen2", "silu", per_layer_arch="deci"),
    "qwen3": GgufFamily("qwen3", "silu", qk_norm="head"),
    "phi3": GgufFamily("phi3", "silu"),  # fused qkv and gate_up map to attn_qkv and ffn_up as they are
    "gemma2": GgufFamily("gemma2", "gelu_pytorch_tanh", wiring="sandwich", sliding=True, attention_softcap=True,
                         tied_head_only=True, norm_shift=1.0, hparams=_softcap_hparams, attention_scale=_gemma_attention_scale),
    "gemma3_text": GgufFamily("gemma3", "gelu_pytorch_tanh", wiring="sandwich", qk_norm="head", sliding=True,
                              norm_shift=1.0, hparams=_softcap_hparams, attention_scale=_gemma_attention_scale),
    "olmo2": GgufFamily("olmo2", "silu", wiring="post-norm", qk_norm="full", sliding=True),
}


def gguf_family(config) -> GgufFamily:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UserError(f"GGUF export maps {', '.join(FAMILIES)}; {config.model_type!r} is not mapped: export it to "
                        "ONNX instead (--format onnx)")
    return family


# ---------------------------------------------------------------- geometry

@dataclass(frozen=True)
class GgufLayout:
    arch: str  # the llama.cpp architecture written
    family: GgufFamily
    hidden: int
    head_dim: int
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    windows: list[int | None]  # each block's sliding window (None: full attention)
    scaling: float  # the model's query scale (the same in every block)

    @property
    def uniform(self) -> bool:
        return len(set(self.heads)) == len(set(self.kv_heads)) == len(set(self.ffn)) == 1

    @property
    def blocks(self) -> int:
        return len(self.heads)

    def per_layer(self, values: list[int]):
        return values[0] if self.uniform else values


def gguf_layout(model) -> GgufLayout:
    """Widths of every block read from its modules (a structured model's blocks differ), checked against what the
    family's llama.cpp architecture implements, or a one-line refusal."""
    from .blocks import layer_spec

    config = model.config
    family = gguf_family(config)
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation != family.activation:
        raise UserError(f"llama.cpp's {family.arch} architecture applies {family.activation} in the MLP; this model "
                        f"uses {activation!r}: export it to ONNX instead (--format onnx)")
    blocks = decoder_layers(model)
    mlp_only = [i for i, b in enumerate(blocks) if not isinstance(getattr(b, "self_attn", None), torch.nn.Module)]
    if mlp_only:
        raise UserError(f"GGUF export needs attention in every block; blocks {mlp_only} are MLP-only (a depth-pruning "
                        "replacement): export it to ONNX instead (--format onnx)")
    specs = [layer_spec(block, config, i, family.arch) for i, block in enumerate(blocks)]
    _check_specs(specs, family)
    heads, kv_heads = [s.num_heads for s in specs], [s.num_kv_heads for s in specs]
    ffn = [_ffn_width(block, config.hidden_size, i) for i, block in enumerate(blocks)]
    uniform = len(set(heads)) == len(set(kv_heads)) == len(set(ffn)) == 1
    if not uniform and family.per_layer_arch is None:
        raise UserError(f"llama.cpp's {family.arch} loader sizes every block like the first (it reads no per-layer "
                        "head counts or FFN widths), and this model's blocks differ: export it to ONNX instead "
                        "(--format onnx)")
    arch = family.arch if uniform else family.per_layer_arch
    return GgufLayout(arch, family, int(config.hidden_size), specs[0].head_dim, heads, kv_heads, ffn, [s.window for s in specs],
                      specs[0].scaling)


def _check_specs(specs, family: GgufFamily) -> None:
    """What llama.cpp reads once for all blocks must be one value; what its graph lacks must be absent."""
    for field, what in (("head_dim", "head size"), ("scaling", "attention scale"), ("softcap", "soft-capping")):
        if len({getattr(s, field) for s in specs}) > 1:
            raise UserError(f"llama.cpp's {family.arch} architecture reads one {what} for all blocks; this model's "
                            "blocks differ: export it to ONNX instead (--format onnx)")
    spec = specs[0]
    checks = ((spec.wiring, family.wiring, "norm wiring"), (spec.qk_norm, family.qk_norm, "q/k norm"))
    for found, wanted, what in checks:
        if found != wanted:
            raise UserError(f"llama.cpp's {family.arch} architecture implements {what} {wanted!r}, this model's "
                            f"blocks have {found!r}: export it to ONNX instead (--format onnx)")
    if spec.softcap and not family.attention_softcap:
        raise UserError(f"llama.cpp's {family.arch} architecture has no attention soft-capping, this model's blocks "
                        "cap their scores: export it to ONNX instead (--format onnx)")
    if family.sliding and len({w for w in (s.window for s in specs) if w}) > 1:
        raise UserError(f"llama.cpp's {family.arch} architecture reads one sliding window for all sliding layers; "
                        "this model's differ: export it to ONNX instead (--format onnx)")


def _ffn_width(block, hidden: int, index: int) -> int:
    """The MLP's width: the input size of its Linear that writes back to the hidden state (down). A structured
    model may keep exactly `hidden` channels, so shapes alone may not single it out: it is the last Linear writing
    the hidden size in the MLP's own order (as in every family's MLP, fused or not)."""
    writers = [m for m in block.mlp.modules() if isinstance(m, torch.nn.Linear) and m.out_features == hidden]
    if not writers:
        raise UserError(f"block {index}: no MLP Linear writes the hidden size ({hidden}): export it to ONNX instead "
                        "(--format onnx)")
    return writers[-1].in_features


def check_gguf_window(model, seq_len: int) -> None:
    """Where llama.cpp's architecture has no sliding window, attention past it would differ: cap the window."""
    layout = gguf_layout(model)
    windows = [w for w in layout.windows if w]
    if windows and not layout.family.sliding and seq_len > min(windows):
        raise UserError(f"--seq-len {seq_len} exceeds the model's sliding attention window ({min(windows)}), which "
                        f"llama.cpp's {layout.arch} architecture does not apply; use --seq-len {min(windows)} or "
                        "less, or --format onnx")


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotates the two halves of each head (rotate_half); llama.cpp's `llama` rope rotates adjacent pairs.
    Reorder each head's rows so the same pairs rotate (llama.cpp's converter does the same)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# ---------------------------------------------------------------- writing

def write_gguf(model, tokenizer, path: Path, quant: GgufQuant, tokenizer_dir: Path, name: str = "") -> dict:
    """Write `model` as a GGUF file in `quant`; returns what export.json records about it."""
    layout = gguf_layout(model)
    if quant.tensor_type:
        tensors = _write(model, tokenizer, path, quant, layout, tokenizer_dir, name)
    else:
        with tempfile.TemporaryDirectory(prefix="dlp-gguf-", dir=path.parent) as tmp:
            source = Path(tmp) / "f32.gguf"
            _write(model, tokenizer, source, GGUF_QUANTS["f32"], layout, tokenizer_dir, name)
            llamacpp_quantize(source, path, quant)
        tensors = _tensor_types(path)
    windows = sorted({w for w in layout.windows if w})
    return {"architecture": layout.arch, "hf_model_type": model.config.model_type, "quant": quant.name,
            "produced_by": quant.produced_by, "tensor_types": tensors, "head_count": layout.heads,
            "head_count_kv": layout.kv_heads, "feed_forward_length": layout.ffn, "head_dim": layout.head_dim,
            "sliding_window": (windows[0] if windows else None) if layout.family.sliding else None,
            "sparse_kernels": False}


def _write(model, tokenizer, path: Path, quant: GgufQuant, layout: GgufLayout, tokenizer_dir: Path,
           name: str) -> dict[str, int]:
    import gguf

    writer = gguf.GGUFWriter(str(path), layout.arch)
    _write_hparams(writer, model.config, layout, quant, name)
    layout.family.hparams(writer, model.config, layout)
    _write_window(writer, model.config, layout)
    _write_vocab(writer, tokenizer, model.config.vocab_size, tokenizer_dir)
    _write_name(writer, name or model.config.model_type, tokenizer)
    counts: dict[str, int] = {}
    for gguf_name, tensor in _named_tensors(model, layout):
        data, raw_type = _encode(tensor, quant)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)  # the writer turns byte rows into element rows
        counts[raw_type.name] = counts.get(raw_type.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _write_hparams(writer, config, layout: GgufLayout, quant: GgufQuant, name: str) -> None:
    import gguf

    rope = _rope(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(layout.blocks)
    writer.add_feed_forward_length(layout.per_layer(layout.ffn))
    writer.add_head_count(layout.per_layer(layout.heads))
    writer.add_head_count_kv(layout.per_layer(layout.kv_heads))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(int(layout.head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(getattr(gguf.LlamaFileType, quant.file_type))
    scaling = rope.get("rope_type", "default")
    if scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif scaling not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor
        raise UserError(f"rope scaling {scaling!r} is not written to GGUF yet; export to ONNX instead")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_window(writer, config, layout: GgufLayout) -> None:
    """The sliding window and which layers use it (an explicit per-layer pattern, as llama.cpp's converter writes
    for OLMo-3), and the local layers' rope base (Gemma-3's), for the architectures whose graph applies them."""
    windows = [w for w in layout.windows if w]
    if not (layout.family.sliding and windows):
        return
    writer.add_sliding_window(int(windows[0]))
    writer.add_sliding_window_pattern([bool(w) for w in layout.windows])
    params = getattr(config, "rope_parameters", None) or {}
    local = params.get("sliding_attention", {}) if isinstance(params, dict) else {}
    if "rope_theta" in local:
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))


# llama.cpp's vocabulary loader gives these tokens Phi-3's strip attributes when general.name contains "phi3" or
# "phi-3", and aborts (unordered_map::at) when the vocabulary lacks one of them
PHI3_NAME_RULE = (("phi3", "phi-3"), ("</s>", "<unk>", "<s>", "<|endoftext|>"))


def _write_name(writer, name: str, tokenizer) -> None:
    """general.name is informational; it is left out where llama.cpp's name-keyed rule would abort the load."""
    fragments, tokens = PHI3_NAME_RULE
    vocab = tokenizer.get_vocab()
    if any(f in name.lower() for f in fragments) and not all(t in vocab for t in tokens):
        return
    writer.add_name(name)


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params.get("full_attention", params)) if isinstance(params, dict) else {}


def _named_tensors(model, layout: GgufLayout):
    """(GGUF name, fp32 tensor) for every weight llama.cpp reads, in the family's conventions."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == layout.arch)
    names = gguf.get_tensor_name_map(arch, layout.blocks)
    head = model.get_output_embeddings()
    separate_head = head is not None and head.weight is not model.get_input_embeddings().weight
    for hf_name, param in model.named_parameters():  # a tied head is the embedding, listed once
        if layout.family.tied_head_only and separate_head and param is head.weight:
            raise UserError(f"llama.cpp's {layout.arch} architecture reads the LM head from the embedding; this "
                            "model's head is a separate matrix: export it to ONNX instead (--format onnx)")
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"no GGUF tensor of llama.cpp's {layout.arch} architecture for {hf_name}: export it to "
                            "ONNX instead (--format onnx)")
        yield gguf_name, _convert(gguf_name, param.detach().float().cpu(), layout)
    freqs = _llama3_rope_factors(model.config, layout.head_dim)
    if freqs is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs


def _convert(gguf_name: str, tensor: torch.Tensor, layout: GgufLayout) -> torch.Tensor:
    """One tensor in llama.cpp's conventions: Gemma's norm offset, the model's query scale folded in where the
    graph applies another, q/k rows reordered where its rope rotates adjacent pairs."""
    family, block = layout.family, _block_index(gguf_name)
    role = gguf_name.split(".")[-2]
    if family.norm_shift and role.endswith("norm"):
        tensor = tensor + family.norm_shift
    ratio = layout.scaling / family.attention_scale(layout)
    if abs(ratio - 1.0) > 1e-9:
        tensor = _fold_query_scale(tensor, role, ratio, layout, block)
    if layout.arch in ROTATES_PAIRS and role in ("attn_q", "attn_k"):
        tensor = permute_rotary(tensor, (layout.heads if role == "attn_q" else layout.kv_heads)[block])
    return tensor


def _fold_query_scale(tensor: torch.Tensor, role: str, ratio: float, layout: GgufLayout, block: int):
    """Queries scaled by `ratio` (the model's scale over the graph's): through q's norm weight where q is normed
    after its projection (a norm undoes any scale before it), else through q's rows (weight and bias)."""
    carrier = "attn_q_norm" if layout.family.qk_norm else "attn_q"
    if role == carrier:
        return tensor * ratio
    if role == "attn_qkv" and carrier == "attn_q":  # fused: q's rows come first
        rows = layout.heads[block] * layout.head_dim
        return torch.cat([tensor[:rows] * ratio, tensor[rows:]])
    return tensor


def _block_index(gguf_name: str) -> int:
    parts = gguf_name.split(".")
    return int(parts[1]) if parts[0] == "blk" else -1


def _llama3_rope_factors(config, head_dim: int) -> torch.Tensor | None:
    """Llama 3.x's frequency-dependent rope scaling as llama.cpp reads it (a per-frequency factor tensor)."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _encode(tensor: torch.Tensor, quant: GgufQuant):
    """Bytes and type of one tensor: 1-D tensors stay f32 (as llama.cpp's converter keeps norms); a weight whose
    rows do not split into the format's blocks falls back to f16."""
    import gguf

    array = tensor.numpy()
    if array.ndim == 1:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    qtype = getattr(gguf.GGMLQuantizationType, quant.tensor_type)
    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32), qtype
    try:
        return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
    except gguf.QuantError:
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16


# ---------------------------------------------------------------- vocabulary

def _write_vocab(writer, tokenizer, vocab_size: int, tokenizer_dir: Path) -> None:
    """The tokenizer as llama.cpp reads it: a byte-level BPE ("gpt2": tokens + merges) or a SentencePiece-style
    one ("llama": tokens + scores, byte-fallback tokens typed BYTE). Token ids are the model's."""
    import gguf

    spm = _is_sentencepiece(tokenizer)
    tokens, types = _tokens(tokenizer, vocab_size, spm)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    if not spm:
        writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
    special = gguf.SpecialVocab(str(tokenizer_dir), load_merges=not spm, n_vocab=len(tokens))
    if not spm and not special.merges:
        special.merges = ["\u0120 \u0120"]  # llama.cpp refuses a BPE vocabulary without merges; one harmless pair
    special.add_to_gguf(writer)


def _tokens(tokenizer, vocab_size: int, spm: bool) -> tuple[list[str], list[int]]:
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    special_ids = set(tokenizer.all_special_ids)
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special_ids:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.USER_DEFINED)
        elif spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _is_sentencepiece(tokenizer) -> bool:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return True
    model = json.loads(backend.to_str()).get("model", {})
    return bool(model.get("byte_fallback"))


def _pre_tokenizer(tokenizer) -> str:
    ids = tokenizer.encode(TOKENIZER_PROBE)
    return KNOWN_PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest(), "default")


# ---------------------------------------------------------------- llama.cpp's quantizer

def llamacpp_quantize(source: Path, target: Path, quant: GgufQuant) -> None:
    from ..runtime.llamacpp_engine import llamacpp_module

    llama_cpp = llamacpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{quant.file_type}")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0 or not target.is_file():
        raise UserError(f"llama.cpp could not quantize to {quant.name} (status {status})")


def _tensor_types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def gguf_weight_stats(path: Path) -> dict:
    """Every matrix a decode step multiplies (block weights, and `output`, or `token_embd` when the head is tied
    to it), with its zeros as stored (dequantized) and bytes per weight, in the shape `onnx_weight_sparsity`
    reports for ONNX files, so the bandwidth-bound ideal is computed the same way for both formats."""
    import gguf
    from gguf.quants import dequantize

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2}
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    per, zeros, total = {}, 0, 0
    for name, tensor in tensors.items():
        if not (name.startswith("blk.") or name == head):
            continue
        values = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        z = int(values.size - np.count_nonzero(values))
        per[name] = {"shape": [int(d) for d in reversed(tensor.shape)], "zeros": z, "sparsity": z / values.size,
                     "bytes_per_weight": int(tensor.n_bytes) / int(tensor.n_elements)}
        zeros, total = zeros + z, total + values.size
    return {"per_initializer": per, "zeros": zeros, "params": total, "overall": zeros / total if total else 0.0}


def stored_block_sparsity(path: Path) -> dict:
    """Zeros among the block weights as stored in the GGUF file: what llama.cpp multiplies by."""
    per = gguf_weight_stats(path)["per_initializer"]
    blocks = [e for name, e in per.items() if name.startswith("blk.")]
    total = sum(int(np.prod(e["shape"])) for e in blocks)
    return {"global": sum(e["zeros"] for e in blocks) / total if total else 0.0, "block_params": total,
            "note": "llama.cpp has no sparse kernels: stored zeros are multiplied like any other weight"}
