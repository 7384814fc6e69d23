"""Benchmark the UI's `GET /metrics`: time to render at 0 and at 100,000 stored rows (target < 2 ms).

The real app (`ui.app.create_app` on its FastAPI app, started through its lifespan) on a real
PostgreSQL (embedded, in a temporary folder, or a new database on `--url` / `DATABASE_URL`),
with predictions and labels made through the service first so that every metric has its label
sets. The model server is an in-process stand-in: `/metrics` never calls it. Each render is one
request through the ASGI app (routing and the Prometheus text, no network), median of many.

    .venv/bin/python bench/metrics.py [--rows 100000] [--renders 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import httpx
import psycopg
from prometheus_client import generate_latest
from psycopg import sql
from psycopg.conninfo import make_conninfo

# The repository root first: this file's folder holds a `db.py` that would shadow the `db` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db.embedded import EmbeddedPostgres
from db.migrate import migrate
from settings import Settings
from ui.app import api_application, create_app
from ui.inference import InferenceClient
from ui.service import PredictionService

TARGET_MS = 2.0
VERSIONS = ("1.0", "1.1", "2.0")


def bench_db() -> ModuleType:
    """bench/db.py (its `fill` tops the table up with COPY), loaded by path: `db` is the package's name."""
    spec = importlib.util.spec_from_file_location("bench_db", Path(__file__).with_name("db.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_answers() -> Callable[[httpx.Request], httpx.Response]:
    """A stand-in for TorchServe: a TorchServe-shaped answer, the version rotating like rollouts do."""
    rng = random.Random(4)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/models/"):
            return httpx.Response(200, json=[{"workers": [{"status": "READY"}]}])
        digit = rng.randrange(10)
        probabilities = [0.01] * 10
        probabilities[digit] = 0.91
        body = {
            "digit": digit,
            "confidence": 0.91,
            "probabilities": probabilities,
            "input": [0] * 784,
            "model_version": rng.choice(VERSIONS),
        }
        return httpx.Response(200, content=json.dumps(body), headers={"content-type": "application/json"})

    return handler


async def traffic(service: PredictionService, png: bytes, n: int) -> None:
    """Predictions and labels through the service, so that the counters carry every label set."""
    rng = random.Random(5)
    for _ in range(n):
        outcome = await service.predict(png)
        if rng.random() < 0.5:
            label = outcome.prediction.digit if rng.random() < 0.9 else rng.randrange(10)
            assert outcome.id is not None
            await service.label_by_id(outcome.id, label, token=outcome.label_token)


async def render_ms(client: httpx.AsyncClient, renders: int) -> tuple[float, float, int]:
    """Median and p95 ms of `renders` GET /metrics, and the size of one answer."""
    for _ in range(50):  # warm-up
        await client.get("/metrics")
    times = []
    size = 0
    for _ in range(renders):
        t0 = time.perf_counter()
        response = await client.get("/metrics")
        times.append((time.perf_counter() - t0) * 1000)
        size = len(response.content)
        assert response.status_code == 200
    times.sort()
    return statistics.median(times), times[int(0.95 * len(times)) - 1], size


def text_ms(renders: int) -> float:
    """Median ms of the Prometheus text alone (`generate_latest`, what the endpoint returns)."""
    times = []
    for _ in range(renders):
        t0 = time.perf_counter()
        generate_latest()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def transactions(url: str) -> int:
    """Transactions of this database so far, as PostgreSQL's statistics tell (published within a second)."""
    time.sleep(1.5)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def run_app(url: str, args: argparse.Namespace, data_dir: Path) -> None:
    fill = bench_db()
    png = fill.canvas_png(random.Random(0))
    settings = Settings(data_dir=data_dir, database_url=url)
    inference = InferenceClient("http://model.bench", transport=httpx.MockTransport(model_answers()))
    app = api_application()
    service = create_app(settings, inference=inference, database_url=url, api_app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ui.bench") as client,
    ):
        await traffic(service, png, args.predictions)
        assert (await client.get("/readyz")).status_code == 200  # the health gauges, as probes set them
        print(f"{args.predictions} predictions (about half labelled) through the service, 3 model versions")
        median, p95, size = await render_ms(client, args.renders)
        rows = (await service.stats()).total
        print(
            f"/metrics at {rows:,} stored rows: median {median:.3f} ms, p95 {p95:.3f} ms of {args.renders} "
            f"({size:,} bytes)"
        )
        t0 = time.perf_counter()
        await asyncio.to_thread(fill.fill, url, args.rows, png)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        print(f"filled to {args.rows:,} rows in {time.perf_counter() - t0:.1f} s")
        idle = -transactions(url)
        idle += transactions(url)  # what reading the statistics costs by itself
        before = transactions(url)
        median, p95, size = await render_ms(client, args.renders)
        queries = transactions(url) - before - idle
        print(
            f"/metrics at {args.rows:,} stored rows: median {median:.3f} ms, p95 {p95:.3f} ms of "
            f"{args.renders} ({size:,} bytes; target < {TARGET_MS} ms: {median / TARGET_MS:.2f} of it)"
        )
        print(f"  database transactions during those {args.renders + 50} renders: {queries}")
        print(f"  of a render, the Prometheus text itself: median {text_ms(args.renders):.3f} ms")
        t0 = time.perf_counter()
        await service.stats()  # the one query of the page's statistics, kept out of /metrics
        stats_ms = (time.perf_counter() - t0) * 1000
        print(f"  for comparison, the statistics query at {args.rows:,} rows: {stats_ms:.1f} ms")
    await inference.close()


def run(url: str, args: argparse.Namespace) -> None:
    migrate(url)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    try:
        asyncio.run(run_app(url, args, data_dir))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--renders", type=int, default=2000)
    parser.add_argument("--predictions", type=int, default=300)
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
        with EmbeddedPostgres(tmp / "postgres") as url:
            print("embedded PostgreSQL, default settings (fsync on)")
            run(url, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
