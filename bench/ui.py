"""The web page and API under load, on this machine, against the real stack started by `python -m ui`.

`python bench/ui.py [--clicks 20] [--per-client 60] [--clients 8]`

1. Click to result: in Debian's chromium (Playwright), draw a digit with the mouse, click Predict
   (live preview off, so the click does the whole round trip), and time in the page, from the click
   event to the DOM showing the answer, and to the "saved as #id" that follows once it is stored.
   Median of `--clicks`.
2. API throughput: `--clients` concurrent httpx clients POST MNIST test digits (rendered 280x280 like
   the canvas) to `/api/predictions`; stored predictions per second over the whole run, and latency.

The app runs as `make run` runs it (embedded PostgreSQL, TorchServe started by the launcher), on
free ports, with its data in a temporary folder, and is stopped (Ctrl-C) at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.client
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Times, in the page's own clock, from the Predict click to the answer shown and to "saved as #id".
OBSERVER_JS = """() => {
  const b = window.__bench = {click: null, shown: [], saved: []};
  const status = document.querySelector('[data-testid=status]');
  const result = document.querySelector('[data-testid=result]');
  document.querySelector('[data-testid=predict]').addEventListener('click', () => {
    b.click = performance.now(); b.shownDone = false; b.savedDone = false;
  }, true);
  new MutationObserver(() => {
    if (b.click === null) return;
    const now = performance.now();
    const visible = !result.classList.contains('hidden');
    if (!b.shownDone && visible && status.textContent && status.textContent !== b.before) {
      b.shown.push(now - b.click); b.shownDone = true;
    }
    if (!b.savedDone && status.textContent.startsWith('saved as #') && status.textContent !== b.before) {
      b.saved.push(now - b.click); b.savedDone = true;
    }
  }).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mnist_pngs(count: int) -> list[bytes]:
    """The first `count` MNIST test digits as 280x280 PNGs (white on black, like the canvas)."""
    with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    out = []
    for digit in data[:count]:
        buf = io.BytesIO()
        Image.fromarray(digit).resize((280, 280), Image.Resampling.BILINEAR).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@contextlib.contextmanager
def running_app(tmp: Path):
    """`python -m ui` with everything on free ports under `tmp`; Ctrl-C at the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",) and not k.startswith("PYTEST_")}
    env.update(
        UI_PORT=str(port),
        DATA_DIR=str(tmp / "data"),
        RUN_DIR=str(tmp / "run"),
        INFERENCE_URL=f"http://127.0.0.1:{free_port()}",
        MANAGEMENT_URL=f"http://127.0.0.1:{free_port()}",
        METRICS_URL=f"http://127.0.0.1:{free_port()}",
        GRPC_INFERENCE_PORT=str(free_port()),
        GRPC_MANAGEMENT_PORT=str(free_port()),
    )
    log = tmp / "app.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "ui"], cwd=ROOT, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the app exited:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise SystemExit(f"the app was not ready in time:\n{log.read_text()}")
        yield url, env["INFERENCE_URL"], process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def cpu_per_request(pid: int, requests: int):
    """CPU milliseconds per request spent in the UI process and in TorchServe (its child processes)."""
    import psutil

    def cpu(processes: list[psutil.Process]) -> float:
        total = 0.0
        for proc in processes:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    ui = psutil.Process(pid)
    children = ui.children(recursive=True)
    before = cpu([ui]), cpu(children)
    out: dict[str, float] = {}
    yield out
    after = cpu([ui]), cpu(children)
    out["ui"] = 1000 * (after[0] - before[0]) / requests
    out["torchserve"] = 1000 * (after[1] - before[1]) / requests


def click_to_result(url: str, clicks: int) -> tuple[list[float], list[float]]:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        canvas = page.get_by_test_id("digit-canvas")
        expect(canvas).to_be_visible()
        page.get_by_test_id("live").click()  # live preview off: the click does the whole round trip
        page.evaluate(OBSERVER_JS)
        box = canvas.bounding_box()
        assert box is not None
        first_id = 1
        for i in range(clicks + 2):  # two warm-up rounds
            page.get_by_test_id("clear").click()
            expect(page.get_by_test_id("result")).to_be_hidden()
            x = box["x"] + box["width"] * (0.45 + 0.01 * (i % 10))
            page.mouse.move(x, box["y"] + box["height"] * 0.2)
            page.mouse.down()
            page.mouse.move(x + 3, box["y"] + box["height"] * 0.8, steps=12)
            page.mouse.up()
            page.wait_for_timeout(150)  # let the stroke's PNG reach the server first, as a person would
            page.get_by_test_id("predict").click()
            expect(page.get_by_test_id("status")).to_have_text(f"saved as #{first_id + i}", timeout=10_000)
        shown = page.evaluate("() => window.__bench.shown")[2:]
        saved = page.evaluate("() => window.__bench.saved")[2:]
        browser.close()
    return shown, saved


def throughput(url: str, path: str, clients: int, per_client: int) -> dict[str, float]:
    """`clients` threads each POSTing `per_client` digits to `url + path`, after a warm-up.

    Each thread keeps one HTTP/1.1 connection (http.client: the least client CPU per request, since
    the load generator shares the 2 cores with what it measures).
    """
    images = mnist_pngs(200)
    ok = 201 if path.startswith("/api/") else 200
    parts = urlsplit(url)

    def client(index: int, count: int, latencies: list[float], statuses: list[int]) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            for n in range(count):
                png = images[(index * 37 + n) % len(images)]
                started = time.perf_counter()
                conn.request("POST", path, body=png, headers={"Content-Type": "image/png"})
                response = conn.getresponse()
                response.read()
                latencies.append(time.perf_counter() - started)
                statuses.append(response.status)
        finally:
            conn.close()

    def run(count: int, latencies: list[float], statuses: list[int]) -> None:
        threads = [
            threading.Thread(target=client, args=(i, count, latencies, statuses)) for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run(3, [], [])  # warm-up
    latencies: list[float] = []
    statuses: list[int] = []
    started = time.perf_counter()
    run(per_client, latencies, statuses)
    elapsed = time.perf_counter() - started
    stored = statuses.count(ok)
    latencies.sort()
    return {
        "statuses": dict(sorted(Counter(statuses).items())),
        "requests": len(statuses),
        "stored": stored,
        "other_statuses": len(statuses) - stored,
        "seconds": elapsed,
        "stored_per_s": stored / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[int(len(latencies) * 0.95)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=60)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    try:
        with running_app(tmp) as (url, inference_url, pid):
            print(f"app: {url} (embedded PostgreSQL, TorchServe started by python -m ui)", flush=True)
            shown, saved = click_to_result(url, args.clicks)
            print(
                f"click to result (chromium, n={len(shown)}): median {statistics.median(shown):.1f} ms "
                f"(min {min(shown):.1f}, max {max(shown):.1f}); to 'saved as #id': median "
                f"{statistics.median(saved):.1f} ms",
                flush=True,
            )
            with cpu_per_request(pid, args.clients * args.per_client) as api_cpu:
                figures = throughput(url, "/api/predictions", args.clients, args.per_client)
            stats = httpx.get(f"{url}/api/stats", timeout=10).json()
            print(
                f"POST /api/predictions, {args.clients} concurrent clients: "
                f"{figures['stored_per_s']:.0f} stored predictions/s ({figures['stored']} of "
                f"{figures['requests']} in {figures['seconds']:.1f} s, other statuses: "
                f"{figures['other_statuses']}); latency p50 {figures['p50_ms']:.0f} ms, "
                f"p95 {figures['p95_ms']:.0f} ms; rows in the database: {stats['total']}",
                flush=True,
            )
            with cpu_per_request(pid, args.clients * args.per_client) as direct_cpu:
                direct = throughput(inference_url, "/predictions/mnist", args.clients, args.per_client)
            print(
                f"for comparison, TorchServe alone (POST /predictions/mnist, same clients): "
                f"{direct['stored_per_s']:.0f} answers/s; latency p50 {direct['p50_ms']:.0f} ms, "
                f"p95 {direct['p95_ms']:.0f} ms (statuses {direct['statuses']})",
                flush=True,
            )
            print(
                f"CPU per request: through the UI {api_cpu['ui']:.1f} ms in the UI process + "
                f"{api_cpu['torchserve']:.1f} ms in TorchServe; "
                f"TorchServe alone {direct_cpu['torchserve']:.1f} ms",
                flush=True,
            )
            print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
