"""Does the one-shot proxy of `--alpha auto` rank DLP's alpha grid as the sequential prune does? (issue 25)

    python scripts/alpha_proxy.py smollm2-135m --sparsity 0.5,0.7 --nsamples 16 --seqlen 512 \
        --out reports/smollm2-135m-alpha-proxy --gate /tmp/heavy.ok --block /tmp/bench.lock

`dlp-deploy prune --alpha auto` scores every alpha of a grid (prune/search.py AUTO_GRIDS, 0 = uniform) by pruning
one-shot from dense-model statistics collected once and measuring perplexity on held-out C4 validation windows,
then prunes sequentially (each block on the already-pruned model's activations) at the winner. For each sparsity
this script records, per alpha of that grid:
  (a) the proxy's validation perplexity: `prune.to_folder.tune_before_pruning` itself, the code `--alpha auto`
      runs, on the model loaded as `prune` loads it (same calibration, same validation windows);
  (b) the sequential prune at that alpha through the normal path (`prune.to_folder.prune_to_folder`, what
      `dlp-deploy prune --alpha A` runs), then, in PyTorch, its perplexity on the same validation windows and on
      WikiText-2 and C4 test text (the first --eval-windows windows of --eval-seqlen, as `dlp-deploy eval`);
then Spearman's rank correlation of (a) with (b) validation and with each test set, and of (b) validation with
each test set, and the alpha each would pick (lowest perplexity, ties to the smaller alpha, as `tune` picks).

Resumable: the proxy scores, the dense reference and each alpha's sequential result are cached under
OUT/cache/ as they finish, and a rerun with the same settings reads them. --gate FILE: before each expensive step
wait (polling every minute) until FILE exists; --block FILE: ... while FILE exists. Writes OUT/alpha_proxy.json
and OUT/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np

SCHEMA = "dlp-deploy/alpha-proxy/1"
CORPORA = ("wikitext2", "c4")


# ---------------------------------------------------------------- rank statistics

def ranks(values: list[float]) -> np.ndarray:
    """1-based ranks, ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> dict:
    """Spearman's rho (Pearson's r of the average ranks) and, for up to 9 points, the exact two-sided permutation
    p-value (share of all orderings of b's ranks with |rho| at least as large). Infinite values rank last; rho is
    None when either side is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")
    ra, rb = ranks(a), ranks(b)
    rho = _pearson(ra, rb)
    p = None
    if rho is not None and len(a) <= 9:
        perms = np.array(list(itertools.permutations(rb)))
        ca = ra - ra.mean()
        cp = perms - perms.mean(axis=1, keepdims=True)
        rhos = (cp @ ca) / (np.sqrt((cp ** 2).sum(axis=1)) * np.sqrt((ca ** 2).sum()))
        p = float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))
    return {"rho": rho, "p_exact": p, "n": len(a)}


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    cx, cy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((cx ** 2).sum()) * float((cy ** 2).sum()))
    return None if den == 0 else float((cx * cy).sum() / den)


def pick(grid: list[float], values: list[float]) -> float:
    """The grid value with the lowest perplexity, ties to the smaller value (search.tune's rule)."""
    return grid[min(range(len(grid)), key=lambda i: (values[i], grid[i]))]


# ---------------------------------------------------------------- waiting for the machine

def wait_for_machine(gate: Path | None, block: Path | None, what: str, poll_s: float = 60.0) -> None:
    said = False
    while (gate is not None and not gate.exists()) or (block is not None and block.exists()):
        if not said:
            why = f"{block} exists" if block is not None and block.exists() else f"{gate} is absent"
            print(f"waiting before {what}: {why} (polling every {poll_s:g} s)", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_s)


# ---------------------------------------------------------------- the measurements

@contextlib.contextmanager
def alpha_grid(grid: tuple[float, ...] | None):
    """--grid: the same scorer on another grid (prune/search.py AUTO_GRIDS['alpha'] for this run only)."""
    from dlp_deploy.prune import search

    if grid is None:
        yield search.AUTO_GRIDS["alpha"]
        return
    before = search.AUTO_GRIDS["alpha"]
    search.AUTO_GRIDS["alpha"] = tuple(grid)
    try:
        yield tuple(grid)
    finally:
        search.AUTO_GRIDS["alpha"] = before


class Study:
    def __init__(self, args):
        from dlp_deploy import data

        self.args = args
        self.root = data.data_dir(args.data_dir)
        self.cache = args.out / "cache"
        self._model = None
        self._data = None
        self._corpora = None

    # ------------------------------------------------ settings and cache

    def settings(self) -> dict:
        a = self.args
        return {"model": a.model, "sparsities": a.sparsity, "method": a.method, "calib": a.calib,
                "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed, "val_windows": a.val_windows,
                "eval_windows": a.eval_windows, "eval_seqlen": a.eval_seqlen, "grid": a.grid, "device": a.device}

    def open_cache(self) -> None:
        from dlp_deploy.errors import UserError
        from dlp_deploy.io import write_json_atomic

        path = self.cache / "settings.json"
        now = json.loads(json.dumps(self.settings()))
        if path.is_file() and not self.args.force:
            before = json.loads(path.read_text())
            # more sparsities may be added to a run; every other setting must match
            differ = sorted(k for k in now if k != "sparsities" and before.get(k) != now[k])
            if differ:
                raise UserError(f"{self.cache} holds results with other settings ({', '.join(differ)}); use the same "
                                "settings, another --out, or --force to start over")
        elif path.is_file():
            shutil.rmtree(self.cache)
        write_json_atomic(path, now, force=True)

    def cached(self, name: str, make, compute: bool = True) -> dict | None:
        """The cached record, else `make()`'s (kept), or None under --cached-only or where `compute` is False."""
        from dlp_deploy.io import write_json_atomic

        path = self.cache / name
        if path.is_file():
            return json.loads(path.read_text())
        if self.args.cached_only or not compute:
            return None
        record = make()
        write_json_atomic(path, record, force=True)
        return record

    def wait(self, what: str) -> None:
        wait_for_machine(self.args.gate, self.args.block, what)

    # ------------------------------------------------ the dense model as `prune` loads it

    def dtype(self):
        from dlp_deploy import models
        from dlp_deploy.prune.to_folder import checkpoint_dtype, compute_dtype, resolve_device

        ref, config = models.load_config(self.args.model)
        folder = Path(ref) if Path(ref).is_dir() else None
        stored, _ = checkpoint_dtype(folder, config)
        return compute_dtype("auto", stored, resolve_device(self.args.device))[0]

    def data(self):
        """(tokenizer, calibration, validation) as `prune --alpha auto` builds them; the same for every model here
        (pruning keeps the tokenizer)."""
        if self._data is None:
            from transformers import AutoTokenizer

            from dlp_deploy import data, models

            a = self.args
            tok = AutoTokenizer.from_pretrained(models.load_config(a.model)[0])
            calibration = data.calibration(a.calib, tok, a.nsamples, a.seqlen, a.seed, self.root)
            validation = data.validation_windows(tok, calibration, a.val_windows, a.seqlen, self.root, a.calib)
            self._data = (tok, calibration, validation)
        return self._data

    def dense(self):
        """The dense model as `prune` loads it (its compute dtype), kept until a sequential prune needs the memory."""
        if self._model is None:
            from dlp_deploy import models
            from dlp_deploy.prune.to_folder import resolve_device

            self._model = models.load(self.args.model, resolve_device(self.args.device), self.dtype())[0]
        return self._model

    def release_dense(self) -> None:
        self._model = None

    def proxy(self, sparsity: float) -> dict:
        """(a): the grid scored by tune_before_pruning, the function `prune --alpha auto` calls."""
        from dlp_deploy.prune.settings import prune_settings
        from dlp_deploy.prune.to_folder import tune_before_pruning

        self.wait(f"the proxy at sparsity {sparsity:g}")
        a = self.args
        model, (tok, calibration, validation) = self.dense(), self.data()
        settings = prune_settings(sparsity, a.method, "dlp", None, auto="alpha", val_windows=a.val_windows)
        t0 = time.perf_counter()
        with alpha_grid(a.grid and tuple(a.grid)):
            chosen, tuning = tune_before_pruning(model, tok, settings, calibration, a.calib, a.seqlen, self.root,
                                                 None)
        tuning["seconds"] = time.perf_counter() - t0
        if tuning["validation"]["docs"] != [validation.docs[0], validation.docs[-1]]:
            raise RuntimeError("the proxy's validation windows are not the ones this script scores")
        from dlp_deploy.provenance import provenance

        return {**tuning, "sparsity": sparsity, "scorer": "dlp_deploy.prune.to_folder.tune_before_pruning",
                "provenance": provenance()}

    def corpora(self, tok) -> dict:
        from dlp_deploy import data
        from dlp_deploy.eval.perplexity import corpus_ids

        if self._corpora is None:
            self._corpora = {}
            for name in CORPORA:
                text = data.eval_text(name, self.root)
                self._corpora[name] = (corpus_ids(tok, text.text), text)
        return self._corpora

    def score(self, model, tok, validation) -> dict:
        """Validation perplexity on the proxy's windows, and test perplexity as `dlp-deploy eval` computes it."""
        from dlp_deploy.eval.perplexity import perplexity

        a = self.args
        out = {"validation_ppl": perplexity(model, validation.ids.flatten(), validation.ids.shape[1])["ppl"],
               "test_ppl": {}, "test_details": {}}
        for name, (ids, text) in self.corpora(tok).items():
            cap = min(x for x in (a.eval_windows, text.max_windows) if x is not None)
            scored = perplexity(model, ids, a.eval_seqlen, cap)
            out["test_ppl"][name] = scored["ppl"]
            out["test_details"][name] = {**scored, "source": text.source}
        return out

    def dense_reference(self) -> dict:
        self.wait("the dense reference")
        from dlp_deploy.provenance import provenance

        tok, _, validation = self.data()
        return {**self.score(self.dense(), tok, validation), "provenance": provenance()}

    def sequential(self, sparsity: float, alpha: float) -> dict:
        """(b): `dlp-deploy prune --alpha A` through prune_to_folder, then scored in PyTorch."""
        from dlp_deploy import models
        from dlp_deploy.prune.settings import prune_settings
        from dlp_deploy.prune.to_folder import prune_to_folder, resolve_device
        from dlp_deploy.provenance import provenance

        self.wait(f"the sequential prune at sparsity {sparsity:g}, alpha {alpha:g}")
        a = self.args
        self.release_dense()
        folder = a.work / f"s{sparsity:g}-a{alpha:g}"
        settings = prune_settings(sparsity, a.method, "dlp", alpha)
        t0 = time.perf_counter()
        report = prune_to_folder(a.model, folder, settings, a.calib, a.nsamples, a.seqlen, a.seed, a.device,
                                 str(self.root) if self.root else None, force=True)
        seconds_prune = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, _ = models.load(str(folder), resolve_device(a.device), self.dtype())
        tok, _, validation = self.data()
        scores = self.score(model, tok, validation)
        del model
        if not a.keep_models:
            shutil.rmtree(folder, ignore_errors=True)
        return {"sparsity": sparsity, "alpha": alpha, **scores,
                "global_sparsity": report["global_sparsity"],
                "layer_targets": [layer["target"] for layer in report["layers"]],
                "layers_clipped": report["layers_clipped"], "loading": report["loading"],
                "timings": {**report["timings"], "prune_job_s": seconds_prune,
                            "score_s": time.perf_counter() - t0},
                "rss_peak_bytes": report["memory"]["rss_peak_bytes"],
                "folder": str(folder) if a.keep_models else None, "provenance": provenance()}


# ---------------------------------------------------------------- the comparison

def compare(proxy: dict, rows: list[dict]) -> dict:
    grid = proxy["grid"]
    series = {"proxy_validation": proxy["validation_ppl"],
              "sequential_validation": [r["validation_ppl"] for r in rows],
              **{f"sequential_{c}": [r["test_ppl"][c] for r in rows] for c in CORPORA}}
    pairs = [("proxy_validation", "sequential_validation")] + \
            [("proxy_validation", f"sequential_{c}") for c in CORPORA] + \
            [("sequential_validation", f"sequential_{c}") for c in CORPORA]
    correlations = {f"{x} vs {y}": spearman(series[x], series[y]) for x, y in pairs}
    picks = {name: pick(grid, values) for name, values in series.items()}
    index = {g: i for i, g in enumerate(grid)}
    at_proxy_pick = {name: values[index[picks["proxy_validation"]]] for name, values in series.items()
                     if name != "proxy_validation"}
    uniform = {name: values[index[0.0]] for name, values in series.items()} if 0.0 in index else None
    return {"grid": grid, "series": series, "spearman": correlations, "picks": picks,
            "at_proxy_pick": at_proxy_pick, "uniform": uniform}


def run(args) -> dict:
    from dlp_deploy.provenance import provenance

    study = Study(args)
    study.open_cache()
    dense = study.cached("dense.json", study.dense_reference)
    if dense is None:
        from dlp_deploy.errors import UserError

        raise UserError(f"--cached-only: {study.cache} holds no results yet")
    per_sparsity = []
    for sparsity in args.sparsity:
        proxy = study.cached(f"s{sparsity:g}/proxy.json", lambda: study.proxy(sparsity))
        if proxy is None:  # --cached-only, not reached yet
            continue
        rows = [study.cached(f"s{sparsity:g}/alpha-{alpha:g}.json",
                             lambda alpha=alpha: study.sequential(sparsity, alpha),
                             compute=args.alphas is None or alpha in args.alphas)
                for alpha in proxy["grid"]]
        done = [i for i, r in enumerate(rows) if r is not None]
        missing = [proxy["grid"][i] for i, r in enumerate(rows) if r is None]
        scored = {**proxy, "grid": [proxy["grid"][i] for i in done],
                  "validation_ppl": [proxy["validation_ppl"][i] for i in done]}
        rows = [rows[i] for i in done]
        per_sparsity.append({"sparsity": sparsity, "proxy": {k: proxy[k] for k in
                                                             ("grid", "validation_ppl", "choice", "validation",
                                                              "seconds", "scorer")},
                             "sequential": [{k: r[k] for k in ("alpha", "validation_ppl", "test_ppl",
                                                              "global_sparsity", "layers_clipped", "timings")}
                                            for r in rows],
                             "missing_alphas": missing,
                             "comparison": compare(scored, rows) if len(rows) >= 2 else None})
    result = {"schema": SCHEMA, "settings": study.settings(), "dense": {k: dense[k] for k in
                                                                       ("validation_ppl", "test_ppl",
                                                                        "test_details")},
              "sparsities": per_sparsity,
              "method_notes": {
                  "proxy": "prune.to_folder.tune_before_pruning (what `prune --alpha auto` runs): every alpha pruned "
                           "one-shot from dense-model statistics, scored on held-out C4 validation windows",
                  "sequential": "prune.to_folder.prune_to_folder with --alpha A (what `dlp-deploy prune` runs), "
                                "scored in PyTorch on the same validation windows and on the test corpora",
                  "spearman": "rho of average ranks; p_exact: two-sided exact permutation p-value (n <= 9)"},
              "provenance": provenance()}
    args.out.mkdir(parents=True, exist_ok=True)
    from dlp_deploy.io import write_json_atomic

    write_json_atomic(args.out / "alpha_proxy.json", result, force=True)
    (args.out / "README.md").write_text(markdown(result))
    return result


def _fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else (f"{x:.1f}" if x >= 100 else f"{x:.2f}")


def markdown(result: dict) -> str:
    s = result["settings"]
    dense = result["dense"]
    prov = result["provenance"]
    first = dense["test_details"]
    lines = [f"# Does `--alpha auto`'s one-shot proxy rank DLP's alpha grid like the sequential prune? ({s['model']}, "
             f"{s['method']})", "",
             "Issue 25. For every alpha of the `--alpha auto` grid (0 = uniform): **proxy** = the validation "
             "perplexity `prune --alpha auto` scores it with (one-shot prune from dense statistics, "
             "`tune_before_pruning` itself); **sequential** = the model `dlp-deploy prune --alpha A` really makes "
             "(`prune_to_folder`), scored in PyTorch on the same validation windows and on the test sets.", "",
             f"Calibration: {s['nsamples']} {s['calib']} windows of {s['seqlen']} tokens, seed {s['seed']}. "
             f"Validation: {s['val_windows']} held-out C4 windows of {s['seqlen']} (as `--alpha auto`). "
             f"Test: the first {s['eval_windows']} windows of {s['eval_seqlen']} tokens of "
             f"{first['wikitext2']['source']} and of {first['c4']['source']}.", "",
             f"Dense: validation {_fmt(dense['validation_ppl'])}, WikiText-2 {_fmt(dense['test_ppl']['wikitext2'])}, "
             f"C4 {_fmt(dense['test_ppl']['c4'])}.", ""]
    reached = {block["sparsity"] for block in result["sparsities"]}
    for sparsity in s["sparsities"]:
        if sparsity not in reached:
            lines += [f"## Sparsity {sparsity:g}", "", "**Not run yet** (not even the proxy).", ""]
    for block in result["sparsities"]:
        c = block["comparison"]
        lines += [f"## Sparsity {block['sparsity']:g}", ""]
        if block["missing_alphas"]:
            lines += [f"**Partial:** the sequential prune has not run yet at alpha "
                      f"{', '.join(f'{x:g}' for x in block['missing_alphas'])}; correlations and picks below are "
                      f"over the alphas done (the proxy's own choice over the whole grid: {block['proxy']['choice']:g}).",
                      ""]
        if c is None:
            continue
        ser = c["series"]
        lines += ["| alpha | proxy val ppl | sequential val ppl | sequential WikiText-2 | sequential C4 |",
                  "|---:|---:|---:|---:|---:|"]
        for i, g in enumerate(c["grid"]):
            cells = []
            for name in ("proxy_validation", "sequential_validation", "sequential_wikitext2", "sequential_c4"):
                cell = _fmt(ser[name][i])
                cells.append(f"**{cell}**" if c["picks"][name] == g else cell)
            lines.append(f"| {g:g}{' (uniform)' if g == 0 else ''} | " + " | ".join(cells) + " |")
        lines += ["", "Bold: the alpha each column would pick (lowest, ties to the smaller alpha).", "",
                  "| Spearman | rho | exact p (two-sided) |", "|---|---:|---:|"]
        for pair, v in c["spearman"].items():
            rho = "undefined" if v["rho"] is None else f"{v['rho']:+.3f}"
            p = "-" if v["p_exact"] is None else f"{v['p_exact']:.3f}"
            lines.append(f"| {pair.replace('_', ' ')} | {rho} | {p} |")
        picks = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in c["picks"].items())
        lines += ["", f"Picks: {picks}."]
        if c["uniform"]:
            at = c["at_proxy_pick"]
            u = c["uniform"]
            lines.append(f"At the proxy's pick (alpha {c['picks']['proxy_validation']:g}) against uniform: "
                         + ", ".join(f"{k.replace('sequential_', 'sequential ')} {_fmt(at[k])} vs {_fmt(u[k])} "
                                     f"({100 * (at[k] / u[k] - 1):+.1f}%)" for k in at) + ".")
        lines.append("")
    m = prov["machine"]
    lines += ["## Provenance", "",
              f"{prov['created']}; {m['cpu_model']}, {m['usable_cores']} cores; dlp-deploy "
              f"{prov['versions'].get('dlp-deploy')}, torch {prov['versions'].get('torch')}, transformers "
              f"{prov['versions'].get('transformers')}. Per-alpha records (timings, layer targets, provenance): "
              "`cache/`; everything above: `alpha_proxy.json`.", "",
              f"Reproduce: `{command_line(s)}`", ""]
    return "\n".join(lines)


