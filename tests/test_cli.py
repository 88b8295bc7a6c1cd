"""The CLI as a user meets it: bad input is one line on stderr, exit 2, and nothing written."""
import json
import os
import subprocess
import sys

import pytest


from dlp_deploy.testing import assert_one_line_error, run_cli as cli


@pytest.mark.parametrize("args,fragments", [
    (["--sparsity", "1.0"], ["outside [0, 1)"]),
    (["--sparsity", "-0.1"], ["outside [0, 1)"]),
    (["--sparsity", "0.5", "--alpha", "0.7"], ["--alpha 0.7 is outside"]),
])
def test_prune_rejects_bad_numbers(tiny_dir, tmp_path, args, fragments):
    out = tmp_path / "out"
    proc = cli("prune", tiny_dir, "--out", out, *args)
    assert_one_line_error(proc, *fragments)
    assert not out.exists()


def test_unknown_method_is_a_usage_error(tiny_dir, tmp_path):
    proc = cli("prune", tiny_dir, "--sparsity", "0.5", "--out", tmp_path / "o", "--method", "obs")
    assert proc.returncode == 2 and "magnitude" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_model_and_non_causal_lm(tmp_path):
    assert_one_line_error(cli("prune", tmp_path / "nope", "--sparsity", "0.5", "--out", tmp_path / "o"),
                          "not found")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 10, "d_model": 8}))
    proc = cli("prune", tmp_path / "enc", "--sparsity", "0.5", "--out", tmp_path / "o", "--allocation", "uniform",
               "--method", "magnitude")
    assert_one_line_error(proc, "not a causal LM")
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_force(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = cli("prune", tiny_dir, "--sparsity", "0.5", "--out", out, "--method", "magnitude",
               "--allocation", "uniform")
    assert_one_line_error(proc, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_offline_without_data_names_the_env_var(tiny_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DLP_DEPLOY_DATA"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-m", "dlp_deploy", "prune", str(tiny_dir), "--sparsity", "0.5",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(proc, "DLP_DEPLOY_DATA", "c4/c4_validation_2k.parquet")
    assert_one_line_error(cli("eval", tiny_dir, "--json", tmp_path / "e.json", "--data-dir", tmp_path / "none"),
                          "does not exist")
    assert not (tmp_path / "e.json").exists()


def test_calibration_windows_longer_than_documents(tiny_dir, tmp_path, data_root):
    proc = cli("prune", tiny_dir, "--sparsity", "0.5", "--out", tmp_path / "o", "--seqlen", "1000000",
               "--nsamples", "1", "--data-dir", data_root)
    assert_one_line_error(proc, "longer than --seqlen")
    assert not (tmp_path / "o").exists()


def test_prune_then_eval_end_to_end(tiny_dir, tmp_path, data_root):
    out = tmp_path / "p"
    proc = cli("prune", tiny_dir, "--sparsity", "0.5", "--method", "sparsegpt", "--allocation", "owl",
               "--nsamples", "4", "--seqlen", "32", "--data-dir", data_root, "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "pruning.json").read_text())
    assert report["settings"]["method"] == "sparsegpt" and len(report["layers"]) == 4
    proc = cli("eval", out, "--ppl", "wikitext2,ptb", "--seqlen", "64", "--max-windows", "3",
               "--data-dir", data_root, "--json", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    for corpus in ("wikitext2", "ptb"):
        # a random byte-level model over 256 symbols: perplexity near (not above a few times) the vocabulary
        assert 50 < result["perplexity"][corpus] < 2000
        assert result["perplexity_details"][corpus]["windows"] == 3
    assert result["weight_sparsity"] == pytest.approx(report["global_sparsity"])
    assert result["pruning"]["settings"]["allocation"] == "owl"


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_dir, tmp_path):
    """Writing the model fails with ENOSPC (as a 1.5B prune did on a full disk): one error line naming the file and
    what to do, exit 1, and neither the output folder nor its temp sibling is left behind."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    # the failing call of that prune: the streamed output's copy of the source checkpoint (prune/offload.py)
    code = ("import errno, shutil, sys\n"
            "copy = shutil.copyfile\n"
            "def full(src, dst, *a, **k):\n"
            "    if str(dst).endswith('.safetensors'):\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device', str(src), None, str(dst))\n"
            "    return copy(src, dst, *a, **k)\n"
            "shutil.copyfile = full\n"
            "from dlp_deploy.cli import main\n"
            f"sys.argv = ['dlp-deploy', 'prune', {str(tiny_dir)!r}, '--sparsity', '0.5', '--method', 'magnitude', "
            f"'--allocation', 'uniform', '--out', {str(out)!r}]\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "no space left on the device" in lines[0] and "model.safetensors" in lines[0]
    assert list(work.iterdir()) == []
