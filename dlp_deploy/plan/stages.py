"""Wiring of `dlp-deploy plan`: three stages over the candidates, then the choice, then (only then) test text.

Layout of DIR, every file written atomically and read back on the next start (a stage's result per candidate, so
the same command resumes where it stopped and redoes nothing):
  settings.json                 what identifies the plan (a resumed one must match it)
  validation.json               the held-out C4 validation windows every stage scores on (token ids)
  stage1/<id>.json              one-shot (or pruned) validation perplexity of each candidate
  models/<id>/                  the pruned model of a stage-1 survivor
  deploy/<name>/, stage2/<name>.json   its deployments and their own validation perplexity through an engine
  stage3/bench/…                each measured round (pipeline/sweep.py's files: the executors write them)
  choice.json                   the choice, written before any test text is read
  test/<name>.json              WikiText-2 test perplexity of the choice and of the llama.cpp peer, same windows
  deployment/                   the chosen deployment with its model card (README.md)
  plan.json, plan.md, pareto.png
Decisions (who is within budget, what fits the time budget, the choice) are recomputed from those files on every
start, so a new --max-ppl-increase or --time-budget reuses everything already measured.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import data, models
from ..bench.harness import BenchSettings, check_settings as check_bench
from ..bench.schedule import merge_rounds
from ..bench.stats import AA_SUFFIX, attach_speedups, bootstrap_ratio_ci, noise_floor, process_runs
from ..errors import UserError
from ..eval.evaluate import evaluate_deployment
from ..eval.perplexity import perplexity, session_logits
from ..export import deployment
from ..export.deployment import ExportSettings, QuantizeOptions, export_deployment, export_gguf_deployment
from ..export.quantize import engines_refusing
from ..io import atomic_dir, write_json_atomic
from ..models import load_config
from ..pipeline.executors import get_executor
from ..pipeline.levels import Level, SweepSettings
from ..pipeline.steps import bench_path, bench_step
from ..provenance import provenance
from ..prune.allocate import get_allocator
from ..prune.depth import StreamlineSettings, streamline_to_folder, validate_settings as check_streamline
from ..prune.masks import parse_pattern
from ..prune.oneshot import DenseSnapshot
from ..prune.pipeline import allocation_params, pattern_ratios
from ..prune.search import Scorer, tune
from ..prune.settings import SweepPrune
from ..prune.to_folder import prune_to_folder
from ..runtime.deployment import EXPORT_FILE, load_deployment
from ..runtime.engines import ENGINES
from ..runtime.worker import ProgressEvents, replay_progress, run_in_worker, workaround
from . import select
from .candidates import DENSE_ID, PEER_ONLY, PEERS, PRECISIONS, Candidate, candidates, deploy_name, precisions, \
    prune_settings_of

# test text, read only after the choice; C4 test docs (1000-1999) never overlap the validation pool (0-999)
TEST_CORPORA = ("wikitext2", "c4")
# issue 24: per-token scales cost SmolLM2 +1% perplexity over fp32, static ones +74%; with the head quantized
# too, +1.7% at 1.93x dense fp32 decode on ONNX Runtime (1.57x without it: the head is the largest matrix read)
INT8_ACT_SCALES = "dynamic-token"
INT8_HEAD = True
# the one-shot screen may use this share of the --time-budget left after the dense statistics: export, scoring
# and measurement need the rest
STAGE1_SHARE = 0.4


@dataclass
class PlanSettings:
    model: str
    max_ppl_increase: float
    engines: list[str] = field(default_factory=lambda: ["onnxruntime"])
    cores: int | None = None
    time_budget: float | None = None  # minutes
    include: list[str] = field(default_factory=lambda: ["unstructured", "nm"])
    levels: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8", "q8_0", "q4_k_m"])
    peers: list[str] = field(default_factory=lambda: list(PEERS))
    executor: str = "local"
    screen_margin: float = 0.10
    seq_len: int = 512
    val_windows: int = 16
    calib: str = "c4"
    nsamples: int = 128
    calib_seqlen: int | None = None
    seed: int = 0
    prompt_len: int = 64
    gen_len: int = 128
    runs: int = 5
    warmup: int = 1
    rounds: int = 3
    test_windows: int | None = 128
    validate: bool = True  # export's own check of each ONNX graph's logits against PyTorch
    allocations: list[str] = field(default_factory=list)  # saved searched allocations screened as well

    @property
    def val_seqlen(self) -> int:
        """Every perplexity of the plan (screen, deployments, test) is over windows of the export window minus
        one, so that a deployment can score them."""
        return self.seq_len - 1


# what a resumed plan must share with the one that wrote its files: the rest only changes decisions or adds work
IDENTITY = ("model", "seq_len", "val_windows", "calib", "nsamples", "calib_seqlen", "seed", "prompt_len", "gen_len",
            "runs", "warmup", "rounds", "cores", "test_windows", "validate")


def check_settings(settings: PlanSettings) -> None:
    if not 0 <= settings.max_ppl_increase:
        raise UserError(f"--max-ppl-increase {settings.max_ppl_increase}: give a non-negative fraction, "
                        "e.g. 0.10 for 10%")
    if settings.time_budget is not None and not settings.time_budget > 0:
        raise UserError(f"--time-budget {settings.time_budget:g}: give a positive number of minutes, or leave it out")
    if settings.screen_margin < 0:
        raise UserError(f"--screen-margin {settings.screen_margin}: give a non-negative fraction")
    candidates(settings.include, settings.levels)
    precisions(settings.precisions)
    for name in settings.allocations:
        get_allocator(name)  # a saved search's name, or a one-line refusal naming what exists
    bad_peers = [p for p in settings.peers if PRECISIONS.get(p) is None or PRECISIONS[p].format != "gguf"]
    if bad_peers:
        raise UserError(f"--peers {','.join(bad_peers)}: peers are GGUF formats ({', '.join((*PEERS, *PEER_ONLY))}), "
                        "or none")
    onnx = [e for e in settings.engines if e in ENGINES and ENGINES[e].model_format == "onnx"]
    if not settings.engines or len(onnx) != len(settings.engines):
        raise UserError(f"--engines {','.join(settings.engines)}: give ONNX engines (onnxruntime, deepsparse, "
                        "deepsparse-external, openvino); GGUF deployments are measured on llama.cpp by themselves")
    get_executor(settings.executor)
    for engine in settings.engines:
        check_bench(BenchSettings(engine, settings.cores, settings.prompt_len, settings.gen_len, 1, settings.runs,
                                  settings.warmup), settings.seq_len)


# ---------------------------------------------------------------- the run's context

class Plan:
    """One run of a plan folder: settings, the time planner, the lazily built scorer, what this run did."""

    def __init__(self, settings: PlanSettings, out: Path, progress=None, log=print,
                 executor_options: dict | None = None):
        self.settings, self.out, self.progress, self.log = settings, Path(out), progress, log
        self.executor_options = executor_options or {}
        self.planner = select.TimePlanner(None if settings.time_budget is None else settings.time_budget * 60)
        self.work = {"screened": 0, "pruned": 0, "exported": 0, "scored": 0, "rounds_measured": 0}
        self.stamps: dict[str, str] = {}
        self.held: dict[str, float] = {}  # what hold_fixed_costs set aside, for plan.md
        self._scorer = None
        self._validation = None
        self.root = data.data_dir()

    def stamp(self, what: str) -> None:
        self.stamps[what] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def task(self, label: str, total: int):
        return self.progress.add_task(label, total=total) if self.progress else None

    def advance(self, task) -> None:
        if self.progress and task is not None:
            self.progress.advance(task)

    # ------------------------------------------------------------ folder and settings

    def open(self) -> None:
        path = self.out / "settings.json"
        now = json.loads(json.dumps(asdict(self.settings)))
        if path.is_file():
            before = json.loads(path.read_text())["settings"]
            differ = sorted(k for k in IDENTITY if before.get(k) != now.get(k))
            if differ:
                raise UserError(f"{self.out} holds a plan with other settings ({', '.join(differ)}); resume it with "
                                "the same options or choose another --out")
        elif self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"{self.out} exists and holds no plan; choose another --out")
        write_json_atomic(path, {"settings": now, "provenance": provenance(seed=self.settings.seed)}, force=True)

    # ------------------------------------------------------------ validation text and the scorer

    def validation(self) -> dict:
        """The held-out C4 windows (never an evaluation document, never one a calibration window came from),
        computed once and kept: every later start scores exactly these."""
        if self._validation is None:
            path = self.out / "validation.json"
            if not path.is_file():
                tok, calibration = self._calibration()
                v = data.validation_windows(tok, calibration, self.settings.val_windows, self.settings.val_seqlen,
                                            self.root, self.settings.calib)
                write_json_atomic(path, {"source": v.source, "windows": self.settings.val_windows,
                                         "seqlen": self.settings.val_seqlen, "docs": [v.docs[0], v.docs[-1]],
                                         "doc_count": len(v.docs), "ids": v.ids.flatten().tolist(),
                                         "provenance": provenance(seed=self.settings.seed)}, force=True)
            self._validation = json.loads(path.read_text())
        return self._validation

    def _calibration(self):
        # transformers' Auto classes take seconds to import: here, not at the top, so the CLI starts without them
        from transformers import AutoTokenizer

        ref, config = load_config(self.settings.model)
        tok = AutoTokenizer.from_pretrained(ref)
        seqlen = self.settings.calib_seqlen or data.default_seqlen(config)
        return tok, data.calibration(self.settings.calib, tok, self.settings.nsamples, seqlen, self.settings.seed,
                                     self.root)

    def scorer(self):
        """The dense model, its statistics (one calibration pass) and the validation windows: built only when a
        candidate needs scoring, so a finished plan resumes without loading the model."""
        if self._scorer is None:
            model, _ = models.load(self.settings.model, "cpu")
            _, calibration = self._calibration()
            v = self.validation()
            ids = torch.tensor(v["ids"], dtype=torch.long).reshape(v["windows"], v["seqlen"])
            validation = data.Validation(ids, v["source"], tuple(v["docs"]))  # first and last document
            self._scorer = Scorer(DenseSnapshot.collect(model, calibration.windows, self.progress), validation)
        return self._scorer


# ---------------------------------------------------------------- stage 1: one-shot screen

def stage1(p: Plan, cands: list[Candidate]) -> tuple[float, dict[str, dict]]:
    """The dense validation perplexity (PyTorch) and each candidate's screen record: {"ppl", "seconds", ...}, or
    {"skipped": why} where the time budget left it out."""
    p.stamp("stage1_started")
    dense_path = p.out / "stage1" / f"{DENSE_ID}.json"
    if not dense_path.is_file():
        write_json_atomic(dense_path, {"ppl": p.scorer().perplexity(), "who": "dense PyTorch model",
                                       "provenance": provenance()}, force=True)
    reference = json.loads(dense_path.read_text())["ppl"]
    bound = select.limit(reference, p.settings.max_ppl_increase, p.settings.screen_margin)
    if any(c.screen == "oneshot" and not (p.out / "stage1" / f"{c.id}.json").is_file() for c in cands):
        p.scorer()  # the dense statistics, a fixed cost: collected before the screen's share is set
    until = p.planner.share_of_left(STAGE1_SHARE)
    share = f"the screen's {STAGE1_SHARE:.0%} of the --time-budget left when it started"
    records: dict[str, dict] = {}
    over: dict[tuple, str] = {}  # series -> the screened candidate of it already over the limit
    task = p.task("stage 1: one-shot screen", len(cands))
    for c in screen_order(cands):
        path = p.out / "stage1" / f"{c.id}.json"
        unit = screen_unit(c)
        if series(c) in over:
            records[c.id] = {"skipped": f"{over[series(c)]} (lower sparsity, same form and allocation) is already "
                                        f"over the screen limit {bound:.3f}; perplexity only rises with sparsity"}
        elif path.is_file():
            records[c.id] = json.loads(path.read_text())
            p.planner.record(unit, records[c.id]["seconds"])
        elif not p.planner.admit(unit, c.id, until=until, share=share):
            records[c.id] = {"skipped": p.planner.skipped[-1]["why"]}
        else:
            t0 = time.perf_counter()
            p.log(f"[{c.id}] screening ({'one-shot' if c.screen == 'oneshot' else 'pruned, no one-shot form'})")
            record = _screen(p, c)
            record["seconds"] = time.perf_counter() - t0
            record["finished_at"] = time.time()
            record["provenance"] = provenance()
            p.planner.record(unit, record["seconds"])
            write_json_atomic(path, record, force=True)
            p.work["screened"] += 1
            records[c.id] = record
        if not select.within_budget(records[c.id].get("ppl"), reference, p.settings.max_ppl_increase,
                                    p.settings.screen_margin) and "skipped" not in records[c.id]:
            over[series(c)] = f"{c.id} ({records[c.id].get('ppl') or float('nan'):.3f})"
        p.advance(task)
    p.stamp("stage1_finished")
    return reference, records


def screen_unit(c: Candidate) -> str:
    """What a screen costs is estimated per kind: DLP's alpha auto scores a whole grid (~9 one-shot scores, 155 s a
    level on SmolLM2 against uniform's 18 s), and the forms with no one-shot form are pruned for real."""
    return f"stage1-{c.screen}" + ("-tuned" if c.screen == "oneshot" and c.allocation == "dlp" else "")


