"""Issue 27's report: what `dlp-deploy plan` chose for one model at several perplexity budgets, and whether each
choice's speed against dense fp32 and the llama.cpp peers shows again in a separate interleaved bench.

    python scripts/plan_report.py --plans runs/plan-3 runs/plan-10 runs/plan-50 --bench runs/plan-rep/bench.json \
        --out reports/smollm2-135m-plan --reproduce "bash scripts/plan_study.sh"

Reads each plan folder's plan.json (and PLAN.time, GNU time's record, beside it where present) and the replication
bench's results; writes OUT/README.md and OUT/report.json, and copies each plan's plan.md, plan.json, pareto.png and
its deployment's model card under OUT/plan-N/. Statistics are dlp_deploy/bench/stats.py's (ratio of per-run
medians, cluster-bootstrap 95% interval over worker processes; a verdict clears the A/A floor)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

from dlp_deploy.bench import stats
from dlp_deploy.bench.schedule import merge_rounds
from dlp_deploy.provenance import provenance

_spec = importlib.util.spec_from_file_location("qwen_report", Path(__file__).with_name("qwen_report.py"))
qwen_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qwen_report)
fmt_ratio, parse_gnu_time, ratio_block = qwen_report.fmt_ratio, qwen_report.parse_gnu_time, qwen_report.ratio_block

PEER_NAMES = {"q8_0": "dense q8_0", "q4_k_m": "dense q4_k_m", "source": "the fetched GGUF"}
PEER_LABELS = {f"dense.{k}": v for k, v in PEER_NAMES.items()}  # a peer's deployment name in a plan folder
TEST_CORPORA = ("wikitext2", "c4")


def _wall_cell(p: dict) -> str:
    asked = p.get("time_budget_min")
    return f"{p['wall_s'] / 60:.1f} min" + (f" (--time-budget {asked:g})" if asked else "")


def budget_of(plan: dict) -> str:
    return f"{100 * plan['budget']['max_ppl_increase']:g}%"


def verdict(block: dict | None, floor: float) -> str:
    """faster / slower / tie: faster or slower only when the whole interval clears 1.0x by the A/A floor."""
    if not block:
        return "—"
    lo, hi = block.get("decode_ci95") or [block["decode"]] * 2
    if lo > 1 + floor:
        return "faster"
    if hi < 1 - floor:
        return "slower"
    return "tie"


# ---------------------------------------------------------------- one plan


def plan_row(folder: Path) -> dict:
    plan = json.loads((folder / "plan.json").read_text())
    c = plan["choice"]
    floor = c["noise_floor"]["value"]
    timing = folder.parent / f"{folder.name}.time"
    cost = parse_gnu_time(timing.read_text()) if timing.is_file() else {}
    candidates = plan["candidates"][1:]
    return {"folder": folder.name, "budget": budget_of(plan), "max_ppl_increase": plan["budget"]["max_ppl_increase"],
            "choice": c["deploy"], "engine": c["engine"], "precision": c["precision"], "why": c["why"],
            "validation_ppl": c["validation_ppl"], "dense_validation_ppl": plan["budget"]["deployment_reference"],
            "limit": plan["budget"]["deployment_limit"], "tokens_per_s": c["decode_tokens_per_s"],
            "floor": floor, "vs_dense_fp32": {**c["vs_dense_fp32"], "verdict": verdict(c["vs_dense_fp32"], floor)},
            "vs_peers": {p: {**v, "verdict": verdict(v, floor)} for p, v in c["vs_peers"].items()},
            "test": plan["test"], "wall_s": plan["wall_s_total"], "time_budget_min": plan["time_budget"]["minutes"],
            "peak_rss_bytes": cost.get("peak_rss_bytes"),
            "screened": sum("ppl" in (x.get("screen") or {}) for x in candidates),
            "not_screened": sum("skipped" in (x.get("screen") or {}) for x in candidates),
            "deployments_scored": sum(d["validation_ppl"] is not None for x in plan["candidates"]
                                      for d in x.get("deployments") or []),
            "measured": sum(not r["aa_control"] for r in plan["measured"]),
            "skipped_for_time": len(plan["time_budget"]["skipped"]),
            "front": c.get("front"), "machine": plan["provenance"].get("machine"), "settings": settings_line(plan),
            "versions": plan["provenance"].get("versions")}


def settings_line(plan: dict) -> str:
    s = plan["settings"]
    return (f"engines {','.join(s['engines'])}; calibration {s['nsamples']} x {s['calib_seqlen'] or 'default'} "
            f"{s['calib']}; validation {s['val_windows']} x {s['seq_len']}; stage 3 {s['rounds']} rounds x "
            f"{s['runs']} runs of {s['gen_len']} tokens after a {s['prompt_len']}-token prompt; test "
            f"{s['test_windows']} windows; " + (f"--time-budget {s['time_budget']:g}" if s["time_budget"] else
                                                 "no --time-budget"))


# ---------------------------------------------------------------- replication across plans


def stage3_row(folder: Path, label: str, engine: str) -> dict | None:
    """A pair as a plan's stage 3 measured it: its round files merged as the plan merged them (merge_rounds)."""
    files = sorted((folder / "stage3" / "bench").glob(f"{label}.{engine}.r*.json"))
    rounds = [r for r in (json.loads(f.read_text()) for f in files) if r.get("decode_ms_runs")]
    return {**merge_rounds(rounds), "label": label, "engine": engine} if rounds else None


