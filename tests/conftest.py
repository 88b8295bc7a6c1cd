import os
from pathlib import Path

import pytest

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("DLP_DEPLOY_DATA", SHARED_DATA))
    if not (root / "c4" / "c4_validation_2k.parquet").is_file():
        pytest.fail(f"offline data not found at {root}; set DLP_DEPLOY_DATA (see README)")
    return root


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from dlp_deploy.models import ALIASES

    folder = ALIASES["smollm2-135m"].folder()
    if not (folder / "config.json").is_file():
        pytest.fail("SmolLM2 is not fetched; run `dlp-deploy models fetch smollm2-135m` (make setup does)")
    return folder


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    from dlp_deploy.testing import save_tiny

    return save_tiny(tmp_path / "tiny")
