"""The three pruning forms: N:M and mixed N:M (zeros in groups of M), and structured (whole heads and channels
removed). Invariants on tiny random GQA models, save/reload, export validation on both engines, bad input."""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import json

import numpy as np
import pytest
import torch

from dlp_deploy.runtime import engines as engines_mod
from dlp_deploy.errors import UserError
from dlp_deploy.models import decoder_layers, linear_modules, load
from dlp_deploy.prune.allocate import mixed_nm_counts, round_and_repair
from dlp_deploy.prune.masks import nm_group_zero_counts, nm_mask, parse_pattern
from dlp_deploy.prune.pipeline import PruneSettings, prune_model
from dlp_deploy.models.geometry import block_geometry
from dlp_deploy.testing import assert_one_line_error, run_cli, tiny_llama

WINDOWS = torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(1))
GQA = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
           num_hidden_layers=6)
needs_deepsparse = pytest.mark.skipif(not engines_mod.deepsparse_available(), reason="deepsparse not installed")


# ---------------------------------------------------------------- N:M, pure

@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (7, 8)])
def test_nm_mask_prunes_the_given_count_lowest_of_every_group(n, m):
    scores = torch.rand(17, 64)
    mask = nm_mask(scores, n, m)
    assert torch.all(mask.reshape(17, -1, m).sum(dim=2) == n)
    groups, chosen = scores.reshape(17, -1, m), mask.reshape(17, -1, m)
    assert torch.all(torch.where(chosen, groups, -1).amax(2) <= torch.where(~chosen, groups, 2).amin(2))


@pytest.mark.parametrize("text,message", [("3:5", "M=5 is not supported"), ("4:4", "N=4 must be between 1"),
                                          ("0:8", "N=0 must be"), ("mixed:16", "M=16"), ("2-4", "not understood")])
def test_bad_patterns_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        parse_pattern(text)


def test_round_and_repair_meets_the_target_within_one_step():
    ideal = np.array([0.4, 1.6, 2.5, 2.5, 3.4])
    sizes = np.array([10.0, 10, 10, 10, 10])
    x = round_and_repair(ideal, sizes, [0] * 5, [3] * 5, target=110)
    assert (x * sizes).sum() == 110 and list(x) == sorted(x)
    # bounds hold even when the target cannot be met
    assert list(round_and_repair(ideal, sizes, [0] * 5, [1] * 5, target=400)) == [1] * 5


def test_mixed_counts_follow_ratio_order_and_target():
    ratios = [0.35, 0.42, 0.48, 0.55, 0.61, 0.66]
    sizes = [1000] * 6
    n = mixed_nm_counts(ratios, sizes, 0.5, 8)  # kept of every 8: a higher ratio keeps fewer
    assert n == sorted(n, reverse=True) and all(0 <= v <= 8 for v in n) and len(set(n)) > 1
    assert abs(sum((8 - v) / 8 for v in n) / 6 - 0.5) <= 0.5 / 8 / 6 + 1e-12


def test_mixed_one_of_four_can_differ_from_uniform():
    """At 75% no layer could keep 2 of 4 unless another keeps 0: mixed 1:4 must allow an emptied layer."""
    n = mixed_nm_counts([0.6, 0.7, 0.8, 0.9], [1000] * 4, 0.75, 4)
    assert sum(n) == 4 and n[0] == 2 and n[-1] == 0


# ---------------------------------------------------------------- N:M, pruned models

