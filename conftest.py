"""Fixtures shared by tests/ and bench/: offline data and the fetched SmolLM2 folder."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # neither suite ever reaches a hub

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
if SHARED_DATA.is_dir():  # export validation scores perplexity: give it the offline corpora, as `make test` does
    os.environ.setdefault("DLP_DEPLOY_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("DLP_DEPLOY_DATA", SHARED_DATA))
    if not (root / "c4" / "c4_validation_2k.parquet").is_file():
        pytest.fail(f"offline data not found at {root}; set DLP_DEPLOY_DATA (see README)")
    return root


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from dlp_deploy.testing import fetched_model_folder

    folder = fetched_model_folder("smollm2-135m")
    if folder is None:
        pytest.fail("SmolLM2 is not fetched; run `dlp-deploy models fetch smollm2-135m` (make setup does)")
    return folder
