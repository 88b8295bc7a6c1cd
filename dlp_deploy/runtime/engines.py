"""One registry of inference engines behind a common one-step interface with a KV cache.

A session runs one forward step: run(input_ids, attention_mask, positions, causal_mask, past_kv) ->
(logits, present_kv). DeepSparse compiles fixed shapes, so its cache is a fixed window of `seq_len` slots: past = the
last seq_len - L slots (left-padded with zeros until filled), attention_mask ones right-aligned. ONNX Runtime runs
the same graph with a cache that grows by one slot per token. Sessions own the window a step attends over
(`window`) and how a cache is started and carried from one step to the next (`init_past`, `advance`), so the decode
loop stays engine-agnostic, including DeepSparse's engine-internal cache where the arrays never reach Python.
"""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # DeepSparse phones home on import otherwise

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from .llamacpp_engine import LLAMACPP_MISSING, LlamaCppSession, llamacpp_available
from .openvino_engine import OPENVINO_MISSING, OpenVinoSessionMixin, openvino_available

PAST_PREFIX = "past_key_values"
PRESENT_PREFIX = "present"


DEEPSPARSE_MISSING = ("deepsparse is not installed; install deepsparse==1.8.0 (Linux x86_64, Python <3.12) "
                      "or use --engine onnxruntime (ONNX Runtime still works)")


def deepsparse_available() -> bool:
    return importlib.util.find_spec("deepsparse") is not None


# ---------------------------------------------------------------- graph facts shared by all engines

@dataclass(frozen=True)
class GraphIO:
    input_names: list[str]
    output_names: list[str]
    cache_shapes: list[tuple[int, int]]  # (kv_heads, head_dim) per past input, in input order

    @classmethod
    def read(cls, onnx_path: str | Path) -> "GraphIO":
        import onnx

        proto = onnx.load(str(onnx_path), load_external_data=False)
        inits = {i.name for i in proto.graph.initializer}
        inputs = [i for i in proto.graph.input if i.name not in inits]
        names = [i.name for i in inputs]
        if names[:4] != ["input_ids", "attention_mask", "positions", "causal_mask"]:
            raise UserError(f"{onnx_path} does not follow the KV-cache contract (inputs {names[:4]}); "
                            "re-export it with `dlp-deploy export`")
        shapes = [(_dim(i, 1), _dim(i, 3)) for i in inputs if i.name.startswith(PAST_PREFIX)]
        return cls(names, [o.name for o in proto.graph.output], shapes)


def _dim(value_info, axis: int) -> int:
    return int(value_info.type.tensor_type.shape.dim[axis].dim_value)


class _CacheWindow:
    """External cache handling common to sessions whose present arrays come back to Python."""

    seq_len: int
    io: GraphIO
    batch: int

    def window(self, filled: int, length: int) -> int:
        """Slots S the step with `length` new tokens after `filled` ones attends over: the fixed window."""
        return self.seq_len

    def init_past(self, length: int) -> list[np.ndarray]:
        """An empty (all padding) cache for a first step of `length` tokens."""
        return [np.zeros((self.batch, h, self.seq_len - length, d), np.float32) for h, d in self.io.cache_shapes]

    def advance(self, present: list[np.ndarray], next_length: int) -> list[np.ndarray]:
        """The past for a next step of `next_length` tokens: drop the oldest slots (padding until the window fills)."""
        return [np.ascontiguousarray(p[:, :, next_length:, :]) for p in present]


class _GrowingCache(_CacheWindow):
    """For engines with dynamic shapes: the past holds just the tokens so far, and a step's present (past + new,
    contiguous) is the next step's past as is. Sliding a fixed window instead copies every layer's cache each
    token (8% of an ONNX Runtime decode step on SmolLM2) and attends over padding."""

    def window(self, filled: int, length: int) -> int:
        return filled + length

    def init_past(self, length: int) -> list[np.ndarray]:
        return [np.zeros((self.batch, h, 0, d), np.float32) for h, d in self.io.cache_shapes]

    def advance(self, present: list[np.ndarray], next_length: int) -> list[np.ndarray]:
        return present


# ---------------------------------------------------------------- ONNX Runtime

