"""Loading: a model reference resolved (folder, alias, fetched GGUF name, hub id), its config checked, the model
built (structured and depth-pruned folders rebuilt to their recorded shapes, models/shapes.py) and its weights
loaded."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from .fetch import ALIASES, MODEL_NAME, first_line, models_dir
from .layers import decoder_layers
from .shapes import STREAMLINE_FILE, STRUCTURE_FILE, apply_structure, rebuild

# transformers is imported inside the functions that use it: it takes about 3 s to import, which `dlp-deploy --help`
# and the one-line refusals before any loading should not pay


def resolve(model: str) -> str:
    """A local folder, a built-in alias (must be fetched), a fetched GGUF's name, or a hub id, in that order."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise UserError(f"{path} is a GGUF file; run `dlp-deploy models fetch {path} --name NAME` once, then give "
                        "NAME as MODEL")
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; point MODEL at a Hugging Face model folder")
        return str(path)
    if model in ALIASES:
        folder = ALIASES[model].folder()
        if not (folder / "config.json").is_file():
            raise UserError(f"model alias {model!r} is not fetched yet; run `dlp-deploy models fetch {model}`")
        return str(folder)
    if MODEL_NAME.fullmatch(model) and (models_dir() / model / "config.json").is_file():
        return str(models_dir() / model)  # fetched from a local GGUF
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model  # a hub id; loading reports whether the hub is reachable
    raise UserError(f"model {model!r} not found: give an existing HF folder, a hub id (org/name), an alias "
                    f"({', '.join(ALIASES)}) or a name fetched with `dlp-deploy models fetch FILE.gguf`")


def load_config(model: str):
    """(resolved reference, config) of a causal LM; a clear error if it is not one. Nothing is loaded but the config."""
    from transformers import AutoConfig

    ref = resolve(model)
    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a model config from {model!r} ({first_line(exc)}); "
                        "check the path, or the hub id and network") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{model!r} is a {config.model_type!r} model, not a causal LM; give a decoder-only "
                        "language model (LLaMA, Mistral, Qwen2, …)")
    return ref, config


def load(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) in eval mode, weights in `dtype`; a clear error if it is not a causal LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref, config = load_config(model)
    try:
        if (Path(ref) / STREAMLINE_FILE).is_file():
            lm = load_streamlined(Path(ref), config, dtype)
        elif (Path(ref) / STRUCTURE_FILE).is_file():
            lm = load_structured(Path(ref), config, dtype)
        else:
            lm = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {model!r} as a causal LM: {first_line(exc)}") from None
    decoder_layers(lm)  # fail now, not mid-pipeline, on architectures without a block stack
    tok = AutoTokenizer.from_pretrained(ref)
    lm.to(device).eval()
    lm.config.use_cache = False
    return lm, tok


def load_structured(folder: Path, config, dtype: torch.dtype = torch.float32):
    """A structured-pruned model: layers may have their own head counts and MLP widths, which config.json cannot
    express, so the model is built from its config, each block shrunk to structure.json's shapes, then the
    saved weights are loaded strictly (only a tied lm_head may be absent)."""
    from transformers import AutoModelForCausalLM


    record = json.loads((folder / STRUCTURE_FILE).read_text())
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_structure(decoder_layers(lm), record, getattr(config, "head_dim", None))
    return _load_weights_strictly(lm, folder, config, STRUCTURE_FILE)


def load_streamlined(folder: Path, config, dtype: torch.dtype = torch.float32):
    """A depth-pruned (LLM-Streamline) model: config.json already has the shorter stack, but an MLP-only
    replacement block is nothing config.json can express, so the model is built from its config, the block
    streamline.json names is swapped in, then the saved weights are loaded strictly."""
    from transformers import AutoModelForCausalLM


    record = json.loads((folder / STREAMLINE_FILE).read_text())
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rebuild(lm, decoder_layers(lm), record)
    lm.to(dtype)
    return _load_weights_strictly(lm, folder, config, STREAMLINE_FILE)


def _load_weights_strictly(lm, folder: Path, config, record_file: str):
    """The folder's safetensors into `lm`, every weight accounted for (only a tied lm_head may be absent)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has {record_file} but no .safetensors weights; re-run the prune")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = lm.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise UserError(f"{folder}: weights do not match {record_file} (missing {sorted(set(missing) - tied)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    lm.tie_weights()
    return lm
