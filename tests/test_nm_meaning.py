"""N in N:M counts the weights kept (DLP Table 15, NVIDIA 2:4): 1:4 is 75% sparse on every path (prune CLI,
pruning.json, the one-shot scorer, the export check, the sweep's levels), and folders or sweeps written when N
counted the pruned weights are converted with a record, or refused in one line."""
import json

import pytest
import torch

from dlp_deploy.errors import UserError
from dlp_deploy.models import decoder_layers, linear_modules
from dlp_deploy.prune.masks import nm_group_zero_counts, parse_pattern
from dlp_deploy.pruning_record import OLD_SCHEMA, SCHEMA, read_pruning_record
from dlp_deploy.testing import assert_one_line_error, run_cli, save_tiny, tiny_llama

CALIB = ("--nsamples", "2", "--seqlen", "32")


@pytest.fixture(scope="module")
def one_of_four(tmp_path_factory, data_root):
    """A tiny LLaMA pruned by the CLI with --pattern 1:4."""
    root = tmp_path_factory.mktemp("nm")
    src = save_tiny(root / "tiny", seed=4)
    out = root / "p14"
    proc = run_cli("prune", src, "--pattern", "1:4", "--out", out, *CALIB, env={"DLP_DEPLOY_DATA": str(data_root)})
    assert proc.returncode == 0, proc.stderr
    return out


def test_one_of_four_is_75_percent_sparse_in_the_folder_and_its_record(one_of_four):
    from transformers import AutoModelForCausalLM

    record = json.loads((one_of_four / "pruning.json").read_text())
    assert record["schema"] == SCHEMA and record["settings"]["pattern"] == "1:4"
    assert record["global_sparsity"] == pytest.approx(0.75) and record["target_sparsity"] == 0.75
    assert {(layer["n"], layer["m"]) for layer in record["layers"]} == {(1, 4)}
    model = AutoModelForCausalLM.from_pretrained(one_of_four)
    for block in decoder_layers(model):
        for lin in linear_modules(block).values():
            assert torch.all(nm_group_zero_counts(lin.weight, 4) == 3)  # three of every four are zero


def test_export_checks_one_kept_of_four(one_of_four, tmp_path):
    from dlp_deploy.export.deployment import export_deployment

    info = export_deployment(str(one_of_four), tmp_path / "dep", seq_len=64, validate=False)
    nm = info["nm_pattern"]
    assert nm["pattern"] == "1:4" and set(nm["n_per_layer"]) == {1} and nm["groups_violating"] == 0
    assert info["weight_sparsity"]["pytorch_global"] == pytest.approx(0.75)


def _as_schema_1(folder, pattern: str, n_of_layer) -> None:
    """Rewrite a folder's record as a prune from before the change would have written it."""
    path = folder / "pruning.json"
    record = json.loads(path.read_text())
    record["schema"] = OLD_SCHEMA
    record["settings"]["pattern"] = pattern
    record["pattern"]["pattern"] = pattern
    record["layers"] = [dict(layer, n=n_of_layer(layer)) for layer in record["layers"]]
    path.write_text(json.dumps(record))


def test_an_old_meaning_folder_is_converted_with_a_record(one_of_four, tmp_path):
    import shutil

    from dlp_deploy.export.deployment import export_deployment

    old = tmp_path / "old"
    shutil.copytree(one_of_four, old)
    _as_schema_1(old, "3:4", lambda layer: 3)  # then: 3 of 4 pruned
    record = read_pruning_record(old)
    assert record["settings"]["pattern"] == "1:4" and {layer["n"] for layer in record["layers"]} == {1}
    assert record["converted"] == {"from_schema": OLD_SCHEMA, "n_counted": "pruned", "pattern_before": "3:4"}
    info = export_deployment(str(old), tmp_path / "dep", seq_len=64, validate=False)
    assert info["nm_pattern"]["pattern"] == "1:4" and info["nm_pattern"]["groups_violating"] == 0


def test_an_old_record_that_fits_neither_meaning_is_refused(one_of_four, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(one_of_four, bad)
    _as_schema_1(bad, "1:4", lambda layer: 1)  # 1 pruned of 4 is 25%, but the folder is 75% sparse
    with pytest.raises(UserError, match="N:M meaning is unclear"):
        read_pruning_record(bad)
    proc = run_cli("export", bad, "--out", tmp_path / "dep", "--no-validate")
    assert_one_line_error(proc, "N:M meaning is unclear", "re-run the prune")
    assert not (tmp_path / "dep").exists()


def test_a_sweep_swept_under_the_old_meaning_is_not_resumed(tmp_path):
    from dlp_deploy.pipeline.levels import SweepSettings, check_sweep, levels

    settings = SweepSettings.from_flat(model="m", sparsities=[0.5], method="wanda", allocations=["dlp"],
                                       engines=["onnxruntime"], patterns=["1:4"])
    assert [(lv.label, lv.sparsity) for lv in levels(settings)][1] == ("wanda-1of4", 0.75)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"settings": {"patterns": ["1:4"]}}))
    with pytest.raises(UserError, match="counted pruned weights"):
        check_sweep(settings, run)
    (run / "run.json").write_text(json.dumps({"settings": {"patterns": ["2:4"]}}))  # same either way
    check_sweep(SweepSettings.from_flat(model="m", sparsities=[0.5], method="wanda", allocations=["dlp"],
                                        engines=["onnxruntime"], patterns=["2:4"]), run)


def test_one_shot_scoring_of_mixed_rounds_to_whole_counts():
    """--alpha auto scores mixed:M as it prunes: each layer's ratio rounded to a count of M (it scored an
    unstructured prune at the continuous ratios before)."""
    from dlp_deploy.prune.oneshot import DenseSnapshot
    from dlp_deploy.prune.pipeline import pattern_ratios

    model = tiny_llama(seed=7, num_hidden_layers=4)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    snap = DenseSnapshot.collect(model, windows)
    alloc = snap.allocate("dlp", 0.75, {"alpha": 0.2, "reducer": "median", "method": "wanda"})
    ratios, kept = pattern_ratios(parse_pattern("mixed:4"), alloc.ratios, snap.sizes, 0.75)
    assert len(set(kept)) > 1 and all(0 <= k <= 4 for k in kept)
    snap.apply(ratios, "wanda", m=4)
    for block, n in zip(decoder_layers(model), kept):
        for lin in linear_modules(block).values():
            assert torch.all(nm_group_zero_counts(lin.weight, 4) == 4 - n)
    snap.restore()


def test_a_block_pruned_to_nothing_exports_with_every_weight_named(tmp_path):
    """Mixed N:M may give a block N = 0: its projections are then equal all-zero tensors, which the TorchScript
    exporter merged into one initializer and the content-matched naming gave one name; the export's sparsity
    check then found weights missing and refused the deployment."""
    from dlp_deploy.export.deployment import export_deployment
    from dlp_deploy.testing import tiny_tokenizer

    model = tiny_llama(0)
    with torch.no_grad():
        for module in linear_modules(decoder_layers(model)[3]).values():
            module.weight.zero_()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    from dlp_deploy.export.onnx import onnx_weight_sparsity

    export_deployment(str(tmp_path / "m"), tmp_path / "out", seq_len=64, engines=("onnxruntime",), quality=None)
    found = onnx_weight_sparsity(next((tmp_path / "out").glob("*.onnx")))["per_initializer"]
    empty = {name.removesuffix(".T"): e for name, e in found.items() if ".layers.3." in name}
    assert len(empty) == 7 and all(e["zeros"] == e["shape"][0] * e["shape"][1] for e in empty.values())
