import pytest

from dlp_deploy import data
from dlp_deploy.errors import UserError
from dlp_deploy.testing import tiny_tokenizer


def test_wikitext_rows_follow_the_hub_layout():
    raw = " \r\n = Title = \r\n \r\n Body line .\r\n"
    assert data.wikitext_rows_from_raw(raw) == ["", " = Title = \n", "", " Body line .\n"]


def test_offline_corpora_load(data_root):
    wiki = data.eval_text("wikitext2", data_root)
    assert wiki.text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is")  # rows joined by "\\n\\n"
    assert "\r" not in wiki.text
    ptb = data.eval_text("ptb", data_root)
    assert ptb.text.startswith("no it was n't black monday but while")
    c4 = data.eval_text("c4", data_root)
    assert c4.max_windows == 256 and "1000-1999" in c4.source


def test_c4_calibration_is_seeded_and_from_calibration_docs(data_root):
    tok = tiny_tokenizer()
    a = data.calibration("c4", tok, 4, 64, 0, data_root)
    b = data.calibration("c4", tok, 4, 64, 0, data_root)
    c = data.calibration("c4", tok, 4, 64, 1, data_root)
    assert a.windows.shape == (4, 64) and (a.windows == b.windows).all() and not (a.windows == c.windows).all()
    calib_text = " ".join(data.c4_documents(data_root, data.C4_CALIB_DOCS, "train"))
    assert tok.decode(a.windows[0]) in calib_text


def test_bad_data_inputs(tmp_path, data_root):
    with pytest.raises(UserError, match="DLP_DEPLOY_DATA"):
        data.eval_text("wikitext2", tmp_path)
    with pytest.raises(UserError, match="smaller --seqlen"):
        data.calibration("c4", tiny_tokenizer(), 2, 10**6, 0, data_root)
    with pytest.raises(UserError, match="use --calib c4"):
        data.calibration("wikitext2", tiny_tokenizer(), 2, 16, 0, data_root)
    with pytest.raises(UserError, match="unknown perplexity corpus"):
        data.eval_text("lambada", data_root)
    with pytest.raises(UserError, match="does not exist"):
        data.data_dir(tmp_path / "missing")
