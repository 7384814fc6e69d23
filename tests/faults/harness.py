"""The fault matrix's moving parts: `make run` in a process group of its own, a tagged load, the
faults themselves, and the reconciliation of every answer against the database.

The app runs exactly as `make run` runs it (`python -m stack`: embedded PostgreSQL under
DATA_DIR, a supervised TorchServe, the UI), but started in a session of its own, as a terminal
starts it, so that a test can SIGKILL its whole process group. Every POST carries a unique
`Idempotency-Key`; the row it made is found by the key the service stores for it
(`ui.service.stored_key`). `reconcile` is a pure function of the answers and the rows.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

from db.embedded import PORT, SYSTEM_USER, bin_dir, socket_dir_for, url_for
from serving.ports import free_port, free_ports
from serving.torchserve import ServeConfig
from serving.torchserve import stop as stop_torchserve
from tests.serving.test_supervisor import java_frontend as frontend_of
from tests.test_stack import processes_under
from tests.ui.live import ROOT, RunningApp, app_env, wait_healthy
from ui.service import stored_key

START_TIMEOUT_S = 240.0  # 2 shared cores: TorchServe may take a while to load the model
STOP_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 20.0  # every request gives up after this: a hang is a failure, never a wait
CONCURRENCY = 8  # load clients at once
RATE = 50.0  # requests per second at most, all clients together (about a third of what the app takes)
PAUSE_AFTER_ERROR_S = 0.2  # a client backs off a little after an error (the load stays bounded)
GONE_WITHIN_S = 30.0  # processes of a stopped (or killed) run: the watchdogs poll every 0.5 s
DRAIN_TIMEOUT_S = 90.0  # the outbox is stored within this once the database is back


# --- where a run lives ------------------------------------------------------------------------------


@dataclass
class StackDirs:
    """One test's `make run`: its folder (data, run folder, logs), TorchServe's ports, what ran."""

    root: Path
    torchserve_env: dict[str, str]
    seen: list[psutil.Process] = field(default_factory=list)  # every process the runs started
    runs: list[int] = field(default_factory=list)  # pids of the `make run` processes (group leaders)

    @property
    def pgdata(self) -> Path:
        return self.root / "data" / "postgres"

    @property
    def database_url(self) -> str:
        """The embedded server's `postgres` database, which `make run` stores into."""
        return url_for(socket_dir_for(self.pgdata), port=PORT)

    @property
    def torchserve(self) -> ServeConfig:
        """The TorchServe `make run` starts here (its pid file, ports)."""
        env = self.torchserve_env
        return ServeConfig(
            run_dir=self.root / "run" / "torchserve",
            inference_url=env["INFERENCE_URL"],
            management_url=env["MANAGEMENT_URL"],
            metrics_url=env["METRICS_URL"],
            grpc_inference_port=int(env["GRPC_INFERENCE_PORT"]),
            grpc_management_port=int(env["GRPC_MANAGEMENT_PORT"]),
        )

    def track(self, *extra: psutil.Process) -> None:
        """Remember the processes running from this folder now (checked at the end: all gone)."""
        known = {p.pid for p in self.seen}
        for proc in [*extra, *processes_under(self.root)]:
            if proc.pid not in known:
                self.seen.append(proc)
                known.add(proc.pid)


def new_stack_dirs() -> StackDirs:
    """A fresh folder and free ports. Not under pytest's 0700 folders: as root, PostgreSQL runs as
    another user, who must reach its data folder (as in tests/test_stack.py)."""
    root = Path(tempfile.mkdtemp(prefix="faults-"))
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    env = {
        "INFERENCE_URL": f"http://127.0.0.1:{inference}",
        "MANAGEMENT_URL": f"http://127.0.0.1:{management}",
        "METRICS_URL": f"http://127.0.0.1:{metrics}",
        "GRPC_INFERENCE_PORT": str(grpc_inference),
        "GRPC_MANAGEMENT_PORT": str(grpc_management),
    }
    return StackDirs(root, env)


