"""The training job queue: procrastinate (a PostgreSQL-backed task queue), on the app's database.

The UI defers a retrain job by task name (it never imports the trainer's code or torch); the
trainer worker (`serving/trainer.py`) registers the task `RETRAIN_TASK` on `make_app(url)` and runs
the queue `QUEUE`. Every retrain job carries the lock `LOCK`: procrastinate starts no job while
another job with the same lock is 'doing', so runs go one at a time across all workers and a
second request waits, queued, in order.

procrastinate's own tables (`procrastinate_jobs`, ...) come from its schema file, applied by
`apply_schema` (called by `db.migrate.migrate` after our SQL files) when they are absent.
Only this module imports procrastinate: `import db` does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

from db.migrate import LOCK_KEY as SCHEMA_LOCK_KEY  # the migrator's: one process applies it at a time
from db.records import is_count

if TYPE_CHECKING:
    import procrastinate

QUEUE = "training"
RETRAIN_TASK = "retrain"
LOCK = "retrain"
MARKER_TABLE = "procrastinate_jobs"
FETCH_POLL_S = 1.0


def make_app(url: str, *, max_size: int = 4) -> procrastinate.App:
    """A procrastinate app on `url` with no task registered: the UI defers by name, the worker registers
    `RETRAIN_TASK` on it. Open it with `async with app.open_async(): ...` (or `await app.open_async()`
    and `await app.close_async()`)."""
    import procrastinate

    connector = procrastinate.PsycopgConnector(
        conninfo=url,
        min_size=1,
        max_size=max_size,
        kwargs={"application_name": "queue", "options": "-c TimeZone=UTC"},
    )
    # The trainer's worker: only the training queue, and a job held back by the lock is looked for
    # every second (new jobs come at once through LISTEN/NOTIFY; the default poll is 5 s).
    return procrastinate.App(
        connector=connector,
        worker_defaults={"queues": [QUEUE], "fetch_job_polling_interval": FETCH_POLL_S},
    )


async def defer_retrain(app: procrastinate.App, run_id: int) -> int:
    """Queue a retrain job for the run `run_id` (task kwargs `{"run_id": run_id}`); return its job id.
    The app must be open."""
    if not is_count(run_id, 1, 2**63 - 1):
        raise ValueError(f"run_id must be a positive integer, got {run_id!r}")
    deferrer = app.configure_task(RETRAIN_TASK, lock=LOCK, queue=QUEUE)
    return await deferrer.defer_async(run_id=run_id)


async def fail_stalled_jobs(app: procrastinate.App, seconds: float = 30.0) -> list[int]:
    """Mark failed the jobs of `QUEUE` still 'doing' whose worker has sent no heartbeat for `seconds`
    (or was pruned already, i.e. is gone); return their ids. A killed worker's job would otherwise
    stay 'doing' for ever and, holding `LOCK`, block every later retrain job.

    procrastinate workers beat every 10 s by default (`update_heartbeat_interval`), so keep `seconds`
    above that when other workers may be alive. A single trainer may pass 0 at start, before its
    worker runs: any job then 'doing' belongs to a dead worker. Call it again now and then (e.g.
    every minute) to catch a worker that died while this one was up. The app must be open."""
    from procrastinate.exceptions import ConnectorException
    from procrastinate.jobs import Status

    stalled = await app.job_manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=seconds)
    failed: list[int] = []
    for job in stalled:
        assert job.id is not None
        try:
            await app.job_manager.finish_job_by_id_async(
                job_id=job.id, status=Status.FAILED, delete_job=False
            )
        except ConnectorException as exc:  # finished meanwhile (its worker was alive after all): leave it
            if "not found" not in str(exc).lower():
                raise
            continue
        failed.append(job.id)
    return sorted(failed)


async def job_status(app: procrastinate.App, job_id: int) -> str | None:
    """The job's procrastinate status ('todo', 'doing', 'succeeded', 'failed', 'cancelled', 'aborted'),
    or None when there is no such job."""
    rows = await app.job_manager.list_jobs_async(id=job_id)
    for job in rows:
        return str(job.status)
    return None


async def cancel_job(app: procrastinate.App, job_id: int) -> bool:
    """Cancel a job still waiting ('todo'); False when it has started or finished (or does not exist)."""
    return bool(await app.job_manager.cancel_job_by_id_async(job_id))


def schema_sql() -> str:
    """procrastinate's schema file (the one of the installed version)."""
    from procrastinate.schema import SchemaManager

    return SchemaManager.get_schema()


def apply_schema_sync(url: str) -> bool:
    """Apply procrastinate's schema if its tables are absent; True when applied now. One transaction,
    under the migrator's advisory lock: two processes starting together apply it once."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_KEY,))
        try:
            return apply_schema_locked(conn)
        finally:
            if not conn.closed:
                conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_KEY,))


def apply_schema_locked(conn: psycopg.Connection[Any]) -> bool:
    """Apply the schema unless present, on an autocommit connection that holds the migrator's advisory
    lock (`db.migrate.migrate` calls it on its own connection: the lock is per session)."""
    (present,) = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (MARKER_TABLE,)).fetchone() or (False,)
    if present:
        return False
    with conn.transaction():
        conn.execute(schema_sql().encode())
    return True


async def apply_schema(url: str) -> bool:
    """`apply_schema_sync` for async callers (in a thread: it is a one-off at start-up)."""
    import asyncio

    return await asyncio.to_thread(apply_schema_sync, url)
