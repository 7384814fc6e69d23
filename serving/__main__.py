"""`python -m serving start|stop|status|run`: TorchServe for the app.

`start` (`make serve`) returns once the model is READY and leaves TorchServe in the background;
`stop` (`make stop`) ends it. `run` is the foreground form (the container's command): it starts
TorchServe with its console on stdout, stays until SIGTERM/Ctrl-C, then stops it; it exits 1 if
TorchServe dies on its own, so a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from types import FrameType

from serving.torchserve import (
    START_TIMEOUT_S,
    ServeConfig,
    ServeError,
    describe,
    log_tail,
    start,
    status,
    stop,
)


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(config: ServeConfig, timeout: float) -> int:
    """Start TorchServe, stay while it runs, stop it on SIGTERM/SIGINT (exit 128 + signal)."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        server = start(config, timeout=timeout, console=True)
        print(f"TorchServe is ready:\n{describe(server)}", flush=True)
        while server.alive():
            time.sleep(1.0)
        print(f"TorchServe exited on its own.\n{log_tail(config)}", file=sys.stderr)
        return 1
    except ServeError as exc:
        print(f"TorchServe did not start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stop(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("action", choices=["start", "stop", "status", "run"])
    parser.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait (start, run)")
    args = parser.parse_args(argv)
    config = ServeConfig.from_settings()
    if args.action == "run":
        return run(config, args.timeout)
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
