"""What one prediction costs on this machine, per part: the figures behind docs/scaling.md.

`python bench/capacity.py [--requests 2000] [--clients 8] [--idle 5] [--database-url URL]`

Starts its own stack on free ports in a temporary folder: PostgreSQL (embedded, fsync and
synchronous commit on, as in production; or a new database on `--database-url`, migrated),
TorchServe as `python -m serving` registers it (2 workers, batches of up to 4), and the UI as
its image runs it (`python -m ui`). Then:

1. the CPU time each process tree uses while idle for `--idle` seconds (its background rate);
2. a fixed, bounded load through the UI's API: `--requests` POSTs of MNIST test digits drawn as
   280x280 canvas PNGs, `--clients` at a time (keep-alive), each answered 201 (stored);
3. per tree (TorchServe: launcher, Java frontend, Python workers; the UI process; PostgreSQL:
   postmaster and every backend), psutil CPU time (user + system) over the load, minus the idle
   rate, divided by the predictions stored: CPU ms per prediction; rows stored per second;
4. bytes on disk per row (`pg_total_relation_size` of the tables after the load, from empty,
   indexes and TOAST included) and WAL bytes per row, and the PNG bytes sent.

The load generator shares the 2 cores (its CPU is printed, not counted in any part), so the rate
is a lower bound; the CPU per prediction is what sizes replicas. The date and load average are
printed with the figures, to be quoted with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from db.embedded import EmbeddedPostgres  # noqa: E402
from db.migrate import migrate  # noqa: E402
from db.records import NewPrediction  # noqa: E402
from db.store import Store  # noqa: E402
from serving.ports import free_port, free_ports  # noqa: E402
from serving.torchserve import ServeConfig, read_pid, start, stop  # noqa: E402
from settings import Settings  # noqa: E402
from tests.handlers.renditions import read_mnist_test, render  # noqa: E402

MNIST = ROOT.parent / "shared" / "data" / "mnist"
TABLES = ("predictions", "prediction_images", "prediction_counts")
DRAWINGS = 200  # distinct test digits sent in turn


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (28, 28), 0).save(out, format="PNG")
    return out.getvalue()


SAMPLE_PNG = _png()  # the writers' section stores small rows: it measures commits, not bytes


# -- CPU of process trees ------------------------------------------------------------------------------
def torchserve_part(cmdline: str) -> str:
    if "model_service_worker" in cmdline:
        return "workers (Python)"
    return "frontend (Java)" if "java" in cmdline else "launcher"


def postgres_part(cmdline: str) -> str:
    """A backend serves a client connection ("postgres: user db [local] idle"); the rest write WAL,
    checkpoint, vacuum."""
    if not cmdline.startswith("postgres:"):
        return "postmaster"
    return "backends" if "[local]" in cmdline or "(" in cmdline or " idle" in cmdline else "background"


@dataclass
class Tree:
    """A process and its descendants, found again at each sample (workers and backends come and go)."""

    name: str
    root: psutil.Process
    part: Callable[[str], str] = lambda cmdline: ""  # which part of the tree a process is
    # pid -> (part, CPU seconds) at the last sample; what exited since still counts.
    _last: dict[int, tuple[str, float]] = field(default_factory=dict)
    _gone: dict[str, float] = field(default_factory=dict)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far, per part of the tree."""
        now: dict[int, tuple[str, float]] = {}
        for proc in [self.root, *_children(self.root)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                now[proc.pid] = (self.part(" ".join(proc.cmdline())), times.user + times.system)
        for pid, (part, seconds) in self._last.items():
            if pid not in now:
                self._gone[part] = self._gone.get(part, 0.0) + seconds
        self._last = now
        out = dict(self._gone)
        for part, seconds in now.values():
            out[part] = out.get(part, 0.0) + seconds
        return out

    def rss_mb(self) -> float:
        total = 0
        for proc in [self.root, *_children(self.root)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total / 2**20

    def count(self) -> int:
        return 1 + len(_children(self.root))


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


Sample = dict[str, dict[str, float]]  # tree -> part -> CPU seconds


def sample(trees: list[Tree]) -> Sample:
    return {t.name: t.cpu_s() for t in trees}


def used(before: Sample, after: Sample, tree: str, idle_rate: Sample, seconds: float) -> dict[str, float]:
    """CPU seconds per part between two samples, minus what the part uses when idle."""
    out = {}
    for part, end in after[tree].items():
        start = before[tree].get(part, 0.0)
        out[part] = max(end - start - idle_rate[tree].get(part, 0.0) * seconds, 0.0)
    return out


# -- the stack -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def database(tmp: Path, url: str | None) -> Iterator[str]:
    """A fresh migrated database: on `url`'s server, or an embedded one (durable settings)."""
    if url:
        name = f"bench_capacity_{os.getpid()}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        target = make_conninfo(url, dbname=name)
        try:
            migrate(target)
            yield target
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    server = EmbeddedPostgres(tmp / "postgres")
    target = server.start()
    try:
        migrate(target)
        yield target
    finally:
        server.stop()


@contextlib.contextmanager
def torchserve(tmp: Path) -> Iterator[ServeConfig]:
    *urls, grpc_inference, grpc_management = free_ports(5)
    inference, management, metrics = (f"http://127.0.0.1:{p}" for p in urls)
    settings = Settings()
    config = ServeConfig(
        model_store=Path(settings.model_store),
        run_dir=tmp / "run" / "torchserve",
        inference_url=inference,
        management_url=management,
        metrics_url=metrics,
        grpc_inference_port=grpc_inference,
        grpc_management_port=grpc_management,
    )
    start(config)
    try:
        yield config
    finally:
        stop(config)


@contextlib.contextmanager
def ui_process(
    tmp: Path, database_url: str, ts: ServeConfig | None, *, ready: str = "/readyz", **extra: str
) -> Iterator[tuple[str, psutil.Process]]:
    """`python -m ui` (what the UI image runs) on TorchServe `ts` (None: no model server, then
    wait for `/healthz`), answering 200 on `ready`; SIGTERM at the end. `extra`: more settings."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "NICEGUI_"))}
    env.update(
        DATABASE_URL=database_url, UI_PORT=str(port), DATA_DIR=str(tmp / "data"), RUN_DIR=str(tmp / "run")
    )
    if ts is not None:
        env.update(
            INFERENCE_URL=ts.inference_url,
            MANAGEMENT_URL=ts.management_url,
            METRICS_URL=ts.metrics_url,
            TORCHSERVE_KEY_FILE=str(ts.key_file),
        )
    env.update(extra)
    log = tmp / "ui.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ui"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the UI did not become ready:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}{ready}", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield url, psutil.Process(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def postmaster(database_url: str) -> psutil.Process:
    """The server's postmaster: the parent of a backend (the server must run on this machine)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        parent = psutil.Process(row[0]).parent()  # while the backend lives
    if parent is None:
        raise SystemExit("PostgreSQL's postmaster is not visible from here: run it on this machine")
    return parent


# -- the load ------------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    seconds: float
    statuses: dict[int, int]
    latencies_ms: list[float]


def load(url: str, bodies: list[bytes], requests: int, clients: int) -> LoadResult:
    """`requests` POSTs to /api/predictions, `clients` keep-alive connections at once."""
    parts = urlsplit(url)
    counter = iter(range(requests))
    lock = threading.Lock()
    statuses: dict[int, int] = {}
    latencies: list[float] = []

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            conn.request(
                "POST",
                "/api/predictions",
                body=bodies[i % len(bodies)],
                headers={"Content-Type": "image/png"},
            )
            response = conn.getresponse()
            response.read()
            with lock:
                latencies.append(1000 * (time.perf_counter() - t0))
                statuses[response.status] = statuses.get(response.status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadResult(time.perf_counter() - t0, statuses, latencies)


def disk(database_url: str) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn:
        sizes = {t: conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone() for t in TABLES}
        rows = conn.execute("SELECT count(*), avg(octet_length(image_png)) FROM prediction_images").fetchone()
        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
    assert rows is not None and lsn is not None
    return {
        "bytes": {t: int(v[0]) for t, v in sizes.items() if v is not None},
        "rows": int(rows[0]),
        "png": float(rows[1] or 0),
        "lsn": str(lsn[0]),
    }


def wal_bytes(database_url: str, since: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (since,)).fetchone()
    assert row is not None
    return int(row[0])


# -- what the notification trigger costs writers -------------------------------------------------------------
async def write_rate(url: str, replicas: int, callers: int, seconds: float, labels: bool) -> float:
    """Predictions (or labels) stored per second by `replicas` stores, `callers` concurrent each."""
    stores = [await Store.open(url, max_size=8) for _ in range(replicas)]
    try:
        ids = [i for s in stores for i in [await s.record_prediction(sample_prediction(0))]]
        deadline = time.perf_counter() + seconds
        done = 0

        async def caller(store: Store, n: int) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                if labels:
                    await store.set_label(ids[n % len(ids)], n % 10)
                else:
                    await store.record_prediction(sample_prediction(n))
                done += 1
                n += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller(s, i * 1000) for s in stores for i in range(callers)))
        return done / (time.perf_counter() - t0)
    finally:
        for s in stores:
            await s.close()


def sample_prediction(seed: int) -> NewPrediction:
    probabilities = [0.01] * 10
    probabilities[seed % 10] = 0.91
    return NewPrediction(
        digit=seed % 10,
        confidence=0.91,
        probabilities=probabilities,
        model_name="mnist",
        model_version="bench",
        latency_ms=1.0,
        image_png=SAMPLE_PNG,
        input_pixels=bytes(784),
    )


def notify_cost(url: str, replicas: int, callers: int, seconds: float) -> dict[str, tuple[float, float]]:
    """Write rates with the trigger of migration 0006 and without it (disabled for the measure)."""
    out: dict[str, tuple[float, float]] = {}
    for what, labels in (("predictions", False), ("labels", True)):
        with_trigger = asyncio.run(write_rate(url, replicas, callers, seconds, labels))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE predictions DISABLE TRIGGER predictions_notify")
        try:
            without = asyncio.run(write_rate(url, replicas, callers, seconds, labels))
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ALTER TABLE predictions ENABLE TRIGGER predictions_notify")
        out[what] = (with_trigger, without)
    return out


# -- the report ----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="predictions in the load (default 2000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent API clients (default 8)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle baseline (default 5)")
    parser.add_argument("--warmup", type=int, default=100, help="predictions before measuring (default 100)")
    parser.add_argument("--replicas", type=int, default=4, help="stores writing at once, last section")
    parser.add_argument("--callers", type=int, default=16, help="concurrent callers per store, last section")
    parser.add_argument("--write-seconds", type=float, default=3.0, help="per write figure (0: skip)")
    parser.add_argument("--database-url", default=None, help="a PostgreSQL server to create the database on")
    args = parser.parse_args()

    images, _ = read_mnist_test(MNIST, DRAWINGS)
    bodies = [render(image, "canvas") for image in images]
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    print(f"{started:%Y-%m-%d %H:%M} UTC, {psutil.cpu_count()} cores, load average {load_before[0]:.2f}")
    mean_png = statistics.mean(map(len, bodies))
    print(f"payload: {DRAWINGS} MNIST test digits as 280x280 canvas PNGs, {mean_png:.0f} B on average")

    tmp = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    try:
        with (
            database(tmp, args.database_url) as url,
            torchserve(tmp) as ts,
            ui_process(tmp, url, ts) as (ui_url, ui_proc),
        ):
            ts_pid = read_pid(ts)
            assert ts_pid is not None
            trees = [
                Tree("TorchServe", psutil.Process(ts_pid), torchserve_part),
                Tree("UI", ui_proc),
                Tree("PostgreSQL", postmaster(url), postgres_part),
            ]
            me = psutil.Process()  # alone: the stack's processes are its children
            warm = load(ui_url, bodies, args.warmup, args.clients)
            assert set(warm.statuses) == {201}, warm.statuses

            idle0, t0 = sample(trees), time.perf_counter()
            time.sleep(args.idle)
            idle1, idle_s = sample(trees), time.perf_counter() - t0
            zero: Sample = {t.name: {} for t in trees}
            idle_rate = {t.name: used(idle0, idle1, t.name, zero, 0.0) for t in trees}
            idle_rate = {tree: {p: v / idle_s for p, v in parts.items()} for tree, parts in idle_rate.items()}

            before = disk(url)
            cpu0, me0 = sample(trees), me.cpu_times()
            result = load(ui_url, bodies, args.requests, args.clients)
            cpu1, me1 = sample(trees), me.cpu_times()
            generator_s = (me1.user + me1.system) - (me0.user + me0.system)
            after = disk(url)
            wal = wal_bytes(url, before["lsn"])
            rss = {t.name: t.rss_mb() for t in trees}
            procs = {t.name: t.count() for t in trees}
            writers = (
                notify_cost(url, args.replicas, args.callers, args.write_seconds)
                if args.write_seconds
                else {}
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    stored = result.statuses.get(201, 0)
    rows = after["rows"] - before["rows"]
    if stored != args.requests or rows != stored:
        raise SystemExit(f"not every prediction was stored: {result.statuses}, {rows} new rows")
    load_after = os.getloadavg()
    latencies = sorted(result.latencies_ms)
    print(
        f"\nload: {args.requests} predictions through the UI's API, {args.clients} clients: "
        f"{stored / result.seconds:.0f} stored/s, latency p50 {latencies[len(latencies) // 2]:.1f} ms, "
        f"p95 {latencies[int(len(latencies) * 0.95)]:.1f} ms, in {result.seconds:.1f} s"
    )
    print("\nCPU per prediction (ms of one core, idle rate subtracted), cores busy during the load")
    print(f"{'part':<28} {'ms/pred.':>9} {'cores':>6} {'procs':>6} {'RSS MB':>7}")
    total = 0.0
    for tree in cpu0:
        parts = used(cpu0, cpu1, tree, idle_rate, result.seconds)
        seconds = sum(parts.values())
        total += seconds
        print(
            f"{tree:<28} {1000 * seconds / stored:>9.2f} {seconds / result.seconds:>6.2f} "
            f"{procs[tree]:>6} {rss[tree]:>7.0f}"
        )
        if len(parts) > 1:
            for part, s in sorted(parts.items(), key=lambda kv: -kv[1]):
                print(f"  {part:<26} {1000 * s / stored:>9.2f} {s / result.seconds:>6.2f}")
    print(f"{'all three':<28} {1000 * total / stored:>9.2f} {total / result.seconds:>6.2f}")
    print(f"(the load generator: {1000 * generator_s / stored:.2f} ms per prediction, not counted)")

    print(f"\ndisk after {rows} rows (from empty; indexes and TOAST included)")
    grown = {t: after["bytes"][t] - before["bytes"][t] for t in TABLES}
    for table, size in grown.items():
        print(f"  {table:<18} {size / rows:>8.0f} B/row  ({after['bytes'][table] / 2**20:.1f} MB)")
    print(
        f"  {'all':<18} {sum(grown.values()) / rows:>8.0f} B/row;  stored PNG {after['png']:.0f} B on average"
    )
    print(f"  WAL written: {wal / rows:.0f} B/row")
    if writers:
        print(
            f"\nthe change notification's cost to writers: {args.replicas} stores (replicas) with "
            f"{args.callers} concurrent callers each, {args.write_seconds:.0f} s per figure"
        )
        for what, (with_trigger, without) in writers.items():
            print(
                f"  {what:<12} {with_trigger:>7.0f}/s with the trigger, {without:>7.0f}/s without "
                f"({with_trigger / without - 1:+.0%})"
            )
    print(f"\nload average at the end {load_after[0]:.2f} (1 min), {load_after[1]:.2f} (5 min)")
    database_name = conninfo_to_dict(url).get("dbname")
    print(f"database {database_name!r} on {'--database-url' if args.database_url else 'an embedded server'}")


if __name__ == "__main__":
    main()
