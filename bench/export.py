"""Benchmark the UI's memory under the heaviest reads and writes a client can ask for.

Two concurrent exports of 100,000 labelled drawings (streamed by `GET /api/export`) and a
400 MB chunked prediction body (refused with 413): the UI's resident memory is sampled every
50 ms and compared with what it was just before. Target (issue 12): it grows by less than 20 MB.

Runs `python -m ui` (what the UI image runs) on a fresh embedded PostgreSQL filled by COPY; no
model server is needed (nothing is predicted).

    .venv/bin/python bench/export.py [--rows 100000] [--exports 2]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
from PIL import Image, ImageDraw

# The repository root first: this file's own folder would otherwise shadow the `db` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.capacity import ui_process
from db.embedded import EmbeddedPostgres
from db.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
TARGET_GROWTH_MB = 20
ADMIN_TOKEN = "bench-operator-token"
MB = 1024 * 1024


def drawing_png() -> bytes:
    """A drawing like the page sends (280x280, one stroke): the export copies stored PNGs as they are."""
    image = Image.new("L", (280, 280), 0)
    ImageDraw.Draw(image).line([(80, 60), (200, 60), (120, 230)], fill=255, width=18)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def fill(url: str, rows: int) -> None:
    """`rows` labelled drawings (COPY): small PNGs and 28x28 pixels, like the page stores."""
    png = drawing_png()
    with psycopg.connect(url) as conn:
        copy_sql = (
            "COPY predictions (digit, confidence, probabilities, model_name, model_version, latency_ms, "
            "true_label, labelled_at) FROM STDIN"
        )
        with conn.cursor().copy(copy_sql) as copy:
            for i in range(rows):
                digit = i % 10
                probabilities = [0.005] * 10
                probabilities[digit] = 0.955
                copy.write_row((digit, 0.955, probabilities, "mnist", "1.0", 5.0, digit, "now"))
        conn.execute(
            "INSERT INTO prediction_images (prediction_id, image_png, input_pixels) "
            "SELECT id, %s, %s FROM predictions",
            (png, bytes(range(196)) * 4),
        )


def peak_rss_during(process: psutil.Process, work: Callable[[], None]) -> tuple[float, float, float]:
    """(RSS before, peak RSS while `work` runs, seconds it took), in MB."""
    before = process.memory_info().rss / MB
    peak, done = before, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss / MB)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return before, peak, time.perf_counter() - started


def exports(url: str, count: int) -> Callable[[], None]:
    def download(sizes: list[int]) -> None:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.stream("GET", f"{url}/api/export", headers=headers, timeout=600) as response:
            response.raise_for_status()
            sizes.append(sum(len(chunk) for chunk in response.iter_bytes(1 << 20)))

    def work() -> None:
        sizes: list[int] = []
        threads = [threading.Thread(target=download, args=(sizes,)) for _ in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(sizes) != count or len(set(sizes)) != 1:
            raise SystemExit(f"exports failed or differ: {sizes}")
        print(f"  {count} exports of {sizes[0] / MB:.1f} MB each")

    return work


def huge_body(url: str, megabytes: int) -> Callable[[], None]:
    def chunks() -> Iterator[bytes]:
        for _ in range(megabytes):
            yield b"\x00" * MB

    def work() -> None:
        response = httpx.post(
            f"{url}/api/predictions", content=chunks(), headers={"content-type": "image/png"}, timeout=120
        )
        print(f"  {megabytes} MB chunked body: {response.status_code} {response.json()['detail'][:60]}")

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--exports", type=int, default=2)
    parser.add_argument("--body-mb", type=int, default=400)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        with EmbeddedPostgres(tmp / "postgres") as db_url:
            migrate(db_url)
            t0 = time.perf_counter()
            fill(db_url, args.rows)
            print(f"{args.rows:,} labelled drawings stored in {time.perf_counter() - t0:.1f} s")
            model = {"INFERENCE_URL": "http://127.0.0.1:9", "MANAGEMENT_URL": "http://127.0.0.1:9"}  # unused
            with ui_process(tmp, db_url, None, ready="/healthz", ADMIN_TOKEN=ADMIN_TOKEN, **model) as (
                url,
                process,
            ):
                cases = [
                    (f"{args.exports} concurrent exports (first)", exports(url, args.exports)),
                    (f"{args.exports} concurrent exports (again)", exports(url, args.exports)),
                    (f"a {args.body_mb} MB chunked body", huge_body(url, args.body_mb)),
                ]
                for name, work in cases:
                    print(name)
                    before, peak, seconds = peak_rss_during(process, work)
                    growth = peak - before
                    print(
                        f"  UI resident memory {before:.0f} MB -> peak {peak:.0f} MB: +{growth:.1f} MB "
                        f"in {seconds:.1f} s (target < {TARGET_GROWTH_MB} MB: "
                        f"{'met' if growth < TARGET_GROWTH_MB else 'NOT met'})"
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
