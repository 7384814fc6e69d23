"""The training job queue (`db.queue`, procrastinate) against a real PostgreSQL: its schema, deferring by
task name, one job at a time through the lock, a real worker, and the jobs a killed worker leaves."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
import pytest

from db.migrate import migrate
from db.queue import (
    LOCK,
    QUEUE,
    RETRAIN_TASK,
    apply_schema,
    apply_schema_sync,
    cancel_job,
    defer_retrain,
    fail_stalled_jobs,
    job_status,
    make_app,
)
from db.registry import Registry
from db.runtime import start_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def app(db_url: str) -> AsyncIterator[procrastinate.App]:
    queue_app = make_app(db_url)
    async with queue_app.open_async():
        yield queue_app


def _jobs(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT id, status::text, task_name, queue_name, lock, args FROM procrastinate_jobs ORDER BY id"
        ).fetchall()


# -- the schema ------------------------------------------------------------------------------------
async def test_schema_is_applied_once(empty_db_url: str, db_url: str) -> None:
    assert await apply_schema(db_url) is False  # the migrated template has it already
    assert apply_schema_sync(empty_db_url) is True
    assert apply_schema_sync(empty_db_url) is False
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT to_regclass('procrastinate_workers') IS NOT NULL").fetchone() == (True,)


def test_two_migrators_at_once_apply_the_schema_once(empty_db_url: str) -> None:
    barrier = threading.Barrier(2)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(migrate(empty_db_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(len(r) for r in results)[0] == 0  # the second found everything applied
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM procrastinate_jobs").fetchone() == (0,)


def test_the_command_applies_the_queue_schema_then_nothing(empty_db_url: str) -> None:
    cmd = [sys.executable, "-m", "db", "migrate", "--database-url", empty_db_url]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "0007_model_registry.sql, the job queue's schema (procrastinate)" in first.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "up to date: nothing to apply"


# -- deferring -------------------------------------------------------------------------------------
async def test_defer_by_task_name(app: procrastinate.App, db_url: str) -> None:
    assert RETRAIN_TASK not in app.tasks  # the UI's app knows no task: it defers by name
    job_id = await defer_retrain(app, 5)
    assert job_id > 0
    assert _jobs(db_url) == [(job_id, "todo", RETRAIN_TASK, QUEUE, LOCK, {"run_id": 5})]
    assert await job_status(app, job_id) == "todo"
    assert await job_status(app, job_id + 1000) is None
    for bad in (0, -1, True, "5"):
        with pytest.raises(ValueError):
            await defer_retrain(app, bad)  # type: ignore[arg-type]
    assert await cancel_job(app, job_id) is True
    assert await job_status(app, job_id) == "cancelled"
    assert await cancel_job(app, job_id) is False


async def test_the_lock_runs_one_job_at_a_time(app: procrastinate.App) -> None:
    first, second = await defer_retrain(app, 1), await defer_retrain(app, 2)
    manager = app.job_manager
    worker_a, worker_b = await manager.register_worker(), await manager.register_worker()
    taken = await manager.fetch_job(queues=[QUEUE], worker_id=worker_a)
    assert taken is not None and taken.id == first
    assert await manager.fetch_job(queues=[QUEUE], worker_id=worker_b) is None  # queued behind the lock
    assert await job_status(app, second) == "todo"
    await manager.finish_job_by_id_async(
        job_id=first, status=procrastinate.jobs.Status.SUCCEEDED, delete_job=False
    )
    taken = await manager.fetch_job(queues=[QUEUE], worker_id=worker_b)
    assert taken is not None and taken.id == second


async def test_a_real_worker_runs_the_task_registered_by_name(app: procrastinate.App, db_url: str) -> None:
    registry = await Registry.open(db_url)
    try:
        run_ids = [(await registry.create_run()).id for _ in range(2)]
        job_ids = [await defer_retrain(app, run_id) for run_id in run_ids]
        for run_id, job_id in zip(run_ids, job_ids, strict=True):
            await registry.set_job(run_id, job_id)

        worker_app = make_app(db_url)  # the trainer's: it registers the task
        seen: list[tuple[int, int]] = []
        overlapping: list[int] = []
        running = 0

        @worker_app.task(name=RETRAIN_TASK, queue=QUEUE, pass_context=True)
        async def retrain(context: procrastinate.JobContext, run_id: int) -> None:
            nonlocal running
            running += 1
            overlapping.append(running)
            assert context.job.id is not None
            await registry.start_run(run_id)
            await asyncio.sleep(0.2)
            seen.append((run_id, context.job.id))
            await registry.finish_run(run_id, "succeeded", "done")
            running -= 1

        async with worker_app.open_async():
            worker = asyncio.create_task(
                worker_app.run_worker_async(
                    concurrency=2, install_signal_handlers=False
                )  # make_app's defaults
            )
            try:
                async with asyncio.timeout(60):
                    while len(seen) < 2:
                        await asyncio.sleep(0.05)
            finally:
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
        assert seen == list(zip(run_ids, job_ids, strict=True))
        assert max(overlapping) == 1  # concurrency 2, but the lock lets one run at a time
        assert [await job_status(app, j) for j in job_ids] == ["succeeded", "succeeded"]
        for run_id in run_ids:
            run = await registry.get_run(run_id)
            assert run is not None and run.status == "succeeded"
    finally:
        await registry.close()


# -- a killed worker -------------------------------------------------------------------------------
async def test_fail_stalled_jobs_frees_the_lock_of_a_dead_worker(app: procrastinate.App, db_url: str) -> None:
    manager = app.job_manager
    dead, alive = await manager.register_worker(), await manager.register_worker()
    stalled = await defer_retrain(app, 1)
    assert (job := await manager.fetch_job(queues=[QUEUE], worker_id=dead)) is not None and job.id == stalled
    waiting = await defer_retrain(app, 2)
    assert await manager.fetch_job(queues=[QUEUE], worker_id=alive) is None  # blocked by the stalled job

    assert await fail_stalled_jobs(app, 30) == []  # the dead worker's last heartbeat is recent
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '5 minutes' WHERE id = %s",
            (dead,),
        )
    assert await fail_stalled_jobs(app, 30) == [stalled]
    assert await job_status(app, stalled) == "failed"
    assert await fail_stalled_jobs(app, 30) == []

    job = await manager.fetch_job(queues=[QUEUE], worker_id=alive)  # the next run works
    assert job is not None and job.id == waiting
    assert await fail_stalled_jobs(app, 30) == []  # a live worker's job is left alone
    assert await job_status(app, waiting) == "doing"


async def test_at_start_a_single_trainer_fails_every_orphan_at_once(app: procrastinate.App) -> None:
    manager = app.job_manager
    killed = await manager.register_worker()
    stalled = await defer_retrain(app, 1)
    assert await manager.fetch_job(queues=[QUEUE], worker_id=killed) is not None
    await manager.prune_stalled_workers(0)  # what a new worker does at start: the old one is gone
    assert await fail_stalled_jobs(app, 0) == [stalled]
    assert await job_status(app, stalled) == "failed"


async def test_other_queues_are_not_touched(app: procrastinate.App) -> None:
    manager = app.job_manager
    worker = await manager.register_worker()
    other = await app.configure_task("something_else", queue="other").defer_async()
    assert (
        job := await manager.fetch_job(queues=["other"], worker_id=worker)
    ) is not None and job.id == other
    await manager.prune_stalled_workers(0)
    assert await fail_stalled_jobs(app, 0) == []
    assert await job_status(app, other) == "doing"


def test_start_database_applies_the_queue_schema_too(empty_db_url: str) -> None:
    database = start_database(empty_db_url)  # what `make run` does
    try:
        with psycopg.connect(database.url) as conn:
            assert conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone() == (True,)
            assert conn.execute("SELECT to_regclass('model_versions') IS NOT NULL").fetchone() == (True,)
    finally:
        database.stop()
    assert apply_schema_sync(empty_db_url) is False