class OrtSession(_GrowingCache):
    name = "onnxruntime"
    internal_cache = False

    def __init__(self, onnx_path, seq_len: int, num_cores: int | None = None, batch: int = 1):
        import onnxruntime as ort

        self.seq_len, self.batch, self.io = seq_len, batch, GraphIO.read(onnx_path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_cores:
            opts.intra_op_num_threads = num_cores
            opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def prepare(self, length: int) -> None:
        """Shapes are dynamic in ONNX Runtime: nothing to compile per length."""

    def run(self, input_ids, attention_mask, positions, causal_mask, past_kv):
        feed = dict(zip(self.io.input_names, (input_ids, attention_mask, positions, causal_mask, *past_kv)))
        logits, *present = self._session.run(None, feed)
        return logits, present


# ---------------------------------------------------------------- DeepSparse

def shaped_copy(onnx_path: str | Path, seq_len: int, length: int, batch: int, folder: str | Path) -> Path:
    """A copy of the graph with fixed shapes for one (batch, L, S), written under `folder`.

    DeepSparse compiles fixed shapes and its own helper rewrites them inside the file it is given, so the deployed
    model.onnx is never handed to it. External weights are linked, not copied.
    """
    import onnx

    src, folder = Path(onnx_path), Path(folder)
    proto = onnx.load(str(src), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        dims[0].dim_value = batch
        if inp.name in ("input_ids", "positions"):
            dims[1].dim_value = length
        elif inp.name == "attention_mask":
            dims[1].dim_value = seq_len
        elif inp.name == "causal_mask":
            dims[2].dim_value, dims[3].dim_value = length, seq_len
        elif inp.name.startswith(PAST_PREFIX):
            dims[2].dim_value = seq_len - length
    for location in _external_locations(proto):
        link = folder / location
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((src.parent / location).resolve(), link)
    out = folder / f"model_L{length}_S{seq_len}.onnx"
    onnx.save_model(proto, str(out))
    return out


def _external_locations(proto) -> set[str]:
    locations = set()
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return locations


class DeepSparseSession(_CacheWindow):
    """One compiled engine per input length L (DeepSparse needs fixed shapes): typically prefill P and decode 1.
    The KV cache is carried in Python (`deepsparse-external`)."""

    name = "deepsparse-external"
    internal_cache = False

    def __init__(self, onnx_path, seq_len: int, num_cores: int | None = None, batch: int = 1):
        if not deepsparse_available():
            raise UserError(DEEPSPARSE_MISSING)
        self.onnx_path, self.seq_len, self.num_cores, self.batch = Path(onnx_path), seq_len, num_cores, batch
        self.io = GraphIO.read(onnx_path)
        self._engines: dict[int, object] = {}

    def _compile_kwargs(self, shaped: Path) -> dict:
        return {}

    def prepare(self, length: int):
        """Compile the engine for `length` input tokens (once); keep it out of any timed step."""
        if length in self._engines:
            return self._engines[length]
        if not 1 <= length < self.seq_len:
            raise UserError(f"cannot run {length} tokens at once in a {self.seq_len}-token window; "
                            "use a shorter prompt or a larger --seq-len")
        from deepsparse import Engine

        with tempfile.TemporaryDirectory(prefix="dlp-ds-") as tmp:
            shaped = shaped_copy(self.onnx_path, self.seq_len, length, self.batch, tmp)
            engine = Engine(str(shaped), batch_size=self.batch, num_cores=self.num_cores,
                            **self._compile_kwargs(shaped))
        self._engines[length] = engine
        self._warm_up(engine, length)
        return engine

    def _warm_up(self, engine, length: int) -> None:
        """The first execution of a compiled engine pays one-time setup; keep it out of timed steps."""
        from .decode import step_inputs

        mask, positions, causal = step_inputs(self.seq_len, 0, length)
        ids = np.zeros((self.batch, length), np.int64)
        batch = lambda a: np.repeat(a, self.batch, axis=0)  # noqa: E731
        past = self._placeholders(length) if self.internal_cache else _CacheWindow.init_past(self, length)
        self._execute(engine, [batch(ids), batch(mask), batch(positions), batch(causal), *past], warm_up=True)

    def _execute(self, engine, inputs, warm_up: bool = False):
        return engine.run(inputs, val_inp=False)

    def fraction_of_supported_ops(self, length: int = 1) -> float:
        return float(self.prepare(length).fraction_of_supported_ops)

    def run(self, input_ids, attention_mask, positions, causal_mask, past_kv):
        engine = self._engines.get(input_ids.shape[1]) or self.prepare(input_ids.shape[1])
        logits, *present = self._execute(engine, [input_ids, attention_mask, positions, causal_mask, *past_kv])
        return logits, present


class DeepSparseInternalSession(DeepSparseSession):
    """DeepSparse keeping the KV cache inside the engine (`cached_outputs`): past inputs are passed empty
    (batch 0) and the cache lives in a LIB.kv_cache object shared by the prefill and decode engines."""

    name = "deepsparse"
    internal_cache = True

    def _compile_kwargs(self, shaped: Path) -> dict:
        from deepsparse.utils.onnx import default_cached_outputs

        return {"cached_outputs": default_cached_outputs(str(shaped))}

    def init_past(self, length: int) -> list[np.ndarray]:
        from deepsparse.engine import LIB

        # a fresh engine-side cache: no previous tokens, none frozen
        self._kv_cache = LIB.kv_cache(0, 0)
        return self._placeholders(length)

    def advance(self, present, next_length: int) -> list[np.ndarray]:
        return self._placeholders(next_length)

    def _placeholders(self, length: int) -> list[np.ndarray]:
        return [np.zeros((0, h, self.seq_len - length, d), np.float32) for h, d in self.io.cache_shapes]

    def _execute(self, engine, inputs, warm_up: bool = False):
        if warm_up:  # a throwaway cache, so a warm-up (even mid-generation) cannot touch the live one
            from deepsparse.engine import LIB

            return engine._eng_net.execute_list_out(inputs, LIB.kv_cache(0, 0))
        return engine._eng_net.execute_list_out(inputs, self._kv_cache)


# ---------------------------------------------------------------- OpenVINO

class OpenVinoSession(OpenVinoSessionMixin, _GrowingCache):
    def __init__(self, onnx_path, seq_len: int, num_cores: int | None = None, batch: int = 1,
                 sparse_rate: float | None = None):
        self.seq_len, self.batch, self.io = seq_len, batch, GraphIO.read(onnx_path)
        self._open(onnx_path, num_cores, sparse_rate)


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class EngineKind:
    name: str
    session: Callable[..., object]
    available: Callable[[], bool]
    missing: str = ""
    # whether the engine's kernels skip zero weights; one that does not does the same work at every sparsity, so
    # any "speedup" it shows in a sweep is the run's noise (the report uses it as that control)
    sparse_kernels: bool = False
    model_format: str = "onnx"  # the deployment file it runs: model.onnx or model.gguf

    def compile(self, onnx_path, seq_len: int, num_cores: int | None = None, batch: int = 1, **options):
        return self.session(onnx_path, seq_len, num_cores=num_cores, batch=batch, **options)


class EngineRegistry(dict):
    """ENGINES[name] gives an EngineKind, or a UserError that says why it cannot be used."""

    def __getitem__(self, name: str) -> EngineKind:
        if name not in self:
            raise UserError(f"unknown engine {name!r}; choose one of {', '.join(self)}")
        kind = super().__getitem__(name)
        if not kind.available():
            raise UserError(kind.missing)
        return kind

    def usable(self) -> list[str]:
        return [name for name, kind in self.items() if kind.available()]


# One name, one meaning everywhere (generate, export validation, bench, sweep, eval): `deepsparse` keeps its KV
# cache inside the engine, as DeepSparse deploys LLMs; `deepsparse-external` carries it in Python.
ENGINES = EngineRegistry({
    # ONNX Runtime's CPU MatMul (MLAS) is dense: zeros cost as much as any other weight
    "onnxruntime": EngineKind("onnxruntime", OrtSession, lambda: True),
    "deepsparse": EngineKind("deepsparse", DeepSparseInternalSession, lambda: deepsparse_available(),
                             DEEPSPARSE_MISSING, sparse_kernels=True),
    "deepsparse-external": EngineKind("deepsparse-external", DeepSparseSession, lambda: deepsparse_available(),
                                      DEEPSPARSE_MISSING, sparse_kernels=True),
    # dense kernels except INT8 weights on AMX CPUs with the sparse-weights rate set: a session reports which ran
    "openvino": EngineKind("openvino", OpenVinoSession, openvino_available, OPENVINO_MISSING),
    # no sparse kernels: zeros are multiplied like any other weight; structured models are smaller and faster
    "llamacpp": EngineKind("llamacpp", LlamaCppSession, llamacpp_available, LLAMACPP_MISSING,
                           model_format="gguf"),
})


def engines_for(model_format: str) -> list[str]:
    return [name for name, kind in ENGINES.items() if kind.model_format == model_format]


# Engines that cannot run a quantization scheme's weights, by scheme (export/int4.py writes MatMulNBits). Measured
# with tests/test_int4.py: DeepSparse 1.8 has no 4-bit kernel and does not know com.microsoft ops
INT4_REFUSALS = {"deepsparse": "DeepSparse runs no 4-bit weights (MatMulNBits is an ONNX Runtime contrib op); "
                               "validate and deploy the int4 folder on onnxruntime or openvino"}
INT4_REFUSALS["deepsparse-external"] = INT4_REFUSALS["deepsparse"]
_W8_REFUSAL = ("DeepSparse runs no blockwise 8-bit weights (MatMulNBits is an ONNX Runtime contrib op); validate "
               "and deploy the w8 folder on onnxruntime or openvino, or use --quantize int8 for DeepSparse")
NBITS_REFUSALS = {"int4": INT4_REFUSALS, "w8": {engine: _W8_REFUSAL for engine in INT4_REFUSALS}}
# Measured, not assumed (tests/test_int8.py): DeepSparse 1.8 runs 95% of a dynamic-scale INT8 graph's ops; with its
# external cache the logits match ONNX Runtime's, but its internal-cache engine returns different ones (max
# |logit error| 1.09 against 0.015 on a tiny LLaMA, other greedy tokens), so that engine is left out for them
DYNAMIC_SCALE_REFUSALS = {"deepsparse": "its internal-cache engine returns wrong logits for dynamic activation "
                                        "scales (deepsparse-external runs them correctly); use --act-scales static "
                                        "for it"}


def engines_refusing(quantization: dict | None) -> dict[str, str]:
    """Engines that cannot run a deployment of this quantization record (export.json's), with the reason."""
    quantization = quantization or {}
    scheme = quantization.get("scheme", "int8" if quantization else None)  # INT8 records predate the key
    if scheme == "int8" and quantization.get("act_scales", "static") != "static":
        return dict(DYNAMIC_SCALE_REFUSALS)
    return dict(NBITS_REFUSALS.get(scheme, {}))
