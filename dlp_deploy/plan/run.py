"""The whole plan: screen, deploy and score, measure, choose; then test text, the deployment and the plan files."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..io import write_json_atomic
from ..provenance import provenance
from . import render, select, stages
from .candidates import DENSE_ID, PRECISIONS, candidates, deploy_name
from .stages import Plan, PlanSettings

SCHEMA = "dlp-deploy/plan/1"


def run_plan(settings: PlanSettings, out: Path, progress=None, log=print, executor_options: dict | None = None) -> dict:
    """Returns plan.json's contents."""
    started = time.time()
    stages.check_settings(settings)
    p = Plan(settings, out, progress, log, executor_options)
    p.open()
    cands = candidates(settings.include, settings.levels, settings.allocations)

    # the references first: what they and the test text after the choice will cost is held out of the budget
    p.stamp("references_started")
    references = stages.deploy_references(p)
    reference1, screened = stages.stage1(p, cands)
    rows1 = [{"id": c.id, "ppl": screened[c.id].get("ppl")} for c in cands if "skipped" not in screened[c.id]]
    kept1, dropped1 = select.budget_split(rows1, reference1, settings.max_ppl_increase, settings.screen_margin)
    dropped1 += uniform_twins(cands, screened, {r["id"] for r in kept1})
    survivors = [c for c in cands if c.id in {r["id"] for r in kept1} - {r["id"] for r in dropped1}]
    likely, _ = select.budget_split(rows1, reference1, settings.max_ppl_increase)

    p.stamp("stage2_started")
    deploys = {**references, **stages.stage2(p, stages.stage2_units(p, survivors, {r["id"] for r in likely}))}
    p.stamp("stage2_finished")
    reference2 = deploys[DENSE_ID]["ppl"]
    scored = [{"id": name, "ppl": r["ppl"]} for name, r in deploys.items() if "ppl" in r]
    kept2, dropped2 = select.budget_split(scored, reference2, settings.max_ppl_increase)
    for r in kept2:
        deploys[r["id"]]["within_budget"] = True
    for r in dropped2:
        deploys[r["id"]].update(within_budget=False, why=r["why"])

    rows, unmeasured, skipped3 = stages.stage3(p, deploys)
    choice = stages.choose(rows, deploys, settings.engines)
    # the choice is on disk before any test text is read: test/ files are only ever written after choice.json
    write_json_atomic(out / "choice.json", {**choice, "provenance": provenance()}, force=True)
    p.stamp("chosen")

    p.planner.release("test perplexity")
    chosen = out / "deploy" / choice["deploy"]
    test = {"chosen": stages.test_perplexity(p, chosen, PRECISIONS[choice["precision"]].scoring_engine)}
    for peer in settings.peers:
        r = deploys.get(deploy_name(DENSE_ID, peer))
        if r and r.get("deploy"):
            test[f"peer {peer}"] = stages.test_perplexity(p, Path(r["deploy"]), "llamacpp")
    dense_fp32 = out / "deploy" / DENSE_ID
    test["dense fp32"] = stages.test_perplexity(p, dense_fp32, "onnxruntime")
    p.stamp("tested")

    plan = {"schema": SCHEMA, "model": settings.model, "settings": asdict(settings),
            "budget": {"max_ppl_increase": settings.max_ppl_increase, "screen_margin": settings.screen_margin,
                       "screen_reference": reference1, "deployment_reference": reference2,
                       "screen_limit": select.limit(reference1, settings.max_ppl_increase, settings.screen_margin),
                       "deployment_limit": select.limit(reference2, settings.max_ppl_increase)},
            "validation": {k: v for k, v in p.validation().items() if k not in ("ids", "provenance")},
            "candidates": candidate_records(cands, screened, dropped1, deploys, rows, skipped3, settings),
            "peers": peer_records(settings, deploys),
            "measured": [_row_summary(r) for r in rows], "unmeasured": unmeasured,
            "choice": choice, "test": test,
            "time_budget": {"minutes": settings.time_budget, "skipped": p.planner.skipped, "held_s": p.held,
                            "cost_estimates_s": {k: select.TimePlanner(None, costs=p.planner.costs).estimate(k)
                                                 for k in p.planner.costs}},
            "this_run": {"work": p.work, "stamps": p.stamps, "wall_s": time.time() - started},
            "provenance": provenance(seed=settings.seed)}
    plan["wall_s_total"] = _total_wall(out, plan["this_run"]["wall_s"])
    figure = render.pareto_figure(plan, out / "pareto.png")
    plan["figure"] = figure.name if figure else None
    card = render.model_card(plan)
    stages.publish(p, choice, card)
    write_json_atomic(out / "plan.json", plan, force=True)
    (out / "plan.md").write_text(render.plan_markdown(plan), encoding="utf-8")
    return plan