def group_zeros_per_layer(model, m):
    return [[nm_group_zero_counts(lin.weight, m) for lin in linear_modules(b).values()] for b in decoder_layers(model)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern,sparsity", [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75), ("6:8", 0.25)])
def test_fixed_nm_holds_in_every_group(method, pattern, sparsity):
    model = tiny_llama(seed=5, **GQA)
    p = parse_pattern(pattern)
    assert p.fixed_sparsity == sparsity  # N counts the weights kept
    result = prune_model(model, WINDOWS, PruneSettings(sparsity, method, "uniform", pattern=pattern))
    for layer in group_zeros_per_layer(model, p.m):
        for zeros in layer:
            assert torch.all(zeros == p.m - p.n)  # random weights: no zero was there before
    assert result.realized == pytest.approx([sparsity] * 6)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("allocation,m", [("dlp", 8), ("owl", 4), ("dlp", 4)])
def test_mixed_nm_follows_importance_and_meets_target(method, allocation, m):
    model = tiny_llama(seed=6, **GQA)
    result = prune_model(model, WINDOWS, PruneSettings(0.5, method, allocation, alpha=0.15, pattern=f"mixed:{m}"))
    n = result.extras["n_per_layer"]
    for layer, n_l in zip(group_zeros_per_layer(model, m), n):
        assert all(torch.all(z == m - n_l) for z in layer)  # n_l kept of every m
    # layers the allocation ranks as more important (lower continuous ratio) never keep fewer per group
    cont = result.extras["continuous_ratios"]
    order = sorted(range(6), key=lambda i: cont[i])
    assert all(n[a] >= n[b] for a, b in zip(order, order[1:]))
    if allocation == "dlp":
        assert len(set(n)) > 1, "DLP at alpha 0.15 spreads the layers over more than one N"
    sizes = result.block_sizes
    realised = sum(r * s for r, s in zip(result.realized, sizes)) / sum(sizes)
    assert abs(realised - 0.5) <= max(sizes) / m / sum(sizes) / 2 + 1e-9  # within half a rounding step


@pytest.mark.parametrize("settings,message", [
    (PruneSettings(0.3, "wanda", "uniform", pattern="2:4"), "means sparsity 0.5"),
    (PruneSettings(0.5, "wanda", "dlp", alpha=0.1, pattern="2:4"), "use --allocation uniform"),
    (PruneSettings(0.5, "wanda", "dlp", alpha=0.1, pattern="mixed:8", granularity="per-layer"), "per-layer"),
    (PruneSettings(0.5, "wanda", "uniform", pattern="2:4", structure="heads"), "two different forms"),
    (PruneSettings(0.5, "wanda", "uniform", structure="rows"), "heads, channels"),
    (PruneSettings(0.5, "wanda", "uniform", structure="channels", importance="fisher"), "--importance"),
])
def test_conflicting_settings_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        prune_model(tiny_llama(seed=1), WINDOWS, settings)


def test_pattern_must_divide_every_input_width():
    model = tiny_llama(seed=1, intermediate_size=130)  # down_proj reads 130 inputs
    with pytest.raises(UserError, match=r"layer 0 mlp.down_proj has 130 inputs, not a multiple of 4"):
        prune_model(model, WINDOWS, PruneSettings(0.5, "wanda", "uniform", pattern="2:4"))


# ---------------------------------------------------------------- structured

def geometry_of(model):
    return [block_geometry(b, i) for i, b in enumerate(decoder_layers(model))]


@pytest.mark.parametrize("importance", ["activation", "taylor"])
@pytest.mark.parametrize("allocation", ["uniform", "dlp"])
def test_structured_shapes_are_consistent(importance, allocation):
    model = tiny_llama(seed=7, **GQA)
    dense_params = sum(sum(lin.weight.numel() for lin in linear_modules(b).values()) for b in decoder_layers(model))
    result = prune_model(model, WINDOWS, PruneSettings(0.3, "wanda", allocation, alpha=0.1,
                                                       structure="heads,channels", importance=importance))
    for g, shape in zip(geometry_of(model), result.extras["shapes"]):
        attn = decoder_layers(model)[0].self_attn
        assert g.head_dim == 16 and g.num_heads % g.num_kv_heads == 0  # every KV group keeps equal query heads
        assert (g.num_heads, g.num_kv_heads, g.intermediate) == (
            shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"])
        assert g.intermediate % 8 == 0 and g.intermediate < 256
        assert len(shape["kept_heads"]) == g.num_heads and all(h // 4 in shape["kept_kv_heads"]
                                                              for h in shape["kept_heads"])
        assert attn.num_key_value_groups == attn.q_proj.out_features // attn.k_proj.out_features
    now = sum(sum(lin.weight.numel() for lin in linear_modules(b).values()) for b in decoder_layers(model))
    step = 3 * 128 * 8 / dense_params  # one multiple of MLP channels in one layer
    assert abs((1 - now / dense_params) - 0.3) <= step
    with torch.no_grad():  # still a working model
        assert torch.isfinite(model(WINDOWS[:1]).logits).all()


def test_structured_dlp_removes_more_from_less_important_layers():
    model = tiny_llama(seed=8, **GQA)
    result = prune_model(model, WINDOWS, PruneSettings(0.4, "wanda", "dlp", alpha=0.15, structure="heads,channels"))
    importance, realized = result.allocation.extras["I"], result.realized
    most, least = int(np.argmax(importance)), int(np.argmin(importance))
    assert realized[most] < realized[least]


def test_structured_ratio_beyond_one_head_is_clipped_and_recorded():
    model = tiny_llama(seed=9, **GQA)
    result = prune_model(model, WINDOWS, PruneSettings(0.98, "wanda", "uniform", structure="heads,channels"))
    assert result.extras["layers_short"] == 6
    assert all(s["num_attention_heads"] == 1 and s["num_key_value_heads"] == 1 and s["intermediate_size"] == 8
               for s in result.extras["shapes"])


def test_structured_model_saves_and_reloads_with_equal_logits(tmp_path, data_root):
    from dlp_deploy.prune.to_folder import prune_to_folder
    from dlp_deploy.testing import save_tiny

    src = save_tiny(tmp_path / "src", seed=3, **GQA)
    out = tmp_path / "pruned"
    report = prune_to_folder(str(src), out, PruneSettings(0.3, "wanda", "dlp", alpha=0.1, structure="heads,channels"),
                             nsamples=4, seqlen=32, data_root=str(data_root))
    record = json.loads((out / "structure.json").read_text())
    assert [layer["intermediate_size"] for layer in record["layers"]] == [
        layer["intermediate_size"] for layer in report["layers"]]
    assert report["form"] == "structured" and report["global_sparsity"] == pytest.approx(0.3, abs=0.01)
    assert {"rss_start_bytes", "rss_peak_bytes"} <= set(report["memory"])
    saved = json.loads((out / "pruning.json").read_text())  # the default importance is LLM-Pruner's, and recorded
    assert saved["settings"]["importance"] == saved["structure"]["importance"] == "taylor"
    reloaded, _ = load(str(out))
    # the same model as before the save: rebuild it by pruning again in memory with the same inputs
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception):  # plain from_pretrained refuses the shapes instead of loading garbage
        AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    before = _prune_in_memory(src, data_root)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, before(ids).logits)