def left_running(dirs: StackDirs, timeout: float = GONE_WITHIN_S) -> list[str]:
    """What still runs of this folder's runs after `timeout`: every process they started, and any
    process whose command line names the folder (PostgreSQL, TorchServe, its workers, watchdogs)."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in dirs.seen if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)  # not psutil.wait_procs: an unreaped zombie (not our child) counts as gone
    left = {p.pid: p for p in [*alive, *processes_under(dirs.root)]}
    out = []
    for proc in left.values():
        with contextlib.suppress(psutil.Error):
            out.append(f"{proc.pid}: {' '.join(proc.cmdline())[:200]}")
    return out


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def force_stop(dirs: StackDirs) -> None:
    """After a failed test: stop whatever still runs from `dirs`, then remove the folder."""
    for pid in dirs.runs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        stop_torchserve(dirs.torchserve, timeout=10)
    if (dirs.pgdata / "postmaster.pid").exists():
        pg_ctl(dirs, "stop", "-m", "immediate", "-w", check=False)
    for proc in dirs.seen:
        with contextlib.suppress(psutil.Error):
            if _running(proc):
                proc.kill()
    shutil.rmtree(dirs.root, ignore_errors=True)


# --- make run ---------------------------------------------------------------------------------------


@dataclass
class Stack:
    """One `python -m stack` (= `make run`) in its own process group."""

    app: RunningApp
    dirs: StackDirs
    killed: bool = False

    @property
    def url(self) -> str:
        return self.app.url

    @property
    def pid(self) -> int:
        return self.app.process.pid

    def output(self) -> str:
        return self.app.output()

    def kill_group(self) -> None:
        """SIGKILL the whole process group, as a kill of the terminal's `make run` does."""
        self.killed = True
        os.killpg(self.pid, signal.SIGKILL)
        self.app.process.wait(30)


@contextlib.contextmanager
def make_run(dirs: StackDirs, timeout: float = START_TIMEOUT_S) -> Iterator[Stack]:
    """`python -m stack` on `dirs` until the block ends (ready: model, database, pool), then SIGTERM;
    it must exit 0 within 60 s, unless the test killed it."""
    port = free_port()
    log = dirs.root / f"make-run-{port}.log"
    environment = app_env(dirs.root, port, **dirs.torchserve_env)
    # Its own parts only: the embedded server under DATA_DIR (which the tests stop), and the keys of
    # the TorchServe it starts (not those of the session's TorchServe, if one ran before).
    for name in ("DATABASE_URL", "TORCHSERVE_KEY_FILE"):
        environment.pop(name, None)
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "stack"],
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as in a terminal: killed as a whole
        )
    stack = Stack(RunningApp(process, f"http://127.0.0.1:{port}", log), dirs)
    dirs.runs.append(process.pid)
    dirs.track(psutil.Process(process.pid))
    try:
        wait_healthy(stack.app, timeout)
        wait_ready(stack, timeout)
        dirs.track()
        yield stack
    finally:
        dirs.track()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise AssertionError(f"make run did not stop on SIGTERM:\n{stack.output()}") from None
    if not stack.killed:
        assert process.returncode == 0, f"make run exited {process.returncode}:\n{stack.output()}"


def readiness(url: str) -> dict[str, Any]:
    """`/readyz` as JSON (its status code is 200 when ready, else 503)."""
    return httpx.get(f"{url}/readyz", timeout=10).json()


def wait_ready(stack: Stack, timeout: float) -> dict[str, Any]:
    """Until `/readyz` says ready (model, database and pool)."""
    last: dict[str, Any] = {}

    def ready() -> bool:
        nonlocal last
        assert stack.app.process.poll() is None, f"make run exited:\n{stack.output()}"
        with contextlib.suppress(httpx.HTTPError, ValueError):
            last = readiness(stack.url)
        return bool(last.get("ready"))

    wait_for(ready, timeout, lambda: f"make run not ready: {last}\n{stack.output()}")
    return last


