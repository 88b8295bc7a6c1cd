"""A measured estimate of speculative decoding (issue 25): a pruned copy of a model as the draft for greedy
speculative decoding of the dense one, lossless by construction (every token emitted is the target's own argmax).

    python scripts/speculative_estimate.py TARGET_GGUF_DIR DRAFT_DIR --out spec.json
    python scripts/speculative_estimate.py TARGET_GGUF_DIR DRAFT_ONNX_DIR --draft-engine onnxruntime --out spec.json

TARGET is a GGUF deployment folder (`dlp-deploy export --format gguf`), run on llama.cpp. DRAFT is a GGUF folder
(llama.cpp) or an ONNX one on --draft-engine (onnxruntime, openvino, deepsparse: its window logits are read from
deepsparse-external, the same compiled graph with the cache in Python). Both must share the tokenizer.

What is measured, on this machine:
1. Acceptance, teacher-forced. From each prompt (windows of WikiText-2 test text) the target generates greedily;
   then the whole sequence (prompt + generated tokens) goes once through each model in one batch. Position i is
   accepted when the draft's argmax there equals the target's: given the target's own prefix, exactly the test a
   greedy speculative loop makes (its prefixes are always the target's tokens). The target's token at a position
   is its argmax in that batched pass, because verification is a batched pass too; how often that agrees with
   its step-by-step greedy token is reported (target_self_agreement; < 1 only through kernel numerics).
2. Step costs: the median ms of a target decode step and of a draft decode step (one token, last logits only, as
   the benchmark runs them), and of the target evaluating k+1 tokens in one batch after a prefix, with the
   logits of every position (what verification reads), k = 0..max_k, the KV cache rolled back between tries.
3. The speedup per gamma (draft tokens per iteration), Leviathan et al. 2023: a loop of iterations, each
   gamma draft steps and one verification of gamma+1 tokens, emits the accepted run plus one target token.
   Tokens per iteration are simulated on the measured accept/reject sequences (whole iterations only) and also
   given by the i.i.d. formula E = (1 - a^(gamma+1)) / (1 - a); speedup = E * c_target / (gamma * c_draft +
   c_verify(gamma)).

Why this is an estimate, not a measurement of speculative decoding: no speculative loop is run. llama.cpp's own
speculative example (and its draft-model server options) are not in the llama-cpp-python wheel, and a loop
written here in Python would time Python. The estimate leaves out: the draft re-reading its last proposal and the
bonus token after a fully accepted iteration (about one extra draft step then), the draft's KV-cache rollback,
sampling (greedy only), and any overlap of draft and target work. Two models also compete for one memory bus
and cache, which timing them one after the other does not show. Timings are as noisy as the machine:
the load average at the start and end is recorded.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np

SCHEMA = "dlp-deploy/speculative-estimate/1"
WINDOW_SCORING = {"deepsparse": "deepsparse-external"}  # engines whose internal cache cannot score a window


# ---------------------------------------------------------------- pure parts (tested directly)

def run_lengths(accepted: list[list[bool]]) -> dict:
    """Runs of consecutive accepted positions, each ended by a rejection; the run still open at the end of a
    sequence is counted apart (censored: it was cut by the end of the text, not by a rejection)."""
    closed, censored = [], []
    for seq in accepted:
        run = 0
        for ok in seq:
            if ok:
                run += 1
            else:
                closed.append(run)
                run = 0
        censored.append(run)
    histogram: dict[int, int] = {}
    for r in closed:
        histogram[r] = histogram.get(r, 0) + 1
    return {"definition": "accepted positions before each rejection (teacher-forced); the open run at each "
                          "sequence end is listed apart as censored",
            "histogram": {str(k): histogram[k] for k in sorted(histogram)},
            "mean": statistics.fmean(closed) if closed else None,
            "rejections": len(closed), "censored_tail_runs": censored}


def simulate(accepted: list[list[bool]], gamma: int) -> dict:
    """Greedy speculative decoding replayed on teacher-forced accept/reject sequences: an iteration at position p
    accepts the draft's tokens up to its first rejection (at most gamma) and emits them plus one target token.
    Only whole iterations count (p + gamma inside the sequence), so a draft that always agrees gives gamma + 1."""
    tokens = iterations = draft_steps = 0
    for seq in accepted:
        p = 0
        while p + gamma < len(seq):
            a = 0
            while a < gamma and seq[p + a]:
                a += 1
            tokens += a + 1
            iterations += 1
            draft_steps += gamma
            p += a + 1
    return {"tokens": tokens, "iterations": iterations,
            "tokens_per_iteration": tokens / iterations if iterations else None}


def expected_tokens(alpha: float, gamma: int) -> float:
    """Leviathan et al. 2023, eq. 1: tokens per iteration when each draft token is accepted with probability
    alpha independently."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def speedups(accepted: list[list[bool]], c_target: float, c_draft: float, c_verify: dict[int, float]) -> dict:
    """Per gamma with a measured verification cost: tokens per iteration (simulated and by the formula), ms per
    iteration, and the speedup over plain target decoding."""
    alpha = float(np.mean([x for seq in accepted for x in seq]))
    out = {}
    for gamma in sorted(k for k in c_verify if k >= 1):
        sim = simulate(accepted, gamma)
        cost = gamma * c_draft + c_verify[gamma]
        formula = expected_tokens(alpha, gamma)
        e = sim["tokens_per_iteration"]
        out[gamma] = {"tokens_per_iteration": e, "tokens_per_iteration_formula": formula,
                      "iterations_simulated": sim["iterations"], "ms_per_iteration": cost,
                      "speedup": None if e is None else e * c_target / cost,
                      "speedup_formula": formula * c_target / cost}
    return out


