"""A 202 survives SIGKILL: `python -m ui` with PostgreSQL stopped, killed, then started again.

The app runs in a subprocess on the session's real PostgreSQL (a fresh migrated database) and a
fake model server on a real port. Every prediction answered 202 while the database was down must
be stored exactly once after the restart, with the time it was made.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.ui.fakes import FakeModelServer, digit_png
from tests.ui.live import ROOT, RunningApp, app_env, free_port, wait_healthy

pytestmark = pytest.mark.slow

N = 25


@contextlib.contextmanager
def app_process(tmp: Path, database_url: str, model_url: str, **extra: str) -> Iterator[RunningApp]:
    """`python -m ui` (serve only) on its own port, with its data folder (the outbox) under `tmp`."""
    port = free_port()
    log = tmp / f"ui-{port}.log"
    model = {"INFERENCE_URL": model_url, "MANAGEMENT_URL": model_url}
    env = app_env(tmp, port, DATABASE_URL=database_url, **{**model, **extra})
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ui"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    app = RunningApp(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_healthy(app, 60)
        yield app
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def rows(database_url: str) -> list[tuple[datetime, str]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT created_at, key FROM predictions ORDER BY id").fetchall()


def test_predictions_accepted_while_the_database_is_down_survive_sigkill(
    postgres, db_url: str, tmp_path: Path
) -> None:
    if not postgres.can_restart:
        pytest.skip("DATABASE_URL points at an external server, which the tests cannot stop")
    with FakeModelServer() as model:
        postgres.stop()
        try:
            with app_process(tmp_path, db_url, model.url) as app:
                made = []
                for i in range(N):
                    response = httpx.post(
                        f"{app.url}/api/predictions",
                        content=digit_png("one" if i % 2 else "zero"),
                        headers={"content-type": "image/png"},
                        timeout=30,
                    )
                    assert response.status_code == 202, response.text
                    made.append(datetime.now(UTC))
                app.process.send_signal(signal.SIGKILL)  # no shutdown: only what is on disk remains
                app.process.wait(30)
                assert app.process.returncode == -signal.SIGKILL
        finally:
            postgres.start()
        assert rows(db_url) == []

        with app_process(tmp_path, db_url, model.url) as app:
            restarted = datetime.now(UTC)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(rows(db_url)) < N:
                time.sleep(0.2)
            time.sleep(1.0)  # a second replay must not add rows
            stored = rows(db_url)
            ready = httpx.get(f"{app.url}/readyz", timeout=10).json()
            app.process.send_signal(signal.SIGTERM)
            assert app.process.wait(60) == 0, app.output()

    assert len(stored) == N, app.output()
    assert len({key for _, key in stored}) == N
    assert ready["waiting_to_store"] == 0
    for (created_at, _), answered in zip(stored, made, strict=True):
        assert created_at <= answered < restarted  # the time the prediction was made, not when stored
    assert [created for created, _ in stored] == sorted(created for created, _ in stored)