def cross_plan_rows(folders: list[Path], plans: list[dict]) -> list[dict]:
    """Each choice as every *other* plan's stage 3 measured it (a separate run of its own, with its own dense
    fp32, peers and A/A control): the comparisons the choice was made on, measured again."""
    out = []
    for p in plans:
        for folder, other in zip(folders, plans):
            if other is p:
                continue
            r = stage3_row(folder, p["choice"], p["engine"])
            if r is None:
                continue
            bases = [("dense fp32", stage3_row(folder, "dense", "onnxruntime"))] + [
                (PEER_NAMES[k], stage3_row(folder, f"dense.{k}", "llamacpp")) for k in PEER_NAMES]
            out.append({"budget": p["budget"], "choice": p["choice"], "engine": p["engine"], "in": other["budget"],
                        "tokens_per_s": r["decode_tokens_per_s"],
                        "comparisons": comparisons(r, bases, lambda base: other["floor"])})
    return out


def comparisons(r: dict, bases: list[tuple[str, dict | None]], floor_of) -> dict[str, dict]:
    """r's decode ratio over each named base that was measured, with its verdict against floor_of(base)."""
    out = {}
    for name, base in bases:
        if base is None:
            continue
        floor = floor_of(base)
        block = {"decode": 1.0} if base is r else ratio_block(base, r)
        out[name] = {**block, "floor": floor, "verdict": verdict(block, floor)}
    return out


# ---------------------------------------------------------------- the replication bench


def rows_by_label(bench: dict) -> dict[str, dict]:
    return {r["label"]: r for r in bench["results"] if not r.get("aa_control")}


def _rep_row(rows: dict[str, dict], name: str, target: str) -> dict | None:
    """The replication bench's row of a folder plan_study.sh linked as `name`: bench labels a linked folder by
    where it leads (`target`: the plan's folder name, or a path ending in it) in the benches it ran before it
    copied them instead."""
    return rows.get(name) or rows.get(target) or next((r for label, r in rows.items()
                                                       if label.endswith("/" + target)), None)


def bench_floors(bench: dict) -> dict[str, float]:
    """engine -> the A/A floor the bench measured there."""
    return {e: stats.aa_floor(b) for e, b in qwen_report.aa_controls(bench).items()}


def replication_rows(bench: dict, plans: list[dict]) -> list[dict]:
    rows = rows_by_label(bench)
    floors = bench_floors(bench)
    bases = [("dense fp32", _rep_row(rows, "dense-fp32", "dense")),
             *((PEER_NAMES[p], _rep_row(rows, f"dense-{p}", f"dense.{p}")) for p in PEER_NAMES)]
    out = []
    for plan in plans:
        r = _rep_row(rows, f"choice-{plan['folder'].split('-')[-1]}", f"{plan['folder']}/deployment")
        if r is None:
            out.append({"budget": plan["budget"], "missing": "not in the replication bench"})
            continue
        out.append({"budget": plan["budget"], "choice": plan["choice"], "engine": r["engine"],
                    "tokens_per_s": r["decode_tokens_per_s"],
                    "comparisons": comparisons(r, bases, lambda base, r=r: max(floors.get(r["engine"], 0.0),
                                                                                 floors.get(base["engine"], 0.0)))})
    return out


