"""What a results.json holds: one schema, with a version, for the rows that `dlp-deploy sweep` and `dlp-deploy bench`
write and `dlp-deploy report` and the replications read (and the two script records committed beside them).

A file names its kind in `schema` ("dlp-deploy/sweep/1", ...) and the version of this module's schema in
`schema_version`. `load_results` checks a file on read: an unknown key, a missing required key or a value of the
wrong type is an error naming the file, the row and the key. Files written before `schema_version` existed (every
committed report of December 2026) load through one adapter, `upgrade_v1`, which fills what their writers left out;
anything else is refused in one line.

Kept below every writer and reader (it imports nothing of the package but errors), so bench, the sweep and the
report share it.
"""
# no `from __future__ import annotations`: TypedDict reads NotRequired off evaluated annotations only (Python 3.11)
import copy
import json
import types
import typing
from pathlib import Path
from typing import Any, NotRequired, TypedDict, Union

from ..errors import UserError

RESULT_SCHEMA_VERSION = 2  # 1: the files from before the field (no `schema_version` key)

SWEEP_SCHEMA = "dlp-deploy/sweep/1"
BENCH_SCHEMA = "dlp-deploy/bench/1"
MEMORY_SCHEMA = "dlp-deploy/memory/1"  # scripts/memory_bench.py
ALLOCATIONS_SCHEMA = "dlp-deploy/allocations/1"  # scripts/allocation_table.py


# ---------------------------------------------------------------- rows


class MeasuredRow(TypedDict):
    """One (deployment, engine, cores) pair, measured in `rounds` worker processes (harness.run_pair, merged by
    schedule.merge_rounds) and compared by stats.attach_speedups. Keys a v1 file may lack are filled by
    upgrade_v1 (V1_FILL)."""
    model: str
    label: str
    engine: str
    cores: int
    kv_cache: str
    machine: dict  # cpu_model, isa, hostname (a cluster sweep adds kind)
    sparse_kernels: bool
    kernels: dict | None  # OpenVINO's executed-kernel record; None on the other engines
    sparsity: float
    matmul_sparsity: float
    pytorch_sparsity: float | None
    source: dict
    prefill_ms: float
    prefill_ms_runs: list
    decode_ms: dict  # stats.latency_summary
    decode_tokens_per_s: float
    e2e_tokens_per_s: float
    compile_s: float
    peak_rss_mib: float
    peak_rss_source: str | None
    decode_ms_runs: list
    e2e_tokens_per_s_runs: list
    precision: str
    seq_len: int | None
    harness_overhead: dict
    weights: dict
    deterministic: bool
    tokens: list
    settings: dict  # harness.BenchSettings
    rounds: list  # per worker process: decode_ms_median, prefill_ms, decode_ms_runs, hostname
    # stats.attach_speedups
    speedup: dict | None
    speedup_vs_int8: dict | None
    vs_peer: dict | None
    process_spread: dict | None
    noise_floor: dict
    win: bool
    # speedup_vs_<precision> (a GGUF format) as well: SPEEDUP_VS_PREFIX
    core_scaling: NotRequired[dict]  # rows of a model measured at several core counts
    remeasured: NotRequired[dict | None]  # the dense model measured again after all levels (older sweeps)
    decode_s_all: NotRequired[list]  # every decode step: rows from before merge_rounds dropped them
    aa_control: NotRequired[bool]  # the A/A control (the dense deployment measured as a second model)


class SweepRow(MeasuredRow):
    """A sweep's measured pair (pipeline/sweep.write_results): the level it measures and the perplexity it carries."""
    allocation: str | None  # None: the dense model
    form: str | None
    variant: str | None
    importance: str | None
    recovered: bool
    target_sparsity: float
    removed: float | None
    perplexity: dict  # corpus -> perplexity (q_of)
    perplexity_by: NotRequired[dict]  # whose perplexity; rows from before it: the report derives it
    replication: NotRequired[dict]


class BenchRow(MeasuredRow):
    """A `dlp-deploy bench` pair (bench/run.py); `replication` where the run replicates an earlier file."""
    replication: NotRequired[dict]


class QualityEntry(TypedDict):
    """One sweep level's PyTorch and deployment quality (pipeline/sweep.write_results)."""
    label: str
    allocation: str | None
    form: str | None
    variant: str | None
    importance: str | None
    recovered: bool
    target_sparsity: float
    sparsity: float
    removed: float | None
    perplexity: dict
    perplexity_details: dict
    validation: dict | None
    deployment_perplexity: dict  # precision -> perplexities (None where the sweep scored no deployments)
    deployment_perplexity_details: dict
    depth: NotRequired[dict]  # a depth-pruned level (sweep.model_records)
    recovery: NotRequired[dict]  # a recovered level


