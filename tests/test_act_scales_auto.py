"""--act-scales auto (the default): the most accurate INT8 activation scales that every engine the deployment is
made for runs on integer kernels: dynamic per-token, or static where DeepSparse is among them."""
from __future__ import annotations

import json

from dlp_deploy.export.deployment import QuantizeOptions, resolve_act_scales
from dlp_deploy.testing import run_cli


def test_auto_picks_dynamic_token_unless_deepsparse_is_a_target():
    auto = QuantizeOptions("int8")
    assert auto.act_scales == "auto"
    chosen, record = resolve_act_scales(auto, ("onnxruntime", "openvino"))
    assert chosen.act_scales == "dynamic-token" and record["chosen"] == "dynamic-token"
    for engines in [("onnxruntime", "deepsparse"), ("deepsparse-external",)]:
        chosen, record = resolve_act_scales(auto, engines)
        assert chosen.act_scales == "static" and "deepsparse" in record["reason"]
    explicit = QuantizeOptions("int8", act_scales="static")
    assert resolve_act_scales(explicit, ("onnxruntime",)) == (explicit, None)  # asked for: kept
    w8 = QuantizeOptions("w8")
    assert resolve_act_scales(w8, ("onnxruntime",)) == (w8, None)  # not INT8 activations


def test_export_records_the_scales_auto_chose(tmp_path, tiny_dir):
    """A real export for ONNX Runtime (DeepSparse's static choice is the same rule, above: its compile is slow)."""
    out, expected = tmp_path / "int8", "dynamic-token"
    proc = run_cli("export", tiny_dir, "--out", out, "--quantize", "int8", "--engines", "onnxruntime", "--seq-len", "64",
                   "--calib-samples", "2", "--ppl-windows", "1", "--ppl-tolerance", "1.0")
    assert proc.returncode == 0, proc.stderr
    quantization = json.loads((out / "export.json").read_text())["quantization"]
    assert quantization["act_scales"] == expected
    assert quantization["act_scales_choice"]["asked"] == "auto"
    assert quantization["act_scales_choice"]["chosen"] == expected
