"""End-to-end generation benchmarks of deployment folders, one (deployment, engine) per worker process.

A worker process compiles its engine once, warms up, then times `runs` generations of `gen_len` tokens after a
`prompt_len`-token prompt with the project's own KV-cache loop (runtime/decode.py). Its own peak RSS is the
measurement's; running each pair in a fresh process keeps one model on the CPU and memory at a time.
"""
from __future__ import annotations

import platform
import resource
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..provenance import machine_info, package_versions
from ..runtime.decode import generate
from ..runtime.deployment import load_deployment
from ..runtime.engines import ENGINES
from .records import BENCH_SCHEMA, RESULT_SCHEMA_VERSION
from .stats import latency_summary, weight_bytes_per_token

PROMPT_TEXT = ("The history of the region is long and varied. Early settlers farmed the river valleys, traded "
               "with neighbours along the coast, and built small towns that grew into market centres. ")


@dataclass(frozen=True)
class BenchSettings:
    engine: str = "deepsparse"
    cores: int | None = None
    prompt_len: int = 64
    gen_len: int = 128
    batch: int = 1
    runs: int = 5
    warmup: int = 1
    external_cache: bool = False

    @property
    def session_kind(self) -> str:
        """DeepSparse runs with its engine-internal KV cache unless asked for the external one."""
        if self.engine == "deepsparse" and self.external_cache:
            return "deepsparse-external"
        return self.engine


def core_counts(cores: int | list[int] | None) -> list[int | None]:
    """The core counts a bench or sweep measures at, ascending; None (the engines' default: all usable cores)
    stays a single entry."""
    if cores is None:
        return [None]
    return sorted({cores} if isinstance(cores, int) else set(cores))


def check_cores(cores: int | list[int] | None) -> None:
    usable = machine_info()["usable_cores"]
    bad = [c for c in core_counts(cores) if c is not None and not 1 <= c <= usable]
    if bad:
        raise UserError(f"--cores {','.join(map(str, bad))} is not available: this machine lets the process use "
                        f"{usable} cores")


def check_settings(settings: BenchSettings, seq_len: int) -> None:
    check_cores(settings.cores)
    if settings.batch != 1:
        raise UserError("--batch above 1 is not supported yet by the KV-cache loop; use --batch 1")
    if settings.prompt_len < 1 or settings.gen_len < 1 or settings.runs < 1 or settings.warmup < 0:
        raise UserError("--prompt-len, --gen-len and --runs must be at least 1, --warmup at least 0")
    if settings.prompt_len + settings.gen_len > seq_len:
        raise UserError(f"--prompt-len {settings.prompt_len} + --gen-len {settings.gen_len} exceed the deployment's "
                        f"{seq_len}-token window; shorten them or re-export with a larger --seq-len")
    ENGINES[settings.session_kind]  # raises a clear error if the engine is not installed


