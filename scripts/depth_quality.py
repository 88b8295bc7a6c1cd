"""Quality of a sweep's depth-pruned levels (LLM-Streamline) from its prepared folders, as a markdown table: each
streamline level's replacement, training settings (lr, weight decay, batch, epochs, steps, tokens), the span's
MSE with the replacement and with the span dropped, and PyTorch perplexity, beside the dense model and the
sweep's in-weight levels. For a `--prepare-only` run (no speed figures).

    python scripts/depth_quality.py runs/smollm2-depth-paper --out reports/smollm2-135m-depth/paper-settings.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _eval_row(run: Path, label: str) -> dict:
    return json.loads((run / "eval" / f"{label}.json").read_text())


def _ppl(row: dict, corpus: str = "wikitext2") -> str:
    return f"{row['perplexity'][corpus]:.2f}"


def streamline_lines(run: Path, labels: list[str]) -> list[str]:
    lines = ["| level | replacement | lr | weight decay | batch × epochs (steps) | tokens trained | span MSE: before → "
             "after training / span dropped | WikiText-2 ppl |", "|---|---|---|---|---|---|---|---|"]
    for label in labels:
        record = json.loads((run / "models" / label / "streamline.json").read_text())
        settings, training = record["settings"], record.get("training") or {}
        mse = (f"{training['mse_before']:.4g} → {training['mse_after']:.4g} / {training['mse_drop_span']:.4g}"
               if training.get("mse_after") is not None else "— (nothing trained)")
        steps = (f"{settings['batch']} × {settings['epochs']} ({training['steps']})" if training.get("steps")
                 else "—")
        lines.append(f"| {label} | {record['replacement']['kind']} | {training.get('lr', '—')} | "
                     f"{training.get('weight_decay', '—')} | {steps} | {training.get('tokens', '—')} | {mse} | "
                     f"{_ppl(_eval_row(run, label))} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    run = args.run
    settings = json.loads((run / "run.json").read_text())["settings"]
    labels = sorted(p.name for p in (run / "models").iterdir() if (p / "streamline.json").is_file())
    others = sorted(p.stem for p in (run / "eval").glob("*.json") if p.stem not in labels)
    lines = [f"# {settings['model']}: LLM-Streamline with the paper's training settings (quality only)", "",
             f"Calibration: {settings['nsamples']} C4 windows of {settings['calib_seqlen']} tokens (offline: documents "
             f"0-999), seed {settings['seed']}; the same windows score the spans and train the replacements. "
             f"Perplexity: PyTorch, WikiText-2 test, the first {settings['max_windows']} windows of "
             f"{settings['eval_seqlen']} tokens.", "",
             "| level | WikiText-2 ppl |", "|---|---|", *(f"| {label} | {_ppl(_eval_row(run, label))} |"
                                                    for label in others), "",
             *streamline_lines(run, labels), "",
             f"Reproduce: `python scripts/depth_quality.py {run} --out {args.out}` after the sweep in NOTES.md."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
