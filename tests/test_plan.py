"""`dlp-deploy plan`: the pure decisions (budget, Pareto, tie rule, time planner) and one tiny plan end to end.

The end-to-end plan runs on a random tiny LLaMA, whose perplexities differ by a few tenths of a percent between
candidates; the budget is set inside those differences (0.2% with a 0.5% screening margin), so that every stage
has something to drop and something to keep. What is asserted is the rule, against the plan's own figures."""
import json
import shutil
from pathlib import Path

import pytest

from dlp_deploy import data
from dlp_deploy.errors import UserError
from dlp_deploy.plan import select
from dlp_deploy.plan.candidates import candidates

# ---------------------------------------------------------------- pure decisions


def test_budget_split_drops_what_is_over_the_limit_and_the_screen_keeps_a_margin():
    rows = [{"id": "a", "ppl": 10.0}, {"id": "b", "ppl": 11.0}, {"id": "c", "ppl": 11.4},
            {"id": "d", "ppl": float("inf")}, {"id": "e", "ppl": None}]
    kept, dropped = select.budget_split(rows, 10.0, 0.10)
    assert [r["id"] for r in kept] == ["a", "b"]  # 11.0 is exactly +10%: within
    assert [r["id"] for r in dropped] == ["c", "d", "e"]
    assert "+14.0%" in dropped[0]["why"] and "11.000" in dropped[0]["why"]
    kept, dropped = select.budget_split(rows, 10.0, 0.10, margin=0.05)  # screen: up to 11.55
    assert [r["id"] for r in kept] == ["a", "b", "c"]
    assert select.limit(10.0, 0.10, 0.05) == pytest.approx(11.55)


def test_choice_is_the_fastest_and_a_tie_within_the_noise_goes_to_the_better_perplexity():
    rows = [{"id": "fast", "speed": 100.0, "ppl": 12.0}, {"id": "close", "speed": 96.0, "ppl": 11.0},
            {"id": "slow", "speed": 80.0, "ppl": 10.0}]
    best, why = select.choose(rows, floor=0.0)
    assert best["id"] == "fast" and why == "the fastest within budget"
    best, why = select.choose(rows, floor=0.05)  # 100 / 96 = 1.042: within 5%, so a tie; 80 is not
    assert best["id"] == "close" and "tied with the fastest, fast" in why
    best, _ = select.choose(rows, floor=0.30)  # now all three tie: the best perplexity wins
    assert best["id"] == "slow"
    assert select.choose(list(reversed(rows)), floor=0.05)[0]["id"] == "close"  # order does not matter
    assert select.choose([], 0.05)[0] is None


def test_pareto_front_of_speed_and_perplexity():
    rows = [{"id": "a", "speed": 10, "ppl": 5}, {"id": "b", "speed": 20, "ppl": 6},
            {"id": "c", "speed": 15, "ppl": 7}, {"id": "d", "speed": 5, "ppl": 4}]
    assert select.front_ids(rows) == ["d", "a", "b"]  # c: b is faster and better


def test_time_planner_estimates_from_what_ran_and_skips_what_would_not_fit():
    now = [0.0]
    planner = select.TimePlanner(100.0, clock=lambda: now[0])
    assert planner.admit("s", "first")  # no cost known yet: one unit runs and teaches it
    planner.record("s", 30.0)
    now[0] = 30.0
    assert planner.admit("s", "second") and planner.admit("s", "two more", units=2)  # 30 and 60 <= 70 left
    assert not planner.admit("s", "three more", units=3)  # 90 > 70
    assert planner.skipped[-1]["unit"] == "three more" and planner.skipped[-1]["estimate_s"] == 90.0
    assert planner.admit("s", "a", units=2, reserve=True)  # 60 of 70 set aside
    assert not planner.admit("s", "b", reserve=True)  # 30 > the 10 left
    assert "would need ~30 s, 10 s left" in planner.skipped[-1]["why"]
    now[0] = 200.0
    planner.reserved = 0.0
    assert not planner.admit("other", "late")  # nothing left, even without an estimate
    assert select.TimePlanner(None).admit("s", "anything", units=10 ** 6)


