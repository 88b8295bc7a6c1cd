"""Mixed precision by a quality budget (export/budget.py): the Linear made sensitive to INT8 is the one kept fp32,
until the held-out perplexity is within the tolerance; a loose tolerance keeps none; the held-out text is C4's
validation slice, never the evaluation text."""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import torch

from dlp_deploy.export.budget import activation_quantizer, fit_budget
from dlp_deploy.export.gptq import weight_plan

SENSITIVE = "model.layers.1.mlp.down_proj"


def _sensitive_tiny(data_root=None):
    """A tiny LLaMA whose block-1 down_proj reads one outlier channel (up_proj row 5 x1000, down_proj column 5
    /1000: the fp32 function is unchanged), so per-token INT8 of its input rounds every other channel to zero.
    With `data_root` it also predicts C4's byte unigram exactly: every token embeds alike, so every position ends
    in the same hidden state h, and lm_head = outer(log p, h) / |h|^2 gives logits log p. Any change of h scales
    them (a tempered unigram, worse on any C4 text), and the MLP that down_proj closes (x10) carries much of h."""
    from dlp_deploy.testing import tiny_llama

    model = tiny_llama(seed=3, num_hidden_layers=2)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5] *= 1000
        mlp.down_proj.weight[:, 5] /= 1000
        if data_root is not None:
            model.model.embed_tokens.weight[:] = model.model.embed_tokens.weight[65]
            mlp.down_proj.weight *= 10
            windows = _calibration(data_root).windows
            counts = torch.bincount(windows.reshape(-1), minlength=256).float() + 0.1
            h = model.model(windows[:1]).last_hidden_state[0, -1]
            model.lm_head.weight[:] = torch.outer((counts / counts.sum()).log(), h) / h.dot(h)
    return model


def _calibration(data_root):
    from dlp_deploy import data
    from dlp_deploy.testing import tiny_tokenizer

    return data.calibration("c4", tiny_tokenizer(), 4, 64, 0, data_root)


def _held_out(data_root):
    from dlp_deploy import data
    from dlp_deploy.testing import tiny_tokenizer

    return data.validation_windows(tiny_tokenizer(), _calibration(data_root), 4, 64, data_root)


def test_the_sensitive_linear_is_kept_fp32_until_the_tolerance_is_met(data_root):
    model, ids = _sensitive_tiny(data_root), _held_out(data_root).ids
    plan = weight_plan("rtn", model, None, lambda _: None)
    act = activation_quantizer("dynamic-token", model, None)
    kept, loose = fit_budget(model, plan, act, ids, tolerance=0.1)
    assert kept == set() and loose["kept_fp32"] == [] and loose["evaluations"] == 2 and loose["met"]
    excess = loose["all_quantized_ppl"] / loose["fp32_ppl"] - 1
    assert excess > 0.01  # INT8 costs this model something measurable

    kept, record = fit_budget(model, plan, act, ids, tolerance=excess / 3)
    sensitivity = record["sensitivity"]
    assert next(iter(sensitivity)) == SENSITIVE and len(sensitivity) == 2 * 7
    assert sensitivity[SENSITIVE] > 100 * max(v for k, v in sensitivity.items() if k != SENSITIVE)
    assert kept == {f"{SENSITIVE}.weight"} and record["kept_fp32"][0]["sensitivity"] == sensitivity[SENSITIVE]
    assert record["met"] and record["final_ppl"] <= record["target_ppl"] < record["all_quantized_ppl"]
    assert record["evaluations"] == 2 + 14 + 1  # fp32, all INT8, one per Linear, one step


def test_budget_units_group_the_same_linears():
    from dlp_deploy.export.budget import BUDGET_UNITS

    model = _sensitive_tiny()
    groups = {unit: group(model) for unit, group in BUDGET_UNITS.items()}
    flat = {unit: sorted(n for names in g.values() for n in names) for unit, g in groups.items()}
    assert flat["linear"] == flat["block"] == flat["kind"] and len(flat["linear"]) == 14
    assert len(groups["block"]) == 2 and len(groups["kind"]) == 7
    assert groups["kind"]["mlp.down_proj"] == ["model.layers.0.mlp.down_proj.weight", f"{SENSITIVE}.weight"]


def test_export_keeps_the_budget_layer_fp32_found_on_held_out_c4(tmp_path, data_root):
    """Through export: the search reads held-out C4 validation text (never an evaluation document, never one a
    calibration window was cut from), the kept MatMul stays fp32 in the graph, the rest are int8 and the zero check
    covers both."""
    import onnx

    from dlp_deploy import data
    from dlp_deploy.export.deployment import QuantizeOptions, export_deployment
    from dlp_deploy.testing import tiny_tokenizer

    model = _sensitive_tiny(data_root)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:3, :8] = 0  # pruned zeros, in the Linear kept fp32 too
    options = QuantizeOptions(calib_samples=4, calib_seqlen=64, act_scales="dynamic-token", smooth_alpha=0,
                              budget=0.01, budget_windows=4)
    info = export_deployment(model, tmp_path / "mixed", seq_len=96, validate=False, quantize=options,
                             tokenizer=tiny_tokenizer(), data_root=str(data_root))
    q = info["quantization"]
    budget = q["budget"]
    text = budget["validation_text"]
    assert text["source"] == "local c4_validation_2k docs 0-999 no calibration window came from"
    assert (text["windows"], text["seqlen"]) == (4, 64)
    held_out = _held_out(data_root)
    assert set(held_out.docs).isdisjoint(data.C4_EVAL_DOCS)
    assert set(held_out.docs).isdisjoint(_calibration(data_root).used)

    assert q["kept_fp32"] == [f"{SENSITIVE}.weight"] and budget["met"] and q["matmuls_quantized"] == 13
    int8 = info["weight_sparsity"]["int8"]
    assert int8["mask_preserved"] and int8["weights_kept_fp32"] == 1
    inits = {i.name: i.data_type for i in onnx.load(str(tmp_path / "mixed" / "model.onnx")).graph.initializer}
    for name in (n for n, _ in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")):
        dtype = inits.get(f"{name}.T", inits.get(name))
        assert dtype == (onnx.TensorProto.FLOAT if name in q["kept_fp32"] else onnx.TensorProto.INT8), name


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
