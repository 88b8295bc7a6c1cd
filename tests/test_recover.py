"""LoRA recovery fine-tuning on tiny random models: every pruned zero survives the merge exactly (unstructured,
2:4, structured), held-out perplexity drops, the trained function is the saved one, streamlined and structured
folders recover and reload, and CLI refusals are one line."""
import json
from dataclasses import replace

import pytest
import torch

from dlp_deploy import models
from dlp_deploy.errors import UserError
from dlp_deploy.prune.to_folder import prune_to_folder
from dlp_deploy.prune.pipeline import PruneSettings
from dlp_deploy.prune.recover import (RecoverSettings, attach_lora, keep_masks, mask_adapters, merge_and_unload,
                                      merged_weight, recover_to_folder, resolve_settings, target_modules)
from dlp_deploy.testing import assert_one_line_error, run_cli, save_tiny, tiny_llama

# a tiny random model learns C4's byte statistics within a few dozen steps at this learning rate
LEARN = RecoverSettings(steps=30, lora_rank=8, lora_alpha=16, lr=5e-3, nsamples=16, seqlen=64, batch_size=4,
                        eval_windows=4)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
QUICK = RecoverSettings(steps=4, lora_rank=4, lora_alpha=8, lr=5e-3, nsamples=4, seqlen=32, batch_size=2,
                        eval_windows=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on busy cores their spin-waits cost 50x (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recover")
    save_tiny(folder / "tiny")
    return folder


def _prune(base, name, settings):
    out = base / name
    if not out.exists():
        prune_to_folder(str(base / "tiny"), out, settings, nsamples=2, seqlen=32, device="cpu")
    return out


def _zero_sets(folder):
    model, _tok = models.load(str(folder))
    return {name: linear.weight == 0 for name, linear in target_modules(model).items()}, target_modules(model)


def test_unstructured_zeros_survive_and_perplexity_drops(base, data_root):
    pruned = _prune(base, "wanda50", PruneSettings(0.5, "wanda", "uniform"))
    out = base / "wanda50-recovered"
    record = recover_to_folder(str(pruned), out, LEARN, "cpu", str(data_root))

    before, dense_before = _zero_sets(pruned)
    after, dense_after = _zero_sets(out)
    assert before.keys() == after.keys() and len(before) == 28  # 4 layers x 7 linears
    for name in before:
        assert torch.equal(before[name], after[name]), name  # the same positions, not only the same count
        assert not torch.equal(dense_before[name].weight, dense_after[name].weight), name  # the kept ones trained
    mask = record["mask"]
    assert mask["zeros_before"] == mask["zeros_after"] == sum(int(z.sum()) for z in before.values())
    assert mask["zeros_before"] / mask["params"] == pytest.approx(0.5, abs=0.01)
    assert record["lora"]["masked_targets"] == 28

    ppl = record["perplexity"]
    assert ppl["after"] < 0.9 * ppl["before"], ppl
    curve = record["training"]["loss_curve"]
    assert len(curve) == LEARN.steps and min(curve[-5:]) < curve[0]
    assert record["training"]["tokens"] == 30 * 4 * 64
    saved = json.loads((out / "recovery.json").read_text())
    assert saved["perplexity"] == ppl and "provenance" in saved and saved["wall_s"] > 0
    carried = json.loads((out / "pruning.json").read_text())  # the zero set is the input's, so is its record
    assert carried["recovered_by"] == "recovery.json" and (out / "tokenizer.json").is_file()
    assert carried["global_sparsity"] == json.loads((pruned / "pruning.json").read_text())["global_sparsity"]
    assert saved["source_pruning"]["form"] == "unstructured"


def test_2_4_pattern_survives(base, data_root):
    pruned = _prune(base, "wanda24", PruneSettings(0.5, "wanda", "uniform", pattern="2:4"))
    out = base / "wanda24-recovered"
    record = recover_to_folder(str(pruned), out, QUICK, "cpu", str(data_root))
    before, _ = _zero_sets(pruned)
    after, linears = _zero_sets(out)
    for name, linear in linears.items():
        assert torch.equal(before[name], after[name]), name
        groups = (linear.weight == 0).reshape(linear.out_features, -1, 4).sum(-1)
        assert bool((groups >= 2).all()), name  # still 2:4 along the input dimension
    assert record["perplexity"] is None and record["mask"]["zeros_before"] == record["mask"]["zeros_after"]


def test_structured_folder_recovers_and_reloads(base, data_root):
    pruned = _prune(base, "channels", PruneSettings(0.3, "wanda", "uniform", structure="channels"))
    out = base / "channels-recovered"
    recover_to_folder(str(pruned), out, QUICK, "cpu", str(data_root))
    assert (out / models.STRUCTURE_FILE).read_text() == (pruned / models.STRUCTURE_FILE).read_text()
    (_, src), (_, rec) = _zero_sets(pruned), _zero_sets(out)
    assert {n: tuple(m.weight.shape) for n, m in src.items()} == {n: tuple(m.weight.shape) for n, m in rec.items()}


def test_streamlined_ffn_recovers_and_reloads(base, data_root):
    from dlp_deploy.models.shapes import MLPBlock
    from dlp_deploy.prune.depth import StreamlineSettings, streamline_to_folder

    streamlined = base / "ffn"
    streamline_to_folder(str(base / "tiny"), streamlined, StreamlineSettings(
        remove_layers=2, replacement="ffn", nsamples=4, seqlen=32, epochs=1, lr=1e-3, batch=1), "cpu",
        str(data_root))
    out = base / "ffn-recovered"
    defaults = replace(QUICK, lora_rank=None, lora_alpha=None)  # a streamlined input: LLM-Streamline's rank
    record = recover_to_folder(str(streamlined), out, defaults, "cpu", str(data_root))
    assert (record["lora"]["rank"], record["lora"]["alpha"], record["settings"]["lora_rank"]) == (128, 256, 128)
    assert json.loads((out / models.STREAMLINE_FILE).read_text()) == \
        json.loads((streamlined / models.STREAMLINE_FILE).read_text())
    model, _tok = models.load(str(out))
    blocks = models.decoder_layers(model)
    replacement = next(i for i, b in enumerate(blocks) if isinstance(b, MLPBlock))
    assert any(name.endswith(f".{replacement}.mlp.up_proj") for name in record["lora"]["target_names"])
    (_, old), (_, new) = _zero_sets(streamlined), _zero_sets(out)
    name = next(n for n in old if f".{replacement}.mlp.down_proj" in n)
    assert not torch.equal(old[name].weight, new[name].weight)  # the replacement block was adapted too
    assert torch.isfinite(model(torch.arange(1, 17)[None]).logits).all()


def test_lora_defaults_follow_the_paper_behind_the_use():
    """DLP's recovery (Wanda's LoRA script: r 8, alpha 16) for pruned or dense inputs; LLM-Streamline's LoRA
    comparison (rank 128) for streamlined ones; alpha 2 x rank unless given; explicit values win."""
    assert (RecoverSettings().lora_rank, RecoverSettings().lora_alpha) == (None, None)
    pruned, streamlined = resolve_settings(RecoverSettings(), False), resolve_settings(RecoverSettings(), True)
    assert (pruned.lora_rank, pruned.lora_alpha) == (8, 16)
    assert (streamlined.lora_rank, streamlined.lora_alpha) == (128, 256)
    given = resolve_settings(RecoverSettings(lora_rank=4, lora_alpha=1.0), True)
    assert (given.lora_rank, given.lora_alpha) == (4, 1.0)


def test_trained_function_is_the_saved_one():
    """The masked LoRA forward and the merged weights compute the same thing, and the zeros stay put."""
    model = tiny_llama()
    targets = target_modules(model)
    with torch.no_grad():
        for linear in targets.values():
            linear.weight[:, ::2] = 0  # half of every weight pruned
    masks = keep_masks(targets)
    peft_model = attach_lora(model, list(targets), QUICK)
    mask_adapters(peft_model, masks)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)  # B starts at zero: give the update a value
    ids = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
        merged = merge_and_unload(peft_model, masks, torch.float32)
        saved = merged(input_ids=ids).logits
    torch.testing.assert_close(saved, trained, rtol=1e-4, atol=1e-4)
    for linear in target_modules(merged).values():
        assert bool((linear.weight[:, ::2] == 0).all()) and bool((linear.weight[:, 1::2] != 0).all())


def test_a_kept_weight_that_lands_on_zero_keeps_its_value():
    weight = torch.tensor([[1.0, 0.0, 2.0]])
    delta = torch.tensor([[-1.0, 5.0, 1.0]])
    keep = weight != 0
    assert merged_weight(weight, delta, keep, torch.float32).tolist() == [[1.0, 0.0, 3.0]]


def test_bad_settings_are_refused(base, tmp_path):
    for settings, fragment in ((RecoverSettings(steps=0), "--steps 0"), (RecoverSettings(lora_rank=0), "--lora-rank"),
                               (RecoverSettings(lr=0), "--lr"), (RecoverSettings(eval_windows=-1), "--eval-windows")):
        with pytest.raises(UserError, match=fragment):
            recover_to_folder(str(base / "tiny"), tmp_path / "never", settings, "cpu")
    assert not (tmp_path / "never").exists()


def test_cli_one_line_errors(base):
    assert_one_line_error(run_cli("recover", base / "tiny", "--out", base / "x", "--lora-rank", "0", env=ONE_THREAD),
                          "--lora-rank 0", "positive")
    assert_one_line_error(run_cli("recover", base / "tiny", "--out", base / "tiny", "--steps", "1", env=ONE_THREAD),
                          "already exists", "--force")


def test_default_held_out_windows_fit_the_shipped_data(data_root):
    """Offline, about 1 in 30 C4 documents is longer than 2048 SmolLM2 tokens; with byte tokens the same share is
    longer than 8192. Drawing the default 128 windows then looks at nearly every document: held-out text may skip
    only those a window was cut from, or the default 16 windows do not fit. A refusal names recover's option."""
    from dlp_deploy import data
    from dlp_deploy.testing import tiny_tokenizer

    tok, root = tiny_tokenizer(), data.data_dir(str(data_root))
    calibration = data.calibration("c4", tok, RecoverSettings().nsamples, 8192, 0, root)
    assert len(calibration.docs) > 900 and len(calibration.used) < 100  # looked at almost all, used few
    held_out = data.validation_windows(tok, calibration, RecoverSettings().eval_windows, 8192, root)
    assert held_out.ids.shape == (16, 8192) and not set(held_out.docs) & set(calibration.used)
    with pytest.raises(UserError, match="ask for fewer --eval-windows$"):
        data.validation_windows(tok, calibration, 1000, 8192, root, flag="--eval-windows")
