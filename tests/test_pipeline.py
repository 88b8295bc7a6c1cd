import json

import pytest
import torch

from dlp_deploy.models import decoder_layers, linear_modules, load
from dlp_deploy.prune.masks import per_output_mask, pruned_count
from dlp_deploy.prune.pipeline import PruneSettings, capture_block_inputs, prune_model, run_block
from dlp_deploy.prune.scores import ActivationNorms, wanda_scores
from dlp_deploy.testing import tiny_llama

WINDOWS = torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(1))


def reference_sequential_wanda(model, windows, ratio):
    """Wanda the slow, obvious way: for each block, run the *whole model* (earlier blocks already pruned) and
    hook that block's linears. Agrees with the pipeline only if block inputs and their kwargs are captured right."""
    for block in decoder_layers(model):
        modules = linear_modules(block)
        norms = {n: ActivationNorms(m.in_features) for n, m in modules.items()}
        hooks = [m.register_forward_hook(lambda _m, i, _o, s=norms[n]: s.add_batch(i[0])) for n, m in modules.items()]
        with torch.no_grad():
            for w in windows:
                model(w.unsqueeze(0), use_cache=False)
        for h in hooks:
            h.remove()
        for n, m in modules.items():
            m.weight.data = m.weight.data.masked_fill(per_output_mask(wanda_scores(m.weight, norms[n].sq_norm), ratio), 0)


def test_sequential_pipeline_equals_whole_model_reference():
    ours, ref = tiny_llama(seed=3), tiny_llama(seed=3)
    prune_model(ours, WINDOWS, PruneSettings(0.5, "wanda", "uniform"))
    reference_sequential_wanda(ref, WINDOWS, 0.5)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a == 0, b == 0)
        assert torch.allclose(a, b)


def test_captured_block_inputs_reproduce_the_model_forward():
    model = tiny_llama(seed=4)
    inputs = capture_block_inputs(model, WINDOWS[:2])
    assert all("position_embeddings" in kw for kw in inputs.block_kwargs)  # what the classic Catcher dropped
    for index, block in enumerate(decoder_layers(model)):
        run_block(block, index, inputs)
    with torch.no_grad():
        expected = model.model(WINDOWS[:2]).last_hidden_state
    got = model.model.norm(torch.cat(inputs.hidden))
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("allocation", ["uniform", "owl", "dlp"])
def test_realised_sparsity_matches_target(method, allocation):
    model = tiny_llama(seed=5, hidden_size=128, intermediate_size=256)
    untouched = {n: p.clone() for n, p in model.named_parameters() if "layers." not in n or "norm" in n}
    result = prune_model(model, WINDOWS, PruneSettings(0.6, method, allocation, alpha=0.1))
    sizes = result.block_sizes
    realised = sum(r * n for r, n in zip(result.realized, sizes)) / sum(sizes)
    assert realised == pytest.approx(0.6, abs=0.005)
    if allocation != "uniform":
        assert max(result.allocation.ratios) - min(result.allocation.ratios) > 0.05
    for block, ratio in zip(decoder_layers(model), result.allocation.ratios):
        for m in linear_modules(block).values():
            if method != "sparsegpt":  # SparseGPT picks its mask per 128-column block
                assert torch.all((m.weight == 0).sum(1) == pruned_count(m.in_features, ratio))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in untouched.items()), "embeddings, norms, lm_head never pruned"


def test_dlp_gives_lower_sparsity_to_higher_importance_layers():
    model = tiny_llama(seed=6, num_hidden_layers=6)
    result = prune_model(model, WINDOWS, PruneSettings(0.5, "wanda", "dlp", alpha=0.1, reducer="median"))
    importance, ratios = result.allocation.extras["I"], result.allocation.ratios
    order = sorted(range(6), key=lambda i: importance[i])
    assert all(ratios[a] >= ratios[b] for a, b in zip(order, order[1:]))


def test_prune_job_writes_reloadable_folder(tiny_dir, tmp_path, data_root):
    from dlp_deploy.prune.to_folder import prune_to_folder

    out = tmp_path / "pruned"
    report = prune_to_folder(str(tiny_dir), out, PruneSettings(0.5, "wanda", "dlp", alpha=0.04), nsamples=4,
                             seqlen=32, data_root=str(data_root))
    saved = json.loads((out / "pruning.json").read_text())
    assert saved["global_sparsity"] == pytest.approx(0.5, abs=0.005)
    assert len(saved["layers"]) == 4 and {"target", "realized", "S", "I"} <= set(saved["layers"][0])
    assert saved["calibration"]["source"].startswith("local c4") and saved["seed"] == 0
    assert {"cpu_model", "isa", "usable_cores"} <= set(saved["provenance"]["machine"])
    model, _ = load(str(out))
    zeros = sum(int((m.weight == 0).sum()) for b in decoder_layers(model) for m in linear_modules(b).values())
    total = sum(m.weight.numel() for b in decoder_layers(model) for m in linear_modules(b).values())
    assert zeros / total == pytest.approx(report["global_sparsity"])
    assert not list(tmp_path.glob(".pruned*")), "temp folder left behind"
