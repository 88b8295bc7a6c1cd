"""Defaults that follow the reference code (issue 10): SparseGPT's block-wise mask, BOS in calibration windows,
window length min(2048, context), OWL's M and lambda as options; MoE experts refused rather than left dense;
any local GGUF fetched into the cache under a name."""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dlp_deploy import data
from dlp_deploy.errors import UserError
from dlp_deploy.prune.pipeline import PruneSettings, prune_model
from dlp_deploy.testing import assert_one_line_error, run_cli, tiny_llama, tiny_tokenizer

WINDOWS = torch.randint(1, 256, (4, 32), generator=torch.Generator().manual_seed(0))
# down_proj reads 256 inputs: two of SparseGPT's 128-column blocks
WIDE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2)


def _zeros_per_block(weight: torch.Tensor, blocksize: int = 128) -> list[int]:
    return [int((weight[:, i:i + blocksize] == 0).sum()) for i in range(0, weight.shape[1], blocksize)]


# ---------------------------------------------------------------- 1. SparseGPT's reference mask

def test_default_granularity_is_each_methods_reference():
    assert PruneSettings(0.5, "sparsegpt", "uniform").granularity == "per-layer"
    assert PruneSettings(0.5, "wanda", "uniform").granularity == "per-output"
    assert PruneSettings(0.5, "magnitude", "uniform").granularity == "per-output"
    # N:M groups lie inside rows: the default must not collide with the pattern (which refuses per-layer)
    assert PruneSettings(0.5, "sparsegpt", "uniform", pattern="2:4").granularity == "per-output"
    assert PruneSettings(0.5, "sparsegpt", "uniform", granularity="per-output").granularity == "per-output"


def test_sparsegpt_default_selects_over_each_128_column_block():
    model = tiny_llama(seed=2, **WIDE)
    prune_model(model, WINDOWS, PruneSettings(0.5, "sparsegpt", "uniform"))
    down = model.model.layers[0].mlp.down_proj.weight  # [128, 256]
    # the reference thresholds each [rows, 128] block as a whole: exactly half of every block...
    assert _zeros_per_block(down) == [128 * 64, 128 * 64]
    # ...but not half of every row
    per_row = (down == 0).sum(dim=1)
    assert per_row.sum() == 128 * 128 and int(per_row.max() - per_row.min()) >= 10
    q = model.model.layers[1].self_attn.q_proj.weight  # [128, 128]: one block
    assert _zeros_per_block(q) == [128 * 64]


def test_sparsegpt_per_output_still_prunes_each_row_alike():
    model = tiny_llama(seed=2, **WIDE)
    prune_model(model, WINDOWS, PruneSettings(0.5, "sparsegpt", "uniform", granularity="per-output"))
    down = model.model.layers[0].mlp.down_proj.weight
    # per row of each block: 64 of 128, so every row loses exactly 128 of 256
    assert ((down == 0).sum(dim=1) == 128).all()
    assert _zeros_per_block(down) == [128 * 64, 128 * 64]


# ---------------------------------------------------------------- 2. BOS in calibration windows

def bos_tokenizer():
    """The byte-level tiny tokenizer, made to prepend BOS (id 0) as LLaMA's tokenizers do."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("abc")["input_ids"] == [0, 97, 98, 99]
    return tok


def wanda_get_c4(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda's lib/data.py get_c4 sampling loop, verbatim but for the dataset access."""
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            trainenc = tokenizer(docs[i], return_tensors="pt")
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        trainloader.append(trainenc.input_ids[:, i:j])
    return torch.cat(trainloader)


def _c4_folder(root: Path, docs: list[str]) -> Path:
    import pandas as pd

    (root / "c4").mkdir(parents=True)
    pd.DataFrame({"text": docs}).to_parquet(root / "c4" / "c4_validation_2k.parquet")
    return root


def test_calibration_windows_keep_bos_as_wandas_loader(tmp_path):
    seqlen = 16
    rng = random.Random(1)
    exact = ["".join(rng.choice("abcdefgh ") for _ in range(seqlen)) for _ in range(6)]  # BOS makes them long enough
    long = ["".join(rng.choice("ijklmnop ") for _ in range(200)) for _ in range(6)]
    short = ["tiny doc"] * 4
    docs = exact + long + short
    root = _c4_folder(tmp_path / "data", docs)
    tok = bos_tokenizer()
    windows = data.calibration("c4", tok, 24, seqlen, 0, root).windows
    assert torch.equal(windows, wanda_get_c4(docs, tok, 24, seqlen, 0))
    # a document of exactly seqlen tokens passes the reference's length test only with BOS counted, and its
    # one possible window starts at 0: BOS, then the first seqlen - 1 tokens
    from_exact = [w for w in windows if set(tok.decode(w[1:])) <= set("abcdefgh ")]
    assert len(from_exact) >= 3
    for w in from_exact:
        assert w[0] == tok.bos_token_id and tok.decode(w[1:]) in {doc[:seqlen - 1] for doc in exact}
    # a random slice of a long document holds BOS only when it starts at the document's start
    for w in windows:
        assert tok.bos_token_id not in w[1:].tolist()
    # without BOS (the old tokenization) no document but the long ones would qualify: the windows differ
    plain = tiny_tokenizer()
    assert not torch.equal(data.calibration("c4", plain, 24, seqlen, 0, root).windows, windows)


