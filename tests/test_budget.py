"""Mixed precision by a quality budget (export/budget.py): the Linear made sensitive to INT8 is the one kept fp32,
until the held-out perplexity is within the tolerance; a loose tolerance keeps none; the held-out text is C4's
validation slice, never the evaluation text."""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import pytest
import torch

from dlp_deploy.export.budget import activation_quantizer, fit_budget
from dlp_deploy.export.gptq import weight_plan

SENSITIVE = "model.layers.1.mlp.down_proj"


def _sensitive_tiny(**overrides):
    """A tiny LLaMA whose block-1 MLP matters (down_proj x10, logits sharpened x4) and whose down_proj reads one
    outlier channel (up_proj row 5 x1000, down_proj column 5 /1000: the fp32 function is unchanged), so per-token
    INT8 of its input rounds every other channel to zero."""
    from dlp_deploy.testing import tiny_llama

    model = tiny_llama(seed=3, num_hidden_layers=2, **overrides)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        model.lm_head.weight *= 4
        mlp.down_proj.weight *= 10
        mlp.up_proj.weight[5] *= 1000
        mlp.down_proj.weight[:, 5] /= 1000
    return model


@pytest.fixture(scope="module")
def sampled_text():
    """The model and windows sampled from it: on its own samples the fp32 model has the lowest expected loss, so
    rounding shows as a perplexity rise rather than as noise on a random model's near-uniform output."""
    model = _sensitive_tiny()
    torch.manual_seed(0)
    starts = torch.tensor([[17], [101], [66], [200]])
    with torch.no_grad():
        ids = model.generate(starts, attention_mask=torch.ones_like(starts), do_sample=True, top_k=0,
                             max_new_tokens=63, min_new_tokens=63, pad_token_id=0)
    return model, ids


def test_the_sensitive_linear_is_kept_fp32_until_the_tolerance_is_met(sampled_text):
    model, ids = sampled_text
    plan = weight_plan("rtn", model, None, lambda _: None)
    act = activation_quantizer("dynamic-token", model, None)
    kept, loose = fit_budget(model, plan, act, ids, tolerance=1.0)
    assert kept == set() and loose["kept_fp32"] == [] and loose["evaluations"] == 2 and loose["met"]
    excess = loose["all_quantized_ppl"] / loose["fp32_ppl"] - 1
    assert excess > 0.002  # INT8 costs this model something measurable

    kept, record = fit_budget(model, plan, act, ids, tolerance=excess / 2)
    sensitivity = record["sensitivity"]
    assert next(iter(sensitivity)) == SENSITIVE and len(sensitivity) == 2 * 7
    assert sensitivity[SENSITIVE] > 5 * max(v for k, v in sensitivity.items() if k != SENSITIVE)
    assert record["kept_fp32"][0]["unit"] == SENSITIVE and f"{SENSITIVE}.weight" in kept
    assert record["met"] and record["final_ppl"] <= record["target_ppl"] < record["all_quantized_ppl"]
    assert len(kept) < 14  # it stopped as soon as the tolerance was met
    assert record["evaluations"] == 2 + 14 + len(record["steps"])


def test_budget_units_group_the_same_linears():
    from dlp_deploy.export.budget import BUDGET_UNITS

    model = _sensitive_tiny()
    groups = {unit: group(model) for unit, group in BUDGET_UNITS.items()}
    flat = {unit: sorted(n for names in g.values() for n in names) for unit, g in groups.items()}
    assert flat["linear"] == flat["block"] == flat["kind"] and len(flat["linear"]) == 14
    assert len(groups["block"]) == 2 and len(groups["kind"]) == 7
    assert groups["kind"]["mlp.down_proj"] == ["model.layers.0.mlp.down_proj.weight", f"{SENSITIVE}.weight"]


def test_export_searches_on_held_out_c4_and_a_loose_tolerance_keeps_every_linear_int8(tmp_path, data_root):
    """Through export: the search reads held-out C4 validation text (never an evaluation document, never one a
    calibration window was cut from); within a loose tolerance nothing is kept fp32 and no sensitivity is spent."""
    from dlp_deploy import data
    from dlp_deploy.export.deployment import QuantizeOptions, export_deployment
    from dlp_deploy.testing import tiny_tokenizer

    options = QuantizeOptions(calib_samples=4, calib_seqlen=64, act_scales="dynamic-token", smooth_alpha=0,
                              budget=1.0, budget_windows=4)
    info = export_deployment(_sensitive_tiny(), tmp_path / "loose", seq_len=96, validate=False, quantize=options,
                             tokenizer=tiny_tokenizer(), data_root=str(data_root))
    q = info["quantization"]
    budget = q["budget"]
    assert q["kept_fp32"] == [] and budget["kept_fp32"] == [] and budget["evaluations"] == 2
    assert q["matmuls_quantized"] == 2 * 7 and info["weight_sparsity"]["int8"]["weights_kept_fp32"] == 0
    text = budget["validation_text"]
    assert text["source"] == "local c4_validation_2k docs 0-999 no calibration window came from"
    assert (text["windows"], text["seqlen"]) == (4, 64)
    calibration = data.calibration("c4", tiny_tokenizer(), 4, 64, 0, data_root)
    held_out = data.validation_windows(tiny_tokenizer(), calibration, 4, 64, data_root)
    assert set(held_out.docs).isdisjoint(data.C4_EVAL_DOCS) and set(held_out.docs).isdisjoint(calibration.used)


def test_cli_prints_the_budget_and_refuses_it_outside_int8(tiny_dir, tmp_path, data_root):
    from dlp_deploy.testing import assert_one_line_error, run_cli

    proc = run_cli("export", tiny_dir, "--out", tmp_path / "int4", "--quantize", "int4", "--quality-budget")
    assert_one_line_error(proc, "--quality-budget", "--quantize int8")
    proc = run_cli("export", tiny_dir, "--out", tmp_path / "gptq", "--quantize", "int8", "--weight-method", "gptq",
                   "--quality-budget", "--ppl-tolerance", "1.0", "--budget-windows", "2", "--calib-samples", "2",
                   "--seq-len", "96", "--no-validate", "--data-dir", data_root)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "quality budget (100.0%, local c4_validation_2k" in text and "every Linear INT8" in text
