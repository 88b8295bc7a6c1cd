"""`dlp-deploy bench --replicate FILE` (issue 23): the earlier run's deployments re-measured with its settings on
the same machine kind, the new file naming it, each speedup marked replicated or not. Structure only: no times."""
import json

import pytest

from dlp_deploy.bench.replicate import mark_replication, replicate_bench_options
from dlp_deploy.bench.stats import replicated
from dlp_deploy.errors import UserError
from dlp_deploy.testing import assert_one_line_error, run_cli

SEQ_LEN = 64


def _row(label, ci=None, win=False, sparsity=0.5, aa=False):
    """A bench row with only what replication reads: the pair's identity and its speedup against dense."""
    return {"label": label, "engine": "onnxruntime", "kv_cache": "external", "cores": 1, "sparsity": sparsity,
            "source": {"pruning": {"global_sparsity": sparsity} if sparsity else None}, "win": win,
            "speedup": None if ci is None else {"decode": sum(ci) / 2, "decode_ci95": list(ci)},
            **({"aa_control": True} if aa else {})}


def test_replicated_flags_follow_the_two_intervals_and_both_wins():
    earlier = [_row("dense", [0.95, 1.05], sparsity=0.0), _row("dense (A/A)", [0.9, 1.1], aa=True, sparsity=0.0),
               _row("p70", [1.20, 1.40], win=True), _row("p50", [1.20, 1.30], win=True),
               _row("p30", [1.02, 1.12]), _row("gone", [1.5, 1.6], win=True)]
    now = [_row("dense", [0.97, 1.03], sparsity=0.0), _row("dense (A/A)", [0.92, 1.08], aa=True, sparsity=0.0),
           _row("p70", [1.30, 1.50], win=True),  # overlaps [1.20, 1.40], both wins: replicated
           _row("p50", [1.35, 1.50], win=True),  # both wins but apart from [1.20, 1.30]: not
           _row("p30", [1.10, 1.20], win=True),  # a win now, noise then: not
           _row("new", [1.5, 1.6], win=True)]    # not in the earlier run: nothing to compare
    summary = mark_replication(earlier, now)
    flags = {r["label"]: r.get("replication", {}).get("replicated") for r in now}
    assert flags == {"dense": None, "dense (A/A)": None, "p70": True, "p50": False, "p30": False, "new": None}
    assert now[2]["replication"]["earlier"] == {"decode": pytest.approx(1.30), "decode_ci95": [1.20, 1.40],
                                                "win": True}
    assert summary == {"pairs": 3, "earlier_wins": 2, "replicated": 1}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A dense and a 50%-pruned tiny deployment benched once, one process per pair and one run each."""
    import torch

    from dlp_deploy.export.deployment import export_deployment
    from dlp_deploy.models import decoder_layers, linear_modules
    from dlp_deploy.prune.masks import per_output_mask
    from dlp_deploy.testing import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("bench-replicate")
    for name, ratio in (("dense", 0.0), ("sparse50", 0.5)):
        model = tiny_llama(seed=11)
        with torch.no_grad():
            for block in decoder_layers(model):
                for m in linear_modules(block).values():
                    m.weight.masked_fill_(per_output_mask(m.weight.abs(), ratio), 0)
        model.save_pretrained(root / "hf" / name)
        tiny_tokenizer().save_pretrained(root / "hf" / name)
        export_deployment(str(root / "hf" / name), root / name, seq_len=SEQ_LEN, validate=False)
    out = root / "first" / "bench.json"
    proc = run_cli("bench", root / "dense", root / "sparse50", "--engine", "onnxruntime", "--json", out,
                   "--prompt-len", "4", "--gen-len", "4", "--runs", "1", "--warmup", "0", "--cores", "1",
                   "--rounds", "1")
    assert proc.returncode == 0, proc.stderr
    return out


def test_bench_replicate_remeasures_the_earlier_pairs_and_marks_them(earlier_run, tmp_path):
    first = json.loads(earlier_run.read_text())
    out = tmp_path / "again.json"
    proc = run_cli("bench", "--replicate", earlier_run.parent, "--json", out)  # the run folder, as a sweep's
    assert proc.returncode == 0, proc.stderr
    again = json.loads(out.read_text())
    assert again["replicates"] == str(earlier_run.resolve())
    assert again["provenance"]["replicates"] == str(earlier_run.resolve())
    assert again["settings"] == first["settings"]  # its deployments, engines, cores, runs and rounds, not defaults
    assert first["settings"]["rounds"] == 1 and first["settings"]["runs"] == 1
    assert sorted(r["label"] for r in again["results"]) == ["dense", "dense (A/A)", "sparse50"]
    by_label = {r["label"]: r for r in again["results"]}
    old = {r["label"]: r for r in first["results"]}
    assert "replication" not in by_label["dense"] and "replication" not in by_label["dense (A/A)"]
    mark = by_label["sparse50"]["replication"]
    # the flag is the rule applied to the two files' own numbers
    assert mark["replicated"] == replicated(old["sparse50"], by_label["sparse50"])
    assert mark["earlier"]["decode"] == old["sparse50"]["speedup"]["decode"]
    assert mark["earlier"]["decode_ci95"] == old["sparse50"]["speedup"].get("decode_ci95")  # none from 1 process
    assert mark["earlier"]["win"] == old["sparse50"]["win"]
    assert again["replication"] == {"pairs": 1, "earlier_wins": int(old["sparse50"]["win"]),
                                    "replicated": int(mark["replicated"])}
    assert len(by_label["sparse50"]["rounds"]) == 1 and len(by_label["sparse50"]["decode_ms_runs"]) == 1


def test_a_file_from_before_settings_were_recorded_replicates_with_the_rows_settings(earlier_run, tmp_path):
    first = json.loads(earlier_run.read_text())
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in first.items() if k != "settings"}))
    _, _, options = replicate_bench_options(old)
    assert options == {**first["settings"], "order": "abba", "order_seed": 0}


def test_bench_replicate_refuses_another_machine_kind(earlier_run, tmp_path):
    from dlp_deploy.provenance import machine_info

    data = json.loads(earlier_run.read_text())
    data["machine"]["cpu_model"] = "Intel Xeon (another machine)"
    moved = tmp_path / "elsewhere.json"
    moved.write_text(json.dumps(data))
    out = tmp_path / "again.json"
    proc = run_cli("bench", "--replicate", moved, "--json", out)
    assert_one_line_error(proc, "Intel Xeon (another machine)", machine_info()["cpu_model"], "same kind")
    assert not out.exists()  # refused before anything was measured or written


def test_bench_replicate_bad_inputs(earlier_run, tmp_path):
    with pytest.raises(UserError, match="not a results file of `dlp-deploy bench`"):
        replicate_bench_options(tmp_path / "none.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds 0 bench results files"):
        replicate_bench_options(empty)
    data = json.loads(earlier_run.read_text())
    data["settings"]["deployments"][0] = str(tmp_path / "deleted")
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps(data))
    with pytest.raises(UserError, match="no longer a deployment folder"):
        replicate_bench_options(gone)
    proc = run_cli("bench", earlier_run.parent.parent / "dense", "--replicate", earlier_run, "--json",
                   tmp_path / "x.json")
    assert_one_line_error(proc, "not both")