# ---------------------------------------------------------------- 3. window length min(2048, context)

@pytest.mark.parametrize("config,expected", [
    (SimpleNamespace(max_position_embeddings=256), 256),
    (SimpleNamespace(max_position_embeddings=131072), 2048),
    (SimpleNamespace(n_positions=1024), 1024),  # GPT-2's spelling
    (SimpleNamespace(), 2048),  # no declared context: the papers' 2048
])
def test_default_seqlen_is_min_2048_and_context(config, expected):
    assert data.default_seqlen(config) == expected


def test_prune_and_eval_resolve_seqlen_from_the_model(tmp_path, data_root):
    from dlp_deploy.eval.evaluate import evaluate
    from dlp_deploy.prune.to_folder import prune_to_folder

    src = tmp_path / "src"
    tiny_llama(seed=3, max_position_embeddings=256).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "pruned"
    report = prune_to_folder(str(src), out, PruneSettings(0.5, "sparsegpt", "uniform"), nsamples=2,
                             data_root=str(data_root))
    assert report["calibration"]["seqlen"] == 256
    saved = json.loads((out / "pruning.json").read_text())
    assert saved["calibration"]["seqlen"] == 256
    assert saved["settings"]["granularity"] == "per-layer"  # the granularity actually used is recorded
    result = evaluate(str(out), ["wikitext2"], max_windows=1, data_root=str(data_root))
    assert result["seqlen"] == 256 and result["perplexity_details"]["wikitext2"]["seqlen"] == 256
    assert result["perplexity_details"]["wikitext2"]["tokens_scored"] == 255


# ---------------------------------------------------------------- 4. OWL's M and lambda

def _owl(**kw):
    model = tiny_llama(seed=4, num_hidden_layers=6)
    return prune_model(model, WINDOWS, PruneSettings(0.5, "magnitude", "owl", **kw)).allocation


def test_owl_lambda_sets_the_spread_and_m_the_outlier_threshold():
    default, narrow = _owl(), _owl(owl_lambda=0.02)
    # equal-sized layers, nothing clipped: ratios span exactly 2 * lambda around the target
    assert max(default.ratios) - min(default.ratios) == pytest.approx(0.16)
    assert max(narrow.ratios) - min(narrow.ratios) == pytest.approx(0.04)
    assert sum(narrow.ratios) / 6 == pytest.approx(0.5)
    low_m = _owl(owl_m=2.0)
    # a lower threshold counts more scores as outliers in every layer
    assert all(a > b for a, b in zip(low_m.extras["D"], default.extras["D"]))
    assert low_m.ratios != pytest.approx(default.ratios)


@pytest.mark.parametrize("kw,message", [({"owl_m": 0.0}, "--owl-m 0.0 must be positive"),
                                        ({"owl_lambda": 0.6}, "--owl-lambda 0.6 is outside")])
def test_bad_owl_parameters_are_refused(kw, message):
    with pytest.raises(UserError, match=message):
        prune_model(tiny_llama(seed=1), WINDOWS, PruneSettings(0.5, "wanda", "owl", **kw))


def test_cli_owl_options_and_explicit_granularity_reach_pruning_json(tmp_path, data_root):
    out = tmp_path / "p"
    src = tmp_path / "src"
    tiny_llama(seed=2, **WIDE).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    proc = run_cli("prune", src, "--sparsity", "0.5", "--method", "sparsegpt", "--granularity", "per-output",
                   "--allocation", "owl", "--owl-m", "3", "--owl-lambda", "0.05", "--nsamples", "2", "--seqlen", "32",
                   "--data-dir", data_root, "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "pruning.json").read_text())
    s = report["settings"]
    assert (s["granularity"], s["owl_m"], s["owl_lambda"]) == ("per-output", 3.0, 0.05)
    targets = [layer["target"] for layer in report["layers"]]
    assert max(targets) - min(targets) == pytest.approx(0.10)  # 2 * lambda (the default would give 0.16)
    from safetensors.torch import load_file

    down = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    ratio = report["layers"][0]["target"]
    per_row = (down == 0).sum(dim=1)
    assert (per_row == per_row[0]).all()  # per-output: every row alike
    assert int(per_row[0]) == 2 * int(128 * ratio + 0.5)  # the nearest count in each of the two column blocks


# ---------------------------------------------------------------- 5. MoE experts are refused, not left dense

def tiny_moe(kind: str):
    import transformers as T

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, num_experts_per_tok=2, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0)
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                               decoder_sparse_step=1, mlp_only_layers=[])
        return T.Qwen3MoeForCausalLM(cfg).eval()
    return T.MixtralForCausalLM(T.MixtralConfig(**common, intermediate_size=64, num_local_experts=4)).eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_moe_experts_are_refused_before_any_work(kind):
    from dlp_deploy.models import unprunable_weights

    model = tiny_moe(kind)
    found = unprunable_weights(model.model.layers[0])
    assert any(len(shape) == 3 for shape in found.values())  # the experts really are 3-D parameters here
    # windows=None: had the check not come first, "needs calibration data" would be raised instead
    with pytest.raises(UserError, match=r"layer 0 module mlp.experts holds mlp.experts.\w+ \[4, .*"
                                        r"MoE expert pruning is not supported"):
        prune_model(model, None, PruneSettings(0.5, "wanda", "dlp", alpha=0.04))
    assert unprunable_weights(tiny_llama().model.layers[0]) == {}  # dense blocks pass