def test_a_stage_share_of_the_time_budget():
    now = [0.0]
    planner = select.TimePlanner(100.0, clock=lambda: now[0])
    planner.record("s", 20.0)
    now[0] = 50.0  # a fixed cost ran first: the stage gets 40% of the 50 s left, up to 70 s
    until = planner.share_of_left(0.4)
    assert until == pytest.approx(70.0)
    now[0] = 45.0 + 5.0
    assert planner.admit("s", "fits", until=until, share="the stage's share")  # 20 <= 70 - 50
    now[0] = 60.0
    assert not planner.admit("s", "late", until=until, share="the stage's share")  # 20 > 10, though 40 s are left
    assert "10 s left of the stage's share" in planner.skipped[-1]["why"]
    assert planner.admit("s", "whole budget")
    assert select.TimePlanner(None).share_of_left(0.4) is None


def test_held_fixed_costs_and_the_measurement_a_deployment_is_made_for():
    now = [0.0]
    planner = select.TimePlanner(100.0, clock=lambda: now[0])
    planner.record("export", 10.0)
    planner.record("measure", 5.0)
    planner.hold("references", 40.0)
    planner.hold("test text", 20.0)  # 40 s left for what is optional
    assert planner.share_of_left(0.5) == pytest.approx(20.0)
    planner.record("screen", 15.0)
    assert planner.admit("screen", "inside the share", until=20.0, share="a share")  # 15 <= 20: held is outside it
    assert not planner.admit("screen", "two", units=2, until=20.0, share="a share")
    assert planner.admit("export", "fits with its measurement", then=(("measure", 6),))  # 10 + 30 <= 40
    assert not planner.admit("export", "its measurement would not fit", then=(("measure", 7),))  # 10 + 35 > 40
    assert "would need ~45 s (with 7 of measure), 40 s left" in planner.skipped[-1]["why"]
    assert planner.admit("export", "without it", units=4)  # the export alone fits: 40 <= 40
    planner.release("references")  # they run now: their time is the clock's
    assert planner.left() == pytest.approx(80.0) and planner.held == {"test text": 20.0}


def test_measurement_order_puts_the_smaller_files_first():
    rows = [{"id": "fp32", "bytes": 400, "sparsity": 0.5, "ppl": 10}, {"id": "int8", "bytes": 100, "ppl": 11},
            {"id": "fp32-sparser", "bytes": 400, "sparsity": 0.7, "ppl": 12}]
    assert [r["id"] for r in select.measurement_order(rows)] == ["int8", "fp32-sparser", "fp32"]


def test_candidate_grid_and_its_refusals():
    ids = [c.id for c in candidates(["unstructured", "nm"], [0.3])]
    assert ids == ["wanda-uniform-0.30", "wanda-dlp-0.30", "wanda-2of4-uniform-0.50", "wanda-4of8-uniform-0.50",
                   "wanda-mixed4-dlp-0.30"]
    assert {c.screen for c in candidates(["structured", "depth"], [0.3])} == {"pruned"}
    with pytest.raises(UserError, match="choose forms from"):
        candidates(["sparse"], [0.3])
    with pytest.raises(UserError, match="--levels"):
        candidates(["unstructured"], [1.5])


def test_the_fetched_gguf_is_a_peer_by_default_and_never_a_candidate(tmp_path):
    from dlp_deploy.models import GGUF_SOURCE_FILE
    from dlp_deploy.plan.candidates import default_peers, precisions
    from dlp_deploy.testing import save_tiny

    model = save_tiny(tmp_path / "tiny", seed=2)
    assert default_peers(str(model)) == ["q8_0", "q4_k_m"]
    (model / GGUF_SOURCE_FILE).write_text(json.dumps({"gguf": str(tmp_path / "m.gguf")}))
    assert default_peers(str(model)) == ["q8_0", "q4_k_m", "source"]
    with pytest.raises(UserError, match="--peers source"):
        precisions(["int8", "source"])


# ---------------------------------------------------------------- one tiny plan, end to end

TINY = dict(engines=["onnxruntime"], cores=1, include=["unstructured", "nm"], levels=[0.3], precisions=["fp32"],
            peers=[], screen_margin=0.005, seq_len=64, val_windows=2, nsamples=4, calib_seqlen=32, prompt_len=8,
            gen_len=8, runs=2, warmup=0, rounds=1, test_windows=2, validate=False)
BUDGET = 0.002


