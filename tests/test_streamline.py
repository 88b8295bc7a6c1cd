"""Depth pruning with LLM-Streamline on tiny random models: span scores against a hand computation, the trained
replacement, reloading, export with MLP-only blocks, and CLI refusals."""
import json

import pytest
import torch

from dlp_deploy import models
from dlp_deploy.errors import UserError
from dlp_deploy.prune.depth import (StreamlineSettings, choose_span, layers_to_remove, paper_deviations,
                                    resolve_settings, save_streamlined, score_spans, streamline_model,
                                    streamline_to_folder, validate_settings)
from dlp_deploy.testing import (FAMILY_BASE, assert_one_line_error, family_model, run_cli, save_tiny, tiny_llama,
                                tiny_tokenizer)

FAST = dict(nsamples=4, seqlen=32, epochs=3, lr=1e-3, batch=1)  # tiny budgets: 4 windows, 12 steps


def _windows(count=3, length=16, seed=1):
    return torch.randint(1, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def _hand_cosines(model, windows, n):
    """Mean per-token cosine between hidden_states[i] and hidden_states[i + n] over all windows; the last entry of
    output_hidden_states is after the final norm, so the last block's raw output is taken from a hook instead."""
    sums, tokens = None, 0
    last = []
    handle = model.model.layers[-1].register_forward_hook(lambda _m, _a, out: last.append(out))
    try:
        for window in windows:
            with torch.no_grad():
                hs = list(model(window[None], output_hidden_states=True).hidden_states)
            hs[-1] = last.pop()
            values = []
            for i in range(len(hs) - n):
                a, b = hs[i][0], hs[i + n][0]
                values.append(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum())
            sums = torch.stack(values) if sums is None else sums + torch.stack(values)
            tokens += window.numel()
    finally:
        handle.remove()
    return (sums / tokens).tolist()


@pytest.mark.parametrize("n", [1, 2])
def test_span_scores_match_hand_cosine(n):
    model = tiny_llama()
    windows = _windows()
    hand = _hand_cosines(model, windows, n)
    scores = score_spans(model, model.model.layers, windows, n)
    assert len(scores) == 4 - n + 1
    assert scores == pytest.approx(hand, abs=1e-5)
    assert choose_span(scores) == max(range(len(hand)), key=hand.__getitem__)


def test_span_choice_and_counts():
    assert choose_span([0.1, 0.9, 0.9, 0.2]) == 1  # a tie goes to the earliest span
    assert layers_to_remove(8, None, 0.25) == 2
    assert layers_to_remove(8, 3, None) == 3
    for remove, ratio, fragment in ((8, None, "every one"), (None, None, "exactly one"), (2, 0.5, "exactly one"),
                                    (None, 1.0, "outside (0, 1)"), (None, 0.01, "removes no layer"),
                                    (0, None, "at least one")):
        with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            layers_to_remove(8, remove, ratio)


@pytest.mark.parametrize("kind", ["ffn", "layer"])
def test_replacement_is_trained(kind):
    model = tiny_llama()
    record = streamline_model(model, _windows(4, 32), StreamlineSettings(remove_layers=2, replacement=kind,
                                                                          epochs=4, lr=1e-3, batch=1))
    training = record["training"]
    assert training["loss_curve"][-1] < training["loss_curve"][0]
    assert training["mse_after"] < training["mse_before"]
    assert training["mse_after"] < training["mse_drop_span"]  # closer to the span's output than dropping it
    blocks = models.decoder_layers(model)
    assert len(blocks) == model.config.num_hidden_layers == 3
    assert [getattr(b.self_attn, "layer_idx", i) for i, b in enumerate(blocks) if hasattr(b, "self_attn")] == \
        [i for i, b in enumerate(blocks) if hasattr(b, "self_attn")]


@pytest.mark.parametrize("kind,lr,weight_decay", [("ffn", 1e-3, 1e-4), ("swiglu", 1e-3, 1e-4),
                                                 ("layer", 1e-5, 1e-3), ("none", None, None)])
def test_defaults_are_the_papers(kind, lr, weight_decay):
    """Chen et al. (ICLR 2025), Experiment Setup: lr/weight decay per replacement kind, batch 32, 20 epochs, 500
    samples for layer selection, post-training at lr 5e-5, weight decay 1e-3, one epoch. Pinned here as literals."""
    resolved = resolve_settings(StreamlineSettings(remove_layers=1, replacement=kind))
    assert (resolved.lr, resolved.weight_decay) == (lr, weight_decay)
    assert (resolved.batch, resolved.epochs, resolved.nsamples) == (32, 20, 500)
    assert (resolved.post_lr, resolved.post_weight_decay, resolved.post_epochs) == (5e-5, 1e-3, 1)
    explicit = resolve_settings(StreamlineSettings(remove_layers=1, replacement=kind, lr=0.5, weight_decay=0.0))
    assert (explicit.lr, explicit.weight_decay) == (0.5, 0.0)  # an explicit value wins for every kind
    deviations = paper_deviations(resolved)
    assert deviations[0].startswith("trained on 65536 tokens") and len(deviations) == 1 + (kind == "layer")


def test_cli_defaults_follow_the_replacement(tiny_dir, tmp_path, data_root):
    """The CLI leaves lr and weight decay to the kind's paper values and records them; --lr overrides."""
    for kind, extra, lr, weight_decay in (("layer", [], 1e-5, 1e-3), ("ffn", ["--lr", "0.002"], 2e-3, 1e-4)):
        out = tmp_path / kind
        proc = run_cli("streamline", tiny_dir, "--remove-layers", "1", "--replacement", kind, "--out", out,
                       "--nsamples", "2", "--seqlen", "16", "--epochs", "1", "--data-dir", data_root, *extra)
        assert proc.returncode == 0, proc.stderr
        settings = json.loads((out / "streamline.json").read_text())["settings"]
        assert (settings["lr"], settings["weight_decay"], settings["batch"]) == (lr, weight_decay, 32)


def test_post_training_trains_the_replacement_only():
    model = tiny_llama()
    before = {id(p): p.detach().clone() for p in model.parameters()}  # the replacement is a copy: new tensors
    record = streamline_model(model, _windows(4, 32), StreamlineSettings(
        remove_layers=2, replacement="layer", epochs=1, lr=1e-3, batch=2, post_train=True, post_lr=1e-2))
    post, index = record["post_training"], record["replacement"]["index"]
    assert post["steps"] == 2 and len(post["loss_curve"]) == 2 and post["lr"] == 1e-2
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone
    replacement = {id(p) for p in models.decoder_layers(model)[index].parameters()}
    kept = [p for p in model.parameters() if id(p) not in replacement]
    assert kept and all(torch.equal(p, before[id(p)]) for p in kept)
    with pytest.raises(UserError, match="--replacement none has none"):
        validate_settings(StreamlineSettings(remove_layers=1, replacement="none", post_train=True))


def test_per_layer_config_lists_follow_the_stack():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      layer_types=["full_attention", "sliding_attention"] * 2, sliding_window=8,
                      use_sliding_window=True)
    model = Qwen3ForCausalLM(cfg).eval()
    record = streamline_model(model, _windows(2, 16), StreamlineSettings(remove_layers=2, replacement="ffn",
                                                                          epochs=1))
    start = record["removed"]["start"]
    expected = cfg.layer_types  # already cut in place: check against the original pattern
    original = ["full_attention", "sliding_attention"] * 2
    assert expected == original[:start] + [original[start]] + original[start + 2:]
    assert "layer_types" in record["config_lists_cut"]
    ids = _windows(1, 6)
    cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)  # the MLP-only block keeps HF's KV cache bookkeeping in step


