import numpy as np
import pytest
import torch

from dlp_deploy.prune.allocate import (REDUCERS, allocate, default_dlp_alpha, dlp_ratios,
                                       match_weighted_mean, owl_outlier_ratio, owl_ratios)

STATS = [0.8, 1.0, 1.3, 0.9, 2.0, 1.1]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("alpha", [0.02, 0.15])
def test_dlp_alg1_properties(p, alpha):
    r = np.array(dlp_ratios(STATS, p, alpha).ratios)
    assert r.mean() == pytest.approx(p, abs=1e-12)
    # d spans [0, 2a], so the ratios span exactly 2a and stay within p +- 2a (p +- a only if mean(d) == a)
    assert r.max() - r.min() == pytest.approx(2 * alpha)
    assert np.all(r >= p - 2 * alpha - 1e-12) and np.all(r <= p + 2 * alpha + 1e-12)
    importance = 1 - np.array(STATS) / sum(STATS)
    order = np.argsort(importance)
    assert np.all(np.diff(r[order]) <= 1e-12), "higher importance must get lower sparsity"


def test_dlp_matches_hand_computation():
    S = [1.0, 2.0, 3.0, 4.0]
    # I = 1 - S/10 = .9 .8 .7 .6 ; d = (I - .6)/.3 * 2*.1 = .2 .1333 .0667 0 ; mean(d) = .1
    alloc = dlp_ratios(S, 0.5, 0.1)
    assert alloc.ratios == pytest.approx([0.4, 0.5 - 1 / 30, 0.5 + 1 / 30, 0.6])
    assert alloc.extras["I"] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert alloc.extras["S"] == S


def test_owl_matches_hand_computation():
    D = [0.01, 0.03, 0.02, 0.05]
    # d = (D - .01)/.04 * .16 = 0 .08 .04 .16 ; mean .07 ; R = .6 + .07 - d
    assert owl_ratios(D, 0.6, 0.08).ratios == pytest.approx([0.67, 0.59, 0.63, 0.51])


def test_owl_outlier_ratio_counts_scores_above_m_times_mean():
    scores = torch.tensor([1.0] * 98 + [100.0, 100.0])  # mean 2.98, threshold 14.9
    assert owl_outlier_ratio(scores, 5.0) == pytest.approx(0.02)


def test_reducers():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0])
    assert REDUCERS["median"](x) == 3.0 and REDUCERS["mean"](x) == 4.0 and REDUCERS["max"](x) == 10.0
    assert REDUCERS["sum"](x) == 20.0 and REDUCERS["var"](x) == pytest.approx(float(x.var()))


def test_weighted_mean_corrects_for_unequal_sizes_and_clipping():
    ratios, sizes = [0.95, 0.99, 0.3, 0.5], [100, 10, 1000, 50]
    out, correction, clipped = match_weighted_mean(ratios, sizes, 0.6)
    assert np.all(out >= 0) and np.all(out <= 0.99)
    assert (out * sizes).sum() / sum(sizes) == pytest.approx(0.6, abs=1e-9)
    assert correction != 0 and clipped == 0


def test_alpha_that_overflows_is_clipped_and_reported():
    alloc = allocate("dlp", STATS, [10] * len(STATS), 0.9, alpha=0.3)
    assert alloc.clipped > 0
    assert max(alloc.ratios) <= 0.99 and min(alloc.ratios) >= 0
    assert np.mean(alloc.ratios) == pytest.approx(0.9, abs=1e-9)


def test_uniform_equal_sizes_needs_no_correction():
    alloc = allocate("uniform", [0.0] * 5, [7] * 5, 0.5)
    assert alloc.ratios == [0.5] * 5 and alloc.correction == 0.0


# DLP (ICML 2025), Appendix G, Table 19 "Hyperparameter settings for different sparsity levels", copied by hand
# so that an edit to the module's own table cannot pass unnoticed.
APPENDIX_G_TABLE_19 = {0.1: 0.06, 0.2: 0.02, 0.3: 0.04, 0.4: 0.02, 0.5: 0.04, 0.6: 0.10, 0.7: 0.15, 0.8: 0.12}


def test_default_alpha_follows_appendix_g():
    for p, a in APPENDIX_G_TABLE_19.items():
        assert default_dlp_alpha(p) == a
    assert default_dlp_alpha(0.9) == 0.12 and default_dlp_alpha(0.65) == 0.10