def best_gamma(by_gamma: dict) -> int | None:
    scored = [(v["speedup"], -g, g) for g, v in by_gamma.items() if v["speedup"] is not None]
    return max(scored)[2] if scored else None


# ---------------------------------------------------------------- models and measurements

def load(folder: Path, engine: str):
    from dlp_deploy.runtime.deployment import load_deployment
    from dlp_deploy.runtime.engines import ENGINES

    dep = load_deployment(folder)
    dep.check_engine(engine)
    ENGINES[engine]  # a one-line refusal when the engine is not installed
    return dep


def compile_session(dep, engine: str, cores: int | None, all_logits: bool):
    from dlp_deploy.runtime.engines import ENGINES

    options = {"all_logits": all_logits} if engine == "llamacpp" else {}
    return ENGINES[engine].compile(dep.model_path, dep.seq_len, num_cores=cores, **options)


def prompts_from_wikitext(tok, count: int, length: int, root) -> tuple[list[list[int]], dict]:
    """`count` windows of `length` tokens, evenly spaced over the tokenized WikiText-2 test text."""
    from dlp_deploy import data
    from dlp_deploy.eval.perplexity import corpus_ids

    text = data.eval_text("wikitext2", root)
    ids = corpus_ids(tok, text.text)
    span = len(ids) - length
    starts = [int((i + 0.5) * span / count) for i in range(count)]
    return ([ids[s:s + length].tolist() for s in starts],
            {"corpus": "wikitext2", "source": text.source, "prompt_tokens": length, "prompts": count,
             "token_offsets": starts, "corpus_tokens": int(len(ids))})


def window_argmax(session, ids: list[int]) -> np.ndarray:
    """Argmax at every position of one batched pass over `ids` from an empty cache."""
    import torch

    from dlp_deploy.eval.perplexity import session_logits

    logits = session_logits(session)(torch.tensor(ids, dtype=torch.long))
    return logits.argmax(-1).numpy()


