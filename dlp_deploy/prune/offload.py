"""Out-of-core pruning: only one decoder block's weights in memory (or on the device) at a time.

The model is built on the meta device; the embeddings, the final norm, the head and the rotary tables (what
calibration needs outside the blocks) are materialised, and each decoder block's tensors are read from the input
safetensors shards only while the pipeline works on that block, then freed. The output folder starts as a byte
copy of the input shards (same files, same index, same dtype) and each pruned block is written into it at its
tensors' own byte offsets, so the output is sharded exactly like the input and no more than one block of weights
is ever held. Peak memory: one block + calibration activations + embeddings and head.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import UserError
from ..models import STREAMLINE_FILE, STRUCTURE_FILE, decoder_layers, linear_modules

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# weights and tensors reach the output only through the shard copy; these describe the model beside them
COPIED_FILES = ("config.json", "generation_config.json")

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class NotStreamable(Exception):
    """This model cannot be pruned out of core (the message says why); the job prunes it in memory instead."""


def shard_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and the byte where its data starts."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


class Checkpoint:
    """The safetensors shards of a local HF folder: which file holds each tensor, and their stored dtypes."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX_FILE).is_file():
            self.weight_map: dict[str, str] = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        elif (folder / SINGLE_FILE).is_file():
            self.weight_map = dict.fromkeys(shard_header(folder / SINGLE_FILE)[0], SINGLE_FILE)
        else:
            raise NotStreamable(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights stream)")
        self.shards = sorted(set(self.weight_map.values()))
        self.headers = {s: shard_header(folder / s) for s in self.shards}

    @classmethod
    def find(cls, folder: Path) -> "Checkpoint | None":
        with contextlib.suppress(NotStreamable):
            return cls(folder)
        return None

    def stored_dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self.headers[self.weight_map[key]][0][key]["dtype"]]

    def float_dtype(self) -> torch.dtype | None:
        """The floating dtype most of the stored parameters use (by element count)."""
        counts: Counter = Counter()
        for header, _ in self.headers.values():
            for entry in header.values():
                dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is not None and dtype.is_floating_point:
                    counts[dtype] += max(1, _numel(entry["shape"]))
        return counts.most_common(1)[0][0] if counts else None

    def largest_shard_bytes(self) -> int:
        return max((self.folder / s).stat().st_size for s in self.shards)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `keys`, read from their shards' byte ranges into fresh tensors. Not through safe_open: it
        maps the whole shard, and the mapped pages count in this process's resident set (a 500 MB shard per
        block read, more than the block itself), which is the figure out-of-core pruning exists to keep small."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_shard[self.weight_map[key]].append(key)
        out = {}
        for shard, names in by_shard.items():
            header, data_start = self.headers[shard]
            with open(self.folder / shard, "rb", buffering=0) as fh:
                for name in names:
                    entry = header[name]
                    begin, end = entry["data_offsets"]
                    raw = torch.empty(end - begin, dtype=torch.uint8)
                    view, done = memoryview(raw.numpy()), 0
                    fh.seek(data_start + begin)
                    while done < len(view):  # one read returns at most ~2 GB
                        got = fh.readinto(view[done:])
                        if not got:
                            raise UserError(f"{self.folder / shard} ends inside {name}; the file is truncated")
                        done += got
                    out[name] = raw.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        return out

    def copy_to(self, folder: Path) -> None:
        """The shards and index as they are: the file system copies the bytes, none pass through this process."""
        for name in [*self.shards, *([INDEX_FILE] if (self.folder / INDEX_FILE).is_file() else [])]:
            shutil.copyfile(self.folder / name, folder / name)

    def overwrite(self, folder: Path, key: str, tensor: torch.Tensor) -> None:
        """Write `tensor` over `key`'s bytes in the copy of its shard in `folder` (same dtype and shape)."""
        shard = self.weight_map[key]
        header, data_start = self.headers[shard]
        entry = header[key]
        begin, end = entry["data_offsets"]
        if tensor.dtype != _SAFETENSORS_DTYPES[entry["dtype"]] or list(tensor.shape) != entry["shape"]:
            raise AssertionError(f"{key}: {tensor.dtype} {list(tensor.shape)} cannot replace the stored "
                                 f"{entry['dtype']} {entry['shape']}")
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if raw.nbytes != end - begin:
            raise AssertionError(f"{key}: {raw.nbytes} bytes for a {end - begin}-byte slot")
        fd = os.open(folder / shard, os.O_WRONLY)
        try:
            os.pwrite(fd, memoryview(raw), data_start + begin)
        finally:
            os.close(fd)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def streaming_refusal(folder: Path | None, structured: bool) -> str | None:
    """Why this job cannot prune out of core (None: it can), before anything is loaded."""
    if structured:
        return "structured pruning changes tensor shapes, so it prunes in memory"
    if folder is None:
        return "only a local model folder streams (a hub model is loaded whole)"
    if (folder / STRUCTURE_FILE).is_file():
        return f"the input has {STRUCTURE_FILE} (layers of their own shapes), so it prunes in memory"
    if (folder / STREAMLINE_FILE).is_file():
        return f"the input has {STREAMLINE_FILE} (a depth-pruned stack), so it prunes in memory"
    if Checkpoint.find(folder) is None:
        return "the input has no safetensors weights (only those can be read one block at a time)"
    return None


