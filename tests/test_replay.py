"""Calibration replays each decoder block with its own call. On models whose layers differ (sliding vs global
attention, per-layer-type masks and RoPE), replaying every block with layer 0's call silently feeds the wrong
activations to Wanda, DLP's statistics and SparseGPT's Hessians; here the block-by-block replay of each family's
tiny random model must equal the model's own forward."""
import pytest
import torch
import transformers as T

from dlp_deploy.models import decoder_layers
from dlp_deploy.prune.pipeline import BlockInputs, capture_block_inputs, run_block

WINDOWS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, head_dim=16, pad_token_id=0, bos_token_id=0,
            eos_token_id=0)
MIXED = ["sliding_attention", "full_attention"] * 2

FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "mistral-sliding": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 16}),
    "qwen2-mixed-layers": (T.Qwen2Config, T.Qwen2ForCausalLM,
                           {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}),
    "qwen3-layer-types": (T.Qwen3Config, T.Qwen3ForCausalLM,
                          {"layer_types": MIXED, "sliding_window": 16, "use_sliding_window": True}),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"sliding_window": 16}),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"sliding_window": 16, "sliding_window_pattern": 2}),
    "phi3-sliding": (T.Phi3Config, T.Phi3ForCausalLM, {"sliding_window": 16}),
}


def build(family):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**BASE, **extra)).eval()


def replay(model, inputs: BlockInputs) -> torch.Tensor:
    with torch.no_grad():
        for index, block in enumerate(decoder_layers(model)):
            run_block(block, index, inputs)
    return torch.cat(inputs.hidden)


def relative_error(model, replayed: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(WINDOWS, output_hidden_states=True).hidden_states[-1]  # after the final norm
        got = model.model.norm(replayed)
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_block_replay_equals_the_model_forward(family):
    model = build(family)
    with torch.no_grad():
        inputs = capture_block_inputs(model, WINDOWS)
    assert relative_error(model, replay(model, inputs)) < 1e-5


@pytest.mark.parametrize("family", ["gemma2", "qwen3-layer-types"])
def test_replaying_layer_zeros_call_everywhere_would_be_wrong(family):
    """The control: the old behaviour (one call for all blocks) departs from the forward on these models, so the
    test above can fail."""
    model = build(family)
    with torch.no_grad():
        inputs = capture_block_inputs(model, WINDOWS)
    inputs.block_kwargs = [inputs.block_kwargs[0]] * len(inputs.block_kwargs)
    assert relative_error(model, replay(model, inputs)) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_nm_and_structured_prune_every_family(family):
    """Both new forms on each family's tiny model: target met, model still runs; a fused qkv (Phi-3) is refused for
    structured pruning with the reason, not pruned wrong."""
    from dlp_deploy.errors import UserError
    from dlp_deploy.prune.pipeline import PruneSettings, prune_model

    for settings, target in ((PruneSettings(0.5, "wanda", "dlp", alpha=0.15, pattern="mixed:8"), 0.5),
                             (PruneSettings(0.3, "wanda", "dlp", alpha=0.1, structure="heads,channels"), 0.3)):
        model = build(family)
        if settings.structure and family.startswith("phi3"):
            with pytest.raises(UserError, match="fused self_attn.qkv_proj"):
                prune_model(model, WINDOWS, settings)
            continue
        result = prune_model(model, WINDOWS, settings)
        realised = sum(r * n for r, n in zip(result.realized, result.block_sizes)) / sum(result.block_sizes)
        assert realised == pytest.approx(target, abs=0.01)
        with torch.no_grad():
            assert torch.isfinite(model(WINDOWS).logits).all()
