"""DSA's allocation as its authors compute it (lliai/DSA): their ratio code transcribed below, compared with our
`--allocation dsa` and the expression mappings on fixed statistics and through the real pipeline."""
import math

import numpy as np
import pytest
import torch

from dlp_deploy.errors import UserError
from dlp_deploy.prune.allocate import allocate, get_allocator, owl_ratios
from dlp_deploy.prune.expressions import DSA_LAMBDA, dsa_mapping, owl_mapping, parse
from dlp_deploy.prune.pipeline import PruneSettings, prune_model
from dlp_deploy.testing import tiny_llama

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7))


# ---- the authors' code, transcribed ----------------------------------------------------------------------------

def authors_layer_value(w_metric: torch.Tensor, post=(torch.atan, torch.asin)) -> float:
    """lliai/DSA lib/autolayer.py, LayerEngine.compute_importance for "W:(ABSLOG)-(VAR)-(ATAN,ASIN)-(7)" (their
    README's LLaMA command): stick op element_wise_abslog_op, deform op torch.var, post ops torch.atan, torch.asin
    (`post`: _POST_OPS entries), then the special values."""
    W = w_metric.clone()
    W[W == 0] = 1  # element_wise_abslog_op
    W = torch.abs(W)
    W = torch.log(W)
    W = torch.var(W)  # "VAR": torch.var
    for operation in post:  # "ATAN", "ASIN"
        W = operation(W)
    value = W.item() if W.numel() == 1 else torch.mean(W).item()
    if math.isnan(value):
        return 0.0
    elif math.isinf(value):
        return -1
    return value


def authors_post_ops(values) -> list[float]:
    """compute_importance's post ops and special values alone, on each layer's number (a 0-d float32 tensor, as
    torch.var returns for float32 scores)."""
    out = []
    for v in values:
        value = torch.asin(torch.atan(torch.tensor(v, dtype=torch.float32))).item()
        out.append(0.0 if math.isnan(value) else -1 if math.isinf(value) else value)
    return out


def authors_ratios(all_layer_ratio, sparsity_ratio: float, Lamda: float = 0.08) -> list[float]:
    """lliai/DSA lib/prune_all.py, test_prune_wanda_outlier_use_var: from `all_layer_ratio` (each layer's
    compute_importance) to each layer's `layer_sparsity_ratio`, line for line."""
    # 0-1 scale
    all_layer_ratio = np.array(all_layer_ratio)
    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) / (all_layer_ratio.max() - all_layer_ratio.min())

    all_layer_ratio = [1 - item for item in all_layer_ratio]
    all_layer_ratio = np.array(all_layer_ratio)

    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (
        1 / (all_layer_ratio.max() - all_layer_ratio.min()) * Lamda * 2
    )

    all_layer_ratio = (
        all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)
    )
    out = []
    for i in range(len(all_layer_ratio)):  # the pruning loop
        layer_sparsity_ratio = 1 - all_layer_ratio[i]
        if layer_sparsity_ratio <= 0:
            layer_sparsity_ratio = 0.01
        out.append(layer_sparsity_ratio)
    return out


# ---- fixed statistics ------------------------------------------------------------------------------------------

# var(log|Wanda scores|) per layer; 2.0 has atan(2) > 1, so asin gives NaN and the authors' code 0
E = [0.31, 1.2, 0.8, 2.0, 1.5, 0.05, 0.97, 1.31]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_dsa_ratios_equal_the_authors_on_fixed_statistics(sparsity):
    ours = allocate("dsa", E, [1] * len(E), sparsity)
    theirs = authors_ratios(authors_post_ops(E), sparsity, Lamda=0.08)
    assert ours.ratios == pytest.approx(theirs, abs=1e-6)
    assert ours.correction == pytest.approx(0.0, abs=1e-12) and ours.clipped == 0
    assert ours.extras["V"][3] == 0.0  # the NaN layer, as theirs
    assert max(ours.ratios) - min(ours.ratios) == pytest.approx(2 * DSA_LAMBDA)


def test_the_dsa_mapping_is_the_authors_on_any_vector():
    rng = np.random.default_rng(0)
    for lam in (0.02, 0.08, 0.15):
        v = rng.normal(size=12)
        assert dsa_mapping(v, 0.6, lam).tolist() == pytest.approx(authors_ratios(v, 0.6, lam), abs=1e-12)
        # the expression form with the same post-ops, mapping and spread is the same allocation
        assert allocate("expr:var>atan,asin@raw", list(v), [1] * 12, 0.6, alpha=lam).ratios == pytest.approx(
            authors_ratios(authors_post_ops(v), 0.6, lam), abs=1e-6)
        # higher value, more sparsity; OWL's mapping is the mirror image about p
        assert np.argmax(dsa_mapping(v, 0.6, lam)) == np.argmax(v)
        assert (dsa_mapping(v, 0.6, lam) - 0.6).tolist() == pytest.approx((0.6 - owl_mapping(v, 0.6, lam)).tolist())
    assert owl_mapping(v, 0.5, 0.08).tolist() == owl_ratios(v, 0.5, 0.08).ratios


def test_mapping_and_domains_are_named_in_the_expression():
    e = parse("abslog>var>atan,asin")
    assert (e.mapping, e.domains, str(e)) == ("dsa", "scaled", "abslog>var>atan,asin")
    e = parse("ABSLOG>VAR>ATAN,ASIN@owl@raw")
    assert (e.mapping, e.domains, str(e)) == ("owl", "raw", "abslog>var>atan,asin@owl@raw")
    assert parse(str(e)) == e
    for bad in ("mean@nope", "mean@owl@dsa", "mean@raw@raw"):
        with pytest.raises(UserError, match="at most one mapping"):
            parse(bad)
    assert get_allocator("dsa").mapping == "dsa" and not get_allocator("dsa").uses_alpha
    assert get_allocator("expr:mean").mapping == "dsa" and get_allocator("expr:mean@owl").mapping == "owl"


