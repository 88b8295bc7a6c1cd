"""Fixtures for the pytest-benchmark suites (`make bench`): real SmolLM2 and tiny deployments, built once."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def deployments(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """Deployment folders (validated by tests/test_export; exported here without validation)."""
    from dlp_deploy.export.deployment import export_deployment
    from dlp_deploy.testing import save_tiny

    root = tmp_path_factory.mktemp("deploy")
    tiny = save_tiny(root / "tiny-hf", hidden_size=256, intermediate_size=768, num_hidden_layers=4)
    out = {"tiny": root / "tiny", "smollm2": root / "smollm2"}
    export_deployment(str(tiny), out["tiny"], seq_len=256, validate=False)
    export_deployment(str(smollm2_dir), out["smollm2"], seq_len=512, validate=False)
    return out


@pytest.fixture(scope="session")
def hf_sources(deployments, smollm2_dir) -> dict[str, Path]:
    """The PyTorch folders each deployment was exported from, for checks computed independently of the export."""
    return {"tiny": deployments["tiny"].parent / "tiny-hf", "smollm2": smollm2_dir}
