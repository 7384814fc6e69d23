"""Benchmark the store: predictions recorded per second (with a PNG) and statistics at 100,000 rows.

Runs against a fresh embedded PostgreSQL in a temporary directory with the product's settings
(fsync on), or a new database on `--url` / `DATABASE_URL`. Targets: >= 1,000 predictions/s,
statistics <= 50 ms at 100,000 rows.

    .venv/bin/python bench/db.py [--rows 100000] [--writes 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from PIL import Image, ImageDraw
from psycopg import sql
from psycopg.conninfo import make_conninfo

# The repository root first: this file's own name would otherwise shadow the `db` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db.embedded import EmbeddedPostgres
from db.migrate import migrate
from db.store import DatabaseUnavailable, NewPrediction, Store

TARGET_WRITES_PER_S = 1000
TARGET_STATS_MS = 50
VERSIONS = ("1.0", "1.1", "2.0")


def canvas_png(rng: random.Random) -> bytes:
    """A drawing like the page sends: 280x280, black strokes on white."""
    img = Image.new("L", (280, 280), 255)
    draw = ImageDraw.Draw(img)
    points = [(rng.randint(40, 240), rng.randint(40, 240)) for _ in range(6)]
    draw.line(points, fill=0, width=18, joint="curve")
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def sample(rng: random.Random, png: bytes) -> NewPrediction:
    digit = rng.randrange(10)
    probabilities = [0.005] * 10
    probabilities[digit] = 0.955
    return NewPrediction(
        digit=digit,
        confidence=0.955,
        probabilities=probabilities,
        model_name="mnist",
        model_version=rng.choice(VERSIONS),
        latency_ms=rng.uniform(2, 20),
        image_png=png,
        input_pixels=bytes(rng.randrange(256) for _ in range(784)),
    )


async def writes_per_second(url: str, n: int, concurrency: int, pngs: list[bytes]) -> float:
    rng = random.Random(1)
    items = [sample(rng, pngs[i % len(pngs)]) for i in range(n)]
    async with await Store.open(url) as store:  # the default pool of 8
        await store.record_prediction(items[0])  # warm the pool
        queue = iter(items)

        async def worker() -> None:
            for item in queue:
                await store.record_prediction(item)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t0)


def fill(url: str, rows: int, png: bytes) -> None:
    """Top the table up to `rows` rows quickly (COPY), ~30 % labelled, ~90 % of those correct."""
    rng = random.Random(2)
    pixels = bytes(784)
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM predictions").fetchone()
        assert row is not None
        (have,) = row
        copy_sql = (
            "COPY predictions (digit, confidence, probabilities, model_name, model_version, latency_ms, "
            "true_label, labelled_at) FROM STDIN"
        )
        with conn.cursor().copy(copy_sql) as copy:
            for _ in range(rows - have):
                digit = rng.randrange(10)
                label = None
                if rng.random() < 0.3:
                    label = digit if rng.random() < 0.9 else rng.randrange(10)
                probabilities = [0.005] * 10
                probabilities[digit] = 0.955
                copy.write_row(
                    (
                        digit,
                        0.955,
                        probabilities,
                        "mnist",
                        rng.choice(VERSIONS),
                        5.0,
                        label,
                        None if label is None else "now",
                    )
                )
        conn.execute(
            "INSERT INTO prediction_images (prediction_id, image_png, input_pixels) "
            "SELECT id, %s, %s FROM predictions "
            "WHERE id NOT IN (SELECT prediction_id FROM prediction_images)",
            (png, pixels),
        )


async def stats_ms(url: str, repeats: int) -> tuple[float, int]:
    async with await Store.open(url) as store:
        stats = await store.stats()  # warm
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            stats = await store.stats()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), stats.total


def run(url: str, args: argparse.Namespace) -> None:
    migrate(url)
    rng = random.Random(0)
    pngs = [canvas_png(rng) for _ in range(20)]
    print(f"PNG sizes: median {statistics.median(map(len, pngs)):.0f} bytes")
    for concurrency in (1, 8, 64):
        rate = asyncio.run(writes_per_second(url, args.writes, concurrency, pngs))
        print(
            f"record_prediction, {concurrency} concurrent: {rate:,.0f}/s "
            f"(target >= {TARGET_WRITES_PER_S:,}: {rate / TARGET_WRITES_PER_S:.2f}x)"
        )
    t0 = time.perf_counter()
    fill(url, args.rows, pngs[0])
    print(f"filled to {args.rows:,} rows in {time.perf_counter() - t0:.1f} s")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")  # what autovacuum does soon after a bulk load
    median, total = asyncio.run(stats_ms(url, args.repeats))
    print(
        f"stats at {total:,} rows: median {median:.1f} ms of {args.repeats} "
        f"(target <= {TARGET_STATS_MS} ms: {median / TARGET_STATS_MS:.2f} of the budget)"
    )
    scan = full_scan_ms(url, args.repeats)
    print(f"  for comparison, grouping the predictions table itself: median {scan:.1f} ms")


def full_scan_ms(url: str, repeats: int) -> float:
    """The same figures computed by scanning `predictions` instead of reading the counters."""
    query = "SELECT model_version, true_label, digit, count(*) FROM predictions GROUP BY 1, 2, 3"
    times = []
    with psycopg.connect(url) as conn:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            conn.execute(query).fetchall()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[1:])


async def outage(server: EmbeddedPostgres, url: str, pngs: list[bytes]) -> tuple[float, float]:
    """Median ms for a call to fail while the server is down; s until the first write after restart."""
    rng = random.Random(3)
    async with await Store.open(url) as store:
        await asyncio.gather(*(store.record_prediction(sample(rng, pngs[0])) for _ in range(8)))
        server.stop()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            try:
                await store.stats()
            except DatabaseUnavailable:
                times.append((time.perf_counter() - t0) * 1000)
        server.start()
        t0 = time.perf_counter()
        while True:
            try:
                await store.record_prediction(sample(rng, pngs[0]))
                break
            except DatabaseUnavailable:
                await asyncio.sleep(0.05)
        return statistics.median(times), time.perf_counter() - t0


def main() -> None:
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # the outage's expected warnings
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--writes", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.url:
        name = f"bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            run(make_conninfo(args.url, dbname=name), args)
        finally:
            with psycopg.connect(args.url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    try:
        server = EmbeddedPostgres(tmp / "postgres")
        with server as url:
            print("embedded PostgreSQL, default settings (fsync on)")
            run(url, args)
            fail_ms, back_s = asyncio.run(outage(server, url, [canvas_png(random.Random(0))]))
            print(f"server down: each call fails in {fail_ms:.1f} ms (median of 5) with DatabaseUnavailable")
            print(f"server restarted: first write succeeded {back_s:.2f} s after start() returned")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
