import os
from pathlib import Path

import pytest

# `make test` runs the suite in two pytest-xdist workers (-n 2 --dist loadgroup) on a 2-core machine. Each worker's
# PyTorch (and the engine and CLI subprocesses it starts, through OMP_NUM_THREADS) then computes on one thread: two
# workers spin-waiting for each other's cores cost far more than the second thread gains on tiny models.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    from dlp_deploy.testing import save_tiny

    return save_tiny(tmp_path / "tiny")


# ---------------------------------------------------------------- which tests must share an xdist worker

@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the xdist_group marks into the node ids
def pytest_collection_modifyitems(config, items):
    """Group the tests that must run in one worker under --dist loadgroup:
    - a module's tests that use one of its own module-scoped fixtures (a tiny sweep, a deployment, a Ray run): the
      fixture is built once, not once per worker;
    - the tests marked `ray`: each starts a local Ray cluster, and two clusters must not run at once.
    A test in two such sets joins them into one group."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    keys_of = {}
    for item in items:
        keys = {Path(defs[-1].baseid).stem for name in item.fixturenames
                if (defs := item._fixtureinfo.name2fixturedefs.get(name))
                and defs[-1].scope != "function" and defs[-1].baseid.endswith(".py")}
        if item.get_closest_marker("ray"):
            keys.add("ray")
        for a, b in zip(sorted(keys), sorted(keys)[1:]):
            parent[root(b)] = root(a)
        keys_of[item] = keys
    for item, keys in keys_of.items():
        if keys:
            item.add_marker(pytest.mark.xdist_group(root(min(keys))))
