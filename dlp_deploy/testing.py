"""Tiny random-weight models and a byte-level tokenizer built in code, for tests and benchmarks (no tiny models
ship anywhere and no hub is reachable)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def tiny_tokenizer():
    """A 256-token byte-level BPE with no merges: every byte is one token; round-trips any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_chars = [_byte_char(b) for b in range(256)]
    assert set(byte_chars) == set(alphabet)
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = byte_chars[0]  # byte 0 never occurs in text
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


def _byte_char(b: int) -> str:
    """GPT-2's byte-to-unicode map: printable bytes stand for themselves, the rest shift above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + sum(1 for x in range(b) if x not in printable))


TINY_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                   bos_token_id=0, eos_token_id=0, pad_token_id=0)


def tiny_llama(seed: int = 0, **overrides):
    """A small random LLaMA (GQA by default); keyword overrides go to LlamaConfig (e.g. attention_bias=True)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**TINY_CONFIG, **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.config.use_cache = False
    return model


def save_tiny(folder: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny LLaMA and its tokenizer as an HF folder; returns the folder."""
    folder = Path(folder)
    tiny_llama(seed, **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder



FAMILY_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, head_dim=16, pad_token_id=0, bos_token_id=0,
                   eos_token_id=0)
FAMILY_WINDOW = 16  # the sliding families' window: shorter than the tests' sequences, so it binds
FAMILIES = ("llama", "mistral-sliding", "qwen2-mixed-layers", "qwen3-layer-types", "gemma2", "gemma3",
            "phi3-sliding", "olmo2")


def _family_classes(family: str) -> tuple:
    import transformers as T

    mixed = ["sliding_attention", "full_attention"] * 2
    w = FAMILY_WINDOW
    return {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
        "mistral-sliding": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": w}),
        "qwen2-mixed-layers": (T.Qwen2Config, T.Qwen2ForCausalLM,
                               {"use_sliding_window": True, "sliding_window": w, "max_window_layers": 2}),
        "qwen3-layer-types": (T.Qwen3Config, T.Qwen3ForCausalLM,
                              {"layer_types": mixed, "sliding_window": w, "use_sliding_window": True}),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"sliding_window": w}),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"sliding_window": w, "sliding_window_pattern": 2}),
        "phi3-sliding": (T.Phi3Config, T.Phi3ForCausalLM, {"sliding_window": w}),
        "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, {}),
    }[family]


def family_model(family: str, seed: int = 0):
    """A tiny random model of one supported family (GQA, sliding windows, per-layer attention types, sandwich and
    post-norm wiring, fused projections)."""
    config_cls, model_cls, extra = _family_classes(family)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**FAMILY_BASE, **extra)).eval()
    model.config.use_cache = False
    return model


def save_family(folder: str | Path, family: str, seed: int = 0) -> Path:
    """Write a tiny model of `family` and the byte tokenizer as an HF folder; returns the folder."""
    folder = Path(folder)
    family_model(family, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder

# real models' shapes, for speed only: random weights (HF init), a byte-level tokenizer, the real vocabulary size
RANDOM_SHAPES = {
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),  # TinyLlama-1.1B
    "llama-350m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=22,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048),
    # TinyLlama's width and vocabulary, 32 layers: 1.54B parameters, 3.1 GB in bf16 (the memory benchmark)
    "llama-1.5b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}
RANDOM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_llama_folder(folder: str | Path, shape: str, seed: int = 0, dtype: str = "fp32",
                        max_shard_size: str | None = None) -> Path:
    """An HF folder holding a random-weight LLaMA of RANDOM_SHAPES[shape] and the byte tokenizer, its weights in
    `dtype`, in shards of at most `max_shard_size` (e.g. "500MB"; None: transformers' default)."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if dtype == "fp32":
        model = tiny_llama(seed, **RANDOM_SHAPES[shape])
    else:  # built in the target dtype: a 1.5B model need not exist in fp32 (6 GB) on its way to disk
        cfg = LlamaConfig(**{**TINY_CONFIG, **RANDOM_SHAPES[shape]})
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(cfg, dtype=RANDOM_DTYPES[dtype]).eval()
    model.config.use_cache = True
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tiny_tokenizer().save_pretrained(folder)
    (folder / "random.json").write_text(json.dumps({"shape": shape, "seed": seed, "dtype": dtype,
                                                    "weights": "random (HF init)",
                                                    "note": "for speed only; perplexity is meaningless"}, indent=1))
    return folder


def run_cli(*args, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`dlp-deploy ARGS…` in a fresh interpreter, as a user runs it; output captured."""
    return subprocess.run([sys.executable, "-m", "dlp_deploy", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def fetched_model_folder(alias: str) -> Path | None:
    """The HF folder of a fetched built-in alias, or None if `dlp-deploy models fetch` has not run."""
    from .models import ALIASES

    folder = ALIASES[alias].folder()
    return folder if (folder / "config.json").is_file() else None


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user mistake: exit 2, no traceback, exactly one `error:` line on stderr, naming every fragment."""
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error:") and len([x for x in lines if x.startswith("error:")]) == 1, proc.stderr
    text = " ".join(proc.stderr.split())
    for f in fragments:
        assert f in text, proc.stderr


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"  # the repository's scripts/ (a checkout, not a wheel)


def load_script(name: str):
    """scripts/NAME.py as a module, for tests of a script's functions (scripts/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def short_eval_texts(monkeypatch, chars: int = 40_000) -> None:
    """The scripts tokenize whole test corpora, as `dlp-deploy eval` does: seconds with the tiny byte tokenizer;
    the start of each text is all a tiny test reads."""
    from dataclasses import replace

    from . import data

    real = data.eval_text
    monkeypatch.setattr(data, "eval_text", lambda name, root: replace(t := real(name, root), text=t.text[:chars]))
