"""Soak: the API under load with and without 200 open tabs, on the real stack that `make run` starts.

`python bench/soak.py [--tabs 200] [--clients 8] [--seconds 20] [--warmup 10] [--json OUT.json]`

The app runs as `make run` runs it (`python -m stack`: embedded PostgreSQL, a supervised
TorchServe, the UI) on free ports with its data in a temporary folder, and is stopped at the end
(SIGTERM), with every process it started checked gone. Then, in order:

1. warm-up: `--warmup` s of the API load (`--clients` keep-alive clients POSTing canvas-like PNGs
   to `/api/predictions`, the load generator of bench/ui.py);
2. without tabs: `--seconds` s of that load: stored predictions/s;
3. `--tabs` page clients open (bench/support/page_clients.py, in a process of its own: each loads `GET /`
   and keeps NiceGUI's socket.io websocket); checked connected: each receives the update pushed
   after one prediction;
4. with tabs: `--warmup` s, then `--seconds` s of the same load; each tab must receive pushes and
   stay connected;
5. the tabs close; after tabs: `--seconds` s of the load again, then `--warmup` s idle;
6. the same number of tabs opened and closed again: memory that was released is reused, memory
   still held grows again.

Meanwhile every `--sample-every` s: the UI process's resident memory (psutil) and `/readyz` (how
long it takes: the event loop's lag; its pool part: the store's `pool_health()`). Store queries
per change are counted on PostgreSQL (`pg_stat_database.xact_commit`; the store runs each
statement in its own transaction) over single predictions 1.5 s apart, with and without tabs.
Printed: throughput with and without tabs and their ratio (target >= 0.70), CPU per request,
memory per phase, pool, non-2xx answers (target 0), queries per change, the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit

import httpx
import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ui import cpu_seconds, mnist_pngs, throughput  # noqa: E402
from db.embedded import url_for  # noqa: E402
from tests.ui.live import free_port, run_app  # noqa: E402

TARGET_RATIO = 0.70
POOL_DETAIL = re.compile(r"(\d+) connections, (\d+) idle, (\d+) waiting, exhausted for ([\d.]+) s")
STATS_LAG_S = 12.5
PAGE_CLIENTS = ROOT / "bench" / "support" / "page_clients.py"
CHANGE_SPACING_S = 1.5  # single predictions this far apart: each is one change the feed loads for


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class Sample:
    t: float  # seconds since the sampler started
    phase: str
    rss_mb: float
    readyz: int  # status; 0: no answer
    readyz_ms: float  # how long it took: the UI's event loop lag shows here
    pool_size: int | None
    pool_idle: int | None
    pool_waiting: int | None
    exhausted_for_s: float | None


class Sampler(threading.Thread):
    """Every `every` s: the UI process's RSS and `/readyz` (its pool part); `phase` is set by the caller."""

    def __init__(self, url: str, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.process, self.every = url, psutil.Process(pid), every
        self.phase = "start"
        self.samples: list[Sample] = []
        self.paused = threading.Event()
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._halt.is_set():
                if not self.paused.is_set():
                    self.samples.append(self.sample(client))
                self._halt.wait(self.every)

    def sample(self, client: httpx.Client) -> Sample:
        rss = self.process.memory_info().rss / 2**20
        status, pool = 0, None
        started = time.perf_counter()
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = client.get(f"{self.url}/readyz")
            status = response.status_code
            pool = POOL_DETAIL.search(response.json()["pool"]["detail"])
        took = 1000 * (time.perf_counter() - started)
        size, idle, waiting, exhausted = pool.groups() if pool else (None,) * 4
        return Sample(
            round(time.monotonic() - self._t0, 1),
            self.phase,
            round(rss, 1),
            status,
            round(took),
            None if size is None else int(size),
            None if idle is None else int(idle),
            None if waiting is None else int(waiting),
            None if exhausted is None else float(exhausted),
        )

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# ---------------------------------------------------------------------------------------------- database
def embedded_url(pgdata: Path) -> str:
    """The URL of the embedded server `make run` started in `pgdata` (from its postmaster.pid)."""
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    return url_for(Path(lines[4].strip()), port=int(lines[3]))


class Commits:
    """`pg_stat_database.xact_commit` of the app's database, minus what these reads add themselves."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.reads = 0

    def read(self) -> int:
        """Transactions committed so far; each read is one more, counted by the next reads."""
        self.reads += 1
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
        assert row is not None
        return int(row[0]) - (self.reads - 1)  # without the earlier reads (each its own transaction)


# ---------------------------------------------------------------------------------------------- page clients
class PageClients:
    """bench/support/page_clients.py in its own process, driven over its stdin/stdout."""

    def __init__(self, url: str, tabs: int, log: Path) -> None:
        with log.open("a") as errors:  # why sockets ended (engine.io's messages), read by `socket_endings`
            self.process = subprocess.Popen(
                [sys.executable, str(PAGE_CLIENTS), url, "--tabs", str(tabs)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        self.opened = self.read()

    def read(self) -> dict[str, Any]:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise SystemExit(f"the page clients exited ({self.process.wait()})")
        message: dict[str, Any] = json.loads(line)
        return message

    def ask(self, command: str) -> dict[str, Any]:
        stdin: IO[str] | None = self.process.stdin
        assert stdin is not None
        stdin.write(command + "\n")
        stdin.flush()
        return self.read()

    def cpu_s(self) -> float:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(self.process.pid).cpu_times()
            return times.user + times.system
        return 0.0

    def close(self) -> dict[str, Any]:
        closed: dict[str, Any] = {}
        if self.process.poll() is None:
            with contextlib.suppress(OSError, SystemExit, ValueError):
                closed = self.ask("close")
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return closed


# ---------------------------------------------------------------------------------------------- helpers
def post_one(url: str, png: bytes) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request("POST", "/api/predictions", body=png, headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def settle(counter: Commits) -> int:
    """`counter.read()` once the commits of a few requests before have reached the statistics: a
    backend that reported less than a second ago reports the rest when idle, 10 s later
    (PGSTAT_IDLE_INTERVAL). After a long load it can take 20 s: measure before loads, or long after."""
    time.sleep(STATS_LAG_S)
    return counter.read()


@dataclass
class PerChange:
    """What one change (a single prediction) costs beyond its own insert and request."""

    queries: float  # PostgreSQL transactions
    ui_cpu_ms: float  # CPU of the UI process (the request itself included)
    idle_ui_cpu_pct: float  # the UI process's CPU while nothing changes (% of one core)


def per_change(
    url: str, pid: int, counter: Commits, sampler: Sampler, png: bytes, changes: int
) -> tuple[PerChange, Counter[int]]:
    """The cost of one change, and the statuses answered.

    `changes` single predictions, `CHANGE_SPACING_S` apart (longer than the feed's throttle, so each
    is a change of its own and every tab gets one push per change), less what the app does anyway
    (its database listener's keep-alive, autovacuum, NiceGUI's timers) at the rate of a quiet window
    just before. The sampler pauses meanwhile (its `/readyz` pings the database). CPU time, unlike
    throughput, hardly depends on what else runs on the machine.
    """
    sampler.paused.set()
    try:
        start, cpu_start = settle(counter), ui_cpu_s(pid)
        quiet_started = time.monotonic()
        time.sleep(changes * CHANGE_SPACING_S)
        quiet_end, cpu_quiet_end = counter.read(), ui_cpu_s(pid)
        quiet_s = time.monotonic() - quiet_started
        busy_started = time.monotonic()
        statuses: Counter[int] = Counter()
        for _ in range(changes):
            statuses[post_one(url, png)] += 1
            time.sleep(CHANGE_SPACING_S)
        cpu_end = ui_cpu_s(pid)
        busy_cpu_s = time.monotonic() - busy_started
        end = settle(counter)
        busy_s = time.monotonic() - busy_started
    finally:
        sampler.paused.clear()
    queries = end - quiet_end - (quiet_end - start) * busy_s / quiet_s
    cpu = cpu_end - cpu_quiet_end - (cpu_quiet_end - cpu_start) * busy_cpu_s / quiet_s
    idle = 100 * (cpu_quiet_end - cpu_start) / quiet_s
    return PerChange((queries - statuses[201]) / changes, 1000 * cpu / changes, idle), statuses


def ui_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def non_2xx(statuses: dict[int, int]) -> int:
    return sum(n for status, n in statuses.items() if not 200 <= status < 300)


def summary(samples: list[Sample], phase: str) -> dict[str, Any]:
    rss = [s.rss_mb for s in samples if s.phase == phase]
    checked_out = [
        s.pool_size - s.pool_idle
        for s in samples
        if s.phase == phase and s.pool_size is not None and s.pool_idle is not None
    ]
    waiting = [s.pool_waiting for s in samples if s.phase == phase and s.pool_waiting is not None]
    exhausted = [s.exhausted_for_s for s in samples if s.phase == phase and s.exhausted_for_s is not None]
    size = [s.pool_size for s in samples if s.phase == phase and s.pool_size is not None]
    return {
        "samples": len(rss),
        "rss_first_mb": rss[0] if rss else None,
        "rss_median_mb": statistics.median(rss) if rss else None,
        "rss_max_mb": max(rss) if rss else None,
        "rss_last_mb": rss[-1] if rss else None,
        "pool_size_max": max(size, default=None),
        "checked_out_max": max(checked_out, default=None),
        "waiting_max": max(waiting, default=None),
        "exhausted_for_max_s": max(exhausted, default=None),
        "readyz_not_200": sum(s.readyz != 200 for s in samples if s.phase == phase),
        "readyz_max_ms": max((s.readyz_ms for s in samples if s.phase == phase), default=None),
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def left_behind(processes: list[psutil.Process], timeout: float = 20.0) -> list[str]:
    """The processes of the run still alive `timeout` s after it ended (watchdogs exit on their own)."""
    deadline = time.monotonic() + timeout
    alive = processes
    while time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.5)
    return [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in alive]


@dataclass
class Phase:
    name: str
    figures: dict[str, Any]  # bench.ui.throughput's answer
    ui_cpu_s: float
    children_cpu_s: float
    tabs_cpu_s: float


def load_phase(
    name: str, url: str, pid: int, args: argparse.Namespace, sampler: Sampler, tabs: PageClients | None
) -> Phase:
    sampler.phase = name
    ui0, children0 = cpu_seconds(pid)
    tabs0 = tabs.cpu_s() if tabs else 0.0
    figures = throughput(url, "/api/predictions", args.clients, args.seconds, pid)
    ui1, children1 = cpu_seconds(pid)
    tabs1 = tabs.cpu_s() if tabs else 0.0
    return Phase(name, figures, ui1 - ui0, children1 - children0, tabs1 - tabs0)


# What closing a tab ourselves logs; everything else is a socket lost.
OWN_CLOSE = (
    "Write loop: WebSocket connection was closed, aborting",
    "Server sent close packet data None, aborting",
)


def socket_endings(log: Path) -> dict[str, int]:
    """The page clients' messages on sockets lost (not closed by us), counted (times, ids left out)."""
    if not log.exists():
        return {}
    lines = (re.sub(r"^\S+ \S+ ", "", line) for line in log.read_text(errors="replace").splitlines())
    found = Counter(
        re.sub(r"[0-9a-f-]{8,}|\d+", "N", line)[:120]
        for line in lines
        if line.strip() and line not in OWN_CLOSE
    )
    return dict(found.most_common(8))


def open_tabs(url: str, count: int, png: bytes, statuses: Counter[int], log: Path) -> PageClients:
    """`count` page clients, checked connected: the update pushed after one prediction reaches each."""
    tabs = PageClients(url, count, log)
    opened = tabs.opened
    for status, n in opened["page_statuses"].items():
        statuses[int(status)] += n
    tabs.ask("mark")
    statuses[post_one(url, png)] += 1
    for _ in range(40):
        time.sleep(0.5)
        opened["check"] = tabs.ask("count")
        if opened["check"]["tabs_updated"] >= opened["check"]["tabs"]:
            break
    print(
        f"  {opened['connected']} of {count} tabs connected in {opened['seconds']:.1f} s (GET / statuses "
        f"{opened['page_statuses']}, failed {opened['failed']} {opened['errors']}); after one prediction "
        f"{opened['check']['tabs_updated']} received the update",
        flush=True,
    )
    return tabs


def soak(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The whole run; returns every figure (printed by `report`)."""
    names = ("INFERENCE_URL", "MANAGEMENT_URL", "METRICS_URL")
    ports = {name: f"http://127.0.0.1:{free_port()}" for name in names}
    grpc = {"GRPC_INFERENCE_PORT": str(free_port()), "GRPC_MANAGEMENT_PORT": str(free_port())}
    out: dict[str, Any] = {
        "tabs": args.tabs,
        "clients": args.clients,
        "seconds": args.seconds,
        "changes": args.changes,
    }
    statuses: Counter[int] = Counter()
    png = mnist_pngs(1)[0]
    processes: list[psutil.Process] = []
    started = time.monotonic()
    with run_app(tmp, timeout=300, **ports, **grpc) as app:
        url, pid = app.url, app.process.pid
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit(f"the app was not ready in time:\n{app.output()}")
            time.sleep(0.5)
        out["start_s"] = time.monotonic() - started
        print(f"app: {url} (python -m stack), ready in {out['start_s']:.0f} s", flush=True)
        processes = [psutil.Process(pid), *descendants(pid)]
        counter = Commits(embedded_url(tmp / "data" / "postgres"))
        sampler = Sampler(url, pid, args.sample_every)
        sampler.start()
        phases: list[Phase] = []
        tabs: PageClients | None = None

        def load(name: str) -> None:
            phases.append(load_phase(name, url, pid, args, sampler, tabs))
            statuses.update(phases[-1].figures["statuses"])
            print(f"  {name}: {phases[-1].figures['stored_per_s']:.1f} stored/s", flush=True)

        def warm_up(name: str) -> None:
            sampler.phase = name
            statuses.update(throughput(url, "/api/predictions", args.clients, args.warmup, pid)["statuses"])

        def change_cost(key: str) -> None:
            cost, answered = per_change(url, pid, counter, sampler, png, args.changes)
            out[key] = asdict(cost)
            statuses.update(answered)

        try:
            # Before any load: PostgreSQL may report the commits of a load 20 s after it ended.
            change_cost("change_without_tabs")
            warm_up("warm-up")
            load("without tabs")

            sampler.phase = "opening tabs"
            tabs = open_tabs(url, args.tabs, png, statuses, tmp / "page_clients.log")
            out["open"] = tabs.opened
            tabs.ask("mark")
            change_cost("change_with_tabs")
            out["change_with_tabs"]["pushes"] = tabs.ask("count")["updates"]  # delivered meanwhile
            warm_up("with tabs, warm-up")
            tabs.ask("mark")
            commits_before = counter.read()
            load("with tabs")
            out["commits_with_tabs"] = counter.read() - commits_before
            out["during"] = tabs.ask("count")
            print(f"  {out['during']['tabs_updated']} tabs received pushes meanwhile", flush=True)

            sampler.phase = "closing tabs"
            out["closed"] = tabs.close()
            tabs = None
            load("after tabs")
            sampler.phase = "idle after"
            time.sleep(args.warmup)

            # Released, or only kept by the allocator? Opening the tabs again must reuse that memory.
            sampler.phase = "tabs again"
            tabs = open_tabs(url, args.tabs, png, statuses, tmp / "page_clients.log")
            out["open_again"] = tabs.opened
            time.sleep(args.sample_every)
            tabs.close()
            tabs = None
            sampler.phase = "idle at the end"
            time.sleep(args.warmup)
        finally:
            if tabs is not None:
                tabs.close()
            sampler.stop()
        processes += [p for p in descendants(pid) if p not in processes]
        out["phases"] = [asdict(p) for p in phases]
        out["samples"] = [asdict(s) for s in sampler.samples]
        out["memory"] = {
            name: summary(sampler.samples, name) for name in dict.fromkeys(s.phase for s in sampler.samples)
        }
    out["socket_endings"] = socket_endings(tmp / "page_clients.log")
    out["left_behind"] = left_behind(processes)
    out["statuses"] = dict(sorted(statuses.items()))
    out["non_2xx"] = non_2xx(out["statuses"])
    out["total_s"] = time.monotonic() - started
    return out


def report(out: dict[str, Any], load: tuple[float, float, float]) -> None:
    phases = {p["name"]: p for p in out["phases"]}
    rate = {name: p["figures"]["stored_per_s"] for name, p in phases.items()}
    without, with_tabs, after = rate["without tabs"], rate["with tabs"], rate["after tabs"]
    ratio = with_tabs / without
    out["ratio"], out["ratio_to_mean"] = ratio, with_tabs / ((without + after) / 2)
    print(f"\nPOST /api/predictions, {out['clients']} keep-alive clients, {out['seconds']:.0f} s per phase:")
    for name, p in phases.items():
        f = p["figures"]
        n = f["requests"]
        print(
            f"  {name:13s} {f['stored_per_s']:6.1f} stored/s  p50 {f['p50_ms']:5.0f} ms  "
            f"p95 {f['p95_ms']:5.0f} ms  statuses {f['statuses']}  "
            f"CPU/request: UI {1000 * p['ui_cpu_s'] / n:.1f} ms, "
            f"TorchServe+PostgreSQL {1000 * p['children_cpu_s'] / n:.1f} ms"
            + (f", page clients {1000 * p['tabs_cpu_s'] / n:.1f} ms" if p["tabs_cpu_s"] else "")
        )
    d = out["during"]
    connected = d["connected"]
    verdict = "met" if ratio >= TARGET_RATIO and connected == out["tabs"] else "NOT met"
    missing = "" if connected == out["tabs"] else f"; only {connected} were"
    print(
        f"  with {out['tabs']} tabs / without: {ratio:.2f} (target >= {TARGET_RATIO:.2f} with every tab "
        f"connected: {verdict}{missing}); with / mean(before, after): {out['ratio_to_mean']:.2f}"
    )
    seconds = phases["with tabs"]["figures"]["seconds"]
    print(
        f"tabs: {out['open']['connected']} connected ({out['open']['seconds']:.1f} s to open), "
        f"{out['open']['check']['tabs_updated']} updated after one prediction; during the load "
        f"{d['connected']} still connected, {d['tabs_updated']} received pushes, "
        f"{d['updates'] / max(d['tabs'], 1) / seconds:.2f} pushes/s per tab, "
        f"{d['bytes'] / max(d['updates'], 1) / 1024:.1f} KB per push, disconnects {d['disconnects']}"
    )
    without, with_tabs = out["change_without_tabs"], out["change_with_tabs"]
    pushes_per_change = with_tabs["pushes"] / out["changes"]
    per_tab_ms = (with_tabs["ui_cpu_ms"] - without["ui_cpu_ms"]) / max(pushes_per_change, 1)
    if out["socket_endings"]:
        print(
            f"  sockets lost (both rounds), as the page clients' engine.io client says: "
            f"{out['socket_endings']}"
        )
    print(
        f"one change (a single prediction) costs, beyond its insert: without tabs {without['queries']:.2f} "
        f"PostgreSQL transactions and {without['ui_cpu_ms']:.1f} ms of UI CPU (the request itself); with "
        f"{out['tabs']} tabs {with_tabs['queries']:.2f} transactions (the feed's loads for all tabs "
        f"together: "
        f"{with_tabs['queries'] - without['queries']:.2f}) and {with_tabs['ui_cpu_ms']:.1f} ms of UI CPU: "
        f"{per_tab_ms:.2f} ms per push to one tab ({pushes_per_change:.0f} tabs updated per change); "
        f"while nothing changes the UI uses {without['idle_ui_cpu_pct']:.1f}% of a core without tabs, "
        f"{with_tabs['idle_ui_cpu_pct']:.1f}% with them"
    )
    print(
        f"under load with tabs: {out['commits_with_tabs']} transactions for "
        f"{phases['with tabs']['figures']['stored']} stored predictions"
    )
    print("UI resident memory (MB) and pool (from /readyz) per phase:")
    for name, m in out["memory"].items():
        if not m["samples"]:
            continue
        print(
            f"  {name:18s} RSS first {m['rss_first_mb']:6.1f} median {m['rss_median_mb']:6.1f} "
            f"max {m['rss_max_mb']:6.1f} last {m['rss_last_mb']:6.1f}; pool size <= {m['pool_size_max']}, "
            f"checked out <= {m['checked_out_max']}, waiting <= {m['waiting_max']}, exhausted <= "
            f"{m['exhausted_for_max_s']} s; /readyz not 200: {m['readyz_not_200']}, slowest "
            f"{m['readyz_max_ms']} ms"
        )
    mem = out["memory"]

    def peak(*names: str) -> float:
        return max(mem[n]["rss_max_mb"] for n in names if mem.get(n, {}).get("samples"))

    def last(name: str) -> float | None:
        return mem[name]["rss_last_mb"] if mem.get(name, {}).get("samples") else None

    before = mem["without tabs"]["rss_median_mb"]
    first, again = peak("opening tabs", "with tabs, warm-up", "with tabs"), peak("tabs again")
    print(
        f"  {out['tabs']} tabs: {before:.1f} -> {first:.1f} MB "
        f"({1024 * (first - before) / out['tabs']:.0f} KB per tab); after they closed "
        f"{last('idle after')} MB; opened again: peak {again} MB, {again - first:+.1f} MB (the first "
        f"tabs' memory reused, the second round adding under a tenth of the first's: "
        f"{again - first <= 0.1 * (first - before)}); at the end {last('idle at the end')} MB"
    )
    print(f"non-2xx answers: {out['non_2xx']} (target 0); all statuses {out['statuses']}")
    print(f"processes left behind: {len(out['left_behind'])} {out['left_behind'] or ''}")
    print(
        f"load average: {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end "
        f"(1 min; {os.cpu_count()} cores, shared); whole run {out['total_s']:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tabs", type=int, default=200, help="open page clients")
    parser.add_argument("--clients", type=int, default=8, help="concurrent API clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured load per phase")
    parser.add_argument("--warmup", type=float, default=10.0, help="load before measuring, idle at the end")
    parser.add_argument("--changes", type=int, default=8, help="single predictions for queries per change")
    parser.add_argument("--sample-every", type=float, default=3.0, help="memory and pool sampling")
    parser.add_argument("--json", type=Path, help="also write every figure and sample here")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, _interrupt)  # stopped like Ctrl-C: the app and the tabs too
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))  # short: PostgreSQL's socket lives in it
    try:
        out = soak(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(out, load)
    out["load_average"] = {"start": load, "end": os.getloadavg()}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