def screen_order(cands: list[Candidate]) -> list[Candidate]:
    """The cheap screens first (every level of the fixed allocations), then the tuned ones: a tight budget then
    still sees every level once, not only the lowest; each series keeps its rising levels (the early stop)."""
    return sorted(cands, key=lambda c: screen_unit(c).endswith("-tuned"))  # sorted() is stable


def series(c: Candidate) -> tuple:
    """Candidates that differ only in sparsity (candidates() lists each series' levels in rising order)."""
    return c.form, c.pattern, c.allocation, c.structure, c.replacement


def _screen(p: Plan, c: Candidate) -> dict:
    if c.screen == "pruned":
        folder = model_folder(p, c)
        return {"ppl": _pytorch_validation_ppl(p, folder), "how": "pruned for real (no one-shot form), PyTorch"}
    scorer = p.scorer()
    settings = prune_settings_of(c, p.settings.val_windows)
    pattern = parse_pattern(c.pattern)
    if c.allocation == "dlp":
        tuning = tune(scorer, "dlp", "alpha", c.sparsity, allocation_params(settings), None, pattern)
        score = tuning["validation_ppl"][tuning["grid"].index(tuning["choice"])]
        return {"ppl": _finite(score), "alpha": tuning["choice"], "how": "one-shot wanda, DLP alpha auto"}
    alloc = scorer.snapshot.allocate(settings.allocation, c.sparsity, allocation_params(settings))
    ratios, _ = pattern_ratios(pattern, alloc.ratios, scorer.snapshot.sizes, c.sparsity)
    return {"ppl": _finite(scorer.score(ratios, pattern.m)), "how": f"one-shot wanda, {settings.allocation}"}