def replicated(plan: dict, rep: dict) -> dict[str, str]:
    """Per comparison: the plan's verdict and the bench's; 'yes' when they agree (a win's intervals overlapping)."""
    out = {}
    first = {"dense fp32": plan["vs_dense_fp32"], **{PEER_NAMES[p]: v for p, v in plan["vs_peers"].items()}}
    for name, a in first.items():
        b = rep.get("comparisons", {}).get(name)
        if b is None or _peer_cell(plan, {}, name) == "itself":
            continue
        agree = a["verdict"] == b["verdict"]
        if agree and a["verdict"] == "faster":
            (lo1, hi1), (lo2, hi2) = (x.get("decode_ci95") or [x["decode"]] * 2 for x in (a, b))
            agree = lo1 <= hi2 and lo2 <= hi1
        out[name] = "yes" if agree else (
            f"no ({a['verdict']} in the plan, {b['verdict']} here)" if a["verdict"] != b["verdict"] else
            f"no (faster in both, but {fmt_ratio(a)} and {fmt_ratio(b)} do not overlap)")
    return out


# ---------------------------------------------------------------- markdown


def _pct_over(ppl: float, ref: float) -> str:
    return f"{100 * (ppl / ref - 1):+.1f}%"


def _peer_cell(p: dict, blocks: dict, peer: str, with_verdict: bool = False) -> str:
    if PEER_LABELS.get(p["choice"]) == peer and p["engine"] == "llamacpp":
        return "itself"
    block = blocks.get(peer)
    return fmt_ratio(block) + (f" {block['verdict']}" if with_verdict and block else "")


COMPARED = ("dense fp32", "dense q4_k_m", "dense q8_0", "the fetched GGUF")


def _comparison_cells(p: dict, r: dict) -> str:
    """A re-measured choice's ratio cells, then whether each of the plan's verdicts replicated."""
    return (" | ".join(_peer_cell(p, r["comparisons"], k, True) for k in COMPARED) + " | "
            + "; ".join(f"{k}: {v}" for k, v in replicated(p, r).items()) + " |")


def _test_cell(test: dict, who: str) -> str:
    t = test.get(who)
    return "—" if not t else " / ".join(f"{t[c]['ppl']:.2f}" if c in t else "—" for c in TEST_CORPORA)