def uniform_twins(cands, screened: dict, kept: set[str]) -> list[dict]:
    """DLP survivors whose alpha auto chose 0: the uniform allocation itself, already a survivor at that level and
    pattern; pruning and exporting them again would spend the budget on a copy."""
    uniform = {(c.form, c.pattern, c.sparsity): c.id for c in cands if c.allocation == "uniform" and c.id in kept}
    out = []
    for c in cands:
        twin = uniform.get((c.form, c.pattern, c.sparsity))
        if c.allocation == "dlp" and c.id in kept and twin and screened[c.id].get("alpha") == 0:
            out.append({"id": c.id, "ppl": screened[c.id].get("ppl"),
                        "why": f"alpha auto chose 0: the same allocation as {twin}, which goes on"})
    return out


def _total_wall(out: Path, this_run: float) -> float:
    """Wall time over every start of this plan folder (each run adds its own)."""
    path = out / "runs.json"
    runs = json.loads(path.read_text())["wall_s"] if path.is_file() else []
    runs.append(this_run)
    write_json_atomic(path, {"wall_s": runs}, force=True)
    return sum(runs)


def candidate_records(cands, screened: dict, dropped1: list[dict], deploys: dict, rows: list[dict],
                      skipped3: list[str], settings: PlanSettings) -> list[dict]:
    """Every candidate, with the stage where it stopped and why (or that it reached the measurements)."""
    why1 = {r["id"]: r["why"] for r in dropped1}
    measured = {r["label"] for r in rows}
    out = [{"id": DENSE_ID, "form": "dense", "screen": None, "deployments": _deployments(DENSE_ID, deploys, measured,
                                                                                          skipped3, settings)}]
    for c in cands:
        rec = {**c.describe(), "screen": screened[c.id]}
        if "skipped" in screened[c.id]:
            rec.update(stopped="stage 1", why=f"not screened: {screened[c.id]['skipped']}")
        elif c.id in why1:
            rec.update(stopped="stage 1", why=why1[c.id])
        else:
            rec["deployments"] = _deployments(c.id, deploys, measured, skipped3, settings)
        out.append(rec)
    return out


def _deployments(candidate_id: str, deploys: dict, measured: set, skipped3: list[str],
                 settings: PlanSettings) -> list[dict]:
    out = []
    for precision in settings.precisions:
        name = deploy_name(candidate_id, precision)
        d = deploys.get(name) or {}
        entry = {"name": name, "precision": precision, "validation_ppl": d.get("ppl")}
        if "error" in d:
            entry.update(stopped="stage 2", why=d["error"])
        elif "skipped" in d:
            entry.update(stopped="stage 2", why=f"not exported: {d['skipped']}")
        elif not d.get("within_budget"):
            entry.update(stopped="stage 2", why=d.get("why", "over budget"))
        elif name in skipped3:
            entry.update(stopped="stage 3", why="not measured: it would not fit in --time-budget")
        elif name in measured:
            entry.update(stopped=None, why="measured")
        else:
            entry.update(stopped="stage 3", why="not measured (see unmeasured)")
        out.append(entry)
    return out


def peer_records(settings: PlanSettings, deploys: dict) -> dict:
    out = {}
    for peer in settings.peers:
        d = deploys.get(deploy_name(DENSE_ID, peer)) or {}
        out[peer] = {"validation_ppl": d.get("ppl"), "skipped": d.get("error") or d.get("skipped")}
    return out


def _row_summary(r: dict) -> dict:
    speed = r.get("speedup") or {}
    return {"label": r["label"], "engine": r["engine"], "precision": r.get("precision"),
            "aa_control": bool(r.get("aa_control")), "decode_tokens_per_s": r["decode_tokens_per_s"],
            "decode_ms": r["decode_ms"]["median"], "prefill_ms": r["prefill_ms"],
            "speedup_vs_dense_fp32": speed.get("decode"), "speedup_ci95": speed.get("decode_ci95"),
            "noise_floor": r.get("noise_floor"), "rounds": len(r.get("rounds") or []),
            "runs": len(r.get("decode_ms_runs") or [])}
