"""DLP's overhead over uniform allocation: the dense statistics pass, timed on SmolLM2 (small calibration)."""
import pytest

from dlp_deploy import data
from dlp_deploy.models import load
from dlp_deploy.prune.pipeline import PruneSettings, prune_model

NSAMPLES, SEQLEN = 4, 256


@pytest.fixture(scope="module")
def windows(smollm2_dir, data_root):
    _, tok = load(str(smollm2_dir))
    return data.calibration("c4", tok, NSAMPLES, SEQLEN, 0, data_root).windows


@pytest.mark.parametrize("allocation", ["uniform", "dlp"])
def test_prune_wanda(benchmark, smollm2_dir, windows, allocation):
    benchmark.group = f"prune SmolLM2 wanda 50% ({NSAMPLES}x{SEQLEN} calibration tokens)"
    benchmark.extra_info["allocation"] = allocation

    def setup():
        model, _ = load(str(smollm2_dir))
        return (model,), {}

    def prune(model):
        return prune_model(model, windows, PruneSettings(0.5, "wanda", allocation, alpha=0.04))

    result = benchmark.pedantic(prune, setup=setup, rounds=3)
    assert abs(sum(result.realized) / len(result.realized) - 0.5) < 0.005