# ---- through the real pipeline ---------------------------------------------------------------------------------

def _authors_layer_values(model, post=(torch.atan, torch.asin)) -> list[float]:
    """Each block's compute_importance on |W| * sqrt(scaler_row) (Wanda's metric, their
    test_prune_wanda_outlier_use_var), the activations taken with forward hooks on the dense model."""
    blocks = model.model.layers
    sq, n = {}, {}

    def hook(name):
        def run(_, inp, __):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            sq[name] = sq.get(name, 0) + x.pow(2).sum(0)
            n[name] = n.get(name, 0) + 1
        return run

    linears = {(i, name): m for i, b in enumerate(blocks) for name, m in b.named_modules()
               if isinstance(m, torch.nn.Linear)}
    handles = [m.register_forward_hook(hook(key)) for key, m in linears.items()]
    with torch.no_grad():
        for window in WINDOWS:  # one sample at a time, as theirs
            model(window.unsqueeze(0))
    for h in handles:
        h.remove()
    values = []
    for i in range(len(blocks)):
        metric = [torch.abs(m.weight.data) * torch.sqrt((sq[k] / n[k]).reshape(1, -1))
                  for k, m in linears.items() if k[0] == i]
        values.append(authors_layer_value(torch.cat([torch.flatten(x) for x in metric]), post))
    return values


def test_through_the_pipeline_the_ratios_are_the_authors_on_a_tiny_llama():
    # A random tiny LLaMA's blocks all have var(log|Wanda score|) > tan(1) (about 4.7 here), where DSA's published
    # atan,asin gives NaN, hence 0, in every block: their code then divides 0 by 0 (and fails in int()), ours
    # gives the uniform p. So the published statistic is checked before its post-ops, and the whole chain with
    # ATAN alone, their "W:(ABSLOG)-(VAR)-(ATAN)", mapped with lambda 0.08.
    model = tiny_llama(seed=21, num_hidden_layers=6)
    variances = _authors_layer_values(model, post=())
    theirs = authors_ratios(_authors_layer_values(model, post=(torch.atan,)), 0.5, Lamda=0.08)
    dsa = prune_model(tiny_llama(seed=21, num_hidden_layers=6), WINDOWS, PruneSettings(0.5, "wanda", "dsa"))
    assert dsa.allocation.extras["E"] == pytest.approx(variances, rel=1e-5)
    assert min(variances) > math.tan(1) and dsa.allocation.extras["V"] == [0.0] * 6
    assert dsa.allocation.ratios == pytest.approx([0.5] * 6)
    atan = prune_model(model, WINDOWS, PruneSettings(0.5, "wanda", "expr:abslog>var>atan@raw", alpha=DSA_LAMBDA))
    assert atan.allocation.ratios == pytest.approx(theirs, abs=1e-5)
    assert max(theirs) - min(theirs) == pytest.approx(0.16)


def test_pruning_json_records_the_mapping(tiny_dir, tmp_path):
    from dlp_deploy.prune.to_folder import prune_to_folder

    for allocation, alpha, mapping in (("dsa", None, "dsa"), ("expr:median@owl", 0.05, "owl"), ("dlp", 0.05, None)):
        report = prune_to_folder(str(tiny_dir), tmp_path / allocation.replace(":", "_").replace("@", "_"),
                                 PruneSettings(0.5, "wanda", allocation, alpha), nsamples=4, seqlen=32)
        assert report["allocation_mapping"] == mapping
    assert "W:(ABSLOG)-(VAR)-(ATAN,ASIN)" in get_allocator("dsa").source


# ---- the search uses the mapping of the allocation it saves ----------------------------------------------------

def test_search_scores_and_saves_with_its_mapping_and_old_searches_are_owl(tiny_dir, tmp_path, monkeypatch):
    import json

    from dlp_deploy.prune.search import SearchSettings, run_search

    monkeypatch.setenv("DLP_DEPLOY_CACHE", str(tmp_path / "cache"))
    tiny = dict(nsamples=4, seqlen=32, val_windows=2, population=4, top_k=2)
    out = tmp_path / "old"
    result = run_search(SearchSettings(str(tiny_dir), 0.5, mapping="owl", **tiny), out, candidates=2)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["expression"] for h in history] == ["median>neg", "outlier"]  # DLP and OWL under OWL's mapping
    assert result["mapping"] == "owl" and get_allocator("old").mapping == "owl"
    # a search and a saved allocation from before the mapping was recorded: both were OWL's
    for path in (out / "search.json", tmp_path / "cache" / "allocations" / "old.json"):
        record = json.loads(path.read_text())
        (record.get("settings") or record).pop("mapping")
        path.write_text(json.dumps(record))
    assert get_allocator("old").mapping == "owl"
    with pytest.raises(UserError, match="other settings \\(mapping\\)"):
        run_search(SearchSettings(str(tiny_dir), 0.5, **tiny), out, candidates=2)
    again = run_search(SearchSettings(str(tiny_dir), 0.5, mapping="owl", **tiny), out, candidates=2)
    assert again["new_candidates"] == 0
    with pytest.raises(UserError, match="--mapping nope"):
        run_search(SearchSettings(str(tiny_dir), 0.5, mapping="nope", **tiny), tmp_path / "x", candidates=2)
