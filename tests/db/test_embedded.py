"""The embedded server: reuse of its data, stale and orphaned servers, stopping on exit."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from db.embedded import MAX_SOCKET_PATH, EmbeddedPostgres, socket_dir_for, url_for

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys, time
from db.embedded import EmbeddedPostgres
server = EmbeddedPostgres(sys.argv[1], watchdog=sys.argv[2] == "watchdog")
print(server.start(), flush=True)
time.sleep(600)
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pgdata() -> Iterator[Path]:
    """An initialised, stopped data directory shared by this module's tests (each leaves it stopped)."""
    tmp = Path(tempfile.mkdtemp(prefix="pytest-embedded-"))
    server = EmbeddedPostgres(tmp / "postgres", watchdog=False)
    with server as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (value text)")
        conn.execute("INSERT INTO kept VALUES ('before')")
    yield tmp / "postgres"
    EmbeddedPostgres(tmp / "postgres", watchdog=False).stop()
    shutil.rmtree(tmp, ignore_errors=True)


def _child(pgdata: Path, watchdog: bool) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(pgdata), "watchdog" if watchdog else "none"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith("postgresql://"), url
    return proc, url


def _wait_stopped(server: EmbeddedPostgres, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while server.is_running():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _value(url: str) -> list[tuple[str]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT value FROM kept ORDER BY value").fetchall()


def test_data_is_reused_across_runs(pgdata: Path) -> None:
    server = EmbeddedPostgres(pgdata, watchdog=False)
    with server as url:
        assert server.is_running() and server.owned
        assert _value(url) == [("before",)]
    assert not server.is_running()


def test_stale_postmaster_pid_is_cleared(pgdata: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (pgdata / "postmaster.pid").write_text(f"{dead.pid}\n{pgdata}\n0\n5432\n{pgdata}\n\n  0 0\nready\n")
    server = EmbeddedPostgres(pgdata, watchdog=False)
    assert not server.is_running()
    with server as url:
        assert _value(url) == [("before",)]


def test_pid_file_naming_another_live_process_is_cleared(pgdata: Path) -> None:
    other = subprocess.Popen(["sleep", "60"])  # alive, but not PostgreSQL
    try:
        (pgdata / "postmaster.pid").write_text(f"{other.pid}\n{pgdata}\n0\n5432\n{pgdata}\n\n  0 0\nready\n")
        with EmbeddedPostgres(pgdata, watchdog=False) as url:
            assert _value(url) == [("before",)]
    finally:
        other.kill()
        other.wait()


def test_server_left_by_a_killed_run_is_adopted(pgdata: Path) -> None:
    proc, url = _child(pgdata, watchdog=False)
    proc.kill()
    proc.wait()
    server = EmbeddedPostgres(pgdata, watchdog=False)
    assert server.is_running()  # the killed run left it behind
    assert server.start() == url
    assert server.owned
    assert _value(url) == [("before",)]
    server.stop()
    assert not server.is_running()


def test_watchdog_stops_the_server_when_its_process_is_killed(pgdata: Path) -> None:
    proc, _ = _child(pgdata, watchdog=True)
    server = EmbeddedPostgres(pgdata, watchdog=False)
    assert server.is_running()
    proc.kill()
    proc.wait()
    assert _wait_stopped(server)


def test_sigterm_stops_the_server(pgdata: Path) -> None:
    proc, _ = _child(pgdata, watchdog=False)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert not EmbeddedPostgres(pgdata, watchdog=False).is_running()


def test_a_server_another_live_process_owns_is_shared_not_stopped(pgdata: Path) -> None:
    proc, url = _child(pgdata, watchdog=False)
    try:
        server = EmbeddedPostgres(pgdata, watchdog=False)
        assert server.start() == url
        assert not server.owned
        server.stop()
        assert server.is_running()  # still the other process's server
        assert _value(url) == [("before",)]
    finally:
        proc.terminate()
        proc.wait(30)
    assert _wait_stopped(EmbeddedPostgres(pgdata, watchdog=False))


def test_long_data_dir_gets_a_short_socket_dir(tmp_path: Path) -> None:
    short = tmp_path / "pg"
    assert socket_dir_for(short) == short
    long = tmp_path / ("x" * 120) / "pg"
    sock = socket_dir_for(long)
    assert len(str(sock)) < MAX_SOCKET_PATH and sock != long
    assert socket_dir_for(long) == sock  # stable across runs
    assert url_for(Path("/tmp/a b")) == "postgresql://postgres@/postgres?host=/tmp/a%20b&port=5432"


def test_a_running_server_is_found_on_its_own_socket_dir(pgdata: Path, monkeypatch) -> None:
    other = Path(tempfile.mkdtemp(prefix="pgsock-test-"))
    monkeypatch.setattr("db.embedded.socket_dir_for", lambda _: other)
    first = EmbeddedPostgres(pgdata, watchdog=False)
    try:
        url = first.start()
        assert str(other) in url
        monkeypatch.undo()
        second = EmbeddedPostgres(pgdata, watchdog=False)
        assert second.socket_dir == pgdata
        assert second.start() == url  # found through postmaster.pid
        assert _value(second.url) == [("before",)]
        second.stop()  # the same process started it, so this object may stop it too
        assert not first.is_running()
    finally:
        first.stop()
        shutil.rmtree(other, ignore_errors=True)