def wait_for(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> float:
    """Poll `condition` until true; the seconds it took. AssertionError with `what` after `timeout`."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise AssertionError(what() if callable(what) else what)
        time.sleep(0.1)
    return time.monotonic() - began


# --- the faults -------------------------------------------------------------------------------------


def pg_ctl(dirs: StackDirs, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The embedded server's own `pg_ctl` on `dirs`' data folder, as the user the server runs as."""
    user: dict[str, Any] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses root: db.embedded runs it as SYSTEM_USER
        user = {"user": SYSTEM_USER, "group": SYSTEM_USER, "extra_groups": []}
    # stdout to a file, not a pipe: a server it starts inherits it and would hold a pipe open.
    with tempfile.TemporaryFile("w+") as out:
        result = subprocess.run(
            [str(bin_dir() / "pg_ctl"), "-D", str(dirs.pgdata), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
            timeout=120,
            **user,
        )
        out.seek(0)
        text = out.read()
    if check:
        assert result.returncode == 0, f"pg_ctl {' '.join(args)} failed: {text}"
    return subprocess.CompletedProcess(result.args, result.returncode, text, "")


def stop_postgres(dirs: StackDirs, mode: str) -> None:
    """`pg_ctl stop -m fast|immediate`: connections break; immediate skips the checkpoint (a crash)."""
    pg_ctl(dirs, "stop", "-m", mode, "-w", "-t", "60")


def start_postgres(dirs: StackDirs) -> None:
    """Start the stopped server again with the options it ran with (`restart` reads postmaster.opts)."""
    pg_ctl(dirs, "restart", "-w", "-t", "60", "-l", str(dirs.pgdata / "log"))
    dirs.track()


HOLD_COMMITS = "synchronous_standby_names = 'faults_no_such_standby'  # tests/faults: commits wait"


def hold_commits(dirs: StackDirs) -> None:
    """While the server is down: from its next start, every commit waits for a standby that does not
    exist. The commit is written (kept by any shutdown), but the client never hears it succeed."""
    with (dirs.pgdata / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"\n{HOLD_COMMITS}\n")


def release_commits(dirs: StackDirs) -> None:
    """While the server is down: commits are acknowledged again from its next start."""
    conf = dirs.pgdata / "postgresql.auto.conf"
    conf.write_text("".join(line for line in conf.read_text().splitlines(True) if HOLD_COMMITS not in line))


def commits_waiting(dirs: StackDirs) -> int:
    """Sessions whose commit waits for the missing standby (`hold_commits`)."""
    with psycopg.connect(dirs.database_url, connect_timeout=10, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'").fetchone()
    return int(row[0]) if row else 0


def postgres_processes(dirs: StackDirs) -> list[psutil.Process]:
    return [p for p in processes_under(dirs.pgdata) if "postgres" in p.name()]


def java_frontend(dirs: StackDirs) -> psutil.Process:
    """TorchServe's Java frontend under the launcher recorded in the run folder."""
    return frontend_of(dirs.torchserve)


def python_workers(dirs: StackDirs) -> list[psutil.Process]:
    """TorchServe's Python worker processes (children of its Java frontend)."""
    return [
        proc
        for proc in java_frontend(dirs).children(recursive=True)
        if "model_service_worker" in " ".join(proc.cmdline())
    ]


def model_workers(url: str) -> str:
    """`/readyz`'s model detail, e.g. "workers: READY, READY"."""
    return str(readiness(url)["model"]["detail"])


# --- the load ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One tagged POST and what came back (`status` None: no answer at all)."""

    key: str  # the client's Idempotency-Key
    image: int  # which drawing (index into the load's images)
    phase: str  # what was happening when it was sent (before, during, after a fault)
    sent_at: datetime
    answered_at: datetime | None = None
    status: int | None = None
    body: Any = None  # the JSON body, None when the body was not JSON
    error: str = ""  # no answer: the client's exception; else the content type when not JSON

    @property
    def accepted(self) -> bool:
        """201 (stored) or 202 (durably queued): a promise that the row exists, or will."""
        return self.status in (201, 202)


def post(client: httpx.Client, url: str, image: bytes, key: str, index: int, phase: str) -> Answer:
    """One POST /api/predictions with its `Idempotency-Key`; never raises, never waits forever."""
    answer = Answer(key=key, image=index, phase=phase, sent_at=datetime.now(UTC))
    try:
        response = client.post(
            f"{url}/api/predictions",
            content=image,
            headers={"content-type": "image/png", "Idempotency-Key": key},
            timeout=CLIENT_TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        answer.error = type(exc).__name__
        return answer
    answer.answered_at = datetime.now(UTC)
    answer.status = response.status_code
    try:
        answer.body = response.json()
    except ValueError:
        answer.error = response.headers.get("content-type", "no content type")
    return answer


class Load:
    """`CONCURRENCY` clients posting tagged drawings to one app, at most `RATE` per second, until
    `stop()` or `limit` requests."""

    def __init__(self, url: str, images: Sequence[bytes], case: str, limit: int) -> None:
        self.url = url
        self.images = images
        self.case = case
        self.limit = limit
        self.phase = "before"
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CONCURRENCY)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """No new requests; wait for those in flight (each has a client timeout)."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(CLIENT_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a load client hangs"

    def _next(self) -> tuple[int, str, str] | None:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.limit:
                return None
            n = self._sent
            self._sent += 1
            return n, f"{self.case}-{n}-{uuid.uuid4().hex[:12]}", self.phase

    def _client(self) -> None:
        interval = CONCURRENCY / RATE
        with httpx.Client() as client:
            while (job := self._next()) is not None:
                began = time.monotonic()
                n, key, phase = job
                index = n % len(self.images)
                answer = post(client, self.url, self.images[index], key, index, phase)
                with self._lock:
                    self.answers.append(answer)
                pause = interval - (time.monotonic() - began)
                self._stop.wait(max(pause, 0.0 if answer.accepted else PAUSE_AFTER_ERROR_S))

    def count(self, phase: str | None = None, status: int | None = None) -> int:
        """Answered requests (any status), of one phase and with one status if given."""
        with self._lock:
            return sum(
                1
                for a in self.answers
                if a.status is not None
                and (phase is None or a.phase == phase)
                and (status is None or a.status == status)
            )

    def wait(self, answered: int, phase: str, timeout: float, status: int | None = None) -> None:
        """Until `answered` requests sent in `phase` have an answer (with `status` if given)."""
        wait_for(
            lambda: self.count(phase, status) >= answered or self.exhausted(),
            timeout,
            lambda: f"{self.case}: {self.count(phase, status)} of {answered} {phase} answers in {timeout} s",
        )
        assert self.count(phase, status) >= answered, f"{self.case}: the load reached its limit first"

    def exhausted(self) -> bool:
        with self._lock:
            return self._sent >= self.limit and all(not t.is_alive() for t in self._threads)

    def first_accepted_after(self, moment: datetime, status: int | None = None) -> Answer | None:
        """The first accepted answer (with `status` if given) to a request sent after `moment`."""
        with self._lock:
            later = [
                a
                for a in self.answers
                if a.accepted and a.sent_at >= moment and (status is None or a.status == status)
            ]
        return min(later, key=lambda a: a.answered_at or a.sent_at, default=None)

    def seconds_to_first_after(self, moment: datetime, status: int | None = None) -> float | None:
        """From `moment` to the first accepted answer (with `status`) to a request sent after it."""
        first = self.first_accepted_after(moment, status)
        if first is None or first.answered_at is None:
            return None
        return (first.answered_at - moment).total_seconds()

    def wait_first_after(self, moment: datetime, timeout: float, status: int | None = None) -> float:
        """`seconds_to_first_after`, once there is such an answer (AssertionError after `timeout`)."""
        wait_for(
            lambda: self.seconds_to_first_after(moment, status) is not None,
            timeout,
            f"{self.case}: no request sent after {moment} accepted within {timeout} s",
        )
        return self.seconds_to_first_after(moment, status) or 0.0


# --- reconciliation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRow:
    id: int
    key: str | None
    created_at: datetime


def stored_rows(dirs: StackDirs, after_id: int = 0) -> list[StoredRow]:
    """Every prediction row in the run's database with an id above `after_id`: a case sharing a run
    with earlier ones reconciles the rows stored since it began (ids only grow; the earlier cases'
    outbox was drained before it began, so every later row is its own)."""
    with psycopg.connect(dirs.database_url, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT id, key, created_at FROM predictions WHERE id > %s ORDER BY id", (after_id,)
        ).fetchall()
    return [StoredRow(*row) for row in rows]


def last_row_id(dirs: StackDirs) -> int:
    """The highest prediction id stored so far (0: none)."""
    with psycopg.connect(dirs.database_url, connect_timeout=10) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM predictions").fetchone()
    return int(row[0]) if row else 0


@dataclass
class Tally:
    """Every answer of a case reconciled with the database."""

    case: str
    requests: int = 0
    created: int = 0  # 201
    accepted: int = 0  # 202
    others: Counter[str] = field(default_factory=Counter)  # "503", "no answer: ReadTimeout", ...
    lost: list[str] = field(default_factory=list)  # a 201/202 whose row is not there
    duplicated: int = 0  # rows beyond one per request: same key twice, or a row of no request
    wrong_id: list[str] = field(default_factory=list)  # a 201 whose id is not its row's
    made_later: list[str] = field(default_factory=list)  # a row dated after its request was answered
    bad_errors: list[str] = field(default_factory=list)  # an error that is not a 503 with a JSON body
    stored_despite_error: list[str] = field(default_factory=list)  # a row for a request answered 4xx/5xx
    stored_unanswered: int = 0  # rows of requests that got no answer (in flight at a SIGKILL): allowed
    figures: dict[str, str] = field(default_factory=dict)  # recovery times and such, for the report

    @property
    def no_answer(self) -> int:
        return sum(n for kind, n in self.others.items() if kind.startswith("no answer"))

    def summary(self) -> str:
        others = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.others.items())) or "none"
        extra = "".join(f", {name} {value}" for name, value in self.figures.items())
        return (
            f"{self.case}: {self.requests} requests, 201: {self.created}, 202: {self.accepted}, "
            f"other: {others}; lost {len(self.lost)}, duplicated {self.duplicated}, "
            f"stored without an answer {self.stored_unanswered}{extra}"
        )

    def problems(self) -> list[str]:
        """Every broken promise; empty when the case passed."""
        found = []
        for name in ("lost", "wrong_id", "made_later", "bad_errors", "stored_despite_error"):
            items = getattr(self, name)
            if items:
                found.append(f"{name}: {len(items)} (first: {items[:3]})")
        if self.duplicated:
            found.append(f"duplicated: {self.duplicated}")
        return found


def reconcile(case: str, answers: Sequence[Answer], rows: Sequence[StoredRow]) -> Tally:
    """Every 201 and 202 has exactly one row (found by its stored key), none twice, nothing else
    stored; every other answer is a 503 with a JSON body and stored nothing."""
    tally = Tally(case, requests=len(answers))
    by_key: dict[str | None, list[StoredRow]] = {}
    for row in rows:
        by_key.setdefault(row.key, []).append(row)
    sent = {stored_key(a.key) for a in answers}
    tally.duplicated = sum(len(found) - 1 for found in by_key.values() if len(found) > 1)
    tally.duplicated += sum(len(found) for key, found in by_key.items() if key not in sent)
    for a in answers:
        found = by_key.get(stored_key(a.key), [])
        if a.status is None:
            tally.others[f"no answer: {a.error}"] += 1
            tally.stored_unanswered += bool(found)
            continue
        if not a.accepted:
            tally.others[str(a.status)] += 1
            if a.status != 503 or not isinstance(a.body, dict) or "detail" not in a.body:
                tally.bad_errors.append(f"{a.key}: {a.status} {a.error or a.body}")
            if found:
                tally.stored_despite_error.append(a.key)
            continue
        if a.status == 201:
            tally.created += 1
        else:
            tally.accepted += 1
        if not found:
            tally.lost.append(a.key)
            continue
        body_id = a.body.get("id") if isinstance(a.body, dict) else None
        if a.status == 201 and body_id != found[0].id:
            tally.wrong_id.append(f"{a.key}: answered {body_id}, stored {found[0].id}")
        if a.answered_at is not None and found[0].created_at > a.answered_at:
            tally.made_later.append(f"{a.key}: {found[0].created_at} > {a.answered_at}")
    return tally


def wait_drained(stack: Stack, answers: Sequence[Answer], timeout: float = DRAIN_TIMEOUT_S) -> float:
    """Until nothing waits in the outbox and every accepted request has its row; the seconds taken.
    Then a little longer: a second replay must not add rows."""
    wanted = {stored_key(a.key) for a in answers if a.accepted}
    state: dict[str, Any] = {}

    def drained() -> bool:
        with contextlib.suppress(httpx.HTTPError, ValueError, psycopg.Error):
            state["ready"] = readiness(stack.url)
            state["missing"] = len(wanted - {r.key for r in stored_rows(stack.dirs)})
            return state["ready"].get("waiting_to_store") == 0 and state["missing"] == 0
        return False

    took = wait_for(drained, timeout, lambda: f"{stack.dirs.root}: not drained: {state}\n{stack.output()}")
    time.sleep(1.0)
    return took


def retry_some(url: str, images: Sequence[bytes], answers: Sequence[Answer], count: int) -> list[Answer]:
    """POST again, with the same key and drawing, some accepted requests (the 202s first): a client's
    retry after a lost answer. Each must come back accepted with the first answer's digit."""
    accepted = [a for a in answers if a.accepted]
    chosen = sorted(accepted, key=lambda a: a.status != 202)[:count]
    with httpx.Client() as client:
        retried = [post(client, url, images[a.image], a.key, a.image, "retry") for a in chosen]
    for first, again in zip(chosen, retried, strict=True):
        assert again.accepted, f"retry of {first.key}: {again.status} {again.body or again.error}"
        assert again.body["digit"] == first.body["digit"], (first.body, again.body)
    return retried


# --- the pool ---------------------------------------------------------------------------------------

POOL = re.compile(r"(\d+) connections, (\d+) idle, (\d+) waiting")


@dataclass(frozen=True)
class Pool:
    size: int
    idle: int
    waiting: int
    ready: bool


def pool_state(url: str) -> Pool:
    """The pool as `/readyz` reports it ("N connections, M idle, K waiting, exhausted for S s")."""
    pool = readiness(url)["pool"]
    found = POOL.search(pool["detail"])
    assert found, f"/readyz pool detail not understood: {pool}"
    size, idle, waiting = (int(g) for g in found.groups())
    return Pool(size, idle, waiting, bool(pool["ready"]))


def pool_whole(url: str) -> bool:
    """Every connection of the pool is back (idle) and nobody waits for one; False while `/readyz`
    does not answer in time (a server still working off a backlog)."""
    try:
        pool = pool_state(url)
    except (httpx.HTTPError, ValueError):
        return False
    return pool.size >= 1 and pool.idle == pool.size and pool.waiting == 0
