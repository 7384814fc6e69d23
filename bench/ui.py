"""The web page and API under load, on this machine, against the real stack started by `python -m ui`.

`python bench/ui.py [--clicks 20] [--clients 8] [--seconds 15] [--warmup 5]`

1. Click to result: in Debian's chromium (Playwright), draw a digit with the mouse, click Predict
   (live preview off, so the click does the whole round trip), and time in the page, from the click
   event to the DOM showing the answer, and to the "saved as #id" that follows once it is stored.
   Median of `--clicks`.
2. API throughput: `--clients` concurrent keep-alive clients POST MNIST test digits (scaled up to
   280x280 PNGs of about 8 KB, like a canvas drawing) to `/api/predictions` for `--seconds`, after
   `--warmup` seconds of the same load; stored predictions per second (checked against the new
   rows in the database), latency, and the same load on TorchServe alone for comparison.

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.keys import headers as key_headers  # noqa: E402
from tests.ui.live import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402

MNIST = ROOT.parent / "shared" / "data" / "mnist"

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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds used so far by the UI process and by its children (TorchServe, PostgreSQL)."""
    import psutil

    def cpu(processes: list[psutil.Process]) -> float:
        total = 0.0
        for proc in processes:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    ui = psutil.Process(pid)
    return cpu([ui]), cpu(ui.children(recursive=True))


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


def throughput(
    url: str, path: str, clients: int, seconds: float, pid: int, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """`clients` threads POSTing MNIST digits to `url + path` for `seconds`; CPU per request of `pid`.

    Each thread keeps one HTTP/1.1 connection (http.client: the least client CPU per request,
    since the load generator shares the 2 cores with what it measures).
    """
    images = mnist_pngs(200)
    ok = 201 if path.startswith("/api/") else 200
    parts = urlsplit(url)

    def client(index: int, until: float, latencies: list[float], statuses: list[int]) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        try:
            n = 0
            while time.perf_counter() < until:
                png = images[(index * 37 + n) % len(images)]
                n += 1
                started = time.perf_counter()
                conn.request("POST", path, body=png, headers={"Content-Type": "image/png", **(headers or {})})
                response = conn.getresponse()
                response.read()
                latencies.append(time.perf_counter() - started)
                statuses.append(response.status)
        finally:
            conn.close()

    def run(duration: float, latencies: list[float], statuses: list[int]) -> float:
        until = time.perf_counter() + duration
        threads = [
            threading.Thread(target=client, args=(i, until, latencies, statuses)) for i in range(clients)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    latencies: list[float] = []
    statuses: list[int] = []
    cpu_before = cpu_seconds(pid)
    elapsed = run(seconds, latencies, statuses)
    cpu_after = cpu_seconds(pid)
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
        "ui_cpu_ms": 1000 * (cpu_after[0] - cpu_before[0]) / len(statuses),
        "children_cpu_ms": 1000 * (cpu_after[1] - cpu_before[1]) / len(statuses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured load, per target")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of the same load before")
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
            # Warm-up with the same load: the figures are a running server's steady state (the Java
            # frontend's JIT, connection pools, PostgreSQL's caches), not its first seconds.
            throughput(url, "/api/predictions", args.clients, args.warmup, pid)
            rows_before = httpx.get(f"{url}/api/stats", timeout=10).json()["total"]
            figures = throughput(url, "/api/predictions", args.clients, args.seconds, pid)
            rows = httpx.get(f"{url}/api/stats", timeout=10).json()["total"] - rows_before
            print(
                f"POST /api/predictions, {args.clients} concurrent clients, {args.seconds:.0f} s after "
                f"{args.warmup:.0f} s of warm-up: {figures['stored_per_s']:.0f} stored predictions/s "
                f"({figures['stored']} answered 201 of {figures['requests']}, new rows in the database: "
                f"{rows}, other statuses: {figures['other_statuses']}); latency p50 "
                f"{figures['p50_ms']:.0f} ms, p95 {figures['p95_ms']:.0f} ms",
                flush=True,
            )
            # TorchServe's inference key, from the run folder of the TorchServe the app started.
            keys = key_headers(tmp / "run" / "torchserve" / "key_file.json", "inference")
            throughput(inference_url, "/predictions/mnist", args.clients, args.warmup, pid, keys)
            direct = throughput(inference_url, "/predictions/mnist", args.clients, args.seconds, pid, keys)
            print(
                f"for comparison, TorchServe alone (POST /predictions/mnist, same clients): "
                f"{direct['stored_per_s']:.0f} answers/s; latency p50 {direct['p50_ms']:.0f} ms, "
                f"p95 {direct['p95_ms']:.0f} ms (statuses {direct['statuses']}); API / TorchServe alone: "
                f"{figures['stored_per_s'] / direct['stored_per_s']:.2f}",
                flush=True,
            )
            print(
                f"CPU per request: through the UI {figures['ui_cpu_ms']:.1f} ms in the UI process + "
                f"{figures['children_cpu_ms']:.1f} ms in TorchServe and PostgreSQL; "
                f"TorchServe alone {direct['children_cpu_ms']:.1f} ms",
                flush=True,
            )
            print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