def prompt_ids(tokenizer, length: int) -> list[int]:
    """The same `length` prompt tokens for every engine and model: a fixed passage, repeated as needed."""
    ids = tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    return (ids * (length // len(ids) + 1))[:length]


class NullSession:
    """Answers every step instantly with preallocated arrays of the real shapes, so timing the loop over it
    measures the harness's own cost per token (step inputs, cache carry-over, argmax)."""

    def __init__(self, real):
        self.seq_len, self._real = real.seq_len, real
        vocab = real.vocab_size
        self._logits = {1: np.zeros((1, 1, vocab), np.float32)}
        io = getattr(real, "io", None)  # None: an engine holding its cache itself (llama.cpp) hands none back
        self._present = [np.zeros((1, h, real.seq_len, d), np.float32) for h, d in io.cache_shapes] if io else []

    def prepare(self, length: int) -> None:
        self._logits.setdefault(length, np.zeros((1, length, self._logits[1].shape[-1]), np.float32))

    def window(self, filled: int, length: int) -> int:
        return self._real.window(filled, length)

    def init_past(self, length: int):
        return self._real.init_past(length)

    def advance(self, present, next_length: int):
        return self._real.advance(present, next_length)

    def run(self, input_ids, attention_mask, positions, causal_mask, past_kv):
        return self._logits[input_ids.shape[1]], self._present


def peak_rss_mib_of_this_process() -> tuple[float, str]:
    """This process's own peak RSS. Linux keeps ru_maxrss across execve, so a worker started by a large parent
    (a sweep holding a model) would report the parent's peak; VmHWM belongs to the new address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "VmHWM"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"


def engine_options(settings: BenchSettings, dep) -> dict:
    """OpenVINO's sparse INT8 kernel exists only with AMX-INT8: there, an INT8 deployment gets the sparse-weights
    rate (just under its measured sparsity, so its pruned layers qualify); elsewhere nothing is switched on and
    the recorded kernel types show the dense path."""
    from ..runtime.openvino_engine import has_amx_int8

    if settings.engine == "llamacpp":
        return {"all_logits": False}  # the last position's logits, as llama.cpp serves
    if settings.engine != "openvino" or not dep.info.get("quantization") or not has_amx_int8():
        return {}
    sparsity = (dep.info.get("weight_sparsity") or {}).get("pytorch_global") or 0.0
    return {"sparse_rate": round(0.9 * sparsity, 3)} if sparsity > 0.05 else {}


def run_pair(deploy_dir: str, settings: BenchSettings) -> dict:
    """Benchmark one deployment on one engine in this process (the worker's body)."""
    dep = load_deployment(deploy_dir)
    check_settings(settings, dep.seq_len)
    prompt = prompt_ids(dep.tokenizer(), settings.prompt_len)
    t0 = time.perf_counter()
    dep.check_engine(settings.session_kind)
    session = ENGINES[settings.session_kind].compile(dep.model_path, dep.seq_len, settings.cores, settings.batch,
                                                     **engine_options(settings, dep))
    session.prepare(settings.prompt_len)
    session.prepare(1)
    compile_s = time.perf_counter() - t0
    for _ in range(settings.warmup):
        generate(session, prompt, settings.gen_len)
    runs = [generate(session, prompt, settings.gen_len) for _ in range(settings.runs)]
    # the engine's footprint, before this process loads the ONNX file again for its own weight statistics
    peak_rss_mib, rss_source = peak_rss_mib_of_this_process()
    tokens = [g.tokens for g in runs]
    session.vocab_size = int(runs[0].first_logits.shape[-1])
    overhead = _harness_overhead(session, prompt, settings.gen_len)
    kernels = session.kernel_report() if hasattr(session, "kernel_report") else None
    weights = deployment_weight_stats(dep)
    decode = latency_summary([s for g in runs for s in g.decode_s])
    e2e = [len(g.tokens) / (g.prefill_s + sum(g.decode_s)) for g in runs]
    return {
        "model": str(Path(deploy_dir)),
        "label": Path(deploy_dir).name,
        **pair_identity(settings),
        # an engine that reports its executed kernels (OpenVINO) says itself whether a sparse one ran
        "sparse_kernels": kernels["sparse_kernel_used"] if kernels else ENGINES[settings.session_kind].sparse_kernels,
        "kernels": kernels,
        # decoder-block weights, as pruned and as measured in the ONNX file; lm_head stays dense
        "sparsity": (dep.info.get("weight_sparsity") or {}).get("global", weights["overall"]),
        "matmul_sparsity": weights["overall"],
        "pytorch_sparsity": (dep.info.get("weight_sparsity") or {}).get("pytorch_global"),
        "source": dep.info.get("source"),
        "prefill_ms": float(np.median([g.prefill_s for g in runs]) * 1e3),
        "prefill_ms_runs": [g.prefill_s * 1e3 for g in runs],
        "decode_ms": decode,
        "decode_tokens_per_s": 1e3 / decode["median"],
        "e2e_tokens_per_s": float(np.median(e2e)),
        "compile_s": compile_s,
        "peak_rss_mib": peak_rss_mib,
        "peak_rss_source": rss_source,
        "decode_ms_runs": [float(np.median(g.decode_s)) * 1e3 for g in runs],
        "e2e_tokens_per_s_runs": e2e,
        "decode_s_all": [s for g in runs for s in g.decode_s],
        "precision": precision_of_deployment(dep),
        "seq_len": dep.seq_len,
        "harness_overhead": {"ms_per_token": overhead * 1e3, "fraction_of_decode": overhead * 1e3 / decode["median"]},
        "weights": weight_bytes_per_token(weights["per_initializer"]),
        "deterministic": all(t == tokens[0] for t in tokens),
        "tokens": tokens[0],  # greedy output of the first run: equal across engines when the numerics agree
        "settings": asdict(settings),
    }


def pair_identity(settings: BenchSettings) -> dict:
    """What a result row says of where and how it was measured, beside its deployment: also the record a
    timed-out round leaves (pipeline/sweep.py), so the two pair alike."""
    info = node_info()
    internal = ENGINES[settings.session_kind].session.internal_cache
    return {"engine": settings.engine,
            # the count the engine ran with, resolved, so a default run pairs with an explicit one of that count
            "cores": settings.cores or info["usable_cores"],
            "kv_cache": "internal" if internal else "external",
            # its kind pairs results (bench/stats.py), its host name tells a cluster's nodes apart
            "machine": {k: info[k] for k in ("cpu_model", "isa", "hostname")}}


def node_info() -> dict:
    """This machine (provenance.machine_info) and its host name, which tells a cluster's nodes apart."""
    return {**machine_info(), "hostname": platform.node()}


def deployment_weight_stats(dep) -> dict:
    if dep.format == "gguf":
        from ..export.gguf import gguf_weight_stats

        return gguf_weight_stats(dep.model_path)
    from ..export.onnx import onnx_weight_sparsity

    return onnx_weight_sparsity(dep.model_path)


def precision_of_deployment(dep) -> str:
    """fp32, int8 or int4 for ONNX; the GGUF weight format (q4_1, q8_0, ...) for llama.cpp files."""
    if dep.format == "gguf":
        return dep.info["format"]["quant"]
    quantization = dep.info.get("quantization")
    return quantization.get("scheme", "int8") if quantization else "fp32"  # INT8 records predate the key


def _harness_overhead(session, prompt: list[int], gen_len: int) -> float:
    null = NullSession(session)
    steps = []
    for _ in range(3):
        steps.extend(generate(null, prompt, gen_len).decode_s)
    return float(np.median(steps))


def bench_task(args: dict, emit) -> dict:
    """The worker's side of bench_pair_subprocess (runtime/worker.py)."""
    return run_pair(args["deploy_dir"], BenchSettings(**args["settings"]))


def bench_pair_subprocess(deploy_dir: str | Path, settings: BenchSettings, timeout: float | None = None) -> dict:
    """Run `run_pair` in a worker process. With `timeout` (seconds) a worker still running then is killed and
    EngineTimeout raised (an engine's compiler can hang on a graph); one that crashes raises EngineFailure."""
    from ..runtime.worker import run_in_worker, workaround

    return run_in_worker("bench", {"deploy_dir": str(deploy_dir), "settings": asdict(settings)},
                         engine=settings.session_kind, label=Path(deploy_dir).name, during="compile and runs",
                         timeout=timeout,
                         hint=workaround(settings.session_kind, "leave it out with --engine (bench) or --engines (sweep)"))


def copy_bandwidth_by_threads(counts: list[int], mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """{"N": GB/s} for N threads each copying its share of one large buffer; one pair of buffers serves every
    count, so the whole measurement stays well under two seconds."""
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the destination's pages in before anything is timed
    return {str(n): 2 * src.nbytes / min(_timed_copy(src, dst, n) for _ in range(repeats)) / 1e9
            for n in sorted(set(counts))}


def _timed_copy(src, dst, threads: int = 1) -> float:
    """Seconds for `threads` threads to copy their slices; numpy releases the GIL while it copies, so the slices
    move in parallel."""
    pairs = list(zip(np.array_split(src, threads), np.array_split(dst, threads)))
    start = threading.Barrier(threads + 1)

    def copy(s, d):
        start.wait()
        np.copyto(d, s)

    workers = [threading.Thread(target=copy, args=pair) for pair in pairs]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def machine_block(cores: int | list[int] | None) -> dict:
    """The machine, measured once per bench or sweep: `cores_used` is the largest count measured (all usable
    cores by default), `cores_measured` every count, and the copy bandwidth at 1 thread (= per core, the figure
    reports before lists had) and at each count."""
    info = node_info()
    counts = [c or info["usable_cores"] for c in core_counts(cores)]
    info["cores_used"] = max(counts)
    info["cores_measured"] = counts
    info["copy_bandwidth_gbs_by_threads"] = copy_bandwidth_by_threads([1, *counts])
    info["copy_bandwidth_gbs"] = info["copy_bandwidth_gbs_by_threads"]["1"]
    return info


def deepsparse_benchmark_decode_ms(deploy_dir: str | Path, cores: int | None, internal_cache: bool = True,
                                   seconds: int = 10) -> float:
    """DeepSparse's own `benchmark_model` on the same graph and shapes (one input token, the deployment's window),
    median ms per step: the cross-check for this harness's decode latency."""
    import shutil
    import tempfile

    from deepsparse.benchmark.benchmark_model import benchmark_model

    dep = load_deployment(deploy_dir)
    with tempfile.TemporaryDirectory(prefix="dlp-dsbench-") as tmp:
        copy = Path(tmp) / "model.onnx"  # benchmark_model rewrites the shapes inside the file it is given
        shutil.copyfile(dep.onnx_path, copy)
        result = benchmark_model(str(copy), batch_size=1, num_cores=cores, sequence_length=dep.seq_len,
                                 input_ids_length=1, internal_kv_cache=internal_cache, time=seconds,
                                 warmup_time=2, quiet=True)
    return float(result["benchmark_result"]["median"])


def bench_report(results: list[dict], machine: dict, unmeasured: list[dict] = ()) -> dict:
    """`unmeasured`: the pairs whose engine crashed (each with its reason), left out of `results`."""
    return {"schema": BENCH_SCHEMA, "schema_version": RESULT_SCHEMA_VERSION, "machine": machine,
            "versions": package_versions(), "results": results, "unmeasured": list(unmeasured)}
