from pathlib import Path

import pytest


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    from dlp_deploy.testing import save_tiny

    return save_tiny(tmp_path / "tiny")
