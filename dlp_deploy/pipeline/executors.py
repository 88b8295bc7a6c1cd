"""Where a sweep's work runs. An executor prepares every level (prune -> eval -> export, steps.prepare_level) and
measures every (deployment, precision, engine, cores) pair in interleaved rounds; run_sweep picks one by name from
EXECUTORS and writes results.json from what it hands back, the same whichever ran.

- `local`: this process, as sweeps always ran: levels one after another, then each measurement in a worker
  subprocess (harness.bench_pair_subprocess), in run_interleaved's order.
- `ray`: a Ray cluster (README: "Sweeps on a Ray cluster"). Each level's prepare chain is one task (CPUs, or
  `prune_gpus` GPUs and the prune on cuda); each measurement is one task that holds every CPU of its node, pinned
  there, so no two measurements and no preparation share a machine. Nodes are grouped by kind (CPU model, ISA,
  CPU count): every kind measures every pair in the interleaved order, and where there are several kinds each
  row names its kind, so speedups only divide measurements of one kind. Files move through the run folder, which
  every node must see at the same path; results (small dicts) come back as task return values. A task whose
  worker dies is retried (`retries`); a UserError inside one is reported, never retried; finished steps stay in
  the run folder, so a rerun resumes from them, and the driver skips levels and rounds already on disk without
  starting a task. executor.json in the run folder records the nodes, every task's attempts and the counts.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..bench.harness import core_counts, machine_block, node_info
from ..bench.records import scoring_engine
from ..bench.schedule import interleaved_order, run_interleaved
from ..errors import UserError
from ..io import write_json_atomic
from ..progress import quiet_transformers
from ..provenance import provenance
from .levels import pairs_per_level, prepare_waves
from .steps import bench_path, bench_step, deploy_name, prepare_level

RAY_MISSING = "--executor ray needs Ray, an optional extra: pip install 'dlp-deploy[ray]'"
FAULT_ENV = "DLP_DEPLOY_FAULT"  # tests: "STAGE:NAME[:WORD],..." kills the first attempt of that task (see _fault)
# what a task's process needs from the driver's environment (a cluster's workers were started elsewhere)
_ENV_PREFIXES = ("DLP_", "HF_", "TRANSFORMERS_", "NM_")


@dataclass
class Measured:
    pairs: list[tuple]  # what was measured: the sweep's pairs, once per machine kind
    rounds: list[list[dict]]  # per pair, its result in each round
    machine: dict | None = None  # results.json's machine block; None: write_results measures this machine


class Executor:
    """prepare(levels) -> [(level, quality, {precision: deploy folder}, {precision: deploy eval})] and
    measure(pairs, rounds, order, seed) -> Measured; a context manager around both (start and stop resources)."""

    name = ""
    options: tuple[str, ...] = ()  # the options (CLI flags without --) it takes

    def __init__(self, sweep, run_dir: Path, progress=None, log=print, **options):
        given = sorted(k for k, v in options.items() if v is not None and k not in self.options)
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            owners = sorted(n for n, e in EXECUTORS.items() if set(given) <= set(e.options))
            raise UserError(f"{flags} belong{'s' if len(given) == 1 else ''} to --executor "
                            f"{' or '.join(owners) or '(none)'}, not --executor {self.name}")
        self.sweep, self.run_dir, self.progress, self.log = sweep, Path(run_dir), progress, log

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def prepare(self, plan: list) -> list[tuple]:
        raise NotImplementedError

    def measure(self, pairs: list[tuple], rounds: int, order: str, seed: int) -> Measured:
        raise NotImplementedError


class LocalExecutor(Executor):
    """Everything in this process (measurements in worker subprocesses), one progress bar for the sweep."""

    name = "local"

    def prepare(self, plan: list) -> list[tuple]:
        sweep, progress = self.sweep, self.progress
        self._task = progress.add_task("sweep", total=len(plan) * (1 + pairs_per_level(sweep) * sweep.rounds)) \
            if progress else None
        prepared = []
        for level in plan:
            prepared.append(prepare_level(sweep, self.run_dir, level, progress, self.log))
            if progress:
                progress.advance(self._task)
        return prepared

    def measure(self, pairs: list[tuple], rounds: int, order: str, seed: int) -> Measured:
        task = getattr(self, "_task", None)
        if self.progress and task is None:  # measuring without a prepare (`plan` prepares its own deployments)
            task = self.progress.add_task("bench", total=len(pairs) * rounds)
        measured = run_interleaved(
            len(pairs), rounds, order, seed,
            lambda r, i: bench_step(self.sweep, self.run_dir, *pairs[i], self.log, round_=r),
            on_done=(lambda *_: self.progress.advance(task)) if self.progress else None)
        return Measured(pairs, measured)


class _NeedsWork(Exception):
    """Raised by the driver's dry run: every step logs before it works, and skips silently when its file exists."""