@pytest.fixture(scope="module")
def planned(tmp_path_factory, data_root):
    """The tiny plan run twice in one folder (the second a resume), the test-text loaders (WikiText-2, C4 test
    documents) instrumented: each call records its corpus and whether choice.json was on disk then."""
    from dlp_deploy.plan.run import run_plan
    from dlp_deploy.plan.stages import PlanSettings
    from dlp_deploy.testing import save_tiny

    root = tmp_path_factory.mktemp("plan")
    model = save_tiny(root / "tiny", seed=2)
    out = root / "plan"
    settings = PlanSettings(str(model), BUDGET, **TINY)
    calls = []

    def recorded(corpus):
        loader = data.EVAL_CORPORA[corpus]

        def load(where):
            calls.append((corpus, (out / "choice.json").is_file()))
            return loader(where)
        return load

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DLP_DEPLOY_DATA", str(data_root))
        for corpus in ("wikitext2", "c4"):
            mp.setitem(data.EVAL_CORPORA, corpus, recorded(corpus))
        first = run_plan(settings, out, log=lambda *_: None)
        stamps = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*/pruning.json")}
        second = run_plan(settings, out, log=lambda *_: None)
    return {"out": out, "settings": settings, "first": first, "second": second, "calls": calls, "stamps": stamps}


def test_each_stage_drops_the_candidates_over_budget(planned):
    plan = planned["first"]
    b = plan["budget"]
    assert b["screen_limit"] == pytest.approx(b["screen_reference"] * (1 + BUDGET) * (1 + TINY["screen_margin"]))
    stopped = {c["id"]: c for c in plan["candidates"]}
    screened_out = [c for c in plan["candidates"] if c.get("stopped") == "stage 1"]
    assert screened_out, "the tiny budget must screen something out"
    for c in plan["candidates"][1:]:
        if "alpha auto chose 0" in (c.get("why") or ""):  # within budget, and its uniform twin goes on
            continue
        over = c["screen"]["ppl"] > b["screen_limit"]
        assert (c.get("stopped") == "stage 1") == over, c["id"]
        # the one level of each series was screened: nothing to skip by a lower level's result
        assert "skipped" not in c["screen"], c["id"]
    deployed = [d for c in plan["candidates"] for d in c.get("deployments") or []]
    assert any(d["stopped"] == "stage 2" for d in deployed), "and drop a deployment over budget in stage 2"
    for d in deployed:
        if d["validation_ppl"] is not None:
            assert (d["stopped"] == "stage 2") == (d["validation_ppl"] > b["deployment_limit"]), d["name"]
    measured = {r["label"] for r in plan["measured"]}
    assert measured >= {"dense", "dense (A/A)"}
    assert all(d["name"] in measured for d in deployed if d["stopped"] is None)
    assert all(d["name"] not in measured for d in deployed if d["stopped"] == "stage 2")
    # the choice is within budget and is the fastest, or tied with it within the A/A noise floor
    c = plan["choice"]
    assert c["validation_ppl"] <= b["deployment_limit"]
    fastest = max(r["decode_tokens_per_s"] for r in plan["measured"] if not r["aa_control"]
                  and r["label"] in {d["name"] for d in deployed if d["stopped"] is None})
    assert fastest <= c["decode_tokens_per_s"] * (1 + c["noise_floor"]["value"]) + 1e-9
    assert stopped["dense"]["deployments"][0]["validation_ppl"] == pytest.approx(b["deployment_reference"])
    # outputs: a deployment ready for generate/bench with its card, plan.md with every candidate and the figure
    out = planned["out"]
    assert (out / "deployment" / "model.onnx").is_file() and (out / "deployment" / "export.json").is_file()
    card = (out / "deployment" / "README.md").read_text()
    assert "## Reproduce" in card and "dlp-deploy plan" in card and f"{c['decode_tokens_per_s']:.1f}" in card
    assert ("Wanda pruning" in card) == (c["candidate"] != "dense")
    md = (out / "plan.md").read_text()
    assert all(cand["id"] in md for cand in plan["candidates"]) and "pareto.png" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "plan.json").read_text())["provenance"]["versions"]


def test_no_test_text_is_read_before_the_choice(planned):
    assert {corpus for corpus, _ in planned["calls"]} == {"wikitext2", "c4"}, "both test texts are scored"
    assert all(after for _, after in planned["calls"]), "test text was read before choice.json existed"
    test = planned["first"]["test"]
    assert set(test) == {"chosen", "dense fp32"}
    for who in test.values():
        assert set(who) == {"wikitext2", "c4"}
        assert all(t["windows"] == TINY["test_windows"] and 1 < t["ppl"] < 1e4 for t in who.values())
    # the same deployment on the same windows of the other corpus is a different number
    assert test["chosen"]["wikitext2"]["ppl"] != test["chosen"]["c4"]["ppl"]
    # export validation scored no perplexity (it reads WikiText-2 test text)
    for export in (planned["out"] / "deploy").glob("*/export.json"):
        assert not (json.loads(export.read_text()).get("validation") or {}).get("quality")