def target_sequences(session, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from dlp_deploy.runtime.decode import generate

    return [p + generate(session, p, new_tokens).tokens for p in prompts]


def verify_costs(session, sequences: list[list[int]], prefix_len: int, max_k: int, repeats: int) -> dict:
    """ms of the target evaluating k+1 tokens (its own next ones) in one batch after `prefix_len` tokens, with
    every position's logits, for k = 0..max_k: the median over `repeats` prefixes; the KV cache is rolled back to
    the prefix between tries (llama-cpp-python drops every cached slot past n_tokens on the next eval)."""
    llm = session._llm
    times: dict[int, list[float]] = {k: [] for k in range(max_k + 1)}
    rng = np.random.default_rng(0)
    for r in range(repeats):
        seq = sequences[r % len(sequences)]
        session.init_past(prefix_len)
        llm.eval(seq[:prefix_len])
        for k in rng.permutation(max_k + 1):  # an order of k that differs per repeat: no k always runs first
            llm.n_tokens = prefix_len
            t0 = time.perf_counter()
            llm.eval(seq[prefix_len:prefix_len + int(k) + 1])
            times[int(k)].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def decode_costs(sessions: dict, prompts: list[list[int]], steps: int, repeats: int) -> dict[str, dict]:
    """Median ms of a one-token decode step per session, generating `steps` tokens from each of `repeats`
    prompts; the sessions alternate prompt by prompt, so a change in the machine's load hits them alike."""
    from dlp_deploy.runtime.decode import generate

    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(repeats):
        for name, session in sessions.items():
            times[name] += [1e3 * s for s in generate(session, prompts[r % len(prompts)], steps).decode_s]
    return {name: {"median_ms": statistics.median(v), "steps": len(v),
                   "p10_ms": float(np.percentile(v, 10)), "p90_ms": float(np.percentile(v, 90))}
            for name, v in times.items()}


def check_same_tokenizer(target_tok, draft_tok, target: Path, draft: Path) -> None:
    from dlp_deploy.errors import UserError

    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise UserError(f"{draft} and {target} have different tokenizers; a draft must propose the target's tokens")


def estimate(target: Path, draft: Path, draft_engine: str = "llamacpp", prompts: int = 8, prompt_tokens: int = 32,
             new_tokens: int = 64, max_k: int = 8, repeats: int = 5, cores: int | None = None,
             data_root: str | None = None, log=print) -> dict:
    from dlp_deploy import data
    from dlp_deploy.errors import UserError
    from dlp_deploy.provenance import provenance
    from dlp_deploy.runtime.llamacpp_engine import llamacpp_build_info

    started = time.perf_counter()
    load_before = os.getloadavg()
    tdep, ddep = load(target, "llamacpp"), load(draft, draft_engine)
    score_engine = WINDOW_SCORING.get(draft_engine, draft_engine)
    prefix_len = prompt_tokens + new_tokens // 2
    for dep in (tdep, ddep):
        if prompt_tokens + new_tokens >= dep.seq_len or prefix_len + max_k + 1 >= dep.seq_len:
            raise UserError(f"{dep.folder}: {prompt_tokens} prompt + {new_tokens} new tokens do not fit its "
                            f"{dep.seq_len}-token window; ask for fewer")
    if max_k + 1 > new_tokens - new_tokens // 2:
        raise UserError(f"--max-k {max_k} needs at least {2 * (max_k + 1)} --new-tokens")
    tok = tdep.tokenizer()
    check_same_tokenizer(tok, ddep.tokenizer(), target, draft)
    prompt_ids, prompt_info = prompts_from_wikitext(tok, prompts, prompt_tokens, data.data_dir(data_root))

    log("target: greedy generation, batched argmax, verification costs")
    t_all = compile_session(tdep, "llamacpp", cores, all_logits=True)
    sequences = target_sequences(t_all, prompt_ids, new_tokens)
    target_argmax = [window_argmax(t_all, seq)[prompt_tokens - 1:-1] for seq in sequences]
    c_verify = verify_costs(t_all, sequences, prefix_len, max_k, repeats)
    del t_all

    log(f"draft ({draft_engine}): batched argmax")
    d_all = compile_session(ddep, score_engine, cores, all_logits=True)
    draft_argmax = [window_argmax(d_all, seq)[prompt_tokens - 1:-1] for seq in sequences]
    del d_all

    generated = [np.asarray(seq[prompt_tokens:]) for seq in sequences]
    self_agreement = float(np.mean(np.concatenate([t == g for t, g in zip(target_argmax, generated)])))
    accepted = [[bool(x) for x in (d == t)] for d, t in zip(draft_argmax, target_argmax)]
    alpha = float(np.mean([x for seq in accepted for x in seq]))

    log("decode step costs (target and draft alternating)")
    sessions = {"target": compile_session(tdep, "llamacpp", cores, all_logits=False),
                "draft": compile_session(ddep, draft_engine, cores, all_logits=False)}
    steps = decode_costs(sessions, prompt_ids, new_tokens // 2, repeats)
    del sessions
    c_target, c_draft = steps["target"]["median_ms"], steps["draft"]["median_ms"]

    by_gamma = speedups(accepted, c_target, c_draft, c_verify)
    best = best_gamma(by_gamma)
    return {
        "schema": SCHEMA,
        "target": {"folder": str(target), "export": _export_summary(tdep)},
        "draft": {"folder": str(draft), "export": _export_summary(ddep)},
        "engines": {"target": "llamacpp", "draft": draft_engine, "draft_window_scoring": score_engine,
                    "cores": cores or len(os.sched_getaffinity(0)), "llamacpp": llamacpp_build_info()},
        "acceptance": {"alpha": alpha, "positions": sum(len(a) for a in accepted),
                       "per_prompt": [float(np.mean(a)) for a in accepted],
                       "target_self_agreement": self_agreement,
                       "method": "teacher-forced: the draft's argmax given the target's prefix against the target's "
                                 "argmax, both from one batched pass over prompt + the target's greedy tokens"},
        "accepted_sequences": ["".join("1" if x else "0" for x in a) for a in accepted],
        "run_lengths": run_lengths(accepted),
        "c_target_ms": c_target, "c_draft_ms": c_draft,
        "c_verify_ms": {str(k): v for k, v in c_verify.items() if k >= 1},
        "c_verify_one_token_all_logits_ms": c_verify[0],
        "step_costs": {**steps, "verify": {"prefix_tokens": prefix_len, "repeats": repeats,
                                           "logits": "every position (verification reads them all)"},
                       "decode": {"steps_per_prompt": new_tokens // 2 - 1, "repeats": repeats,
                                  "logits": "last position only"}},
        "speedup_by_gamma": {str(g): v for g, v in by_gamma.items()},
        "best_gamma": best,
        "best_speedup": by_gamma[best]["speedup"] if best is not None else None,
        "prompts": {**prompt_info, "new_tokens": new_tokens},
        "estimate_only": "no speculative loop is run: acceptance and step costs are measured apart and combined "
                         "(Leviathan et al. 2023); see the script's docstring for what this leaves out",
        "load_average": {"start": list(load_before), "end": list(os.getloadavg())},
        "seconds": time.perf_counter() - started,
        "provenance": provenance(),
    }


def _export_summary(dep) -> dict:
    info = dep.info
    return {k: info.get(k) for k in ("source", "format", "quantization", "seq_len") if k in info}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    acc = result["acceptance"]
    table = Table(title=f"speculative estimate: alpha {acc['alpha']:.3f} over {acc['positions']} positions; "
                        f"target {result['c_target_ms']:.2f} ms/step, draft {result['c_draft_ms']:.2f} ms/step")
    for col in ("gamma", "verify ms", "ms/iter", "E sim", "E formula", "speedup", "speedup formula"):
        table.add_column(col, justify="right")
    for g, v in result["speedup_by_gamma"].items():
        mark = " *" if int(g) == result["best_gamma"] else ""
        sim = "-" if v["tokens_per_iteration"] is None else f"{v['tokens_per_iteration']:.2f}"
        speed = "-" if v["speedup"] is None else f"{v['speedup']:.2f}x{mark}"
        table.add_row(g, f"{result['c_verify_ms'][g]:.2f}", f"{v['ms_per_iteration']:.2f}", sim,
                      f"{v['tokens_per_iteration_formula']:.2f}", speed, f"{v['speedup_formula']:.2f}x")
    Console(width=110).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", type=Path, help="GGUF deployment folder of the model to decode (llama.cpp)")
    ap.add_argument("draft", type=Path, help="deployment folder of the draft (GGUF, or ONNX with --draft-engine)")
    ap.add_argument("--draft-engine", default="llamacpp")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-k", type=int, default=8, help="verification of k+1 tokens timed for k = 1..max-k; "
                                                         "gamma runs over the same range")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from dlp_deploy.errors import UserError
    from dlp_deploy.io import write_json_atomic

    try:
        result = estimate(args.target, args.draft, args.draft_engine, args.prompts, args.prompt_tokens,
                          args.new_tokens, args.max_k, args.repeats, args.cores, args.data_dir,
                          log=lambda m: print(m, file=sys.stderr))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, result, force=True)
    print_table(result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
