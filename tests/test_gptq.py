"""GPTQ weights for INT8 (export/gptq.py): masked, so every pruned zero stays an exact zero; lower output error
than round-to-nearest on correlated inputs; the ONNX writer takes its codes as they are."""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np
import pytest
import torch

from dlp_deploy.export.gptq import gptq_quantize, output_mse, rtn_codes
from dlp_deploy.prune.sparsegpt import Hessian


def _correlated_layer(seed: int = 0, n_in: int = 96, n_out: int = 32, sparsity: float = 0.5):
    """A masked weight and inputs whose channels are strongly correlated (what GPTQ's feedback exploits)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g)
    x = torch.randn(8, 64, n_in, generator=g) @ mix * 0.3 + torch.randn(8, 64, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g)
    w[torch.rand(w.shape, generator=g) < sparsity] = 0
    h = Hessian(n_in)
    for window in x:
        h.add_batch(window[None])
    return w, x, h.H


def test_masked_gptq_keeps_every_zero_and_beats_rtn_on_the_calibration_outputs():
    w, x, H = _correlated_layer()
    q, scale = gptq_quantize(w, H, block=32)  # several lazy batches over 96 columns
    rq, rscale = rtn_codes(w)
    mask = w.numpy() == 0
    assert q.dtype == np.int8 and np.count_nonzero(q[mask]) == 0 and mask.mean() > 0.45
    assert np.abs(q).max() <= 127 and np.array_equal(scale, rscale)  # RTN's grid, so the writer's zero check holds
    assert (q != rq).mean() > 0.01  # it is not RTN

    # output error on the calibration inputs, in numpy, against the fp32 layer
    xs = x.reshape(-1, x.shape[-1]).numpy().astype(np.float64)
    ref = xs @ w.numpy().T.astype(np.float64)

    def mse(codes):
        return float(((xs @ (codes.astype(np.float64) * scale[:, None]).T - ref) ** 2).mean())

    gptq_err, rtn_err = mse(q), mse(rq)
    assert gptq_err < 0.9 * rtn_err
    # the Hessian form export.json reports is the same figure
    deq = torch.from_numpy(q.astype(np.float32) * scale[:, None])
    assert output_mse(w, deq, H, x.shape[1]) == pytest.approx(gptq_err, rel=1e-4)


def test_a_column_no_input_reaches_is_rounded_and_takes_no_feedback():
    w, _, H = _correlated_layer(seed=1)
    H[:, 5] = 0
    H[5, :] = 0
    q, _ = gptq_quantize(w, H)
    assert np.array_equal(q[:, 5], rtn_codes(w)[0][:, 5])


@pytest.fixture(scope="module")
def masked_model_dir(tmp_path_factory):
    """A tiny LLaMA with half of every decoder Linear's weights set to exact zeros (a stand-in for a prune)."""
    from dlp_deploy.models import decoder_layers, linear_modules
    from dlp_deploy.testing import tiny_llama, tiny_tokenizer

    model = tiny_llama(seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in decoder_layers(model):
            for m in linear_modules(block).values():
                m.weight[torch.rand(m.weight.shape, generator=g) < 0.5] = 0
    folder = tmp_path_factory.mktemp("gptq") / "masked"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_gptq_export_writes_the_gptq_codes_and_passes_the_int8_zero_check(masked_model_dir, tmp_path, data_root):
    import onnx
    from onnx import numpy_helper

    from dlp_deploy import data
    from dlp_deploy.export.deployment import QuantizeOptions, export_deployment
    from dlp_deploy.export.gptq import weight_plan
    from dlp_deploy.models import load

    options = QuantizeOptions(calib_samples=4, calib_seqlen=64, act_scales="dynamic-token", weight_method="gptq",
                              smooth_alpha=0)
    info = export_deployment(str(masked_model_dir), tmp_path / "int8", seq_len=96, validate=False, quantize=options,
                             data_root=str(data_root))
    q = info["quantization"]
    assert info["weight_sparsity"]["int8"]["mask_preserved"]  # _check_int8_mask ran and found every zero
    assert q["weight_method"] == "gptq" and q["kept_fp32"] == [] and q["matmuls_quantized"] == 4 * 7
    g = q["gptq"]
    assert (g["damp"], g["block_size"], g["calibration_windows"]) == (0.01, 128, 4) and len(g["layers"]) == 28
    assert all(layer["gptq_mse"] <= layer["rtn_mse"] * 1.0001 for layer in g["layers"])

    # the graph holds exactly the codes GPTQ chose (same calibration windows, same algorithm)
    model, tok = load(str(masked_model_dir))
    windows = data.calibration("c4", tok, 4, 64, 0, data_root).windows
    plan = weight_plan("gptq", model, windows, lambda _: None)
    inits = {i.name: i for i in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.initializer}
    differs = 0
    for name, (codes, _) in plan.codes.items():
        stored = numpy_helper.to_array(inits.get(f"{name}.T") or inits[name])
        stored = stored.T if f"{name}.T" in inits else stored
        assert np.array_equal(stored, codes), name
        differs += int((codes != rtn_codes(dict(model.named_parameters())[name])[0]).sum())
    assert differs > 0