def test_cli_refuses_moe_in_one_line(tmp_path, data_root):
    src = tmp_path / "moe"
    tiny_moe("qwen3_moe").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    proc = run_cli("prune", src, "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32", "--data-dir", data_root,
                   "--out", out)
    assert_one_line_error(proc, "Qwen3MoeForCausalLM", "mlp.experts", "MoE expert pruning is not supported")
    assert not out.exists()


# ---------------------------------------------------------------- 6. any local GGUF as a named model

def merging_tokenizer():
    """A byte-level BPE with two real merges: transformers rebuilds a GGUF's BPE vocabulary from its merges,
    and a merge whose result is no token (what the GGUF writer adds to a merge-less vocabulary) cannot load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dlp_deploy.testing import _byte_char

    chars = [_byte_char(b) for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)} | {"\u0120t": 256, "he": 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t"), ("h", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chars[0], bos_token=chars[0], pad_token=chars[0])


def _write_gguf(folder: Path, quant: str, seed: int = 1) -> tuple[Path, torch.nn.Module]:
    from dlp_deploy.export.gguf import GGUF_QUANTS, write_gguf

    model, tok = tiny_llama(seed, vocab_size=258), merging_tokenizer()
    src = folder / f"src-{seed}"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    path = folder / f"Tiny-Llama.{quant.upper()}.gguf"
    write_gguf(model, tok, path, GGUF_QUANTS[quant], src)
    return path, model


@pytest.mark.parametrize("quant,rel_tol", [("f32", 1e-6), ("f16", 2e-3)])
def test_fetched_gguf_loads_by_name_with_the_source_logits(tmp_path, monkeypatch, quant, rel_tol):
    from dlp_deploy.models import fetch_gguf, load

    monkeypatch.setenv("DLP_DEPLOY_CACHE", str(tmp_path / "cache"))
    path, source = _write_gguf(tmp_path, quant)
    folder = fetch_gguf(path, "tiny-gguf")
    assert folder == tmp_path / "cache" / "models" / "tiny-gguf"
    model, tok = load("tiny-gguf")
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 7, 81, 256, 257]])
    with torch.no_grad():
        ref, got = source(ids).logits, model(ids).logits
    assert (got - ref).abs().max() <= rel_tol * ref.abs().max()
    assert tok("the then")["input_ids"] == merging_tokenizer()("the then")["input_ids"] == [116, 257, 256, 257, 110]
    assert fetch_gguf(path, "tiny-gguf") == folder  # the same file again: nothing to do


def test_gguf_fetch_names_and_refusals(tmp_path, monkeypatch):
    from dlp_deploy.models import fetch_gguf, resolve

    monkeypatch.setenv("DLP_DEPLOY_CACHE", str(tmp_path / "cache"))
    path, _ = _write_gguf(tmp_path, "f32")
    assert fetch_gguf(path).name == "tiny-llama.f32"  # default: the file stem, lower case
    assert resolve("tiny-llama.f32") == str(tmp_path / "cache" / "models" / "tiny-llama.f32")
    other, _ = _write_gguf(tmp_path / "b", "f16", seed=2)
    with pytest.raises(UserError, match="already fetched .* pass --force"):
        fetch_gguf(other, "tiny-llama.f32")
    assert fetch_gguf(other, "tiny-llama.f32", force=True).name == "tiny-llama.f32"
    with pytest.raises(UserError, match="does not exist"):
        fetch_gguf(tmp_path / "missing.gguf")
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(UserError, match="is not a GGUF file"):
        fetch_gguf(tmp_path / "notes.gguf")
    for bad in ("smollm2-135m", "org/name", "../x"):
        with pytest.raises(UserError, match="is not usable"):
            fetch_gguf(path, bad)
    with pytest.raises(UserError, match="models fetch"):
        resolve(str(path))  # a GGUF given directly as MODEL: told to fetch it


def test_cli_models_fetch_gguf(tmp_path):
    path, _ = _write_gguf(tmp_path, "f16")
    env = {"DLP_DEPLOY_CACHE": str(tmp_path / "cache")}
    proc = run_cli("models", "fetch", path, "--name", "mine", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "cache" / "models" / "mine")
    listed = run_cli("models", "list", env=env)
    assert f"mine\tfrom {path}" in listed.stdout
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    assert_one_line_error(run_cli("models", "fetch", tmp_path / "weights.bin", env=env), "is not a GGUF file")
    assert_one_line_error(run_cli("models", "fetch", tmp_path / "nope.gguf", env=env), "does not exist")
