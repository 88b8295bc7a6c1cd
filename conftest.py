"""Fixtures shared by tests/ and bench/: offline data and the fetched SmolLM2 folder."""
import os
import re
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


# ---------------------------------------------------------------- CI: a skipped engine test is a failure

ENGINE_MISSING = re.compile(r"\b(deepsparse|onnxruntime|openvino|llama[-_.]?cpp(?:-python)?)\b.*\b(not installed|"
                            r"missing|not available|unavailable|no module)\b|\bno module named '?(deepsparse|"
                            r"onnxruntime|openvino|llama_cpp)", re.IGNORECASE)


def in_ci() -> bool:
    """CI (set by CI services) or DLP_DEPLOY_CI=1 (set by .ci/run): every engine is installed there."""
    return any(os.environ.get(v, "").lower() not in ("", "0", "false", "no") for v in ("CI", "DLP_DEPLOY_CI"))


def skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skip that says an engine is missing means CI lost an engine: fail the test instead of counting a
    skip nobody reads."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and in_ci():
        reason = skip_reason(report)
        if ENGINE_MISSING.search(reason):
            report.outcome = "failed"
            report.longrepr = f"{reason} -- in CI every engine is installed, so this skip is a failure"