class SweepUnmeasured(TypedDict):
    """A sweep pair whose engine timed out or crashed in some round: named, with no figures."""
    label: str
    precision: str
    engine: str
    kv_cache: str
    cores: int
    reason: str
    machine: NotRequired[dict]  # where a cluster sweep measured it on one kind of several


class BenchUnmeasured(TypedDict):
    """A bench pair whose engine crashed (bench/run._measure): runtime.worker.EngineFailure's record."""
    label: str
    model: str
    engine: str
    cores: int
    kv_cache: str
    machine: dict
    reason: str
    failed: str
    signal: str | None
    timeout_s: float | None


class NotRun(TypedDict):
    """A bench pair whose engine refuses the deployment (bench/run.runnable_pairs)."""
    label: str
    model: str
    engine: str
    reason: str


# scripts/memory_bench.py: one model pruned streamed and in memory ("in-memory" is no identifier: the call form)
MemoryRow = TypedDict("MemoryRow", {"model": str, "folder": str, "params": int, "on_disk": dict,
                                    "streamed": NotRequired[dict], "in-memory": NotRequired[dict]})


class AllocationRow(TypedDict):
    """scripts/allocation_table.py: one allocation at one sparsity, scored on every corpus."""
    key: str
    allocation: str
    sparsity: float
    ppl: dict
    ratios: list | None
    weighted_sparsity: float
    seconds: float
    alpha: NotRequired[float]
    tuning: NotRequired[dict]


# ---------------------------------------------------------------- files


class Replicated(TypedDict):
    run: str
    results: list  # SweepRow


class SweepResults(TypedDict):
    schema: str
    schema_version: int
    settings: dict  # pipeline/sweep.SweepSettings
    machine: dict
    quality: list  # QualityEntry
    results: list  # SweepRow
    unmeasured: list  # SweepUnmeasured
    provenance: dict
    random_weights: NotRequired[dict | None]
    replicates: NotRequired[str]  # the earlier run this one re-measures
    replicated_from: NotRequired[dict]  # a report's copy of that run's rows (Replicated)


class BenchResults(TypedDict):
    schema: str
    schema_version: int
    machine: dict
    versions: dict
    results: list  # BenchRow
    unmeasured: list  # BenchUnmeasured
    not_run: NotRequired[list]  # NotRun
    settings: NotRequired[dict]  # the bench options (files from before it: read back from the rows)
    provenance: NotRequired[dict]
    replicates: NotRequired[str]
    replication: NotRequired[dict]


class MemoryResults(TypedDict):
    schema: str
    schema_version: int
    settings: dict
    rows: list  # MemoryRow
    notes: list
    provenance: dict


class AllocationResults(TypedDict):
    schema: str
    schema_version: int
    settings: dict
    calibration: str
    validation: dict
    corpora: dict
    search: dict | None
    rows: list  # AllocationRow
    provenance: dict


# kind -> (the file's TypedDict, {list key: the TypedDict of its rows})
KINDS: dict[str, tuple[type, dict[str, type]]] = {
    SWEEP_SCHEMA: (SweepResults, {"results": SweepRow, "quality": QualityEntry, "unmeasured": SweepUnmeasured}),
    BENCH_SCHEMA: (BenchResults, {"results": BenchRow, "unmeasured": BenchUnmeasured, "not_run": NotRun}),
    MEMORY_SCHEMA: (MemoryResults, {"rows": MemoryRow}),
    ALLOCATIONS_SCHEMA: (AllocationResults, {"rows": AllocationRow}),
}
SPEEDUP_VS_PREFIX = "speedup_vs_"  # speedup_vs_<precision>: a dict, or None where no dense baseline was measured


# ---------------------------------------------------------------- checking


def _hints(kind: type) -> dict[str, Any]:
    hints = typing.get_type_hints(kind)
    return {**hints, **{k: v for k, v in kind.__annotations__.items() if k not in hints}}


def _allowed(hint) -> tuple[type, ...]:
    """The JSON types a hint admits (NotRequired[...] unwrapped; a float admits an int, never a bool)."""
    if typing.get_origin(hint) is NotRequired:
        hint = typing.get_args(hint)[0]
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return tuple(t for a in typing.get_args(hint) for t in _allowed(a))
    if hint is type(None) or hint is None:
        return (type(None),)
    return (origin or hint,)