def test_resume_redoes_nothing(planned):
    first, second = planned["first"], planned["second"]
    assert first["this_run"]["work"]["pruned"] >= 2 and first["this_run"]["work"]["rounds_measured"] >= 3
    assert second["this_run"]["work"] == {k: 0 for k in first["this_run"]["work"]}
    assert {p: p.stat().st_mtime_ns for p in planned["stamps"]} == planned["stamps"]
    assert second["choice"]["deploy"] == first["choice"]["deploy"]
    assert second["measured"] == first["measured"]


def test_a_tiny_time_budget_skips_stage_3_candidates_and_says_so(planned, tmp_path, data_root, monkeypatch):
    from dataclasses import replace

    from dlp_deploy.plan.run import run_plan

    out = tmp_path / "plan"
    shutil.copytree(planned["out"], out, ignore=shutil.ignore_patterns("stage3", "test", "choice.json"))
    monkeypatch.setenv("DLP_DEPLOY_DATA", str(data_root))
    plan = run_plan(replace(planned["settings"], time_budget=0.01), out, log=lambda *_: None)
    assert plan["this_run"]["work"]["pruned"] == plan["this_run"]["work"]["exported"] == 0
    skipped = [x for x in plan["time_budget"]["skipped"] if x["stage"] == "stage3"]
    survivors = [d["name"] for c in planned["first"]["candidates"][1:] for d in c.get("deployments") or []
                 if d["stopped"] is None]
    assert survivors and sorted(x["unit"] for x in skipped) == sorted(survivors)
    assert {r["label"] for r in plan["measured"]} == {"dense", "dense (A/A)"}  # the references always run
    assert plan["choice"]["deploy"] == "dense"
    md = (out / "plan.md").read_text()
    assert "Skipped to stay within it" in md and all(f"stage3: {name}" in md for name in survivors)
    with pytest.raises(UserError, match="other settings"):
        run_plan(replace(planned["settings"], seq_len=128), out, log=lambda *_: None)


def test_a_plan_keeps_to_its_time_budget_references_and_test_text_included(planned, tmp_path, data_root,
                                                                          monkeypatch):
    """Half the time the same plan took without a budget, from an empty folder: the references and the test
    perplexities (which run whatever the budget) are held out of it before anything optional is admitted, so the
    whole run, not only its optional part, stays near the budget; something is skipped to get there."""
    from dataclasses import replace

    from dlp_deploy.plan.run import run_plan

    monkeypatch.setenv("DLP_DEPLOY_DATA", str(data_root))
    budget_s = planned["first"]["this_run"]["wall_s"] / 2
    plan = run_plan(replace(planned["settings"], time_budget=budget_s / 60), tmp_path / "plan", log=lambda *_: None)
    held = plan["time_budget"]["held_s"]
    assert set(held) == {"stage 3 references", "test perplexity"} and all(v > 0 for v in held.values())
    assert plan["time_budget"]["skipped"], "half the time cannot hold every candidate"
    # the screen had its share of what the fixed part left; on a loaded machine that part can take it all, and
    # then every candidate says it was skipped for the screen's share (never screened without a reason)
    unscreened = [c for c in plan["candidates"][1:] if "ppl" not in c["screen"]]
    assert len(unscreened) < len(plan["candidates"]) - 1 or all("the screen's" in c["why"] for c in unscreened)
    assert plan["this_run"]["wall_s"] <= 1.25 * budget_s, (plan["this_run"]["wall_s"], budget_s)
    assert f"of the {budget_s / 60:g} asked" in (tmp_path / "plan" / "plan.md").read_text()


