"""`python -m serving start|stop|status|run|health`: TorchServe for the app.

`start` (`make serve`) returns once the model is READY and leaves TorchServe in the background;
`stop` (`make stop`) ends it, unless a live process supervises it (that one would restart it).
`run` is the foreground form (the container's command): it starts TorchServe with its console on
stdout, restarts it whenever it dies (with backoff), and stops it on SIGTERM/Ctrl-C. `health`
(the container's healthcheck) exits 0 when the model is ready (`serving.management.is_ready`),
else 1; it sends the management key from `TORCHSERVE_KEY_FILE` or `RUN_DIR/torchserve/`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from types import FrameType

from serving.keys import KeyFileAuth, key_file_of
from serving.management import ManagementClient
from serving.ports import local_url
from serving.supervisor import Supervisor
from serving.torchserve import (
    START_TIMEOUT_S,
    ServeConfig,
    ServeError,
    describe,
    seed_store,
    shipped_archive,
    start,
    status,
    stop,
)
from serving.watchdog import live_owner
from settings import Settings, get_settings

HEALTH_TIMEOUT_S = 4.0  # the container healthcheck allows 5 s


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(config: ServeConfig, timeout: float) -> int:
    """Start TorchServe, keep it running (restarts), stop it on SIGTERM/SIGINT (exit 128 + signal)."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    supervisor = Supervisor(config, timeout=timeout, console=True)
    try:
        server = supervisor.start()
        print(f"TorchServe is ready:\n{describe(server)}", flush=True)
        supervisor.watch()
        return 0
    except ServeError as exc:
        print(f"TorchServe did not start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        supervisor.stop()


def health(settings: Settings) -> int:
    """0 when the model's default version has a READY worker, else 1 (one line on why)."""
    url = local_url(settings.management_url)
    auth = KeyFileAuth(key_file_of(settings), "management")
    with ManagementClient(url, settings.model_name, timeout=HEALTH_TIMEOUT_S, auth=auth) as client:
        ready, detail = client.readiness()
    print(f"{'ready' if ready else 'not ready'}: {detail}")
    return 0 if ready else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("action", choices=["start", "stop", "status", "run", "health"])
    parser.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait (start, run)")
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.action == "health":
        return health(settings)
    config = ServeConfig.from_settings(settings)
    if args.action in ("run", "start") and seed_store(config, shipped_archive(settings)):
        print(f"Copied {shipped_archive(settings)} into the model store {config.model_store}", flush=True)
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
        if (owner := live_owner(config)) is not None:
            print(
                f"TorchServe is supervised by process {owner} (make run, or python -m serving run), which "
                "would start it again: stop that process instead (Ctrl-C there).",
                file=sys.stderr,
            )
            return 1
        print("TorchServe stopped." if stop(config) else "TorchServe was not running.")
    else:
        info = status(config)
        print(json.dumps(info, indent=2))
        return 0 if info["running"] else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
