"""`python -m serving start|stop|status`: TorchServe in the background (`make serve`, `make stop`)."""

from __future__ import annotations

import argparse
import json
import sys

from serving.torchserve import START_TIMEOUT_S, ServeConfig, ServeError, describe, start, status, stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait (start)")
    args = parser.parse_args(argv)
    config = ServeConfig.from_settings()
    if args.action == "start":
        print(f"Starting TorchServe (run folder {config.run_dir}) ...", flush=True)
        try:
            server = start(config, timeout=args.timeout)
        except ServeError as exc:
            print(f"TorchServe did not start: {exc}", file=sys.stderr)
            return 1
        print(f"TorchServe is ready:\n{describe(server)}")
    elif args.action == "stop":
        print("TorchServe stopped." if stop(config) else "TorchServe was not running.")
    else:
        info = status(config)
        print(json.dumps(info, indent=2))
        return 0 if info["running"] else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