def _type_ok(value, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


def fits(value, hint) -> bool:
    """Whether a JSON value is of a hint's type: unions, None, and a list's elements where the hint names them
    (list[float]); the same rule as check_row (a float admits an int, nothing admits a bool but bool)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(fits(value, a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list and typing.get_args(hint):
        return isinstance(value, list) and all(fits(v, typing.get_args(hint)[0]) for v in value)
    return _type_ok(value, _allowed(hint))


def _type_name(allowed: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in allowed)


def check_row(row: dict, kind: type = SweepRow, where: str = "row") -> list[str]:
    """What is wrong with `row` as a `kind` (a TypedDict of this module): unknown keys, required keys missing,
    values of the wrong type. Empty when it is right."""
    if not isinstance(row, dict):
        return [f"{where}: not an object"]
    hints = _hints(kind)
    problems = []
    for key in sorted(kind.__required_keys__ - row.keys()):
        problems.append(f"{where}: {key} missing")
    for key, value in row.items():
        if key in hints:
            allowed = _allowed(hints[key])
        elif key.startswith(SPEEDUP_VS_PREFIX) and kind in (SweepRow, BenchRow, MeasuredRow):
            allowed = (dict, type(None))
        else:
            problems.append(f"{where}: unknown key {key!r}")
            continue
        if not _type_ok(value, allowed):
            problems.append(f"{where}: {key} is {type(value).__name__}, expected {_type_name(allowed)}")
    return problems


def check_results(data: dict) -> list[str]:
    """Every problem of a results file of the current version: the file's own keys, then each row's."""
    kind, rows = KINDS[data["schema"]]
    problems = check_row(data, kind, "file")
    for key, row_kind in rows.items():
        for i, row in enumerate(data.get(key) or []):
            problems += check_row(row, row_kind, f"{key}[{i}]")
    replicated = data.get("replicated_from")
    if isinstance(replicated, dict):
        problems += check_row(replicated, Replicated, "replicated_from")
        for i, row in enumerate(replicated.get("results") or []):
            problems += check_row(row, SweepRow, f"replicated_from.results[{i}]")
    if data.get("schema_version") != RESULT_SCHEMA_VERSION:
        problems.append(f"file: schema_version {data.get('schema_version')!r}, expected {RESULT_SCHEMA_VERSION}")
    return problems


# ---------------------------------------------------------------- reading


def load_results(source: str | Path | dict, kind: str | None = None, name: str | None = None) -> dict:
    """A results file (a path, or its parsed dict), checked and brought to the current version. `kind`: the
    schema it must have (SWEEP_SCHEMA, ...). Refused in one line naming the file: another kind, a version this
    code does not know, or rows that break the schema."""
    if isinstance(source, dict):
        data, name = source, name or "results"
    else:
        path = Path(source)
        name = name or str(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{name} is not a readable results file ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{name} is not a results file (a JSON object with a `schema`)")
    version = data.get("schema_version")
    if version is None:
        data = upgrade_v1(data, name)
    elif version != RESULT_SCHEMA_VERSION:
        raise UserError(f"{name} has schema_version {version!r}, which this dlp-deploy does not read (it reads "
                        f"{RESULT_SCHEMA_VERSION}); read it with the version that wrote it")
    if kind is not None and data.get("schema") != kind:
        raise UserError(f"{name} has schema {data.get('schema')!r}, expected {kind!r}; give a results file of "
                        f"that kind")
    if data.get("schema") not in KINDS:
        raise UserError(f"{name} has schema {data.get('schema')!r}, not one of {', '.join(KINDS)}")
    problems = check_results(data)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{name} does not match results schema {RESULT_SCHEMA_VERSION}: {problems[0]}{more}")
    return data


# what writers before schema_version left out of a row, and the value its readers already took for the absence
V1_FILL: dict[type, dict[str, Any]] = {
    SweepRow: {"precision": "fp32", "form": None, "variant": None, "importance": None, "recovered": False,
               "removed": None, "machine": {}, "kernels": None, "pytorch_sparsity": None, "peak_rss_source": None,
               "seq_len": None, "decode_ms_runs": [], "e2e_tokens_per_s_runs": [], "rounds": []},
    BenchRow: {"precision": "fp32", "machine": {}, "kernels": None, "pytorch_sparsity": None, "peak_rss_source": None,
               "seq_len": None, "decode_ms_runs": [], "e2e_tokens_per_s_runs": [], "rounds": []},
    QualityEntry: {"form": None, "variant": None, "importance": None, "recovered": False, "removed": None,
                   "deployment_perplexity": {}, "deployment_perplexity_details": {}},
}
_V1_KEYS = {SWEEP_SCHEMA: ("settings", "machine", "results", "quality"), BENCH_SCHEMA: ("machine", "results")}


def upgrade_v1(data: dict, name: str) -> dict:
    """A file from before schema_version, as the current schema has it: each row kind's V1_FILL where a key is
    absent, and a row's `cores` (absent before rows recorded their count) resolved to the setting or the cores the
    run used. The allocation table (scripts/allocation_table.py) wrote no `schema`: named by its keys. Anything
    else is refused: rewrite it with the command that wrote it (`dlp-deploy sweep --out RUN_DIR` resumes a sweep
    and rewrites its results.json from the measurements kept in RUN_DIR)."""
    data = dict(data)
    schema = data.get("schema")
    if schema is None and {"rows", "search", "corpora"} <= data.keys():
        schema = data["schema"] = ALLOCATIONS_SCHEMA
    if schema not in KINDS or any(k not in data for k in _V1_KEYS.get(schema, ())):
        raise UserError(f"{name} is not a results file this dlp-deploy reads (schema {schema!r}, no "
                        "schema_version); write it again with the command that wrote it (a sweep: `dlp-deploy "
                        "sweep --out RUN_DIR` with its options rewrites RUN_DIR/results.json from what it kept)")
    _, rows = KINDS[schema]
    for key, row_kind in rows.items():
        if key in data:
            data[key] = [_fill(row, row_kind, data) for row in data[key]]
    if isinstance(data.get("replicated_from"), dict):
        earlier = data["replicated_from"]
        data["replicated_from"] = {**earlier, "results": [_fill(r, SweepRow, data) for r in earlier["results"]]}
    if schema in (SWEEP_SCHEMA, BENCH_SCHEMA):
        data.setdefault("unmeasured", [])
    return {**data, "schema_version": RESULT_SCHEMA_VERSION}


def _fill(row: dict, row_kind: type, data: dict) -> dict:
    if not isinstance(row, dict):
        return row
    out = {**row, **{k: copy.deepcopy(v) for k, v in V1_FILL.get(row_kind, {}).items() if k not in row}}
    if row_kind in (SweepRow, BenchRow) and out.get("cores") is None:
        out["cores"] = (out.get("settings") or {}).get("cores") or (data.get("machine") or {}).get("cores_used")
    return out


# ---------------------------------------------------------------- what a sweep row carries
# derived alike by the sweep that writes a row (pipeline/sweep.write_results) and by the report that reads a row
# written before the sweep stored it (report/render.py)

ONNX_PRECISIONS = ("fp32", "int8", "int4", "w8")  # int4, w8: QuantizeOptions defaults (g32, symmetric)


def scoring_engine(precision: str) -> str:
    """The engine a deployment of `precision` has its own perplexity scored on: ONNX Runtime for an ONNX graph,
    llama.cpp for any other precision a sweep accepts (a GGUF format: pipeline/levels.precision_format checks
    the name before any work)."""
    return "onnxruntime" if precision in ONNX_PRECISIONS else "llamacpp"


def q_of(entry: dict, precision: str) -> dict:
    """The perplexity a result row carries: where the sweep scored deployments (it does when INT8 is among its
    precisions, since PyTorch cannot run an INT8 graph), every precision's deployment on the same protocol; else
    the PyTorch model's. Both kinds stay in the quality table."""
    return entry["deployment_perplexity"].get(precision) or entry["perplexity"]


def perplexity_by(settings: dict, entry: dict, precision: str) -> dict:
    """Whose perplexity a row carries (q_of) and on what windows: the deployment's own on its scoring engine
    (windows of the export window minus one), or the PyTorch model's (windows of --eval-seqlen). `settings`: the
    sweep's, as results.json keeps them (ppl, max_windows, seq_len)."""
    corpus = settings["ppl"][0]
    if entry["deployment_perplexity"].get(precision):
        details = ((entry.get("deployment_perplexity_details") or {}).get(precision) or {}).get(corpus) or {}
        return {"who": f"deployment on {scoring_engine(precision)}", "windows": details.get("windows") or
                settings["max_windows"], "seqlen": details.get("seqlen") or settings["seq_len"] - 1}
    details = entry["perplexity_details"][corpus]
    return {"who": "PyTorch", "windows": details["windows"], "seqlen": details["seqlen"]}


def random_model_record(model: str) -> dict | None:
    """A model made by `dlp-deploy models random` measures speed only: kept in results.json (`random_weights`) so
    that the report says so wherever it is regenerated, the model folder gone or not."""
    path = Path(model) / "random.json"
    return json.loads(path.read_text()) if path.is_file() else None