@pytest.fixture(scope="module")
def streamlined(tmp_path_factory, data_root):
    """A tiny LLaMA streamlined with every replacement that changes what is saved."""
    base = tmp_path_factory.mktemp("streamline")
    src = save_tiny(base / "tiny")
    out = {}
    for kind in ("none", "ffn", "layer"):
        settings = StreamlineSettings(remove_layers=2, replacement=kind, **FAST)
        out[kind] = streamline_to_folder(str(src), base / kind, settings, "cpu", str(data_root)), base / kind
    return out


@pytest.mark.parametrize("kind", ["none", "ffn", "layer"])
def test_streamlined_folder_reloads(streamlined, kind):
    record, folder = streamlined[kind]
    saved = json.loads((folder / models.STREAMLINE_FILE).read_text())
    assert saved["replacement"]["kind"] == kind and len(saved["span_scores"]) == 3
    assert saved["calibration"]["nsamples"] == 4 and "provenance" in saved
    model, _tok = models.load(str(folder))
    blocks = models.decoder_layers(model)
    assert len(blocks) == record["num_layers"]["after"] == (2 if kind == "none" else 3)
    if kind == "ffn":
        assert not hasattr(blocks[record["replacement"]["index"]], "self_attn")
    logits = model(_windows(1, 12)).logits
    assert torch.isfinite(logits).all()