def test_structured_and_depth_forms_are_screened_by_pruning_them(tmp_path, data_root, monkeypatch):
    """No one-shot form exists for them: stage 1 prunes for real and scores the PyTorch model on the same
    validation windows; the pruned folder is the one stage 2 would export."""
    from dlp_deploy.plan.candidates import Candidate
    from dlp_deploy.plan.stages import Plan, PlanSettings, stage1
    from dlp_deploy.testing import save_tiny

    monkeypatch.setenv("DLP_DEPLOY_DATA", str(data_root))
    model = save_tiny(tmp_path / "tiny", seed=2)
    p = Plan(PlanSettings(str(model), 0.1, **TINY), tmp_path / "plan", log=lambda *_: None)
    p.open()
    cands = [Candidate("structured", 0.2, "uniform", structure="heads,channels"),
             Candidate("depth", 0.25, replacement="none")]
    reference, records = stage1(p, cands)
    for c in cands:
        assert records[c.id]["how"].startswith("pruned for real") and 1 < records[c.id]["ppl"] < 1e4
        assert records[c.id]["ppl"] != pytest.approx(reference, rel=1e-6)  # the pruned model, not the dense one
    assert (p.out / "models" / cands[0].id / "structure.json").is_file()
    assert json.loads((p.out / "models" / cands[1].id / "streamline.json").read_text())["removed"]["count"] == 1
    assert p.work["pruned"] == 2


def test_a_dlp_survivor_whose_alpha_is_0_is_its_uniform_twin():
    from dlp_deploy.plan.run import uniform_twins

    cands = candidates(["unstructured"], [0.2, 0.3])
    screened = {"wanda-dlp-0.20": {"ppl": 10.0, "alpha": 0.0}, "wanda-dlp-0.30": {"ppl": 11.0, "alpha": 0.04},
                "wanda-uniform-0.20": {"ppl": 10.0}, "wanda-uniform-0.30": {"ppl": 12.0}}
    twins = uniform_twins(cands, screened, set(screened))
    assert [t["id"] for t in twins] == ["wanda-dlp-0.20"] and "wanda-uniform-0.20" in twins[0]["why"]
    # without its uniform twin among the survivors it goes on
    assert uniform_twins(cands, screened, set(screened) - {"wanda-uniform-0.20"}) == []


def test_a_series_over_the_screen_limit_is_not_screened_at_higher_levels(tmp_path, data_root, monkeypatch):
    """Perplexity only rises with sparsity: once a level of a form and allocation is over the screen limit, its
    higher levels are recorded as not screened, with the level that was over, and cost nothing."""
    from dlp_deploy.plan.candidates import candidates
    from dlp_deploy.plan.stages import Plan, PlanSettings, stage1
    from dlp_deploy.testing import save_tiny

    monkeypatch.setenv("DLP_DEPLOY_DATA", str(data_root))
    model = save_tiny(tmp_path / "tiny", seed=2)
    p = Plan(PlanSettings(str(model), BUDGET, **{**TINY, "levels": [0.5, 0.7]}), tmp_path / "plan",
             log=lambda *_: None)
    p.open()
    cands = candidates(["unstructured"], [0.5, 0.7])
    reference, records = stage1(p, cands)
    bound = screen_limit(reference)
    assert records["wanda-uniform-0.50"]["ppl"] > bound  # a tiny random model loses far more than 0.2% at 50%
    skipped = records["wanda-uniform-0.70"]["skipped"]
    assert "wanda-uniform-0.50" in skipped and "already over the screen limit" in skipped
    assert not (p.out / "stage1" / "wanda-uniform-0.70.json").exists()
    assert p.work["screened"] == sum(c.sparsity == 0.5 for c in cands) + sum(
        "skipped" not in records[c.id] for c in cands if c.sparsity == 0.7)


def screen_limit(reference: float) -> float:
    return select.limit(reference, BUDGET, TINY["screen_margin"])


@pytest.mark.ray
def test_stage_3_on_a_ray_cluster(planned, tmp_path, data_root, monkeypatch):
    """--executor ray: the same pairs measured as Ray tasks (a local cluster the plan starts and stops), into the
    same bench files; stages 1 and 2 are read from the folder."""
    ray = pytest.importorskip("ray")
    from dataclasses import replace

    from dlp_deploy.plan.run import run_plan

    out = tmp_path / "plan"
    shutil.copytree(planned["out"], out, ignore=shutil.ignore_patterns("stage3", "test", "choice.json"))
    monkeypatch.setenv("DLP_DEPLOY_DATA", str(data_root))
    plan = run_plan(replace(planned["settings"], executor="ray"), out, log=lambda *_: None)
    assert {r["label"] for r in plan["measured"]} == {r["label"] for r in planned["first"]["measured"]}
    record = json.loads((out / "stage3" / "executor.json").read_text())
    assert record["executor"] == "ray" and record["status"] == "complete"
    # the probe round was measured here first; every other round was a Ray task
    assert record["stages"]["bench"]["tasks"] + record["stages"]["bench"]["cached"] == len(plan["measured"])
    assert record["stages"]["bench"]["cached"] == 1
    assert plan["this_run"]["work"]["pruned"] == 0 and not ray.is_initialized()


