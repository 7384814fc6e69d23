"""Helpers for tests against the real app: run it as `make run` does (`python -m stack`) in a subprocess,
a switchable TCP proxy, and the browser tests' fixtures (Chromium, the app on the session's real
TorchServe and PostgreSQL), imported by test_e2e.py and test_phone.py; each module gets its own app.
"""

from __future__ import annotations

import contextlib
import itertools
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
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

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
    out.setdefault("NICEGUI_STORAGE_PATH", str(tmp / "nicegui"))  # the page's per-browser storage
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


# ---------------------------------------------------------------- browser test fixtures (module-scoped)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: `make test` installs Debian's chromium (scripts/system-deps.sh)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def model_proxy(torchserve: Any) -> Iterator[TcpProxy]:
    target = urlsplit(torchserve.inference_url)
    assert target.hostname is not None and target.port is not None
    proxy = TcpProxy(target.hostname, target.port)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def database(postgres: Any) -> Iterator[str]:
    """A fresh empty database: `python -m stack` applies the migrations."""
    url: str = postgres.create_database()
    yield url
    postgres.drop_database(psycopg.conninfo.conninfo_to_dict(url)["dbname"])


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory, torchserve: Any, model_proxy: TcpProxy, database: str
) -> Iterator[RunningApp]:
    env = {
        "DATABASE_URL": database,
        "INFERENCE_URL": model_proxy.url,
        "MANAGEMENT_URL": torchserve.management_url,
        "METRICS_URL": torchserve.metrics_url,
    }
    with run_app(tmp_path_factory.mktemp("ui"), "--no-torchserve", **env) as running:
        yield running


def draw_with_mouse(page: Page, dx: float = 4) -> None:
    """A vertical stroke with the mouse: a 1."""
    box = page.get_by_test_id("digit-canvas").bounding_box()
    assert box is not None
    x = box["x"] + box["width"] / 2
    page.mouse.move(x, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(x + dx, box["y"] + box["height"] * 0.8, steps=20)
    page.mouse.up()


def stroke_count(page: Page) -> int:
    """The strokes the canvas holds (canvas.js keeps the count in `data-strokes`)."""
    count = page.get_by_test_id("digit-canvas").get_attribute("data-strokes")
    return -1 if count is None else int(count)


def wait_strokes(page: Page, count: int, timeout_s: float = 5.0) -> None:
    """Until the canvas holds `count` strokes (a clear or undo from the server takes a round trip)."""
    deadline = time.monotonic() + timeout_s
    while stroke_count(page) != count and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert stroke_count(page) == count, f"{stroke_count(page)} strokes, expected {count}"


Points = list[tuple[float, float]]  # a stroke, in fractions of the canvas (0-1 across, 0-1 down)
ONE: Points = [(0.5, 0.2), (0.51, 0.8)]
TWO: Points = [(0.3, 0.32), (0.38, 0.2), (0.55, 0.17), (0.68, 0.27), (0.66, 0.42), (0.3, 0.8), (0.74, 0.8)]


def canvas_points(page: Page, stroke: Points, steps: int = 8) -> list[tuple[float, float]]:
    """The stroke in page pixels, with `steps` points per segment (a finger moves smoothly too)."""
    box = page.get_by_test_id("digit-canvas").bounding_box()
    assert box is not None
    out = [(box["x"] + box["width"] * stroke[0][0], box["y"] + box["height"] * stroke[0][1])]
    for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
        for i in range(1, steps + 1):
            t = i / steps
            out.append(
                (
                    box["x"] + box["width"] * (x0 + (x1 - x0) * t),
                    box["y"] + box["height"] * (y0 + (y1 - y0) * t),
                )
            )
    return out


def draw_path(page: Page, stroke: Points) -> None:
    """One stroke with the mouse."""
    points = canvas_points(page, stroke)
    page.mouse.move(*points[0])
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*point)
    page.mouse.up()


def draw_with_finger(page: Page, stroke: Points) -> None:
    """One stroke with real touch events (Chrome DevTools Protocol); the page needs `has_touch`."""
    points = canvas_points(page, stroke)
    cdp = page.context.new_cdp_session(page)
    x, y = points[0]
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for x, y in points[1:]:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()