def test_mlp_only_model_exports_and_validates(streamlined, tmp_path):
    from dlp_deploy.export.deployment import export_deployment
    from dlp_deploy.runtime.engines import GraphIO

    record, folder = streamlined["ffn"]
    info = export_deployment(folder, tmp_path / "deploy", seq_len=64, num_cores=1, quality=None,
                             engines=("onnxruntime", "deepsparse-external"))
    index = record["replacement"]["index"]
    assert info["architecture"]["mlp_only_layers"] == [index]
    assert info["architecture"]["kv_cache_layers"] == 2
    assert info["graph_proof"]["max_block_error"] < 1e-4
    # no KV cache entry for the MLP-only block: one key and one value per attention block
    assert len(GraphIO.read(tmp_path / "deploy" / "model.onnx").cache_shapes) == 4
    for engine in ("onnxruntime", "deepsparse-external"):
        result = info["validation"][engine]
        assert "skipped" not in result, result
        assert result["greedy_match"], result



# LLaMA is streamlined above; here every other family once, the replacements spread so that sliding windows,
# per-layer attention types (Qwen3, Gemma-3), sandwich norms (Gemma), post-norm (OLMo-2) and fused projections
# (Phi-3) each meet an MLP-only block or a copied layer
FAMILY_KINDS = [("mistral-sliding", "layer"), ("qwen2-mixed-layers", "none"), ("qwen3-layer-types", "ffn"),
                ("gemma2", "ffn"), ("gemma3", "layer"), ("gemma3", "ffn"), ("phi3-sliding", "ffn"),
                ("olmo2", "ffn")]


@pytest.mark.parametrize("family,kind", FAMILY_KINDS)
def test_every_family_streamlines_reloads_and_exports(family, kind, tmp_path):
    from dlp_deploy.export.deployment import export_deployment

    model = family_model(family)
    types_before = list(getattr(model.config, "layer_types", None) or [])
    settings = StreamlineSettings(remove_layers=2, replacement=kind, epochs=3, lr=1e-3, batch=1)
    record = streamline_model(model, _windows(4, 32), settings)
    start, after = record["removed"]["start"], record["num_layers"]["after"]
    assert after == (2 if kind == "none" else 3)
    if types_before:
        keep = list(range(start)) + ([start] if kind != "none" else []) + list(range(start + 2, 4))
        assert list(model.config.layer_types) == [types_before[i] for i in keep]
    if kind != "none":
        assert record["training"]["mse_after"] < record["training"]["mse_drop_span"]
    if kind == "ffn":  # the model's MLP width, also where gate and up are one fused projection (Phi-3)
        assert record["replacement"]["width"] == FAMILY_BASE["intermediate_size"]
    save_streamlined(model, tiny_tokenizer(), tmp_path / "model", record)

    reloaded, _tok = models.load(str(tmp_path / "model"))
    ids = _windows(1, 24, seed=5)  # longer than the sliding window, so it binds
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
    prompt = ids[:, :6]
    cached = reloaded.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = reloaded.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)

    info = export_deployment(tmp_path / "model", tmp_path / "deploy", seq_len=64, num_cores=1, quality=None,
                             engines=("onnxruntime",))
    assert info["architecture"]["num_layers"] == after
    assert info["architecture"].get("mlp_only_layers", []) == ([start] if kind == "ffn" else [])
    assert info["graph_proof"]["max_block_error"] < 1e-4
    result = info["validation"]["onnxruntime"]
    assert result["greedy_match"] and result["max_abs_logit_diff"] < 1e-3, result

