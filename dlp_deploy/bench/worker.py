"""`python -m dlp_deploy.bench.worker '{"deploy_dir": …, "settings": {…}}'`: one benchmark pair, JSON on stdout."""
import json
import os
import sys
import time
from pathlib import Path

from ..errors import UserError
from .harness import BenchSettings, run_pair


def _hang_hook(deploy_dir: str) -> None:
    """Test hook: DLP_DEPLOY_FAULT="hang:LABEL" makes the worker of deployment LABEL hang, as an engine's
    compiler has been seen to (the sweep's --bench-timeout is tested with it)."""
    wanted = [one.strip().removeprefix("hang:") for one in os.environ.get("DLP_DEPLOY_FAULT", "").split(",")
              if one.strip().startswith("hang:")]
    if Path(deploy_dir).name in wanted:
        time.sleep(24 * 3600)


def main() -> None:
    args = json.loads(sys.argv[1])
    _hang_hook(args["deploy_dir"])
    try:
        result = run_pair(args["deploy_dir"], BenchSettings(**args["settings"]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
