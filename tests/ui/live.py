"""Helpers for tests against the real app: run it as `make run` does (`python -m stack`) in a subprocess,
and a switchable TCP proxy."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from serving import ports

ROOT = Path(__file__).resolve().parents[2]
# Debian's chromium, driven by Playwright (tests/ui/test_e2e.py, bench/ui.py); never `playwright install`.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    """A free port on 127.0.0.1 (the project's one probe, `serving.ports`)."""
    return ports.free_port()


@dataclass
class RunningApp:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def app_env(tmp: Path, port: int, **env: str) -> dict[str, str]:
    """The environment of an app run: own port, run and data folders, not seen as pytest by NiceGUI."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "NICEGUI_"))}
    out.update({"UI_PORT": str(port), "RUN_DIR": str(tmp / "run"), "DATA_DIR": str(tmp / "data"), **env})
    return out


@contextlib.contextmanager
def run_app(
    tmp: Path, *args: str, module: str = "stack", timeout: float = 120.0, **env: str
) -> Iterator[RunningApp]:
    """`python -m <module>` (`make run`'s `stack` by default; `ui` = serve only, for a migrated database)
    until the block ends; then SIGTERM, and it must exit 0 within 60 s."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = tmp / f"ui-{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=app_env(tmp, port, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    app = RunningApp(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_healthy(app, timeout)
        yield app
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError(f"the app did not stop on SIGTERM:\n{app.output()}") from None
    assert process.returncode == 0, f"exit {process.returncode}:\n{app.output()}"


def wait_healthy(app: RunningApp, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.process.poll() is not None:
            raise AssertionError(f"the app exited with {app.process.returncode}:\n{app.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{app.url}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"the app did not answer /healthz in {timeout} s:\n{app.output()}")


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `stop()` drops every connection, as a dead server would."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close alone does not
            self._server.close()
            self._server = None
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
