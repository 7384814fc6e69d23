"""The model registry and the training runs (migration 0007): which versions exist, which one is live,
what each run did, and the labelled drawings to train on. Async, psycopg 3, parameterised SQL only.

The registry is the source of truth for the live version: TorchServe forgets its registrations
when it restarts, this table does not (`serving/registry.py` registers the live version again).
Promotion is one transaction under an advisory lock, so two promotions at once cannot leave two
live versions or none (the partial unique index `model_versions_one_live` would refuse two anyway).

Failures to reach the server are `DatabaseUnavailable`, other database errors `StoreError`, as in
`db.store`. Connections are taken and given back shielded from the caller's cancellation (`db.detach`;
why: db/README.md "Cancellation and the pool"): the admin page runs these calls under NiceGUI too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from db.detach import Handover
from db.errors import DatabaseUnavailable, PredictionNotFound, StoreError
from db.records import (
    Disagreement,
    FeedbackRow,
    InvalidRegistryValue,
    ModelVersion,
    RunNotFound,
    TrainingRun,
    VersionExists,
    VersionNotFound,
    VersionState,
    is_count,
    validate_archive_file,
    validate_final_status,
    validate_id,
    validate_progress,
    validate_run_id,
    validate_sha256,
    validate_state,
    validate_version,
)

__all__ = [
    "Disagreement",
    "FeedbackRow",
    "InvalidRegistryValue",
    "ModelVersion",
    "Registry",
    "RunNotFound",
    "TrainingRun",
    "VersionExists",
    "VersionNotFound",
]

log = logging.getLogger(__name__)

APPLICATION_NAME = "registry"
CONNECT_TIMEOUT_S = 5
POOL_TIMEOUT_S = 5.0
# Every promotion takes this transaction-level advisory lock (an arbitrary fixed key, not the migrator's).
LIVE_LOCK_KEY = 7_241_905_318_004_212
# A queued run without a job younger than this is being deferred right now (create_run, then
# defer, then set_job): fail_running leaves it alone.
QUEUED_GRACE_S = 60.0

VERSION_COLUMNS = (
    "version, archive_file, archive_sha256, parent_version, created_at, feedback_count, feedback_max_id, "
    "evaluation, state, reason, promoted_at, run_id"
)
RUN_COLUMNS = (
    "id, status, progress, message, options, history, created_at, started_at, finished_at, version, "
    "promoted, job_id"
)

# Labelled with a digit (a not-a-digit row has no true_label), not excluded, with its drawing;
# deleted predictions are gone (their drawings with them). By id: the partial index of migration 0007.
FEEDBACK = """
SELECT p.id, i.image_png, p.true_label
FROM predictions p JOIN prediction_images i ON i.prediction_id = p.id
WHERE p.true_label IS NOT NULL AND NOT p.excluded AND (%(max_id)s::bigint IS NULL OR p.id <= %(max_id)s)
ORDER BY p.id
"""
FEEDBACK_STATS = """
SELECT count(*), max(p.id)
FROM predictions p JOIN prediction_images i ON i.prediction_id = p.id
WHERE p.true_label IS NOT NULL AND NOT p.excluded
"""
# `true_label <> digit` is the partial index predictions_wrong_idx (migration 0005).
DISAGREEMENTS = """
SELECT id, created_at, true_label, digit, confidence, model_version, excluded
FROM predictions WHERE true_label <> digit
ORDER BY id DESC LIMIT %s OFFSET %s
"""


def _version(row: tuple[Any, ...]) -> ModelVersion:
    return ModelVersion(
        version=row[0],
        archive_file=row[1],
        archive_sha256=row[2],
        parent_version=row[3],
        created_at=row[4],
        feedback_count=row[5],
        feedback_max_id=row[6],
        evaluation=row[7],
        state=row[8],
        reason=row[9],
        promoted_at=row[10],
        run_id=row[11],
    )


def _run(row: tuple[Any, ...]) -> TrainingRun:
    return TrainingRun(
        id=row[0],
        status=row[1],
        progress=float(row[2]),
        message=row[3],
        options=row[4],
        history=row[5],
        created_at=row[6],
        started_at=row[7],
        finished_at=row[8],
        version=row[9],
        promoted=row[10],
        job_id=row[11],
    )


def _json_object(value: object, name: str) -> Jsonb:
    """A dict that JSON can hold, as a jsonb parameter; else InvalidRegistryValue (before any round trip)."""
    if not isinstance(value, dict):
        raise InvalidRegistryValue(f"{name} must be a JSON object (a dict), got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRegistryValue(f"{name} must be JSON (no NaN, no infinity): {exc}") from exc
    return Jsonb(value)


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or "\x00" in value:
        raise InvalidRegistryValue(f"{name} must be a text without NUL, got {value!r}")
    return value


def _optional_id(value: object, name: str) -> int | None:
    if value is not None and not is_count(value, 0, 2**63 - 1):
        raise InvalidRegistryValue(f"{name} must be a non-negative integer or None, got {value!r}")
    return value


class Registry:
    """The registry's data access. `Registry(pool)` shares a pool (its owner closes it);
    `await Registry.open(url)` owns a small one, closed by `close()` (or `async with`)."""

    def __init__(self, pool: AsyncConnectionPool[Any], *, owns_pool: bool = False) -> None:
        self._pool = pool
        self._owns_pool = owns_pool
        self._handover = Handover(pool)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        max_size: int = 4,
        timeout: float = POOL_TIMEOUT_S,
        application_name: str = APPLICATION_NAME,
    ) -> Registry:
        """A registry with its own pool of up to `max_size` connections; works while the server is down."""
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=timeout,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT_S,
                "application_name": application_name,
                "options": "-c TimeZone=UTC",
            },
            name="registry",
        )
        await pool.open(wait=False)
        return cls(pool, owns_pool=True)

    async def close(self) -> None:
        await self._handover.settle()
        if self._owns_pool:
            await self._pool.close()

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connections ---------------------------------------------------------------------------------
    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection inside a transaction; connection failures become DatabaseUnavailable."""
        try:
            conn = await self._handover.take()
            try:
                async with conn.transaction():
                    yield conn
            finally:
                await self._handover.give_back(conn)
        except psycopg.OperationalError as exc:  # includes PoolTimeout
            raise DatabaseUnavailable(str(exc).strip().splitlines()[0] if str(exc) else repr(exc)) from exc
        except psycopg.Error as exc:  # e.g. the schema is missing: migrations not applied
            raise StoreError(f"database error: {exc.diag.message_primary or exc}") from exc

    async def _one(self, query: str, params: Any = None) -> tuple[Any, ...] | None:
        async with self._transaction() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchone()

    async def _all(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        async with self._transaction() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    # -- model versions ------------------------------------------------------------------------------
    async def add_version(
        self,
        version: str,
        archive_file: str,
        archive_sha256: str,
        *,
        parent_version: str | None = None,
        feedback_count: int = 0,
        feedback_max_id: int | None = None,
        evaluation: dict[str, Any] | None = None,
        state: VersionState = "candidate",
        reason: str = "",
        run_id: int | None = None,
    ) -> ModelVersion:
        """Register a version (a candidate by default). VersionExists if the name is taken; a 'live' state
        goes through `set_live` (so the old live version is demoted in the same transaction)."""
        validate_version(version)
        validate_archive_file(archive_file)
        validate_sha256(archive_sha256)
        if parent_version is not None:
            validate_version(parent_version)
        if not is_count(feedback_count, 0, 2**31 - 1):
            raise InvalidRegistryValue(
                f"feedback_count must be a non-negative integer, got {feedback_count!r}"
            )
        _optional_id(feedback_max_id, "feedback_max_id")
        _optional_id(run_id, "run_id")
        evaluation_json = _json_object({} if evaluation is None else evaluation, "evaluation")
        wanted = validate_state(state)
        _text(reason, "reason")
        params = (
            version,
            archive_file,
            archive_sha256,
            parent_version,
            feedback_count,
            feedback_max_id,
            evaluation_json,
            "candidate" if wanted == "live" else wanted,
            reason,
            run_id,
        )
        try:
            row = await self._one(
                f"""INSERT INTO model_versions (version, archive_file, archive_sha256, parent_version,
                    feedback_count, feedback_max_id, evaluation, state, reason, run_id)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {VERSION_COLUMNS}""",
                params,
            )
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, psycopg.errors.UniqueViolation):
                raise VersionExists(f"version {version!r} is registered already") from cause
            if isinstance(cause, psycopg.errors.ForeignKeyViolation):
                raise VersionNotFound(
                    f"parent version {parent_version!r} or run {run_id!r} does not exist"
                ) from cause
            raise
        assert row is not None
        if wanted == "live":
            return await self.set_live(version, reason)
        return _version(row)

    async def get_version(self, version: str) -> ModelVersion | None:
        """The version, or None when the registry has no such version."""
        row = await self._one(f"SELECT {VERSION_COLUMNS} FROM model_versions WHERE version = %s", (version,))
        return None if row is None else _version(row)

    async def versions(self) -> list[ModelVersion]:
        """Every version, newest first."""
        rows = await self._all(
            f"SELECT {VERSION_COLUMNS} FROM model_versions ORDER BY created_at DESC, version DESC"
        )
        return [_version(r) for r in rows]

    async def live_version(self) -> ModelVersion | None:
        row = await self._one(f"SELECT {VERSION_COLUMNS} FROM model_versions WHERE state = 'live'")
        return None if row is None else _version(row)

    async def set_live(self, version: str, reason: str = "promoted") -> ModelVersion:
        """Make `version` the live one, in one transaction: the old live version becomes a 'candidate'
        with reason 'replaced by <version>' (still registered: a rollback is one more set_live), the
        new one 'live' with `reason` and promoted_at now. Any state may be made live (a rollback to a
        retired version re-registers its archive first, in serving/). VersionNotFound when absent."""
        validate_version(version)
        _text(reason, "reason")
        async with self._transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LIVE_LOCK_KEY,))
            cur = await conn.execute(
                "SELECT state FROM model_versions WHERE version = %s FOR UPDATE", (version,)
            )
            if await cur.fetchone() is None:
                raise VersionNotFound(f"no model version {version!r}")
            await conn.execute(
                "UPDATE model_versions SET state = 'candidate', reason = %s "
                "WHERE state = 'live' AND version <> %s",
                (f"replaced by {version}", version),
            )
            cur = await conn.execute(
                f"""UPDATE model_versions SET state = 'live', reason = %s, promoted_at = now()
                WHERE version = %s RETURNING {VERSION_COLUMNS}""",
                (reason, version),
            )
            row = await cur.fetchone()
        assert row is not None
        return _version(row)

    async def set_state(self, version: str, state: VersionState, reason: str) -> ModelVersion:
        """Set a version's state and why: 'candidate', 'retired' or 'failed' ('live' is `set_live`).
        Changing the live version's state leaves no live version: serving/ refuses to retire it."""
        validate_version(version)
        wanted = validate_state(state)
        if wanted == "live":
            raise InvalidRegistryValue("a version becomes live through set_live (it demotes the old one)")
        _text(reason, "reason")
        row = await self._one(
            f"UPDATE model_versions SET state = %s, reason = %s WHERE version = %s "
            f"RETURNING {VERSION_COLUMNS}",
            (wanted, reason, version),
        )
        if row is None:
            raise VersionNotFound(f"no model version {version!r}")
        return _version(row)

    async def set_evaluation(self, version: str, evaluation: dict[str, Any]) -> ModelVersion:
        """Replace the version's evaluation JSON (accuracies, per digit, the data it was measured on)."""
        validate_version(version)
        value = _json_object(evaluation, "evaluation")
        row = await self._one(
            f"UPDATE model_versions SET evaluation = %s WHERE version = %s RETURNING {VERSION_COLUMNS}",
            (value, version),
        )
        if row is None:
            raise VersionNotFound(f"no model version {version!r}")
        return _version(row)

    # -- training runs -------------------------------------------------------------------------------
    async def create_run(self, options: dict[str, Any] | None = None) -> TrainingRun:
        """A new run, 'queued', with the options it was asked with (JSON object)."""
        value = _json_object({} if options is None else options, "options")
        row = await self._one(
            f"INSERT INTO training_runs (options) VALUES (%s) RETURNING {RUN_COLUMNS}", (value,)
        )
        assert row is not None
        return _run(row)

    async def get_run(self, run_id: int) -> TrainingRun | None:
        """The run, or None when there is no such run."""
        if not is_count(run_id, 1, 2**63 - 1):
            return None
        row = await self._one(f"SELECT {RUN_COLUMNS} FROM training_runs WHERE id = %s", (run_id,))
        return None if row is None else _run(row)

    async def run_for_job(self, job_id: int) -> TrainingRun | None:
        """The run the queue's job `job_id` belongs to, or None."""
        if not is_count(job_id, 1, 2**63 - 1):
            return None
        row = await self._one(
            f"SELECT {RUN_COLUMNS} FROM training_runs WHERE job_id = %s ORDER BY id DESC LIMIT 1", (job_id,)
        )
        return None if row is None else _run(row)

    async def runs(self, limit: int = 20) -> list[TrainingRun]:
        """The newest runs first."""
        if not is_count(limit, 1, 1000):
            raise InvalidRegistryValue(f"limit must be an integer from 1 to 1000, got {limit!r}")
        rows = await self._all(f"SELECT {RUN_COLUMNS} FROM training_runs ORDER BY id DESC LIMIT %s", (limit,))
        return [_run(r) for r in rows]

    async def set_job(self, run_id: int, job_id: int) -> TrainingRun:
        """Link a queued run to the queue's job that will run it (the UI: create_run, defer, set_job)."""
        validate_run_id(run_id)
        if not is_count(job_id, 1, 2**63 - 1):
            raise InvalidRegistryValue(f"job_id must be a positive integer, got {job_id!r}")
        return await self._update_run(run_id, "job_id = %(job_id)s", {"job_id": job_id})

    async def start_run(self, run_id: int, job_id: int | None = None) -> TrainingRun:
        """Mark the run 'running' (started_at now), linking `job_id` when given (the worker, as a job starts).
        A run that has finished already (e.g. cancelled meanwhile) is refused with InvalidRegistryValue."""
        validate_run_id(run_id)
        if job_id is not None and not is_count(job_id, 1, 2**63 - 1):
            raise InvalidRegistryValue(f"job_id must be a positive integer, got {job_id!r}")
        async with self._transaction() as conn:
            cur = await conn.execute(
                f"""UPDATE training_runs SET status = 'running', started_at = now(), progress = 0,
                    job_id = coalesce(%(job_id)s, job_id)
                WHERE id = %(id)s AND status IN ('queued', 'running') RETURNING {RUN_COLUMNS}""",
                {"id": run_id, "job_id": job_id},
            )
            row = await cur.fetchone()
            if row is None:
                cur = await conn.execute("SELECT status FROM training_runs WHERE id = %s", (run_id,))
                found = await cur.fetchone()
                if found is None:
                    raise RunNotFound(f"no training run with id {run_id}")
                raise InvalidRegistryValue(f"run {run_id} is {found[0]} already: it cannot start")
        return _run(row)

    async def update_run(
        self, run_id: int, progress: float, message: str, history_entry: dict[str, Any] | None = None
    ) -> TrainingRun:
        """Progress (0..1) and a message, appending `history_entry` (e.g. {"epoch": 2, "loss": 0.1,
        "accuracy": 0.97}) to the run's history when given."""
        validate_run_id(run_id)
        params: dict[str, Any] = {
            "progress": validate_progress(progress),
            "message": _text(message, "message"),
            "entry": None if history_entry is None else _json_object(history_entry, "history_entry"),
        }
        return await self._update_run(
            run_id,
            "progress = %(progress)s, message = %(message)s, "
            "history = CASE WHEN %(entry)s::jsonb IS NULL THEN history "
            "ELSE history || jsonb_build_array(%(entry)s::jsonb) END",
            params,
        )

    async def finish_run(
        self, run_id: int, status: str, message: str, version: str | None = None, promoted: bool = False
    ) -> TrainingRun:
        """End the run: 'succeeded' (progress 1), 'failed' or 'cancelled', finished_at now, with the version
        it produced and whether that version was promoted."""
        validate_run_id(run_id)
        final = validate_final_status(status)
        if version is not None:
            validate_version(version)
        if not isinstance(promoted, bool):
            raise InvalidRegistryValue(f"promoted must be a bool, got {promoted!r}")
        return await self._update_run(
            run_id,
            "status = %(status)s, message = %(message)s, version = %(version)s, promoted = %(promoted)s, "
            "finished_at = now(), progress = CASE WHEN %(status)s = 'succeeded' THEN 1 ELSE progress END",
            {"status": final, "message": _text(message, "message"), "version": version, "promoted": promoted},
        )

    async def _update_run(self, run_id: int, assignments: str, params: dict[str, Any]) -> TrainingRun:
        row = await self._one(
            f"UPDATE training_runs SET {assignments} WHERE id = %(id)s RETURNING {RUN_COLUMNS}",
            {**params, "id": run_id},
        )
        if row is None:
            raise RunNotFound(f"no training run with id {run_id}")
        return _run(row)

    async def fail_running(
        self, message: str, *, job_ids: Collection[int] | None = None, queued_grace_s: float = QUEUED_GRACE_S
    ) -> list[int]:
        """Mark failed, with `message`, every 'running' run and every 'queued' run without a job older than
        `queued_grace_s` (its defer never happened); return their ids, in order. The trainer calls it at
        start: a killed worker never leaves a run "running" forever. With `job_ids`, the running runs
        failed are only those of these jobs (e.g. `db.queue.fail_stalled_jobs`'s), for several workers."""
        _text(message, "message")
        jobs = None if job_ids is None else [int(j) for j in job_ids]
        rows = await self._all(
            """UPDATE training_runs SET status = 'failed', message = %(message)s, finished_at = now()
            WHERE (status = 'running' AND (%(jobs)s::bigint[] IS NULL OR job_id = ANY(%(jobs)s::bigint[])))
               OR (status = 'queued' AND job_id IS NULL
                   AND created_at < now() - make_interval(secs => %(grace)s))
            RETURNING id""",
            {"message": message, "jobs": jobs, "grace": float(queued_grace_s)},
        )
        return sorted(r[0] for r in rows)

    # -- feedback --------------------------------------------------------------------------------------
    async def feedback(
        self, batch_size: int = 500, max_id: int | None = None
    ) -> AsyncGenerator[FeedbackRow, None]:
        """The drawings to train on, by id: labelled with a digit, not excluded, with their PNG; deleted
        predictions are gone. `max_id`: only ids up to it (the `feedback_stats()` taken before, so that
        the count recorded with the version is exactly what trained it). A server-side cursor,
        `batch_size` rows per round trip; stop early with `contextlib.aclosing(...)`."""
        if not is_count(batch_size, 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        _optional_id(max_id, "max_id")
        async with self._transaction() as conn, conn.cursor(name="feedback") as cur:
            cur.itersize = batch_size
            await cur.execute(FEEDBACK, {"max_id": max_id})
            async for row in cur:
                yield FeedbackRow(id=row[0], png=bytes(row[1]), label=row[2])

    async def feedback_stats(self) -> tuple[int, int | None]:
        """(how many drawings `feedback()` gives now, the highest id among them or None)."""
        row = await self._one(FEEDBACK_STATS)
        assert row is not None
        return int(row[0]), row[1]

    async def set_excluded(self, prediction_id: int, excluded: bool) -> None:
        """Exclude a drawing from training (or include it again). PredictionNotFound when absent."""
        validate_id(prediction_id)
        if not isinstance(excluded, bool):
            raise InvalidRegistryValue(f"excluded must be a bool, got {excluded!r}")
        row = await self._one(
            "UPDATE predictions SET excluded = %s WHERE id = %s RETURNING id", (excluded, prediction_id)
        )
        if row is None:
            raise PredictionNotFound(f"no prediction with id {prediction_id}")

    async def disagreements(self, limit: int = 50, offset: int = 0) -> list[Disagreement]:
        """Labelled predictions whose label is not the model's digit, newest first (excluded ones too,
        marked: the operator can include them again)."""
        if not is_count(limit, 1, 1000):
            raise InvalidRegistryValue(f"limit must be an integer from 1 to 1000, got {limit!r}")
        if not is_count(offset, 0, 10**9):
            raise InvalidRegistryValue(f"offset must be a non-negative integer, got {offset!r}")
        rows = await self._all(DISAGREEMENTS, (limit, offset))
        return [
            Disagreement(
                id=r[0],
                created_at=r[1],
                label=r[2],
                digit=r[3],
                confidence=r[4],
                model_version=r[5],
                excluded=r[6],
            )
            for r in rows
        ]
