"""Out-of-core pruning (one decoder block in memory at a time, read from and written back to safetensors shards)
gives the same pruned weights as pruning the whole model in memory; --dtype, --device auto and what pruning.json
records about them."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dlp_deploy.models import decoder_layers, linear_modules
from dlp_deploy.prune import offload
from dlp_deploy.prune.offload import INDEX_FILE, StreamedModel
from dlp_deploy.prune.pipeline import PruneSettings, prune_model
from dlp_deploy.testing import assert_one_line_error, run_cli, tiny_llama, tiny_tokenizer

WINDOWS = torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(1))
# shards of ~40 kB: tiny blocks are ~110 kB, so blocks span shard boundaries and every shard holds pieces of several
SHARD = "40KB"


def save_sharded(folder, model, dtype=torch.float32):
    model.to(dtype).save_pretrained(folder, max_shard_size=SHARD)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def in_memory(folder, settings, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    result = prune_model(model, WINDOWS, settings)
    return model, result


def streamed(folder, out, settings, dtype=torch.float32):
    sm = StreamedModel(folder, AutoConfig.from_pretrained(folder), dtype, "cpu")
    out.mkdir()
    sm.begin_output(out)
    result = prune_model(sm.model, WINDOWS, settings, residency=sm)
    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype), result, sm


def assert_same_weights(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("settings", [
    PruneSettings(0.5, "wanda", "dlp", alpha=0.1),
    PruneSettings(0.5, "sparsegpt", "dlp", alpha=0.1),
    PruneSettings(0.6, "sparsegpt", "owl"),
    PruneSettings(0.5, "magnitude", "uniform"),
    PruneSettings(0.5, "wanda", "dlp", alpha=0.1, pattern="mixed:8"),
], ids=["wanda-dlp", "sparsegpt-dlp", "sparsegpt-owl", "magnitude", "wanda-mixed8"])
def test_streamed_prune_equals_in_memory_prune(tmp_path, settings):
    src = save_sharded(tmp_path / "src", tiny_llama(seed=3, num_hidden_layers=6))
    assert len(json.loads((src / INDEX_FILE).read_text())["weight_map"]) > 0
    ref, ref_result = in_memory(src, settings)
    got, result, _ = streamed(src, tmp_path / "out", settings)
    assert_same_weights(got, ref)  # bitwise: same activations, statistics and masks
    assert result.allocation.ratios == ref_result.allocation.ratios
    assert result.realized == ref_result.realized
    assert sum(r * n for r, n in zip(result.realized, result.block_sizes)) / sum(result.block_sizes) == \
        pytest.approx(settings.sparsity, abs=0.01)
    if settings.allocation != "uniform":
        assert max(result.allocation.ratios) - min(result.allocation.ratios) > 0.02


def test_output_is_sharded_like_the_input_and_keeps_bf16(tmp_path):
    src = save_sharded(tmp_path / "src", tiny_llama(seed=4), torch.bfloat16)
    settings = PruneSettings(0.5, "wanda", "dlp", alpha=0.1)
    # computed in fp32 (the CPU path without native bf16), stored back as the input's bf16
    got, _, _ = streamed(src, tmp_path / "out", settings, torch.float32)
    ref, _ = in_memory(src, settings, torch.float32)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == \
        sorted(p.name for p in src.glob("*.safetensors"))
    assert json.loads((tmp_path / "out" / INDEX_FILE).read_text())["weight_map"] == \
        json.loads((src / INDEX_FILE).read_text())["weight_map"]
    for shard in src.glob("*.safetensors"):
        header, _ = offload.shard_header(shard)
        out_header, _ = offload.shard_header(tmp_path / "out" / shard.name)
        assert header == out_header  # same tensors, dtypes, shapes and byte offsets
        assert {e["dtype"] for e in header.values()} == {"BF16"}
    stored = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert stored.dtype == torch.bfloat16
    ref.to(torch.bfloat16)
    assert_same_weights(stored, ref)
    untouched = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    for name, p in stored.named_parameters():  # only decoder-block Linear weights change, and only to zeros
        before = dict(untouched.named_parameters())[name]
        changed = p != before
        assert not changed.any() or (".layers." in name and "proj" in name and bool((p[changed] == 0).all()))


def test_only_one_block_is_resident_at_a_time(tmp_path, monkeypatch):
    src = save_sharded(tmp_path / "src", tiny_llama(seed=5, num_hidden_layers=5))
    resident, most = set(), [0]
    load, unload = StreamedModel.load, StreamedModel.unload

    def counting_load(self, index):
        load(self, index)
        resident.add(index)
        most[0] = max(most[0], len(resident))
        params = [p for i, b in enumerate(self.blocks) for p in b.parameters() if not p.is_meta]
        assert all(any(p is q for q in self.blocks[index].parameters()) for p in params)

    def counting_unload(self, index):
        unload(self, index)
        resident.discard(index)

    monkeypatch.setattr(StreamedModel, "load", counting_load)
    monkeypatch.setattr(StreamedModel, "unload", counting_unload)
    _, _, sm = streamed(src, tmp_path / "out", PruneSettings(0.5, "sparsegpt", "dlp", alpha=0.1))
    assert most[0] == 1 and not resident
    assert all(p.is_meta for b in sm.blocks for p in b.parameters())  # nothing left behind after the job


FAMILY_CASES = ["gemma2", "qwen3-layer-types", "phi3-sliding", "mistral-sliding"]


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_streamed_equals_in_memory_on_other_families(tmp_path, family):
    """Tied heads (Gemma), per-layer-type calls (Qwen3 layer_types, sliding windows), fused qkv (Phi-3)."""
    from test_replay import build

    src = save_sharded(tmp_path / "src", build(family))
    settings = PruneSettings(0.5, "wanda", "dlp", alpha=0.1)
    ref, ref_result = in_memory(src, settings)
    got, result, _ = streamed(src, tmp_path / "out", settings)
    assert_same_weights(got, ref)
    assert result.allocation.ratios == ref_result.allocation.ratios


# ---------------------------------------------------------------- the job: dtype, device, memory record

def job(src, out, data_root, **kw):
    from dlp_deploy.prune.to_folder import prune_to_folder

    return prune_to_folder(str(src), out, kw.pop("settings", PruneSettings(0.5, "wanda", "dlp", alpha=0.04)),
                           nsamples=4, seqlen=32, data_root=str(data_root), **kw)


def test_job_streams_by_default_and_records_dtype_device_memory(tmp_path, data_root):
    src = save_sharded(tmp_path / "src", tiny_llama(seed=6), torch.bfloat16)
    report = job(src, tmp_path / "streamed", data_root)
    saved = json.loads((tmp_path / "streamed" / "pruning.json").read_text())
    assert saved["loading"] == {"mode": "streamed", "why_in_memory": None}
    assert saved["device"] == "cpu"  # --device auto on a machine without CUDA
    assert saved["dtype"]["saved"] == "bf16" and saved["dtype"]["input_from"] == "weights"
    assert saved["dtype"]["compute"] == ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    assert saved["memory"]["rss_peak_bytes"] >= saved["memory"]["rss_start_bytes"] > 0
    assert saved["global_sparsity"] == pytest.approx(0.5, abs=0.01) == report["global_sparsity"]
    in_mem = job(src, tmp_path / "in-memory", data_root, stream=False)
    assert in_mem["loading"]["mode"] == "in-memory"
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype="auto")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory", dtype="auto")
    assert a.dtype == b.dtype == torch.bfloat16
    assert_same_weights(a, b)
    assert [x["realized"] for x in saved["layers"]] == [x["realized"] for x in in_mem["layers"]]


def test_explicit_dtype_computes_in_it_and_saves_in_the_input_dtype(tmp_path, data_root):
    src = save_sharded(tmp_path / "src", tiny_llama(seed=7))
    report = job(src, tmp_path / "out", data_root, dtype="bf16", settings=PruneSettings(0.5, "magnitude", "uniform"))
    assert report["dtype"]["compute"] == "bf16" and report["dtype"]["saved"] == "fp32"
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert out.dtype == torch.float32
    zeros = [float((m.weight == 0).float().mean()) for b in decoder_layers(out) for m in linear_modules(b).values()]
    assert zeros == pytest.approx([0.5] * len(zeros), abs=0.01)


def test_structured_falls_back_to_memory_and_says_why(tmp_path, data_root):
    from dlp_deploy.errors import UserError

    src = save_sharded(tmp_path / "src", tiny_llama(seed=8))
    settings = PruneSettings(0.3, "wanda", "uniform", structure="heads,channels")
    report = job(src, tmp_path / "out", data_root, settings=settings)
    assert report["loading"]["mode"] == "in-memory" and "structured" in report["loading"]["why_in_memory"]
    with pytest.raises(UserError, match="--stream: structured pruning changes tensor shapes"):
        job(src, tmp_path / "out2", data_root, settings=settings, stream=True)
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))


def test_device_auto_resolves_to_cuda_only_when_present(monkeypatch):
    from dlp_deploy.errors import UserError
    from dlp_deploy.prune.to_folder import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda:0")
    with pytest.raises(UserError, match="not a torch device"):
        resolve_device("gpu")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_every_tensor_the_pipeline_creates_follows_the_model_device(method):
    """No GPU here, so the check is the other way round: with the *default* device set to meta, any tensor the
    pipeline made without passing the model's device would land on meta and the run would fail; it must instead
    run on the CPU model exactly as it does without the default device."""
    settings = PruneSettings(0.5, method, "dlp", alpha=0.1)
    ref = tiny_llama(seed=9)
    prune_model(ref, WINDOWS[:2], settings)
    model = tiny_llama(seed=9)
    with torch.device("meta"):
        prune_model(model, WINDOWS[:2], settings)
    assert not any(p.is_meta for p in model.parameters())
    assert_same_weights(model, ref)


def test_cli_dtype_and_device_are_checked(tmp_path):
    src = save_sharded(tmp_path / "src", tiny_llama(seed=10))
    proc = run_cli("prune", src, "--out", tmp_path / "o", "--sparsity", "0.5", "--method", "magnitude",
                   "--allocation", "uniform", "--dtype", "fp8")
    assert_one_line_error(proc, "--dtype 'fp8'", "bf16")
    proc = run_cli("prune", src, "--out", tmp_path / "o", "--sparsity", "0.5", "--method", "magnitude",
                   "--allocation", "uniform", "--device", "cuda")
    if not torch.cuda.is_available():
        assert_one_line_error(proc, "no CUDA device")
    proc = run_cli("prune", src, "--out", tmp_path / "o", "--sparsity", "0.5", "--method", "magnitude",
                   "--allocation", "uniform")
    assert proc.returncode == 0, proc.stderr
    assert "streamed" in proc.stderr and "peak RSS" in proc.stderr
    assert json.loads((tmp_path / "o" / "pruning.json").read_text())["loading"]["mode"] == "streamed"


def test_random_model_in_bf16_shards_and_the_1_5b_shape(tmp_path, monkeypatch):
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlp_deploy.testing import RANDOM_SHAPES, TINY_CONFIG, random_llama_folder

    small = dict(RANDOM_SHAPES["llama-350m"], hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    monkeypatch.setitem(RANDOM_SHAPES, "small", small)
    folder = random_llama_folder(tmp_path / "m", "small", seed=1, dtype="bf16", max_shard_size="40KB")
    shards = list(folder.glob("*.safetensors"))
    assert len(shards) > 3 and (folder / INDEX_FILE).is_file()
    assert {e["dtype"] for s in shards for e in offload.shard_header(s)[0].values()} == {"BF16"}
    assert json.loads((folder / "random.json").read_text())["dtype"] == "bf16"
    with init_empty_weights():
        big = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **RANDOM_SHAPES["llama-1.5b"]}))
    assert 1.45e9 < sum(p.numel() for p in big.parameters()) < 1.6e9
