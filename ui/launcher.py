"""`python -m ui` (= `make run`): database, migrations, TorchServe and the UI, stopped together.

- `DATABASE_URL` unset: the embedded PostgreSQL under `data_dir/postgres` is started (and stopped).
- Migrations are always applied (they are idempotent).
- TorchServe: when a model is already READY at `MANAGEMENT_URL` (e.g. `make serve`), it is used
  and left running; otherwise, when `INFERENCE_URL` points at this machine (loopback), TorchServe
  is started with `model_store/` and stopped at exit; for another host (Compose) nothing is started
  and the page shows a banner until the model answers. `--no-torchserve` never starts it.
- One at a time: an exclusive lock on `run_dir/ui.lock` (released by the OS if the process dies);
  a second run says who holds it and exits with status 1. A busy UI port also exits with 1.
- Ctrl-C or SIGTERM stops the UI, then what this run started, in reverse order.
- A part that cannot start (database, migrations, TorchServe) ends the run with its message and
  status 1, after stopping what was already started.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlsplit

import httpx
import psycopg

from settings import Settings, get_settings

EXIT_ALREADY_RUNNING = 1
EXIT_FAILED = 1


class AlreadyRunning(RuntimeError):
    """Another `python -m ui` holds the lock; the message says which and where."""


def say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def single_instance(lock_path: Path, url: str) -> Iterator[None]:
    """Hold an exclusive lock for the duration; `AlreadyRunning` when another process holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = open(lock_path, "a+")  # noqa: SIM115 - held open for the lifetime of the run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise AlreadyRunning(f"already running ({holder}); stop it first (Ctrl-C there)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, {url}")
        handle.flush()
        yield
    finally:
        handle.close()


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def is_local(url: str) -> bool:
    """Whether a URL's host is this machine (loopback)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_ready(settings: Settings) -> bool:
    """A worker of the model is READY at `MANAGEMENT_URL`."""
    try:
        response = httpx.get(f"{settings.management_url}/models/{settings.model_name}", timeout=2.0)
        versions = response.json() if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError):
        return False
    return any(w.get("status") == "READY" for v in versions for w in v.get("workers", []))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def start_database(settings: Settings, stack: contextlib.ExitStack) -> str:
    if settings.database_url:
        say("database: DATABASE_URL")
        return settings.database_url
    from db.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.data_dir / "postgres")
    say(f"database: starting the embedded PostgreSQL in {server.data_dir} ...")
    url = server.start()
    stack.callback(_step("embedded PostgreSQL", server.stop))
    return url


def start_torchserve(settings: Settings, stack: contextlib.ExitStack, allowed: bool) -> None:
    if model_ready(settings):
        say(f"model: using the TorchServe already serving at {settings.inference_url}")
        return
    if not allowed or not is_local(settings.inference_url):
        say(f"model: not started here; expecting it at {settings.inference_url}")
        return
    from serving.torchserve import ServeConfig, start

    say("model: starting TorchServe (takes a few seconds) ...")
    server = start(ServeConfig.from_settings(settings))
    stack.callback(_step("TorchServe", server.stop))
    say(f"model: TorchServe ready at {settings.inference_url}")


def _step(name: str, stop: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        say(f"stopping {name} ...")
        try:
            stop()
        except Exception as exc:  # keep stopping the rest
            print(f"could not stop {name}: {exc}", file=sys.stderr, flush=True)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui", description="Run the digit classifier app.")
    parser.add_argument("--host", help="UI address (default: UI_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="UI port (default: UI_PORT, 8500)")
    parser.add_argument("--no-torchserve", action="store_true", help="never start TorchServe here")
    args = parser.parse_args(argv)

    settings = get_settings()
    updates = {k: v for k, v in (("ui_host", args.host), ("ui_port", args.port)) if v is not None}
    if updates:
        settings = settings.model_copy(update=updates)
    url = f"http://{settings.ui_host}:{settings.ui_port}"

    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops everything like Ctrl-C does
    try:
        with single_instance(settings.run_dir / "ui.lock", url), contextlib.ExitStack() as stack:
            if not port_free(settings.ui_host, settings.ui_port):
                print(f"make run: {url} is in use; set UI_PORT", file=sys.stderr)
                return EXIT_ALREADY_RUNNING
            database_url = start_database(settings, stack)
            from db.migrate import migrate

            applied = migrate(database_url)
            say("database: migrations applied: " + ", ".join(applied) if applied else "database: up to date")
            start_torchserve(settings, stack, allowed=not args.no_torchserve)

            from nicegui import app

            from .app import api_application, create_app, run

            api_app = api_application()
            create_app(settings, database_url=database_url, api_app=api_app)
            app.on_startup(lambda: say(f"\n  Digit classifier: {url}  (API: {url}/docs; Ctrl-C stops all)\n"))
            run(settings, api_app)
    except AlreadyRunning as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except (RuntimeError, psycopg.OperationalError) as exc:  # database, migrations or TorchServe
        print(f"make run: could not start: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    say("stopped.")
    return 0