def _finite(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _pytorch_validation_ppl(p: Plan, folder: Path) -> float | None:
    model, _ = models.load(str(folder), "cpu")
    ids = torch.tensor(p.validation()["ids"], dtype=torch.long)
    return _finite(perplexity(model, ids, p.settings.val_seqlen)["ppl"])


def model_folder(p: Plan, c: Candidate) -> Path:
    """The candidate's pruned model (made once, kept under models/)."""
    if c.sparsity is None:
        return Path(p.settings.model)
    out = p.out / "models" / c.id
    if has_model_folder(p, c):
        return out
    p.log(f"[{c.id}] pruning")
    t0 = time.perf_counter()
    if c.form == "depth":
        settings = StreamlineSettings(ratio=c.sparsity, replacement=c.replacement, calib=p.settings.calib,
                                      nsamples=p.settings.nsamples, seqlen=p.settings.calib_seqlen,
                                      seed=p.settings.seed)
        check_streamline(settings)
        streamline_to_folder(p.settings.model, out, settings, "cpu", force=True, progress=p.progress)
    else:
        prune_to_folder(p.settings.model, out, prune_settings_of(c, p.settings.val_windows), p.settings.calib,
                        p.settings.nsamples, p.settings.calib_seqlen, p.settings.seed, "cpu", force=True,
                        progress=p.progress)
    p.planner.record("prune", time.perf_counter() - t0)
    p.work["pruned"] += 1
    return out


def has_model_folder(p: Plan, c: Candidate) -> bool:
    """Whether the candidate's model exists (dense: always; a pruned one: once its record is written)."""
    if c.sparsity is None:
        return True
    return (p.out / "models" / c.id / ("streamline.json" if c.form == "depth" else "pruning.json")).is_file()


# ---------------------------------------------------------------- stage 2: deployments and their own perplexity

def reference_units(p: Plan) -> list[tuple[Candidate, str, bool]]:
    """(candidate, precision, selectable) of the deployments every comparison needs, made whatever the time
    budget: the dense fp32 deployment (selectable if fp32 was asked for) and the dense llama.cpp peers."""
    dense = Candidate("dense")
    return [(dense, "fp32", "fp32" in p.settings.precisions)] + [(dense, peer, peer in p.settings.precisions)
                                                                for peer in p.settings.peers]


def stage2_units(p: Plan, survivors: list[Candidate], likely: set[str]) -> list[tuple[Candidate, str, bool]]:
    """The optional deployments: the dense model in the other precisions asked for, then each survivor in every
    precision. Survivors whose screen was within the budget itself (`likely`: not only within its margin) go
    first, the sparsest of them first (fewest weights to stream): the ones a tight --time-budget should not skip."""
    dense = Candidate("dense")
    units = [(dense, pr, True) for pr in p.settings.precisions if pr != "fp32" and pr not in p.settings.peers]
    survivors = sorted(survivors, key=lambda c: (c.id not in likely, -(c.sparsity or 0.0)))
    return units + [(c, pr, True) for c in survivors for pr in p.settings.precisions]


def deploy_references(p: Plan) -> dict[str, dict]:
    """The reference deployments (reference_units), one measured round of the dense fp32 one (what a round
    costs here), and the time held for what must run later whatever the budget (hold_fixed_costs)."""
    records = stage2(p, reference_units(p), forced=True)
    if "ppl" not in records[DENSE_ID]:
        raise UserError(f"the dense fp32 deployment, every deployment's reference, failed: {records[DENSE_ID]}")
    pairs, _, aa = stage3_pairs(p, records)
    sweep, run_dir = sweep_settings(p, p.settings.engines), p.out / "stage3"
    _probe(p, sweep, run_dir, pairs[0])
    hold_fixed_costs(p, records, sum(rounds_to_measure(sweep, run_dir, pair) for pair in pairs + aa))
    return records


def hold_fixed_costs(p: Plan, references: dict[str, dict], rounds: int) -> None:
    """Hold the estimated time of the references' `rounds` stage-3 rounds still to measure (each as long as the
    dense fp32 probe round) and of the test perplexities after the choice (per window as long as the deployment's
    validation scoring; the choice's as the slowest reference's), so that the screen and stage 2 admit nothing
    into it."""
    p.planner.hold("stage 3 references", rounds * (p.planner.estimate("stage3") or 0.0))
    # with every window of each corpus (--test-windows all) the count is unknown here: nothing is held for it
    if p.settings.test_windows is not None:
        per_window = {name: r.get("score_seconds", r["seconds"]) / r["windows"] for name, r in references.items()
                      if r.get("ppl") is not None}
        tested = [*per_window.values(), max(per_window.values())]  # the references and the choice
        p.planner.hold("test perplexity", sum(tested) * p.settings.test_windows * len(TEST_CORPORA))
    p.held = dict(p.planner.held)


def stage2(p: Plan, units: list[tuple[Candidate, str, bool]], forced: bool = False) -> dict[str, dict]:
    """deployment name -> {"ppl", "engine", "deploy", ...}, {"error": ...} or {"skipped": ...}. `forced`: made
    whatever the time budget (the references); otherwise a unit is made only if it and its measurement fit."""
    records: dict[str, dict] = {}
    task = p.task("stage 2: export and score " + ("the references" if forced else "deployments"), len(units))
    for c, precision, selectable in units:
        name = deploy_name(c.id, precision)
        spec = PRECISIONS[precision]
        path = p.out / "stage2" / f"{name}.json"
        base = {"id": c.id, "precision": precision, "engine": spec.scoring_engine, "selectable": selectable}
        if path.is_file():  # the folder's path is this plan folder's, wherever it has moved
            records[name] = {**json.loads(path.read_text()), "selectable": selectable,
                             "deploy": str(p.out / "deploy" / name)}
            p.planner.record("stage2", records[name]["seconds"])
        elif spec.scoring_engine not in ENGINES.usable():
            records[name] = {**base, "error": f"{spec.scoring_engine} is not installed here (llama_cpp for GGUF); "
                                              "install it to deploy and compare in this format"}
        elif not forced and not p.planner.admit("stage2", name, then=work_with(p, c, precision)):
            records[name] = {**base, "skipped": p.planner.skipped[-1]["why"]}
        else:
            model_folder(p, c)  # the prune first, timed on its own: an export's estimate must not carry it
            records[name] = _deploy_and_score(p, c, precision, name, base, path)
        p.advance(task)
    return records


def work_with(p: Plan, c: Candidate, precision: str) -> tuple[tuple[str, float], ...]:
    """(stage, units) of what a deployment brings with it: its measurement, and its prune if not yet made."""
    measure = ("stage3", p.settings.rounds * len(engines_for(p, precision)))
    return (measure,) if has_model_folder(p, c) else (("prune", 1), measure)


def _deploy_and_score(p: Plan, c: Candidate, precision: str, name: str, base: dict, path: Path) -> dict:
    t0 = time.perf_counter()
    try:
        folder = export(p, c, precision, name)
        p.log(f"[{name}] validation perplexity on {base['engine']}")
        t1 = time.perf_counter()
        scored = validation_perplexity(p, folder, base["engine"])
        score_seconds = time.perf_counter() - t1
    except UserError as exc:  # e.g. int4 not accepted by this version's export, an engine that failed
        p.log(f"[{name}] stopped: {exc}")
        return {**base, "error": str(exc)}
    p.work["scored"] += 1
    info = json.loads((folder / "export.json").read_text())
    record = {**base, "deploy": str(folder), "ppl": _finite(scored["ppl"]), "windows": scored["windows"],
              "seqlen": scored["seqlen"], "bytes": info["sizes"].get("model_gguf_bytes") or info["sizes"]["folder_bytes"],
              "sparsity": (info.get("weight_sparsity") or {}).get("global"),
              "seconds": time.perf_counter() - t0, "score_seconds": score_seconds, "finished_at": time.time(),
              "provenance": provenance()}
    p.planner.record("stage2", record["seconds"])
    write_json_atomic(path, record, force=True)
    return record


def export(p: Plan, c: Candidate, precision: str, name: str) -> Path:
    """The deployment folder. Export's own perplexity check reads WikiText-2 test text, which selection must
    never see: ONNX graphs are validated on logits and greedy tokens only (quality=None); GGUF files, whose check
    always scores perplexity, are not validated by export (stage 2's deployed perplexity on llama.cpp is theirs)."""
    out = p.out / "deploy" / name
    if (out / EXPORT_FILE).is_file():
        return out
    model_ref = str(model_folder(p, c))
    p.log(f"[{name}] export")
    cores = p.settings.cores
    if PRECISIONS[precision].format == "gguf":
        export_gguf_deployment(model_ref, out, precision, seq_len=p.settings.seq_len, validate=False, force=True,
                               num_cores=cores)
    else:
        quantize = None if precision == "fp32" else quantize_options(p, precision)
        export_deployment(model_ref, out, seq_len=p.settings.seq_len, validate=p.settings.validate, force=True,
                          num_cores=cores, quantize=quantize, quality=None, engines=("onnxruntime",))
    p.work["exported"] += 1
    return out


def validation_perplexity(p: Plan, folder: Path, engine: str) -> dict:
    v = p.validation()
    return run_in_worker("plan-ppl", {"deploy_dir": str(folder), "engine": engine, "ids": v["ids"],
                                      "seqlen": v["seqlen"], "cores": p.settings.cores},
                         engine=engine, label=folder.name, during="validation perplexity",
                         on_event=replay_progress(p.progress), hint=workaround(engine, "leave its precision out"))


def validation_perplexity_task(args: dict, emit) -> dict:
    """The worker's side (runtime/worker.py): the deployment's own perplexity on the given validation windows."""

    dep = load_deployment(args["deploy_dir"])
    session = ENGINES[args["engine"]].compile(dep.model_path, dep.seq_len, num_cores=args["cores"])
    ids = torch.tensor(args["ids"], dtype=torch.long)
    return perplexity(session_logits(session), ids, args["seqlen"], None, ProgressEvents(emit),
                      f"validation ppl {Path(args['deploy_dir']).name}")


# ---------------------------------------------------------------- stage 3: interleaved speed

AA_ID = "dense-aa"


def sweep_settings(p: Plan, engines: list[str]):
    """The bench files and executors are the sweep's; they read these fields."""
    settings = p.settings
    return SweepSettings(settings.model, SweepPrune([]), export=ExportSettings(seq_len=settings.seq_len),
                         bench=BenchSettings(prompt_len=settings.prompt_len, gen_len=settings.gen_len,
                                             runs=settings.runs, warmup=settings.warmup),
                         engines=engines, cores=settings.cores, rounds=settings.rounds,
                         precisions=sorted({*settings.precisions, *settings.peers}), device="cpu")


def _level(candidate_id: str, aa: bool = False):
    return Level(candidate_id, None if candidate_id in (DENSE_ID, AA_ID) else 1.0, None, aa_control=aa)


def stage3_pairs(p: Plan, deploys: dict[str, dict]) -> tuple[list[tuple], list[list[tuple]], list[tuple]]:
    """Pairs (level, precision, folder, engine, cores) in three groups: the references, always measured (the
    dense fp32 deployment on every engine and the dense llama.cpp peers: no comparison without them); the
    candidates within budget, one group of pairs per deployment, most promising first (select.measurement_order);
    and the A/A control (the dense fp32 deployment again, on every engine), measured last in each round."""
    cores = p.settings.cores
    dense = deploys[DENSE_ID]
    references = [(_level(DENSE_ID), "fp32", Path(dense["deploy"]), e, cores) for e in p.settings.engines]
    for peer in p.settings.peers:
        r = deploys.get(deploy_name(DENSE_ID, peer))
        if r and r.get("ppl") is not None:
            references.append((_level(DENSE_ID), peer, Path(r["deploy"]), "llamacpp", cores))
    rows = [{**r, "candidate": r["id"], "id": name} for name, r in deploys.items()
            if name != DENSE_ID and r.get("within_budget") and r["selectable"]
            and not (r["id"] == DENSE_ID and r["precision"] in p.settings.peers)]
    optional = [[(_level(r["candidate"]), r["precision"], Path(r["deploy"]), e, cores)
                 for e in engines_for(p, r["precision"])] for r in select.measurement_order(rows)]
    optional = [group for group in optional if group]  # an INT8 graph on DeepSparse alone runs nowhere
    aa = [(_level(AA_ID, aa=True), "fp32", Path(dense["deploy"]), e, cores) for e in p.settings.engines]
    return references, optional, aa


def engines_for(p: Plan, precision: str) -> list[str]:
    """The engines a deployment of `precision` is measured on: llama.cpp for GGUF; for ONNX the plan's engines,
    less those export refuses for the graph (DeepSparse's internal cache computes dynamic INT8 scales wrongly)."""
    if PRECISIONS[precision].format == "gguf":
        return ["llamacpp"]
    refused = refusing(quantize_options(p, precision)) if precision != "fp32" else {}
    return [e for e in p.settings.engines if e not in refused]


def quantize_options(p: Plan, precision: str):
    return QuantizeOptions(precision, seed=p.settings.seed,
                           **({"act_scales": INT8_ACT_SCALES, "head": INT8_HEAD} if precision == "int8" else {}))


def refusing(options) -> dict[str, str]:
    """Engines export refuses for a quantized graph, with why: its scheme registry's where it has one (INT4
    landed with it), else the INT8 activation scales' refusals."""
    schemes = getattr(deployment, "QUANT_SCHEMES", {})
    if options.scheme in schemes:
        return schemes[options.scheme].refusals(options)
    return engines_refusing(options.act_scales)


def stage3(p: Plan, deploys: dict[str, dict]) -> tuple[list[dict], list[dict], list[str]]:
    """Measured rows (merged rounds, with speedups and noise floors), unmeasured pairs, and the deployments the
    time budget left unmeasured."""
    p.stamp("stage3_started")
    references, optional, aa = stage3_pairs(p, deploys)
    engines = sorted({pair[3] for pair in references + aa + [x for group in optional for x in group]})
    sweep = sweep_settings(p, engines)
    run_dir = p.out / "stage3"

    def todo(pair) -> int:
        return rounds_to_measure(sweep, run_dir, pair)

    # reserved below instead, as this stage plans its own time (deploy_references measured the probe round)
    p.planner.release("stage 3 references")
    p.planner.reserved = sum(todo(pair) for pair in references + aa) * (p.planner.estimate("stage3") or 0.0)
    chosen, skipped = [], []
    for group in optional:
        rounds_left = sum(todo(pair) for pair in group)
        name = deploy_name(group[0][0].label, group[0][1])
        if rounds_left == 0 or p.planner.admit("stage3", name, rounds_left, reserve=True):
            chosen += group
        else:
            skipped.append(name)
    p.planner.reserved = 0.0
    pairs = references + chosen + aa
    before = sum(todo(pair) for pair in pairs)
    t0 = time.perf_counter()
    with get_executor(p.settings.executor)(sweep, run_dir, p.progress, p.log, **p.executor_options) as runner:
        measured = runner.measure(pairs, sweep.rounds, "abba", 0)
    if before:
        p.planner.record("stage3", (time.perf_counter() - t0) / before)
    p.work["rounds_measured"] += before - sum(todo(pair) for pair in pairs)
    rows, unmeasured = merge_measured(measured.pairs, measured.rounds)
    p.stamp("stage3_finished")
    return rows, unmeasured, skipped


def rounds_to_measure(sweep, run_dir: Path, pair: tuple) -> int:
    """Rounds of a (level, precision, folder, engine, cores) pair not yet on disk."""
    return sum(not bench_path(sweep, run_dir, pair[0], pair[1], pair[3], pair[4], r).is_file()
               for r in range(sweep.rounds))


def _probe(p: Plan, sweep, run_dir: Path, pair: tuple) -> None:
    """What one round costs here: the dense fp32 pair's first round, measured now (and kept: the interleaved
    measurement reuses it) unless an earlier start measured it; its wall time is kept in probe.json."""
    path = run_dir / "probe.json"
    if path.is_file():
        p.planner.record("stage3", json.loads(path.read_text())["seconds"])
        return
    t0 = time.perf_counter()
    level, precision, folder, engine, cores = pair
    bench_step(sweep, run_dir, level, precision, Path(folder), engine, cores, p.log, round_=0)
    seconds = time.perf_counter() - t0
    write_json_atomic(path, {"seconds": seconds, "pair": f"{folder} on {engine}", "provenance": provenance()},
                      force=True)
    p.planner.record("stage3", seconds)
    p.work["rounds_measured"] += 1


def merge_measured(pairs: list[tuple], rounds: list[list[dict]]) -> tuple[list[dict], list[dict]]:
    rows, unmeasured = [], []
    for (level, precision, folder, engine, _), measured in zip(pairs, rounds):
        missed = next((r for r in measured if "unmeasured" in r), None)
        if missed is not None:
            unmeasured.append({"deploy": Path(folder).name, "engine": engine, "reason": missed["unmeasured"]})
            continue
        row = {**merge_rounds(measured), "precision": precision, "candidate": level.label}
        if level.aa_control:
            row.update(label=Path(folder).name + AA_SUFFIX, aa_control=True)
        rows.append(row)
    attach_speedups(rows)
    return rows, unmeasured


# ---------------------------------------------------------------- the choice

def ratio(base: dict, r: dict) -> dict:
    """Decode speed of r over base (>1: r is faster), with the cluster-bootstrap 95% interval over processes."""

    b, g = process_runs(base), process_runs(r)
    out = {"decode": float(np.median(np.concatenate(b)) / np.median(np.concatenate(g)))}
    if sum(map(len, b)) > 1 and sum(map(len, g)) > 1:
        out["decode_ci95"] = bootstrap_ratio_ci(b, g)
    return out


def choice_rows(rows: list[dict], deploys: dict[str, dict]) -> list[dict]:
    """One selectable row per measured (deployment, engine) within budget: its speed and validation perplexity."""
    out = []
    for r in rows:
        d = deploys.get(r["label"])
        if r.get("aa_control") or d is None or not d.get("within_budget") or not d["selectable"]:
            continue
        out.append({"id": f"{r['label']} on {r['engine']}", "deploy": r["label"], "engine": r["engine"],
                    "precision": d["precision"], "speed": r["decode_tokens_per_s"], "ppl": d["ppl"], "row": r})
    return out


def choose(rows: list[dict], deploys: dict[str, dict], engines: list[str]) -> dict:
    floor = noise_floor(rows)
    options = choice_rows(rows, deploys)
    best, why = select.choose(options, floor["value"])
    if best is None:
        raise UserError("no deployment within budget was measured (the dense fp32 one always is: see stage3/)")
    dense = {r["engine"]: r for r in rows if r["label"] == DENSE_ID and not r.get("aa_control")}
    peers = {r["precision"]: r for r in rows if r["engine"] == "llamacpp" and r["label"].startswith(DENSE_ID + ".")
             and r["precision"] in (*PEERS, *PEER_ONLY)}
    base = dense.get(best["engine"]) or dense[engines[0]]
    choice = {"deploy": best["deploy"], "candidate": deploys[best["deploy"]]["id"], "engine": best["engine"],
              "precision": best["precision"],
              "validation_ppl": best["ppl"], "decode_tokens_per_s": best["speed"], "why": why,
              "noise_floor": floor, "vs_dense_fp32": {"baseline": f"dense fp32 on {base['engine']}",
                                                      **ratio(base, best["row"])},
              "vs_peers": {p: {"peer": _peer_label(p), **ratio(r, best["row"])} for p, r in peers.items()},
              "front": select.front_ids(options), "chosen_at": time.time()}
    return choice


def _peer_label(precision: str) -> str:
    return ("the GGUF the model was fetched from, on llama.cpp" if precision in PEER_ONLY
            else f"dense {precision} on llama.cpp")


# ---------------------------------------------------------------- after the choice: test text

def test_perplexity(p: Plan, folder: Path, engine: str) -> dict:
    """Test perplexity of a deployment on each of TEST_CORPORA, on windows of the plan's validation length (the
    first --test-windows of each), through its scoring engine; kept under test/, one file per corpus."""
    return {corpus: _test_perplexity(p, folder, engine, corpus) for corpus in TEST_CORPORA}


def _test_perplexity(p: Plan, folder: Path, engine: str, corpus: str) -> dict:
    path = p.out / "test" / f"{folder.name}.{engine}.{corpus}.json"
    if not path.is_file():
        p.log(f"[{folder.name}] {corpus} test perplexity on {engine} (after the choice)")
        result = evaluate_deployment(str(folder), engine, [corpus], p.settings.val_seqlen,
                                     p.settings.test_windows, p.settings.cores, None, p.progress)
        write_json_atomic(path, result, force=True)
    result = json.loads(path.read_text())
    details = result["perplexity_details"][corpus]
    return {"ppl": result["perplexity"][corpus], "windows": details["windows"], "seqlen": details["seqlen"],
            "source": details["source"], "engine": engine}


def publish(p: Plan, choice: dict, card: str) -> Path:
    """DIR/deployment: the chosen deployment folder as export made it, plus its model card."""
    out = p.out / "deployment"
    with atomic_dir(out, force=True) as tmp:
        shutil.copytree(p.out / "deploy" / choice["deploy"], tmp, dirs_exist_ok=True)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out