def test_cli_refuses_bad_input(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("streamline", tiny_dir, "--remove-layers", "4", "--out", out, "--nsamples", "2", "--seqlen", "16")
    assert_one_line_error(proc, "--remove-layers 4", "every one of the model's 4 decoder layers", "at most 3")
    assert not out.exists()


def test_pruning_keeps_the_layout_records_of_its_input(tmp_path, data_root):
    """A streamlined (or structured) input keeps its streamline.json (structure.json) through `prune`, so the
    pruned folder reloads with the same blocks; streaming is refused for it with the reason."""
    from dlp_deploy.prune.to_folder import prune_to_folder
    from dlp_deploy.prune.pipeline import PruneSettings

    src = save_tiny(tmp_path / "src")
    streamline_to_folder(str(src), tmp_path / "short", StreamlineSettings(remove_layers=2, replacement="ffn", **FAST),
                         "cpu", str(data_root))
    report = prune_to_folder(str(tmp_path / "short"), tmp_path / "pruned", PruneSettings(0.5, "wanda", "uniform"),
                             nsamples=2, seqlen=32)
    assert "streamline.json" in report["loading"]["why_in_memory"]
    model, _ = models.load(str(tmp_path / "pruned"))
    weights = [m.weight for b in models.decoder_layers(model) for m in models.linear_modules(b).values()]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) == pytest.approx(0.5, abs=1e-3)
    ids = torch.arange(1, 17)[None]
    assert torch.isfinite(model(ids).logits).all()
    structured = prune_to_folder(str(src), tmp_path / "structured", PruneSettings(0.3, "wanda", "uniform",
                                                                                   structure="channels"),
                                 nsamples=2, seqlen=32)
    again = prune_to_folder(str(tmp_path / "structured"), tmp_path / "again", PruneSettings(0.5, "wanda", "uniform"),
                            nsamples=2, seqlen=32)
    assert structured and again["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    models.load(str(tmp_path / "again"))  # reloads with the structured shapes


def test_sweep_with_depth_levels_and_recovered_twins(tmp_path, data_root, monkeypatch):
    """Depth levels and +recovery twins go through prune/depth -> eval -> export -> bench like every level;
    a streamlined model (no zeros) must never be taken for the dense baseline, and a resumed sweep redoes
    nothing."""
    from dlp_deploy.bench.stats import is_dense, removed_share
    from dlp_deploy.pipeline.levels import SweepSettings
    from dlp_deploy.pipeline.sweep import run_sweep
    from dlp_deploy.report.render import make_report

    monkeypatch.setenv("DLP_DEPLOY_DATA", str(data_root))
    model = save_tiny(tmp_path / "tiny", seed=2)
    settings = SweepSettings.from_flat(model=str(model), sparsities=[0.5], method="wanda", allocations=["uniform"],
                                       engines=["onnxruntime"], nsamples=2, calib_seqlen=32, eval_seqlen=64,
                                       max_windows=2, seq_len=64, validate=False, cores=1, prompt_len=8, gen_len=8,
                                       runs=1, warmup=0, rounds=1, depth=["none", "ffn"], depth_ratio=0.5,
                                       recover=["wanda-uniform-0.50", "streamline-ffn-*"], recover_steps=4)
    run = tmp_path / "run"
    result = run_sweep(settings, run, log=lambda *_: None)
    q = {e["label"]: e for e in result["quality"]}
    assert list(q) == ["dense", "wanda-uniform-0.50", "streamline-none-0.50", "streamline-ffn-0.50",
                       "wanda-uniform-0.50+recovery", "streamline-ffn-0.50+recovery"]

    # removed: the original decoder-Linear weights gone, net of the replacement (4 layers, 2 cut)
    layer = sum(m.weight.numel() for m in models.linear_modules(tiny_llama(2).model.layers[0]).values())
    mlp = q["streamline-ffn-0.50"]["depth"]
    assert mlp["layers_removed"] == 2 and mlp["num_layers"] == {"before": 4, "after": 3}
    assert q["streamline-none-0.50"]["removed"] == pytest.approx(0.5)
    assert 0.5 > q["streamline-ffn-0.50"]["removed"] > 0.25  # an MLP-only block is less than a layer
    assert mlp["mse_after"] < mlp["mse_drop_span"]
    assert q["streamline-ffn-0.50"]["removed"] == pytest.approx(
        1 - (2 * layer + _mlp_params(run / "models" / "streamline-ffn-0.50")) / (4 * layer))

    twin, base = q["wanda-uniform-0.50+recovery"], q["wanda-uniform-0.50"]
    assert twin["recovered"] and twin["variant"] == "uniform +recovery" and twin["form"] == "unstructured"
    assert twin["sparsity"] == base["sparsity"] and twin["removed"] == base["removed"]  # the zeros are the base's
    zeros = twin["recovery"]["zeros"]
    assert zeros["zeros_after"] == zeros["zeros_before"] > 0 and twin["recovery"]["steps"] == 4
    assert twin["perplexity"]["wikitext2"] != base["perplexity"]["wikitext2"]  # trained, not copied
    assert q["streamline-ffn-0.50+recovery"]["depth"]["replacement"] == "ffn"  # the record travels

    rows = {r["label"]: r for r in result["results"]}
    assert [label for label, r in rows.items() if is_dense(r)] == ["dense"]
    for label in ("streamline-none-0.50", "streamline-ffn-0.50", "streamline-ffn-0.50+recovery"):
        assert rows[label]["form"] == "depth" and rows[label]["speedup"]["baseline"] == "dense", label
        assert removed_share(rows[label]) == pytest.approx(q[label]["removed"])
        assert rows[label]["weights"]["ideal_speedup"] > 1.2  # fewer bytes per token than dense

    stamp = (run / "models" / "wanda-uniform-0.50+recovery" / "recovery.json").stat().st_mtime_ns
    run_sweep(settings, run, log=lambda *_: None)
    assert (run / "models" / "wanda-uniform-0.50+recovery" / "recovery.json").stat().st_mtime_ns == stamp

    md = (make_report([run], tmp_path / "report") / "report.md").read_text()
    assert "Depth pruning (LLM-Streamline" in md and "| streamline-ffn-0.50 | ffn | 2 of 4 |" in md
    assert "Recovery fine-tuning (LoRA, zeros kept)" in md
    assert "| wanda-uniform-0.50+recovery | wanda-uniform-0.50 |" in md
    assert "![pareto.png](pareto.png)" in md

    with pytest.raises(UserError, match="matches no level"):
        run_sweep(settings.replace_flat(recover=["nothing-*"]), tmp_path / "other")


def _mlp_params(folder):
    record = json.loads((folder / "streamline.json").read_text())
    return sum(m.weight.numel() for m in models.linear_modules(
        models.load(str(folder))[0].model.layers[record["removed"]["start"]]).values())