def markdown(plans: list[dict], reps: list[dict], bench: dict | None, reproduce: str,
             cross: list[dict] = ()) -> str:
    m = plans[0]["machine"] or {}
    lines = [f"# Which deployment should I use? `dlp-deploy plan` at {', '.join(p['budget'] for p in plans)} "
             "(issue 27)", "",
             f"Machine: {m.get('cpu_model', '?')}, {m.get('usable_cores', '?')} cores, ISA "
             f"{'/'.join(m.get('isa') or []) or '?'}. Each plan: its settings below, the ONNX engines it was given, "
             "llama.cpp for GGUF, peers `auto` (dense q8_0 and q4_k_m re-exported from the model, and the GGUF it "
             "was fetched from). One plan at a time on a quiet machine; speed ratios compare rows of one run only.",
             "", "## The answers (each plan's own stage-3 measurement)", "",
             "| budget | chosen deployment | engine | validation ppl (dense, limit) | decode tok/s | × dense fp32 "
             "[95% CI] | × dense q4_k_m | × dense q8_0 | × fetched GGUF | A/A floor | plan wall | peak RSS |",
             "|---|---|---|---|---:|---|---|---|---|---:|---:|---:|"]
    for p in plans:
        peer = {PEER_NAMES[k]: v for k, v in p["vs_peers"].items()}
        lines.append(
            f"| +{p['budget']} | `{p['choice']}` | {p['engine']} | {p['validation_ppl']:.2f} "
            f"({_pct_over(p['validation_ppl'], p['dense_validation_ppl'])}; {p['dense_validation_ppl']:.2f}, "
            f"{p['limit']:.2f}) | {p['tokens_per_s']:.1f} | {fmt_ratio(p['vs_dense_fp32'])} | "
            f"{_peer_cell(p, peer, 'dense q4_k_m')} | {_peer_cell(p, peer, 'dense q8_0')} | "
            f"{_peer_cell(p, peer, 'the fetched GGUF')} | ±{100 * p['floor']:.0f}% | {_wall_cell(p)} | "
            + (f"{p['peak_rss_bytes'] / 2 ** 30:.2f} GiB |" if p.get("peak_rss_bytes") else "— |"))
    lines += ["", "Why each: " + " ".join(f"+{p['budget']}: {p['why']}." for p in plans), "",
              "| budget | screened one-shot | not screened (a lower level over, or time) | deployments scored | "
              "measured in stage 3 | skipped for time |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| +{p['budget']} | {p['screened']} | {p['not_screened']} | {p['deployments_scored']} | "
              f"{p['measured']} | {p['skipped_for_time']} |" for p in plans]
    lines += ["", "## Test perplexity, computed after each choice (WikiText-2 / C4 test, same windows)", "",
              "| budget | chosen | dense fp32 | dense q8_0 | dense q4_k_m | fetched GGUF |", "|---|---|---|---|---|---|"]
    for p in plans:
        t = p["test"]
        lines.append(f"| +{p['budget']} | {_test_cell(t, 'chosen')} | {_test_cell(t, 'dense fp32')} | "
                     f"{_test_cell(t, 'peer q8_0')} | {_test_cell(t, 'peer q4_k_m')} | {_test_cell(t, 'peer source')} |")
    lines += ["", "## Replication: the choices measured again, in one separate interleaved bench", ""]
    if bench is None:
        lines.append("**Not run** (no bench file given).")
    else:
        lines += ["| budget | chosen | engine | decode tok/s | × dense fp32 | × dense q4_k_m | × dense q8_0 | "
                  "× fetched GGUF | the plan's verdicts replicated? |", "|---|---|---|---:|---|---|---|---|---|"]
        for p, r in zip(plans, reps):
            if "missing" in r:
                lines.append(f"| +{p['budget']} | `{p['choice']}` | — | — | | | | | {r['missing']} |")
                continue
            lines.append(f"| +{p['budget']} | `{p['choice']}` | {r['engine']} | {r['tokens_per_s']:.1f} | "
                         + _comparison_cells(p, r))
        floors = bench_floors(bench)
        lines += ["", "A/A floors in this bench: " + ", ".join(f"{e} ±{100 * v:.0f}%" for e, v in floors.items())
                  + ". A verdict is *faster* or *slower* only when the whole 95% interval clears 1.0x by the floor; "
                  "else *tie*."]
    lines += ["", "## Replication across plans: each choice as the other plans' stage 3 measured it", ""]
    if not cross:
        lines.append("No choice was measured by another plan.")
    else:
        lines += ["Each plan measures the dense fp32 deployment, the llama.cpp peers and an A/A control in its own "
                  "interleaved run; where a choice was measured in another plan's run too, that is a replication of "
                  "the comparisons it was chosen on.", "",
                  "| choice of | deployment | measured in plan | decode tok/s | × dense fp32 | × dense q4_k_m | "
                  "× dense q8_0 | × fetched GGUF | the plan's verdicts replicated? |",
                  "|---|---|---|---:|---|---|---|---|---|"]
        for r in cross:
            p = next(x for x in plans if x["budget"] == r["budget"])
            lines.append(f"| +{r['budget']} | `{r['choice']}` on {r['engine']} | +{r['in']} | {r['tokens_per_s']:.1f} | "
                         + _comparison_cells(p, r))
    lines += ["", "## Per plan", ""]
    lines += [f"- +{p['budget']}: [plan.md]({p['folder']}/plan.md), [figure]({p['folder']}/pareto.png), "
              f"[model card]({p['folder']}/deployment-README.md), [plan.json]({p['folder']}/plan.json). "
              f"Settings: {p['settings']}." for p in plans]
    v = plans[0]["versions"] or {}
    lines += ["", "## Provenance", "", ", ".join(f"{k} {v[k]}" for k in sorted(v)) if isinstance(v, dict) else str(v),
              "", f"Reproduce: `{reproduce}`", ""]
    return "\n".join(lines)


def copy_plan(folder: Path, out: Path) -> None:
    dest = out / folder.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("plan.md", "plan.json", "pareto.png"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
    card = folder / "deployment" / "README.md"
    if card.is_file():
        shutil.copy2(card, dest / "deployment-README.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", type=Path, nargs="+", required=True)
    ap.add_argument("--bench", type=Path, default=None, help="the replication bench's results (bench --json)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reproduce", default="")
    ap.add_argument("--notes", type=Path, default=None, help="a markdown file: what happened in these runs")
    args = ap.parse_args()
    plans = [plan_row(f) for f in args.plans]
    bench = json.loads(args.bench.read_text()) if args.bench and args.bench.is_file() else None
    reps = replication_rows(bench, plans) if bench else []
    cross = cross_plan_rows(args.plans, plans)
    args.out.mkdir(parents=True, exist_ok=True)
    for f in args.plans:
        copy_plan(f, args.out)
    notes = args.notes.read_text() if args.notes else ""
    (args.out / "README.md").write_text(markdown(plans, reps, bench, args.reproduce, cross) + notes,
                                        encoding="utf-8")
    (args.out / "report.json").write_text(json.dumps({"plans": plans, "replication": reps, "across_plans": cross,
                                                      "provenance": provenance()}, indent=1, default=str))
    if bench:
        shutil.copy2(args.bench, args.out / "bench.json")
    print(f"wrote {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