def _prune_in_memory(src, data_root):
    from dlp_deploy import data

    model, tok = load(str(src))
    windows = data.calibration("c4", tok, 4, 32, 0, data.data_dir(str(data_root))).windows
    torch.manual_seed(0)
    prune_model(model, windows, PruneSettings(0.3, "wanda", "dlp", alpha=0.1, structure="heads,channels"))
    return model


def test_unknown_mlp_wiring_is_refused():
    model = tiny_llama(seed=1)
    block = decoder_layers(model)[0]
    block.mlp.extra = torch.nn.Linear(128, 64)  # a second width->hidden Linear: not a gate/up/down MLP
    with pytest.raises(UserError, match="MLP wiring not understood"):
        block_geometry(block, 0)


# ---------------------------------------------------------------- export of both forms

@needs_deepsparse
@pytest.mark.parametrize("form", ["mixed:8", "structured"])
def test_export_validates_both_forms(tmp_path, data_root, form):
    from dlp_deploy.export.deployment import export_deployment
    from dlp_deploy.prune.to_folder import prune_to_folder
    from dlp_deploy.testing import save_tiny

    src = save_tiny(tmp_path / "src", seed=4, **GQA)
    settings = (PruneSettings(0.3, "wanda", "dlp", alpha=0.1, structure="heads,channels") if form == "structured"
                else PruneSettings(0.5, "wanda", "dlp", alpha=0.15, pattern=form))
    prune_to_folder(str(src), tmp_path / "pruned", settings, nsamples=4, seqlen=32, data_root=str(data_root))
    # the forms' shapes and patterns through the engines; the perplexity step is exercised elsewhere (CI time)
    engines = ("onnxruntime", "deepsparse", "deepsparse-external")
    info = export_deployment(tmp_path / "pruned", tmp_path / "deploy", seq_len=64, num_cores=1, quality=None,
                             engines=engines)
    for engine in engines:
        assert info["validation"][engine]["greedy_match"] is True, engine
    assert info["source"]["pruning"]["form"] == form
    if form == "structured":
        heads = info["architecture"]["num_heads"]
        assert len(set(heads)) > 1 or min(heads) < 8, "real pruned shapes reach the exporter"
        assert info["nm_pattern"] is None
    else:
        nm = info["nm_pattern"]
        assert nm["m"] == 8 and nm["groups_violating"] == 0 and len(set(nm["n_per_layer"])) > 1
        assert nm["groups_checked"] == sum(lin.weight.numel() // 8 for b in decoder_layers(tiny_llama(**GQA))
                                           for lin in linear_modules(b).values())