def test_quantized_deployments_are_measured_only_where_export_says_they_run(tmp_path):
    from dlp_deploy.plan.stages import Plan, PlanSettings, engines_for

    p = Plan(PlanSettings("unused", 0.1, engines=["onnxruntime", "deepsparse", "openvino"]), tmp_path)
    assert engines_for(p, "fp32") == ["onnxruntime", "deepsparse", "openvino"]
    assert engines_for(p, "int8") == ["onnxruntime", "openvino"]  # dynamic per-token scales: DeepSparse refused
    assert engines_for(p, "int4") == ["onnxruntime", "openvino"]  # MatMulNBits is ONNX Runtime's contrib op
    assert engines_for(p, "q4_k_m") == ["llamacpp"]


def test_the_plan_report_reads_plan_folders(planned, tmp_path):
    """scripts/plan_report.py (issue 27's report): the choice, its ratios and test perplexities come from
    plan.json as written; a verdict is faster or slower only when the interval clears 1.0x by the floor."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_report", Path(__file__).parent.parent / "scripts" /
                                                  "plan_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.verdict({"decode": 1.3, "decode_ci95": [1.2, 1.4]}, 0.1) == "faster"
    assert report.verdict({"decode": 0.8, "decode_ci95": [0.7, 0.85]}, 0.1) == "slower"
    assert report.verdict({"decode": 1.1, "decode_ci95": [0.95, 1.2]}, 0.1) == "tie"
    assert report.verdict({"decode": 1.15, "decode_ci95": [1.05, 1.2]}, 0.1) == "tie"  # clears 1.0x, not the floor
    row = report.plan_row(planned["out"])
    first = planned["first"]
    assert row["choice"] == first["choice"]["deploy"] and row["validation_ppl"] == first["choice"]["validation_ppl"]
    assert row["screened"] + row["not_screened"] == len(first["candidates"]) - 1
    md = report.markdown([row], [], None, "make it")
    assert f"`{row['choice']}`" in md and f"{first['test']['chosen']['wikitext2']['ppl']:.2f}" in md
    assert "**Not run** (no bench file given)" in md


@pytest.mark.parametrize("family", ["qwen2-mixed-layers", "gemma2"])
def test_a_plan_on_other_families(family, tmp_path, data_root, monkeypatch):
    """The whole plan on a tiny random Qwen2 (attention biases, sliding layers) and Gemma2 (sandwich norms, logit
    soft-capping, tied head) in fp32 and INT8: each candidate ends at a named stage, the choice is within budget
    and among the measured, and the published deployment is the chosen folder with its card."""
    from dlp_deploy.plan.run import run_plan
    from dlp_deploy.plan.stages import PlanSettings
    from dlp_deploy.testing import save_family

    monkeypatch.setenv("DLP_DEPLOY_DATA", str(data_root))
    model = save_family(tmp_path / family, family, seed=1)
    settings = PlanSettings(str(model), 0.05, **{**TINY, "include": ["unstructured"], "precisions": ["fp32", "int8"],
                                                 "screen_margin": 0.05})
    plan = run_plan(settings, tmp_path / "plan", log=lambda *_: None)
    for c in plan["candidates"][1:]:
        ends = [c.get("stopped")] if c.get("stopped") else [d["stopped"] for d in c["deployments"]]
        assert all(e in ("stage 1", "stage 2", "stage 3", None) for e in ends), c
    deployed = {d["name"]: d for c in plan["candidates"] for d in c.get("deployments") or []}
    assert deployed["dense.int8"]["validation_ppl"] > 1  # scored through the INT8 graph
    choice, b = plan["choice"], plan["budget"]
    assert choice["validation_ppl"] <= b["deployment_limit"]
    assert choice["deploy"] in {r["label"] for r in plan["measured"]}
    assert (tmp_path / "plan" / "deployment" / "model.onnx").is_file()
    assert plan["test"]["chosen"]["wikitext2"]["ppl"] > 1