class StreamedModel:
    """A causal LM on the meta device whose blocks are loaded one at a time; `block`/`forward` are the
    residency hooks the pipeline calls. Pruned blocks go into the output copy of the shards (`begin_output`)."""

    def __init__(self, folder: Path, config, dtype: torch.dtype, device: str | torch.device):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.checkpoint = Checkpoint(folder)
        self.dtype, self.device = dtype, torch.device(device)
        release_freed_memory()
        # rotary tables are buffers computed at construction: built for real (include_buffers=False), only the
        # parameters are empty
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.model.config.use_cache = False
        self.blocks = decoder_layers(self.model)
        self.prefix = next(name for name, m in self.model.named_modules() if m is self.blocks) + "."
        self._check_keys()
        self.out: Path | None = None
        self.realized: list[float | None] = [None] * len(self.blocks)
        self._materialise_outside_blocks()

    def _check_keys(self) -> None:
        stored = set(self.checkpoint.weight_map)
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        wanted = set(self.model.state_dict(keep_vars=True))
        missing = sorted(wanted - stored - tied)
        if missing:
            # e.g. checkpoints whose names transformers converts while loading (fused MoE experts, legacy names)
            raise NotStreamable(f"the checkpoint's tensor names differ from the model's (no {missing[0]!r}), "
                                "so it prunes in memory")

    def _materialise_outside_blocks(self) -> None:
        stored = self.checkpoint.weight_map
        names = [n for n in self.model.state_dict(keep_vars=True) if not n.startswith(self.prefix) and n in stored]
        for name, tensor in self.checkpoint.read(names).items():
            _set_tensor(self.model, name, tensor.to(self.device))
        if set(getattr(self.model, "all_tied_weights_keys", {}) or {}) - set(stored):
            self.model.tie_weights()
        for name, buf in self.model.named_buffers():
            if buf.device != self.device:  # rotary tables built on the CPU
                _set_tensor(self.model, name, buf.to(self.device))
        meta = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(self.prefix)]
        if meta:
            raise NotStreamable(f"{meta[0]} is neither stored nor tied, so it prunes in memory")

    # ------------------------------------------------------------------ residency hooks for the pipeline

    def _block_keys(self, index: int) -> dict[str, str]:
        block = self.blocks[index]
        return {local: f"{self.prefix}{index}.{local}" for local in block.state_dict(keep_vars=True)}

    def load(self, index: int) -> None:
        keys = self._block_keys(index)
        tensors = self.checkpoint.read([k for k in keys.values() if k in self.checkpoint.weight_map])
        for local, key in keys.items():
            if key in tensors:
                _set_tensor(self.blocks[index], local, tensors[key].to(self.device))

    def unload(self, index: int) -> None:
        block = self.blocks[index]
        for module in block.modules():
            for name, param in module._parameters.items():
                if param is not None and not param.is_meta:
                    module._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                            requires_grad=False)

    def begin_output(self, folder: Path) -> None:
        """Pruned blocks are written into a copy of the input shards in `folder` from now on."""
        self.checkpoint.copy_to(folder)
        for name in COPIED_FILES:
            if (self.checkpoint.folder / name).is_file():
                shutil.copyfile(self.checkpoint.folder / name, folder / name)
        self.out = folder

    def write(self, index: int) -> None:
        """Block `index`'s pruned Linear weights into the output, in the dtype the input stores them in."""
        if self.out is None:
            raise AssertionError("begin_output() before the prune pass")
        zeros = total = 0
        for name, m in linear_modules(self.blocks[index]).items():
            key = f"{self.prefix}{index}.{name}.weight"
            stored = m.weight.data.to(self.checkpoint.stored_dtype(key))
            self.checkpoint.overwrite(self.out, key, stored)
            zeros, total = zeros + int((stored == 0).sum()), total + stored.numel()
        self.realized[index] = zeros / total

    @contextlib.contextmanager
    def block(self, index: int, phase: str) -> Iterator[nn.Module]:
        """Block `index` with its weights for the duration; after the prune phase its weights are saved."""
        self.load(index)
        try:
            yield self.blocks[index]
            if phase == "prune":
                self.write(index)
        finally:
            self.unload(index)

    @contextlib.contextmanager
    def forward(self, model: nn.Module) -> Iterator[None]:
        """Let one full forward of the model run: each block is loaded as the forward reaches it, freed after."""
        def pre(index):
            return lambda *_args, **_kw: self.load(index)

        def post(index):
            return lambda *_args, **_kw: self.unload(index)

        handles = [h for i, b in enumerate(self.blocks)
                   for h in (b.register_forward_pre_hook(pre(i)), b.register_forward_hook(post(i)))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for i in range(len(self.blocks)):
                self.unload(i)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def release_freed_memory() -> None:
    """Make every allocation of 1 MiB or more its own mapping, returned to the OS when freed (glibc only; this
    process from now on). glibc's default threshold rises to the largest block it has freed (up to 32 MiB), after
    which a block's tensors come from the heap, where freeing rarely shrinks the resident set: a 0.3B prune out
    of core peaked at 1.71 GiB with it and 0.96 GiB without, for 20% more time (page faults on fresh mappings)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except OSError:
        pass  # not glibc (musl, macOS): their allocators need no such setting or offer none


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` (dotted, relative to `root`) by `value`, keeping its kind and the dtype
    the skeleton gave it (the compute dtype, or fp32 where a model keeps some modules in fp32)."""
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    old = owner._parameters.get(attr, owner._buffers.get(attr))
    if old is not None and old.is_floating_point() and value.is_floating_point():
        value = value.to(old.dtype)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise UserError(f"{name} is neither a parameter nor a buffer of {type(root).__name__}")