def test_export_refuses_a_broken_nm_pattern(tmp_path):
    from dlp_deploy.export.deployment import ValidationError, check_nm_pattern
    from dlp_deploy.export.onnx import export_onnx

    model = tiny_llama(seed=2, **GQA)
    prune_model(model, WINDOWS, PruneSettings(0.5, "magnitude", "uniform", pattern="2:4"))
    export_onnx(model, tmp_path / "m.onnx")
    record = {"settings": {"pattern": "2:4"}, "layers": [{}] * 6}
    assert check_nm_pattern(model, tmp_path / "m.onnx", record)["groups_violating"] == 0
    record = {"settings": {"pattern": "1:4"}, "layers": [{}] * 6}  # claims more zeros than the file holds
    with pytest.raises(ValidationError, match="more non-zeros"):
        check_nm_pattern(model, tmp_path / "m.onnx", record)


# ---------------------------------------------------------------- CLI

@pytest.mark.parametrize("args,fragment", [
    (["--pattern", "2:4", "--sparsity", "0.3"], "means sparsity 0.5"),
    (["--pattern", "3:5"], "M=5 is not supported"),
    (["--pattern", "mixed:8", "--sparsity", "0.5", "--granularity", "per-layer"], "per-layer"),
    (["--structure", "heads,rows", "--sparsity", "0.3"], "heads, channels"),
    (["--method", "wanda"], "--sparsity is required"),
])
def test_cli_refuses_bad_forms_in_one_line(tiny_dir, tmp_path, args, fragment):
    out = tmp_path / "out"
    proc = run_cli("prune", tiny_dir, "--out", out, *args)
    assert_one_line_error(proc, fragment)
    assert not out.exists()


@pytest.mark.parametrize("kv_keep,per_group", [(2, 3), (1, 4), (2, 1)])
def test_shrinking_equals_silencing_the_removed_units(kv_keep, per_group):
    """Removing heads and channels computes exactly what the full model computes with the removed heads' o_proj
    columns and the removed channels' down_proj columns zeroed: the shrink keeps the right slices in the right
    order (query head h reads KV head h // group)."""
    import copy

    from dlp_deploy.models.shapes import Keep, apply_keep

    model = tiny_llama(seed=3, **{**GQA, "num_key_value_heads": 2})  # 8 query heads, 2 KV heads, group 4
    silenced = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    for i, block in enumerate(decoder_layers(model)):
        g = block_geometry(block, i)
        kv = sorted(torch.randperm(2, generator=gen)[:kv_keep].tolist())
        heads = [k * 4 + j for k in kv for j in sorted(torch.randperm(4, generator=gen)[:per_group].tolist())]
        channels = sorted(torch.randperm(256, generator=gen)[:136].tolist())
        apply_keep(block, g, Keep(kv, heads, channels))
        ref = decoder_layers(silenced)[i]
        with torch.no_grad():
            gone = [h for h in range(8) if h not in heads]
            for h in gone:
                ref.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
            ref.mlp.down_proj.weight[:, [c for c in range(256) if c not in channels]] = 0
    ids = torch.randint(0, 256, (1, 20), generator=gen)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, silenced(ids).logits, atol=1e-5)
