"""The search space: pruning candidates per form (one registry entry per form), and the precisions a survivor is
exported in (one registry entry per precision).

A candidate is screened in stage 1 either one-shot from the dense statistics (`oneshot`: its per-layer ratios
and N:M group), or, for forms with no one-shot form here (structured, depth), by pruning it for real and scoring
the pruned PyTorch model on the same validation windows (`pruned`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..models import GGUF_SOURCE_FILE, resolve
from ..prune.masks import parse_pattern
from ..prune.settings import prune_settings

DENSE_ID = "dense"


@dataclass(frozen=True)
class Candidate:
    form: str  # unstructured, nm, structured, depth, or dense
    sparsity: float | None = None  # None: dense
    allocation: str | None = None  # uniform, dlp (alpha auto), a saved search's name
    pattern: str = "unstructured"  # unstructured, N:M, mixed:M
    structure: str | None = None
    replacement: str | None = None  # depth: what replaces the cut span

    @property
    def id(self) -> str:
        if self.sparsity is None:
            return DENSE_ID
        if self.form == "depth":
            return f"depth-{self.replacement}-{self.sparsity:.2f}"
        if self.form == "structured":
            return f"structured-{self.allocation}-{self.sparsity:.2f}"
        pattern = "" if self.pattern == "unstructured" else self.pattern.replace("mixed:", "mixed").replace(":", "of") + "-"
        return f"wanda-{pattern}{_safe(self.allocation)}-{self.sparsity:.2f}"

    @property
    def screen(self) -> str:
        """How stage 1 scores it: one-shot from dense statistics, or by pruning it."""
        return "pruned" if self.form in ("structured", "depth") else "oneshot"

    def describe(self) -> dict:
        return {"id": self.id, **asdict(self)}


def _safe(name: str | None) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name or "")


# ---------------------------------------------------------------- forms

FIXED_NM = ("2:4", "4:8")
MIXED_M = 4
STRUCTURED_LEVELS = (0.1, 0.2, 0.3)
DEPTH_RATIOS = (0.125, 0.25)


def _unstructured(levels: list[float], saved: list[str]) -> list[Candidate]:
    return [Candidate("unstructured", p, a) for p in levels for a in ("uniform", "dlp", *saved)]


def _nm(levels: list[float], saved: list[str]) -> list[Candidate]:
    fixed = [Candidate("nm", _nm_sparsity(p), "uniform", p) for p in FIXED_NM]
    return fixed + [Candidate("nm", p, "dlp", f"mixed:{MIXED_M}") for p in levels]


def _structured(levels: list[float], saved: list[str]) -> list[Candidate]:
    return [Candidate("structured", p, "uniform", structure="heads,channels") for p in STRUCTURED_LEVELS]


def _depth(levels: list[float], saved: list[str]) -> list[Candidate]:
    # "none": the cut span is dropped without training a replacement (the cheap end of LLM-Streamline)
    return [Candidate("depth", r, replacement="none") for r in DEPTH_RATIOS]


def _nm_sparsity(pattern: str) -> float:
    return parse_pattern(pattern).fixed_sparsity


FORMS: dict[str, Callable[[list[float], list[str]], list[Candidate]]] = {
    "unstructured": _unstructured, "nm": _nm, "structured": _structured, "depth": _depth}


def candidates(include: list[str], levels: list[float], saved: list[str] = ()) -> list[Candidate]:
    """Every pruning candidate of the included forms (the dense model is not among them: it is always kept)."""
    unknown = [f for f in include if f not in FORMS]
    if unknown or not include:
        raise UserError(f"--include {','.join(include)}: choose forms from {', '.join(FORMS)} (comma-separated)")
    bad = [p for p in levels if not 0 < p < 1]
    if bad:
        raise UserError(f"--levels {','.join(map(str, bad))}: give sparsities in (0, 1), e.g. 0.1,0.2,0.3")
    out: dict[str, Candidate] = {}
    for form in include:
        for c in FORMS[form](sorted(levels), list(saved)):
            out.setdefault(c.id, c)
    return list(out.values())


def prune_settings_of(c: Candidate, val_windows: int = 16):
    """What `prune` is given for a candidate: DLP with --alpha auto (tuned again on held-out C4, as the screen
    tuned it), the others as named."""
    return prune_settings(c.sparsity, "wanda", c.allocation, None, pattern=c.pattern, structure=c.structure,
                          auto="alpha" if c.allocation == "dlp" else None, val_windows=val_windows)


# ---------------------------------------------------------------- precisions

@dataclass(frozen=True)
class Precision:
    name: str
    format: str  # onnx or gguf
    scoring_engine: str  # the engine its deployed perplexity is scored on


PRECISIONS = {p.name: p for p in (
    Precision("fp32", "onnx", "onnxruntime"),
    Precision("int8", "onnx", "onnxruntime"),  # dynamic per-token activation scales (issue 24: +1% ppl, not +74%)
    Precision("int4", "onnx", "onnxruntime"),  # exported where QuantizeOptions accepts it; else stopped with why
    Precision("w8", "onnx", "onnxruntime"),  # q8_0's blocks on the ONNX engines, int8 activations per block
    Precision("q8_0", "gguf", "llamacpp"),
    Precision("q4_k_m", "gguf", "llamacpp"),
    # the GGUF a fetched model was dequantized from, unchanged: what its users run today; a peer, never a candidate
    # (a pruned model's weights are no longer in it)
    Precision("source", "gguf", "llamacpp"),
)}
PEERS = ("q8_0", "q4_k_m")  # the dense model as llama.cpp users run it
PEER_ONLY = ("source",)


def precisions(csv: list[str]) -> list[Precision]:
    unknown = [p for p in csv if p not in PRECISIONS]
    if unknown or not csv:
        choices = ", ".join(p for p in PRECISIONS if p not in PEER_ONLY)
        raise UserError(f"--precisions {','.join(csv)}: choose from {choices} (comma-separated)")
    peer_only = [p for p in csv if p in PEER_ONLY]
    if peer_only:
        raise UserError(f"--precisions {peer_only[0]}: the GGUF a fetched model came from holds the dense weights "
                        f"only; compare against it with --peers {peer_only[0]}")
    return [PRECISIONS[p] for p in csv]


def default_peers(model: str) -> list[str]:
    """q8_0 and q4_k_m re-exported from the model, and the GGUF it was fetched from where it was (its own file is
    the llama.cpp baseline its users have)."""
    fetched = (Path(resolve(model)) / GGUF_SOURCE_FILE).is_file()
    return [*PEERS, *(PEER_ONLY if fetched else ())]


def deploy_name(candidate_id: str, precision: str) -> str:
    """The deployment folder's name, as the sweep names its own (fp32 bare), so bench files pair the same way."""
    return candidate_id if precision == "fp32" else f"{candidate_id}.{precision}"