def _needs_work(*_):
    raise _NeedsWork


@dataclass
class _Node:
    node_id: str
    host: str
    cpus: int
    info: dict  # provenance.machine_info() of the node

    @property
    def kind(self) -> tuple:
        return (self.info["cpu_model"], tuple(self.info["isa"]), self.cpus)


def kind_name(kind: tuple) -> str:
    cpu, isa, cpus = kind
    return f"{cpu} ({'/'.join(isa) or 'no listed ISA extensions'}), {cpus} CPUs"


def kind_folder(kind: tuple) -> str:
    cpu, _, cpus = kind
    digest = hashlib.sha1(repr(kind).encode()).hexdigest()[:6]
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', cpu).strip('-')[:40]}-{cpus}cpu-{digest}"


class RayExecutor(Executor):
    name = "ray"
    options = ("address", "prune_gpus", "prepare_cpus", "retries")

    def __init__(self, sweep, run_dir: Path, progress=None, log=print, address: str | None = None,
                 prune_gpus: float | None = None, prepare_cpus: float | None = None, retries: int | None = None):
        super().__init__(sweep, run_dir, progress, log)
        try:
            import ray  # an optional extra (dlp-deploy[ray]): imported only when this executor is chosen
        except ImportError:
            raise UserError(RAY_MISSING) from None
        self.ray = ray
        self.address = address
        self.prune_gpus = float(prune_gpus or 0)
        self.prepare_cpus = float(prepare_cpus if prepare_cpus is not None else 1)
        self.retries = 2 if retries is None else int(retries)
        if self.prune_gpus < 0 or self.prepare_cpus <= 0 or self.retries < 0:
            raise UserError("--prune-gpus must be at least 0, --prepare-cpus above 0 and --retries at least 0")
        if sweep.device.startswith("cuda") and not self.prune_gpus:
            raise UserError(f"--device {sweep.device} with --executor ray: give the prepare tasks GPUs with "
                            "--prune-gpus N (they then run on cuda)")
        # every node opens the same paths: no relative ones (a worker's folder is not the driver's)
        self.run_dir = Path(run_dir).resolve()
        model = Path(sweep.model).expanduser()
        self.task_sweep = replace(sweep, model=str(model.resolve()) if model.exists() else sweep.model,
                                  device="cuda" if self.prune_gpus else sweep.device)
        self.env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) and k != FAULT_ENV}
        data = self.env.get("DLP_DEPLOY_DATA")
        if data and Path(data).expanduser().is_dir():
            self.env["DLP_DEPLOY_DATA"] = str(Path(data).expanduser().resolve())
        self.fault = os.environ.get(FAULT_ENV) or None
        self.session = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.attempts_dir = self.run_dir / ".ray-attempts" / self.session
        self.records: list[dict] = []  # one per level / measurement: where and how often it ran
        self.counts = {stage: {"tasks": 0, "cached": 0, "failed": 0} for stage in ("prepare", "bench")}
        self.nodes: list[_Node] = []
        self._started = False
        self._worked = False  # executor.json is written once prepare() or measure() has begun
        self._status = "started"

    # ------------------------------------------------------------------ cluster

    def __enter__(self):
        ray = self.ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            options = dict(log_to_driver=False, logging_level=logging.WARNING)
            try:
                if self.address:
                    self.log(f"connecting to the Ray cluster at {self.address}")
                    ray.init(address=self.address, **options)
                else:
                    self.log("starting a local Ray cluster (this machine's CPUs)")
                    # results come back as small dicts; the object store needs little memory
                    ray.init(include_dashboard=False, object_store_memory=256 * 2**20, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if not self.address:
                    raise UserError(f"could not start a local Ray cluster: {first}") from None
                raise UserError(f"--address {self.address}: no Ray cluster reached ({first}); start one with "
                                "`ray start --head`, or leave --address out to start a local one") from None
            self._started = True
        self.attempts_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._status == "started":
                self._status = "complete"
            elif self._status == "started":
                self._status = f"stopped: {exc_type.__name__}: {exc}"
            if self._worked:
                self._write_record()
        finally:
            shutil.rmtree(self.attempts_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.attempts_dir.parent.rmdir()  # only when no other sweep's attempts are in it
            if self._started:
                self.ray.shutdown()  # a cluster this sweep started stops with it; a connected one is left running

    def _write_record(self) -> None:
        attempts = self._attempts()
        for rec in self.records:
            rec["attempts"] = attempts.get((rec["stage"], rec["key"]), 0)
            rec["retried"] = rec["attempts"] > 1
        for stage, counts in self.counts.items():
            counts["retried"] = sum(r["retried"] for r in self.records if r["stage"] == stage)
        write_json_atomic(self.run_dir / "executor.json", {
            "executor": "ray", "address": self.address or "local cluster started by the sweep",
            "options": {"prune_gpus": self.prune_gpus, "prepare_cpus": self.prepare_cpus, "retries": self.retries},
            "status": self._status,
            "nodes": [{"node_id": n.node_id, "hostname": n.host, "cpus": n.cpus, "kind": kind_name(n.kind)}
                      for n in self.nodes],
            "stages": self.counts, "tasks": self.records, "provenance": provenance()}, force=True)

    def _attempts(self) -> dict[tuple, int]:
        """(stage, key) -> attempts started, from the files each attempt leaves on its first line."""
        out: dict[tuple, int] = {}
        with contextlib.suppress(OSError):
            for name in os.listdir(self.attempts_dir):
                if name.count("~") == 2:
                    stage, key, _ = name.split("~")
                    out[(stage, key)] = out.get((stage, key), 0) + 1
        return out

    def _show(self, task, stage: str, queued: int, pending_keys: list[str], done: int) -> None:
        """queued (waiting for resources or not yet submitted), running (an attempt has started), done."""
        if not self.progress:
            return
        started = {key for (st, key) in self._attempts() if st == stage}
        running = sum(k in started for k in pending_keys)
        self.progress.update(task, completed=done, description=f"{stage}: {queued + len(pending_keys) - running} "
                                                               f"queued, {running} running")

    # ------------------------------------------------------------------ prepare

    def prepare(self, plan: list) -> list[tuple]:
        """Wave after wave (sweep.prepare_waves: a recovered level trains from its base's folder), every level of
        a wave at once; a level already on disk costs the driver a few small reads, not a task."""
        ray = self.ray
        self._worked = True
        self._check_prepare_resources()
        remote = ray.remote(_prepare_task).options(
            num_cpus=self.prepare_cpus, num_gpus=self.prune_gpus, max_retries=self.retries, retry_exceptions=True)
        task = self.progress.add_task("prepare", total=len(plan)) if self.progress else None
        waves = prepare_waves(plan)
        position = {level.label: i for i, level in enumerate(plan)}
        prepared: list[tuple | None] = [None] * len(plan)
        later = len(plan)
        done = 0
        for wave in waves:
            later -= len(wave)
            pending: dict = {}
            for level in wave:
                try:  # the dry run: every step logs before it works, so a finished level raises nothing
                    prepared[position[level.label]] = prepare_level(self.task_sweep, self.run_dir, level, None,
                                                                    _needs_work)
                except _NeedsWork:
                    pending[remote.remote(self.task_sweep, str(self.run_dir), level, str(self.attempts_dir), self.fault,
                                          self.env, self.prepare_cpus)] = level
                    self.counts["prepare"]["tasks"] += 1
                    continue
                done += 1
                self.counts["prepare"]["cached"] += 1
                self.records.append({"stage": "prepare", "key": level.label, "cached": True})
            failures: list[tuple[str, str, bool]] = []
            while pending:
                self._show(task, "prepare", later, [lv.label for lv in pending.values()], done)
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    level = pending.pop(ref)
                    done += 1
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        out = {"error": _ray_error_text(exc)}
                    record = {"stage": "prepare", "key": level.label, "cached": False,
                              **{k: out.get(k) for k in ("host", "steps", "seconds")}}
                    if "prepared" in out:
                        prepared[position[level.label]] = out["prepared"]
                        steps = ", ".join(_step_names(out["steps"])) or "nothing left to do"
                        self.log(f"[{level.label}] prepared on {out['host']} ({steps}; {out['seconds']:.0f} s"
                                 + (f", attempt {out['attempt']})" if out["attempt"] > 1 else ")"))
                    else:
                        self.counts["prepare"]["failed"] += 1
                        record["error"] = out.get("user_error") or out["error"]
                        failures.append((level.label, record["error"], "user_error" in out))
                        self.log(f"[{level.label}] failed: {record['error'].splitlines()[0]}")
                    self.records.append(record)
            self._show(task, "prepare", later, [], done)
            if failures:  # the next wave builds on this one
                self._raise(failures, "prepare")
        return prepared  # type: ignore[return-value]

    def _check_prepare_resources(self) -> None:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        most_gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        most_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
        if self.prune_gpus > most_gpus:
            raise UserError(f"--prune-gpus {self.prune_gpus:g}: no node of the Ray cluster has that many GPUs "
                            f"(the most on one node: {most_gpus:g})")
        if self.prepare_cpus > most_cpus:
            raise UserError(f"--prepare-cpus {self.prepare_cpus:g}: no node of the Ray cluster has that many CPUs "
                            f"(the most on one node: {most_cpus:g})")

    def _raise(self, failures: list[tuple[str, str, bool]], stage: str) -> None:
        self._status = f"failed in {stage}: " + "; ".join(f"[{k}] {e.splitlines()[0]}" for k, e, _ in failures)
        user = [(k, e) for k, e, is_user in failures if is_user]
        if user:  # the user's to fix: one line, as the CLI prints every UserError
            raise UserError(f"[{user[0][0]}] {user[0][1]}")
        names = ", ".join(k for k, _, _ in failures)
        raise RuntimeError(f"{stage} failed for {names} after up to {self.retries + 1} attempts each; what "
                           f"finished is kept in {self.run_dir}, so the same command resumes from it. First "
                           f"error:\n{failures[0][1]}")

    # ------------------------------------------------------------------ measure

    def measure(self, pairs: list[tuple], rounds: int, order: str, seed: int) -> Measured:
        self._worked = True  # `plan` measures without a prepare
        ray = self.ray
        by_kind = self._bench_nodes()
        kinds = sorted(by_kind)
        several = len(kinds) > 1
        if several:
            self.log("measuring on each of the cluster's machine kinds: "
                     + "; ".join(f"{kind_name(k)} ({len(by_kind[k])} node{'s' if len(by_kind[k]) > 1 else ''})"
                                 for k in kinds))
        folder = {k: self.run_dir / "machines" / kind_folder(k) if several else self.run_dir for k in kinds}
        machines = self._machine_blocks(by_kind)
        schedule = interleaved_order(len(pairs), rounds, order, seed)
        queues = {k: deque(schedule) for k in kinds}
        free = {k: list(by_kind[k]) for k in kinds}
        results = {k: [[None] * rounds for _ in pairs] for k in kinds}
        requeued = {k: 0 for k in kinds}
        remote = ray.remote(_bench_task)
        task = self.progress.add_task("bench", total=len(kinds) * len(schedule)) if self.progress else None
        pending: dict = {}
        failures: list[tuple[str, str, bool]] = []
        done = 0
        while any(queues.values()) or pending:
            for k in kinds:  # in the interleaved order; a kind with several nodes measures on all of them
                while queues[k]:
                    r, i = queues[k][0]
                    level, precision, deploy, engine, cores = pairs[i]
                    # the round's file stem, and its machine kind where there are several
                    key = _bench_key(self.sweep, folder[k], pairs[i], r) + (f"@{kind_folder(k)}" if several else "")
                    try:  # a round already on disk costs the driver a read, not a task
                        results[k][i][r] = self._checked(_cached_bench(self.sweep, folder[k], pairs[i], r), k, key)
                    except _NeedsWork:
                        if not free[k]:
                            break
                        node = free[k].pop(0)
                        ref = remote.options(num_cpus=node.cpus, scheduling_strategy=_pinned(node),
                                             max_retries=self.retries, retry_exceptions=True).remote(
                            self.sweep, str(folder[k]), level, precision, str(deploy), engine, cores, r,
                            str(self.attempts_dir), self.fault, self.env, key)
                        pending[ref] = (k, node, r, i, key)
                        self.counts["bench"]["tasks"] += 1
                    else:
                        done += 1
                        self.counts["bench"]["cached"] += 1
                        self.records.append({"stage": "bench", "key": key, "cached": True})
                    queues[k].popleft()
                if queues[k] and not free[k] and not any(p[0] == k for p in pending.values()):
                    raise UserError(f"every node of {kind_name(k)} left the Ray cluster; the same command resumes "
                                    "the measurements where they stopped")
            self._show(task, "bench", sum(map(len, queues.values())), [p[4] for p in pending.values()], done)
            if not pending:
                continue
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                k, node, r, i, key = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    if not self._alive(node) and requeued[k] < self.retries:  # the node left: another of its kind
                        requeued[k] += 1
                        by_kind[k].remove(node)
                        queues[k].appendleft((r, i))
                        self.log(f"[{key}] node {node.host} left the cluster; measuring it on another")
                        continue
                    out = {"error": _ray_error_text(exc)}
                free[k].append(node)
                done += 1
                record = {"stage": "bench", "key": key, "cached": False, "host": out.get("host"),
                          "seconds": out.get("seconds")}
                self.records.append(record)
                if "result" not in out:  # no new measurements; those running finish and keep their files
                    record["error"] = out.get("user_error") or out["error"]
                    self.counts["bench"]["failed"] += 1
                    failures.append((key, record["error"], "user_error" in out))
                    self.log(f"[{key}] failed: {record['error'].splitlines()[0]}")
                    for queue in queues.values():
                        queue.clear()
                    continue
                results[k][i][r] = self._checked(out["result"], k, key)
                self.log(f"[{key}] measured on {out['host']}" + (f" (attempt {out['attempt']})"
                                                                  if out["attempt"] > 1 else ""))
        self._show(task, "bench", 0, [], done)
        if failures:
            self._raise(failures, "bench")
        measured_pairs = [p for _ in kinds for p in pairs]
        measured = [results[k][i] for k in kinds for i in range(len(pairs))]
        first = machines[kinds[0]]
        machine = first if not several else {**first, "kinds": {kind_name(k): machines[k] for k in kinds}}
        return Measured(measured_pairs, measured, machine)

    def _checked(self, result: dict, kind: tuple, key: str) -> dict:
        """A round of this kind; a file on disk measured on another CPU (a run folder moved to another cluster)
        is refused rather than paired with this cluster's figures."""
        m = result.get("machine") or {}
        if (m.get("cpu_model"), tuple(m.get("isa") or ())) != kind[:2]:
            raise UserError(f"{key} in {self.run_dir} was measured on {m.get('cpu_model')}, not on this cluster's "
                            f"{kind[0]}: measure into a new --out")
        if len(self._kinds) > 1:
            result = {**result, "machine": {**m, "kind": kind_name(kind)}}
        return result

    def _bench_nodes(self) -> dict[tuple, list[_Node]]:
        """The alive nodes with CPUs, probed once each (a zero-CPU task pinned to it), grouped by kind; nodes with
        fewer CPUs than the largest --cores cannot measure it and are left out."""
        ray = self.ray
        alive = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
        probe = ray.remote(_node_info_task)
        infos = ray.get([probe.options(num_cpus=0, scheduling_strategy=_pinned_id(n["NodeID"])).remote()
                         for n in alive])
        need = max((c for c in core_counts(self.sweep.cores) if c is not None), default=1)
        self.nodes = [_Node(n["NodeID"], info["hostname"], int(n["Resources"]["CPU"]), info)
                      for n, info in zip(alive, infos)]
        usable = [n for n in self.nodes if n.cpus >= need]
        if not usable:
            raise UserError(f"--cores {need}: no node of the Ray cluster has that many CPUs")
        by_kind: dict[tuple, list[_Node]] = {}
        for n in usable:
            by_kind.setdefault(n.kind, []).append(n)
        self._kinds = sorted(by_kind)
        return by_kind

    def _machine_blocks(self, by_kind: dict) -> dict[tuple, dict]:
        """harness.machine_block (with copy bandwidth) on one node of each kind, holding all of its CPUs."""
        ray = self.ray
        remote = ray.remote(_machine_task)
        refs = {k: remote.options(num_cpus=nodes[0].cpus, scheduling_strategy=_pinned(nodes[0]),
                                  max_retries=self.retries).remote(self.sweep.cores) for k, nodes in by_kind.items()}
        return {k: ray.get(ref) for k, ref in refs.items()}

    def _alive(self, node: _Node) -> bool:
        return any(n["NodeID"] == node.node_id and n.get("Alive") for n in self.ray.nodes())


# ---------------------------------------------------------------------- registry

EXECUTORS: dict[str, type[Executor]] = {"local": LocalExecutor, "ray": RayExecutor}


def get_executor(name: str) -> type[Executor]:
    if name not in EXECUTORS:
        raise UserError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
    return EXECUTORS[name]


# ---------------------------------------------------------------------- what runs inside Ray tasks

def _prepare_task(sweep, run_dir: str, level, attempts_dir: str, fault: str | None, env: dict, threads: float) -> dict:
    """One level's prepare chain on a worker: what it did, where, and at which attempt."""
    with _task_env(env):
        attempt = _begin_attempt(attempts_dir, "prepare", level.label)
        _fault(fault, "prepare", level.label, attempt, None)
        root = Path(run_dir)
        deploys = [deploy_name(level, p) for p in sweep.precisions]
        _remove_stale_temps(root / "models", [level.label])
        _remove_stale_temps(root / "deploy", deploys)
        _remove_stale_temps(root / "eval", [f"{level.label}.json"] + [f"{d}.{scoring_engine(p)}.json"
                                                                      for d, p in zip(deploys, sweep.precisions)])
        torch.set_num_threads(max(1, int(threads)))
        quiet_transformers()
        steps: list[str] = []

        def log(message) -> None:
            steps.append(str(message))
            _fault(fault, "prepare", level.label, attempt, str(message))

        t0 = time.perf_counter()
        try:
            prepared = prepare_level(sweep, root, level, None, log)
        except UserError as exc:  # the user's to fix: reported, never retried
            return {"user_error": str(exc), "host": platform.node(), "attempt": attempt, "steps": steps}
        return {"prepared": prepared, "host": platform.node(), "attempt": attempt, "steps": steps,
                "seconds": time.perf_counter() - t0}


def _bench_task(sweep, run_dir: str, level, precision: str, deploy: str, engine: str, cores, round_: int,
                attempts_dir: str, fault: str | None, env: dict, key: str) -> dict:
    """One round of one pair, on a node whose CPUs this task holds (bench_step's worker subprocess uses them)."""
    with _task_env(env):
        attempt = _begin_attempt(attempts_dir, "bench", key)
        _fault(fault, "bench", key, attempt, None)
        out = bench_path(sweep, Path(run_dir), level, precision, engine, cores, round_)
        _remove_stale_temps(out.parent, [out.name])
        t0 = time.perf_counter()
        try:
            result = bench_step(sweep, Path(run_dir), level, precision, Path(deploy), engine, cores,
                                lambda m: _fault(fault, "bench", key, attempt, str(m)), round_=round_)
        except UserError as exc:
            return {"user_error": str(exc), "host": platform.node(), "attempt": attempt}
        return {"result": result, "host": platform.node(), "attempt": attempt, "seconds": time.perf_counter() - t0}


def _node_info_task() -> dict:
    return node_info()


def _machine_task(cores) -> dict:
    return machine_block(cores)


def _cached_bench(sweep, run_dir: Path, pair: tuple, round_: int) -> dict:
    level, precision, deploy, engine, cores = pair
    return bench_step(sweep, run_dir, level, precision, Path(deploy), engine, cores, _needs_work, round_=round_)


def _bench_key(sweep, run_dir: Path, pair: tuple, round_: int) -> str:
    level, precision, _, engine, cores = pair
    return bench_path(sweep, run_dir, level, precision, engine, cores, round_).name.removesuffix(".json")


@contextlib.contextmanager
def _task_env(env: dict):
    """The driver's settings (data folder, offline flags) for the length of one task; a worker process serves
    many tasks, so they are put back afterwards."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _begin_attempt(attempts_dir: str, stage: str, key: str) -> int:
    """Leave one file per attempt in the run folder (all nodes see it): the attempt's number, for executor.json,
    the progress display (queued vs running) and the fault hook."""
    folder = Path(attempts_dir)
    folder.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        try:
            fd = os.open(folder / f"{stage}~{key}~{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            n += 1
            continue
        os.write(fd, f"{platform.node()} {os.getpid()}\n".encode())
        os.close(fd)
        return n


def _remove_stale_temps(folder: Path, names: list[str]) -> None:
    """What a killed attempt left of its atomic writes (io.atomic_dir, write_json_atomic): `.NAME.XXXXXXXX.tmp`
    beside NAME. They are never published (only a rename publishes), and a retry writes into a new temp of its
    own; removing them only frees the space. Exact names: another level's live temp is never touched."""
    if not folder.is_dir():
        return
    pattern = re.compile("|".join(rf"\.{re.escape(n)}\.[a-z0-9_]{{8}}\.tmp" for n in names))
    for entry in folder.iterdir():
        if pattern.fullmatch(entry.name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def _fault(spec: str | None, stage: str, name: str, attempt: int, message: str | None) -> None:
    """Test hook: DLP_DEPLOY_FAULT="STAGE:NAME[:WORD][,...]" (STAGE prepare or bench; NAME a level label or a
    measurement's file stem, e.g. dense.onnxruntime.r0) kills the worker process of that task's first attempt, as
    a dying machine would: at its start, or when it logs a message holding WORD (e.g. `perplexity`: after the
    prune was published)."""
    if not spec or attempt != 1:
        return
    for one in spec.split(","):
        want_stage, _, rest = one.strip().partition(":")
        want_name, _, word = rest.partition(":")
        if want_stage != stage or want_name not in (name, name.split("@")[0]):  # a bench key may name its kind
            continue
        if (message is None and not word) or (word and message is not None and word in message):
            os._exit(1)


def _pinned(node: _Node):
    return _pinned_id(node.node_id)


def _pinned_id(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # ray: the optional extra

    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def _ray_error_text(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, UserError):
        return str(cause)
    return str(exc).strip() or type(exc).__name__


def _step_names(steps: list[str]) -> list[str]:
    """"[label] perplexity" -> "perplexity"."""
    return [m.split("] ", 1)[-1] for m in steps]