def command_line(s: dict) -> str:
    parts = ["python scripts/alpha_proxy.py", s["model"], "--sparsity", ",".join(f"{x:g}" for x in s["sparsities"]),
             "--method", s["method"], "--nsamples", str(s["nsamples"]), "--seqlen", str(s["seqlen"]),
             "--val-windows", str(s["val_windows"]), "--eval-windows", str(s["eval_windows"]), "--eval-seqlen",
             str(s["eval_seqlen"]), "--out OUT"]
    if s["grid"]:
        parts += ["--grid", ",".join(f"{x:g}" for x in s["grid"])]
    return " ".join(parts)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--sparsity", type=_floats, required=True, help="one or a comma list, e.g. 0.5,0.7")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512, help="calibration and validation window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-windows", type=int, default=16, help="held-out C4 windows (as prune --val-windows)")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--grid", type=_floats, default=None, help="alpha grid for the proxy and the sequential prunes "
                                                               "(default: the one --alpha auto uses)")
    ap.add_argument("--alphas", type=_floats, default=None, help="prune sequentially only at these alphas of the "
                                                                 "grid this run (the rest: cached, or missing); a "
                                                                 "spread first when time is short")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="where the pruned models go (default: a folder under the "
                                                            "temp dir; each removed once scored unless --keep-models)")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--gate", type=Path, default=None, help="wait before each expensive step until this file exists")
    ap.add_argument("--block", type=Path, default=None, help="wait before each expensive step while this file exists")
    ap.add_argument("--force", action="store_true", help="discard cached results")
    ap.add_argument("--cached-only", action="store_true", help="compute nothing: write the report from what the "
                                                               "cache holds so far (marked partial)")
    args = ap.parse_args(argv)
    args.work = args.work or Path(tempfile.gettempdir()) / f"alpha-proxy-{args.out.resolve().name}"

    from dlp_deploy.errors import UserError
    from dlp_deploy.progress import quiet_transformers

    quiet_transformers()
    try:
        result = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for block in result["sparsities"]:
        c = block["comparison"]
        if c is None:
            print(f"sparsity {block['sparsity']:g}: fewer than 2 alphas done")
            continue
        rhos = ", ".join(f"{k}: {'n/a' if v['rho'] is None else format(v['rho'], '+.3f')}"
                         for k, v in c["spearman"].items())
        print(f"sparsity {block['sparsity']:g}: picks {c['picks']}; Spearman {rhos}")
    print(f"wrote {args.out / 'alpha_proxy.json'} and {args.out / 'README.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
