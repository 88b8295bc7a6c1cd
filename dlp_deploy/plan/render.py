"""What a plan writes for people: plan.md, the Pareto figure (speed against deployed perplexity) and the chosen
deployment's model card. Everything here reads plan.json's contents only."""
from __future__ import annotations

from pathlib import Path

from .select import pareto_front


def validation_ppls(plan: dict) -> dict[str, float]:
    """Deployment name -> its own validation perplexity."""
    out = {}
    for c in plan["candidates"]:
        for d in c.get("deployments") or []:
            if d.get("validation_ppl") is not None:
                out[d["name"]] = d["validation_ppl"]
    for peer, rec in plan["peers"].items():
        if rec.get("validation_ppl") is not None:
            out[f"dense.{peer}"] = rec["validation_ppl"]
    return out


def points(plan: dict) -> list[dict]:
    ppl = validation_ppls(plan)
    return [{"id": f"{r['label']} on {r['engine']}", "speed": r["decode_tokens_per_s"], "ppl": ppl[r["label"]]}
            for r in plan["measured"] if not r["aa_control"] and r["label"] in ppl]


def pareto_figure(plan: dict, path: Path) -> Path | None:
    pts = points(plan)
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = set(pareto_front([(p["speed"], p["ppl"]) for p in pts]))
    chosen = f"{plan['choice']['deploy']} on {plan['choice']['engine']}"
    limit = plan["budget"]["deployment_limit"]
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for i, p in enumerate(pts):
        ax.scatter(p["speed"], p["ppl"], s=40, color="tab:blue" if i in front else "tab:gray", zorder=3)
        if i in front or p["id"] == chosen:
            ax.annotate(p["id"], (p["speed"], p["ppl"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    pick = next(p for p in pts if p["id"] == chosen)
    ax.scatter(pick["speed"], pick["ppl"], s=160, marker="*", color="tab:red", zorder=4, label="chosen")
    ax.axhline(limit, ls="--", lw=0.8, color="tab:red", label=f"budget (+{_pct(plan['budget']['max_ppl_increase'])})")
    ax.set_xlabel("decode tokens/s (median step, this machine)")
    ax.set_ylabel("deployed validation perplexity (held-out C4)")
    ax.set_title("plan: speed against deployed perplexity (Pareto front in blue)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _x(block: dict | None) -> str:
    if not block:
        return "—"
    ci = block.get("decode_ci95")
    return f"{block['decode']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _pct(x: float) -> str:
    """A budget or margin as people write it: 10%, 0.2%."""
    return f"{100 * x:g}%"


def _ppl(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def command(plan: dict) -> str:
    settings = plan["settings"]
    parts = [f"dlp-deploy plan {settings['model']} --max-ppl-increase {settings['max_ppl_increase']:g} --out DIR",
             f"--engines {','.join(settings['engines'])}", f"--include {','.join(settings['include'])}",
             f"--levels {','.join(f'{x:g}' for x in settings['levels'])}",
             f"--precisions {','.join(settings['precisions'])}",
             f"--peers {','.join(settings['peers']) or 'none'}", f"--seq-len {settings['seq_len']}",
             f"--val-windows {settings['val_windows']}", f"--nsamples {settings['nsamples']}",
             f"--runs {settings['runs']}", f"--rounds {settings['rounds']}", f"--warmup {settings['warmup']}",
             f"--gen-len {settings['gen_len']}", f"--prompt-len {settings['prompt_len']}",
             f"--screen-margin {settings['screen_margin']:g}", f"--calib {settings['calib']}",
             f"--seed {settings['seed']}"]
    parts += [f"--calib-seqlen {settings['calib_seqlen']}"] if settings["calib_seqlen"] else []
    parts += [f"--test-windows {settings['test_windows']}"] if settings["test_windows"] else []
    parts += [] if settings["validate"] else ["--no-validate"]
    parts += [f"--allocations {','.join(settings['allocations'])}"] if settings.get("allocations") else []
    parts += [f"--cores {settings['cores']}"] if settings["cores"] else []
    parts += [f"--time-budget {settings['time_budget']:g}"] if settings["time_budget"] else []
    parts += [f"--executor {settings['executor']}"] if settings["executor"] != "local" else []
    return " ".join(parts)


def _test_lines(plan: dict) -> list[str]:
    lines = []
    for who, corpora in plan["test"].items():
        cells = [f"{name} {t['ppl']:.3f} ({t['source']}, {t['windows']} windows x {t['seqlen']} tokens)"
                 for name, t in corpora.items()]
        engine = next(iter(corpora.values()))["engine"]
        lines.append(f"- {who}, on {engine}: " + "; ".join(cells))
    return lines


def model_card(plan: dict) -> str:
    c, settings = plan["choice"], plan["settings"]
    machine = plan["provenance"].get("machine") or {}
    cpu = machine.get("cpu_model", "this machine")
    peers = "; ".join(f"{v['peer']}: {_x(v)}" for v in c["vs_peers"].values()) or "no llama.cpp peer measured"
    return "\n".join([
        f"# {c['deploy']} ({c['precision']}) — {settings['model']} for {c['engine']}",
        "",
        f"The fastest deployment of `{settings['model']}` that `dlp-deploy plan` found on {cpu} within a perplexity "
        f"increase of {_pct(settings['max_ppl_increase'])} over the dense model (held-out C4 validation text).",
        "",
        "## How it was made",
        "",
        _how_made(plan),
        "",
        "## Measured on this machine",
        "",
        f"- decode: {c['decode_tokens_per_s']:.1f} tokens/s on {c['engine']} (median step, prompt "
        f"{settings['prompt_len']}, {settings['gen_len']} new tokens, {settings['rounds']} interleaved worker "
        f"processes x {settings['runs']} runs, cores {settings['cores'] or 'all'})",
        f"- against dense fp32: {_x(c['vs_dense_fp32'])} ({c['vs_dense_fp32']['baseline']}); A/A noise floor "
        f"{c['noise_floor']['value']:.1%} ({c['noise_floor']['source']})",
        f"- against the llama.cpp peer: {peers}",
        f"- validation perplexity (held-out C4, deployed): {c['validation_ppl']:.3f}, dense fp32 "
        f"{plan['budget']['deployment_reference']:.3f}",
        "- test perplexity, computed only after the choice:",
        *["  " + line for line in _test_lines(plan)],
        "",
        "## Use",
        "",
        f"    dlp-deploy generate DEPLOYMENT_DIR --engine {c['engine']} --prompt \"...\"",
        f"    dlp-deploy bench DEPLOYMENT_DIR --engine {c['engine']} --json bench.json",
        "",
        "## Reproduce",
        "",
        f"    {command(plan)}",
        "",
        f"Chosen because: {c['why']}.",
        "",
    ])


def _how_made(plan: dict) -> str:
    precision = plan["choice"]["precision"]
    cand = next((c for c in plan["candidates"] if c["id"] == plan["choice"]["candidate"]), None)
    if cand is None or cand["form"] == "dense":
        what = "the dense model, not pruned"
    elif cand["form"] == "depth":
        what = f"depth-pruned (LLM-Streamline, {cand['sparsity']:.0%} of the layers cut, replacement " \
               f"{cand['replacement']})"
    elif cand["form"] == "structured":
        what = f"structured pruning of {cand['structure']} to {cand['sparsity']:.0%} (taylor importance)"
    else:
        alpha = (cand.get("screen") or {}).get("alpha")
        what = (f"Wanda pruning, {cand['pattern']} pattern, {cand['sparsity']:.0%} of decoder-Linear weights, "
                f"{cand['allocation']} allocation" + (f" (alpha auto; the screen chose {alpha:g})"
                                                       if alpha is not None else ""))
    how = {"fp32": "exported to ONNX in fp32", "int8": "exported to ONNX with INT8 weights (the output "
           "head too) and dynamic per-token INT8 activations", "int4": "exported to ONNX with INT4 weights",
           "w8": "exported to ONNX with INT8 weights in blocks of 32 (int8 activations per block at run time)"}.get(
        precision, f"written as GGUF {precision} for llama.cpp")
    return f"{what}; {how}. Calibration: {plan['settings']['calib']}, {plan['settings']['nsamples']} windows, " \
           f"seed {plan['settings']['seed']}."


def plan_markdown(plan: dict) -> str:
    settings, b, c = plan["settings"], plan["budget"], plan["choice"]
    lines = [f"# Deployment plan: {settings['model']}, perplexity budget +{_pct(settings['max_ppl_increase'])}", "",
             f"**Choice: `{c['deploy']}` on {c['engine']}** — {c['decode_tokens_per_s']:.1f} decode tokens/s, "
             f"{_x(c['vs_dense_fp32'])} against dense fp32, validation perplexity {c['validation_ppl']:.3f} "
             f"(dense fp32 deployment {b['deployment_reference']:.3f}, limit {b['deployment_limit']:.3f}). "
             f"{c['why'][0].upper() + c['why'][1:]}.", ""]
    lines += ["## Against the llama.cpp peer", ""]
    if c["vs_peers"]:
        lines += [f"- {v['peer']}: the choice decodes {_x(v)} as fast" for v in c["vs_peers"].values()]
    for peer, rec in plan["peers"].items():
        if rec.get("skipped"):
            lines.append(f"- dense {peer}: not compared ({rec['skipped']})")
    if not plan["peers"]:
        lines.append("- no peer was asked for (--peers none)")
    lines += ["", "Test perplexity (WikiText-2 and C4 test text, read only after choice.json was written):",
              *_test_lines(plan), ""]
    if plan.get("figure"):
        lines += [f"![speed against deployed perplexity]({plan['figure']})", ""]
    lines += ["## How the plan searched", "",
              f"1. Screen: one-shot Wanda from dense statistics collected once, on {plan['validation']['windows']} "
              f"held-out C4 windows of {plan['validation']['seqlen']} tokens ({plan['validation']['source']}); "
              f"kept when at most {b['screen_limit']:.3f} (dense {b['screen_reference']:.3f} x "
              f"(1 + {settings['max_ppl_increase']:g}) x (1 + margin {settings['screen_margin']:g})). Structured and "
              "depth forms have no one-shot form: they are pruned and scored in PyTorch on the same windows.",
              f"2. Deploy: each survivor pruned (sequential Wanda, DLP alpha auto) and exported in "
              f"{', '.join(settings['precisions'])}; each deployment's own perplexity on the same windows through its "
              f"engine (ONNX Runtime, llama.cpp); kept when at most {b['deployment_limit']:.3f}.",
              f"3. Measure: decode speed of every survivor, interleaved with dense fp32, the llama.cpp peers and the "
              f"A/A control ({settings['rounds']} rounds x {settings['runs']} runs, ABBA); the fastest within budget "
              "wins, a tie within the A/A noise floor goes to the better perplexity.", ""]
    lines += ["## Every candidate", "", "| candidate | screen ppl | deployment | deployed ppl | stopped at | why |",
              "|---|---|---|---|---|---|"]
    for cand in plan["candidates"]:
        screen = _ppl((cand.get("screen") or {}).get("ppl")) if cand.get("screen") else "(reference)"
        if not cand.get("deployments"):
            lines.append(f"| {cand['id']} | {screen} | — | — | {cand.get('stopped')} | {cand.get('why')} |")
            continue
        for d in cand["deployments"]:
            lines.append(f"| {cand['id']} | {screen} | {d['name']} | {_ppl(d['validation_ppl'])} | "
                         f"{d['stopped'] or 'measured'} | {d['why']} |")
    lines += ["", "## Measured (stage 3)", "", "| deployment | engine | decode tok/s | vs dense fp32 [95% CI] |",
              "|---|---|---|---|"]
    for r in plan["measured"]:
        ci = r["speedup_ci95"]
        vs = "—" if r["speedup_vs_dense_fp32"] is None else f"{r['speedup_vs_dense_fp32']:.2f}x" + (
            f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        lines.append(f"| {r['label']} | {r['engine']} | {r['decode_tokens_per_s']:.1f} | {vs} |")
    for u in plan["unmeasured"]:
        lines.append(f"| {u['deploy']} | {u['engine']} | not measured: {u['reason']} | |")
    skipped, held = plan["time_budget"]["skipped"], plan["time_budget"].get("held_s") or {}
    lines += ["", "## Time budget", ""]
    if plan["time_budget"]["minutes"] is None:
        lines.append("No --time-budget: nothing was skipped for time.")
    else:
        lines.append(f"--time-budget {plan['time_budget']['minutes']:g} min; per-unit cost estimates from what ran: "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in plan["time_budget"]["cost_estimates_s"].items()
                                 if v is not None) + ".")
        lines.append("The references (the dense fp32 deployment, its A/A control, the llama.cpp peers) are measured "
                     "whatever the budget, and the choice's test perplexity is computed after it: no comparison "
                     "or answer without them. They are made first, and their estimated time is held out of the "
                     "budget before anything optional is admitted"
                     + (" (" + ", ".join(f"{k} ~{v:.0f} s" for k, v in held.items()) + ")" if held else "")
                     + "; a deployment is exported only if its measurement fits as well.")
        wall = plan["this_run"]["wall_s"]
        lines.append(f"This run took {wall / 60:.1f} min of the {plan['time_budget']['minutes']:g} asked "
                     f"({wall / 60 / plan['time_budget']['minutes']:.0%}).")
        if skipped:
            lines.append(f"Skipped to stay within it ({len(skipped)}):")
            lines += [f"- {x['stage']}: {x['unit']} ({x['why']})" for x in skipped]
        else:
            lines.append("Nothing was skipped.")
    run = plan["this_run"]
    lines += ["", f"Wall time: {run['wall_s']:.0f} s this run, {plan['wall_s_total']:.0f} s over every run of this "
              f"folder. This run's new work: {', '.join(f'{k} {v}' for k, v in run['work'].items())}.", "",
              "Reproduce:", "", f"    {command(plan)}", ""]
    return "\n".join(lines)
