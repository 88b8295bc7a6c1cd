"""`python -m dlp_deploy.bench.worker '{"deploy_dir": …, "settings": {…}}'`: one benchmark pair, JSON on stdout."""
import json
import sys

from ..errors import UserError
from .harness import BenchSettings, run_pair


def main() -> None:
    args = json.loads(sys.argv[1])
    try:
        result = run_pair(args["deploy_dir"], BenchSettings(**args["settings"]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
