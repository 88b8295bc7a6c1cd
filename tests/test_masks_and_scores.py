import pytest
import torch

from dlp_deploy.prune.masks import per_layer_mask, per_output_mask, pruned_count
from dlp_deploy.prune.scores import ActivationNorms, magnitude_scores, wanda_scores
from dlp_deploy.prune.sparsegpt import Hessian, sparsegpt_prune


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 0.5, 0.9, 0.99])
def test_per_output_mask_prunes_exact_count_in_every_row(ratio):
    scores = torch.rand(33, 70)
    mask = per_output_mask(scores, ratio)
    assert torch.all(mask.sum(dim=1) == pruned_count(70, ratio))
    # the pruned ones are the lowest of their row
    for row, m in zip(scores, mask):
        if m.any() and (~m).any():
            assert row[m].max() <= row[~m].min()


@pytest.mark.parametrize("ratio", [0.25, 0.6])
def test_per_layer_mask_prunes_exact_count_of_lowest(ratio):
    scores = torch.rand(40, 50)
    mask = per_layer_mask(scores, ratio)
    assert int(mask.sum()) == pruned_count(2000, ratio)
    assert scores[mask].max() <= scores[~mask].min()


def test_wanda_scores_weight_by_input_norm():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norms = ActivationNorms(2)
    norms.add_batch(torch.tensor([[[3.0, 0.0], [4.0, 1.0]]]))  # ||x_0||^2 = 25, ||x_1||^2 = 1
    assert norms.sq_norm.tolist() == [25.0, 1.0]
    assert wanda_scores(w, norms.sq_norm).tolist() == [[5.0, 2.0], [15.0, 0.5]]
    assert torch.equal(magnitude_scores(w), w.abs())


def test_activation_norms_average_over_samples():
    norms = ActivationNorms(1)
    norms.add_batch(torch.full((1, 4, 1), 1.0))  # ||x||^2 = 4
    norms.add_batch(torch.full((1, 4, 1), 2.0))  # 16
    assert norms.sq_norm.item() == pytest.approx(10.0)


def _reconstruction_error(w, w_pruned, x):
    return float(((x @ w.t() - x @ w_pruned.t()) ** 2).sum())


def test_sparsegpt_reconstructs_better_than_magnitude():
    torch.manual_seed(0)
    cols = 256
    # correlated inputs with uneven scales: where an OBS update has something to recover
    mix = torch.randn(cols, cols) / cols ** 0.5 + torch.eye(cols)
    x = (torch.randn(4, 128, cols) * torch.linspace(0.1, 3, cols)) @ mix
    w = torch.randn(96, cols)
    H = Hessian(cols)
    norms = ActivationNorms(cols)
    for sample in x:
        H.add_batch(sample.unsqueeze(0))
        norms.add_batch(sample.unsqueeze(0))
    flat = x.reshape(-1, cols)
    w_sgpt = sparsegpt_prune(w, H.H, 0.5, per_output_mask)
    w_mag = w.masked_fill(per_output_mask(magnitude_scores(w), 0.5), 0)
    w_wanda = w.masked_fill(per_output_mask(wanda_scores(w, norms.sq_norm), 0.5), 0)
    assert float((w_sgpt == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    err = {k: _reconstruction_error(w, v, flat) for k, v in
           {"sparsegpt": w_sgpt, "magnitude": w_mag, "wanda": w_wanda}.items()}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err
