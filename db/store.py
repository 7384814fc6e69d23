"""Data access for predictions and labels: psycopg 3, an async connection pool, parameterised SQL only.

Every failure to reach the server (refused, down, restarting, pool exhausted) is raised as
`DatabaseUnavailable`: at once when the server is known to be down, at worst after the pool
timeout (3 s). The pool reconnects by itself once the server is back, and connections a restart
broke are dropped before use. Other database errors are `StoreError`.

Connections are taken from the pool and given back in tasks of their own, shielded from the
caller's cancellation. NiceGUI cancels page builds that take too long, and a cancellation that
lands inside psycopg_pool's `getconn()` or `putconn()` can lose the connection for good (upstream
psycopg issues #1208, #1275, #1345); enough of them and the pool has none left, forever.

The records, the rules and the errors live in `db.records` and `db.errors` (re-exported here for
older imports); this module is the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import ConnStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from db.detach import Handover
from db.errors import (
    DatabaseUnavailable,
    Forbidden,
    InvalidLabel,
    InvalidPrediction,
    PredictionNotFound,
    StoreError,
)
from db.records import (
    INPUT_PIXELS,
    MAX_PNG_BYTES,
    MAX_TEXT,
    PNG_SIGNATURE,
    LabelledRow,
    NewPrediction,
    Only,
    PoolHealth,
    PredictionRow,
    is_count,
    validate_choice,
    validate_id,
    validate_key,
    validate_label,
    validate_only,
    validate_prediction,
    validate_token_hash,
)
from db.stats import DigitStats, Stats, compute_stats

__all__ = [  # the records, errors and statistics types are re-exported for older imports
    "INPUT_PIXELS",
    "MAX_PNG_BYTES",
    "MAX_TEXT",
    "PNG_SIGNATURE",
    "DatabaseUnavailable",
    "DigitStats",
    "Forbidden",
    "InvalidLabel",
    "InvalidPrediction",
    "LabelledRow",
    "NewPrediction",
    "PoolHealth",
    "PredictionNotFound",
    "PredictionRow",
    "Stats",
    "Store",
    "StoreError",
    "compute_stats",
    "validate_id",
    "validate_label",
    "validate_prediction",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PAGE = 500
MAX_BATCH = 100  # predictions written in one transaction
POOL_TIMEOUT_S = 3.0  # how long a caller waits for a connection before DatabaseUnavailable
CONNECT_TIMEOUT_S = 3
RECONNECT_TIMEOUT_S = 5.0  # a background reconnect gives up after this; the next request retries
KEY_RACE_RETRIES = 3  # see Store._insert
APPLICATION_NAME = "digit-classifier"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"database unavailable: {text[0][:200] if text else type(exc).__name__}"


def _resolve(future: asyncio.Future[int], value: int) -> None:
    if not future.done():  # the caller may have been cancelled
        future.set_result(value)


def _fail(future: asyncio.Future[int], exc: BaseException) -> None:
    """Fail one caller with its own copy of a store error (each caller raises it separately)."""
    if future.done():
        return
    if isinstance(exc, StoreError):
        copy = type(exc)(*exc.args)
        copy.__cause__ = exc.__cause__
        exc = copy
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)


def _is_stale(conn: AsyncConnection[Any]) -> bool:
    """True if the server closed this idle connection (e.g. it restarted); costs no round trip."""
    pgconn = conn.pgconn
    if pgconn.status != ConnStatus.OK:
        return True
    try:
        # A closing server sends an error, then EOF: the first read takes the message, the second
        # sees the EOF. On a live idle connection both reads find nothing and return at once.
        pgconn.consume_input()
        pgconn.consume_input()
    except psycopg.OperationalError:
        return True
    return pgconn.status != ConnStatus.OK


def _params(p: NewPrediction) -> tuple[Any, ...]:
    """The parameters of INSERT for one (validated) prediction."""
    return (
        p.created_at,
        p.digit,
        float(p.confidence),
        [float(x) for x in p.probabilities],
        p.model_name,
        p.model_version,
        float(p.latency_ms),
        p.key,
        p.label_token_hash,
        bytes(p.image_png),
        bytes(p.input_pixels),
        p.key,
    )


COLUMNS = (
    "id, created_at, digit, confidence, probabilities, model_name, model_version, latency_ms, "
    "true_label, labelled_at, not_a_digit"
)

# One row: the new id, or, when a row with the same key exists, its id (nothing stored, so the
# counters of migration 0003 do not count it twice). NULL in one case: the row with that key was
# committed by another transaction while this statement ran, after its snapshot was taken; running
# the statement again (a new snapshot) finds it.
INSERT = """
WITH p AS (
    INSERT INTO predictions
        (created_at, digit, confidence, probabilities, model_name, model_version, latency_ms, key,
         label_token_hash)
    VALUES (coalesce(%s::timestamptz, now()), %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (key) DO NOTHING
    RETURNING id
), i AS (
    INSERT INTO prediction_images (prediction_id, image_png, input_pixels)
    SELECT id, %s, %s FROM p
    RETURNING prediction_id
)
SELECT coalesce((SELECT prediction_id FROM i), (SELECT id FROM predictions WHERE key = %s))
"""

# (model_version, true_label or None, predicted digit, count): the same as grouping `predictions`,
# read from the counters that migration 0003's triggers keep (not a digit: -2, `db.stats.NOT_A_DIGIT`).
STATS = """
SELECT model_version, nullif(true_label, -1), digit, sum(n)::bigint
FROM prediction_counts
GROUP BY model_version, true_label, digit
HAVING sum(n) <> 0
"""

# The person's choice, in one statement that checks the label token when one is given: one row,
# (allowed, changed). allowed is NULL when there is no such row, false when the token does not
# match (or the row has none); changed is false when the row went between (deleted meanwhile).
# Comparing hashes with `=` leaks nothing useful: a caller cannot steer the hash of a guess.
SET_LABEL = """
WITH target AS (
    SELECT id, (%(hash)s::text IS NULL OR coalesce(label_token_hash = %(hash)s, false)) AS allowed
    FROM predictions WHERE id = %(id)s
), changed AS (
    UPDATE predictions
    SET true_label = %(label)s, not_a_digit = %(not_a_digit)s, labelled_at = now()
    WHERE id = (SELECT id FROM target WHERE allowed)
    RETURNING id
)
SELECT (SELECT allowed FROM target), EXISTS (SELECT FROM changed)
"""

# The same for a deletion; the drawing goes with the row (ON DELETE CASCADE), the counters of
# migration 0003 take its count back (trigger).
DELETE = """
WITH target AS (
    SELECT id, (%(hash)s::text IS NULL OR coalesce(label_token_hash = %(hash)s, false)) AS allowed
    FROM predictions WHERE id = %(id)s
), gone AS (
    DELETE FROM predictions WHERE id = (SELECT id FROM target WHERE allowed) RETURNING id
)
SELECT (SELECT allowed FROM target), EXISTS (SELECT FROM gone)
"""

# The history's filters (`recent(only=...)`); the partial indexes of migration 0005 serve the rare ones.
FILTERS: dict[Only, str] = {
    "all": "true",
    "wrong": "true_label <> digit",
    "unlabelled": "true_label IS NULL AND NOT not_a_digit",
    "not_a_digit": "not_a_digit",
}

# Not-a-digit rows have no true label (a CHECK constraint), so they are never exported as a digit.
LABELLED = """
SELECT id, true_label, digit, confidence, model_name, model_version, created_at, labelled_at,
       image_png, input_pixels
FROM predictions JOIN prediction_images ON prediction_id = id
WHERE true_label IS NOT NULL
ORDER BY id
"""


class Store:
    """The app's access to PostgreSQL. Open with `await Store.open(url)`; close with `await close()`."""

    def __init__(
        self, pool: AsyncConnectionPool[AsyncConnection[Any]], connect_kwargs: dict[str, Any]
    ) -> None:
        self._pool = pool
        self._connect_kwargs = connect_kwargs
        # Set by a failure to reach the server: until a direct connection succeeds again, calls
        # fail at once instead of each waiting for the pool timeout.
        self._suspect_down = False
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[int]]] = []  # predictions to write
        self._writer: asyncio.Task[None] | None = None
        # For pool_health(): when each caller now waiting for a connection began (oldest first),
        # and when the first caller that got none (pool timeout) began, since the last that got one.
        self._wait_starts: dict[int, float] = {}
        self._tickets = itertools.count()
        self._starved_since: float | None = None
        self._handover = Handover(pool)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        max_size: int = 8,
        timeout: float = POOL_TIMEOUT_S,
        application_name: str = APPLICATION_NAME,
    ) -> Store:
        """A store with a pool of up to `max_size` connections; works even if the server is down now.

        `application_name` names its connections (`pg_stat_activity`, and the payload of migration
        0006's notifications: a replica can tell its own writes by it)."""
        kwargs: dict[str, Any] = {
            # Each method is one atomic statement: autocommit saves the BEGIN/COMMIT round trips.
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": application_name,
            "options": "-c TimeZone=UTC",
        }
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=timeout,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            kwargs=kwargs,
            name="store",
        )
        await pool.open(wait=False)
        return cls(pool, {"conninfo": url, **kwargs})

    async def close(self) -> None:
        """Finish the queued writes, then close the pool."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer
        await self._handover.settle()
        await self._pool.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connections ---------------------------------------------------------------------------------
    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled autocommit connection; connection failures become DatabaseUnavailable."""
        try:
            if self._suspect_down:
                await self._probe()
            conn = await self._handover.take(self._acquire)
            try:
                yield conn
            finally:
                await self._handover.give_back(conn)
        except psycopg.OperationalError as exc:  # includes PoolTimeout
            self._suspect_down = True
            raise DatabaseUnavailable(_short(exc)) from exc
        except psycopg.Error as exc:  # e.g. the schema is missing: migrations not applied
            raise StoreError(f"database error: {exc.diag.message_primary or exc}") from exc

    async def _acquire(self) -> AsyncConnection[Any]:
        """A live connection from the pool; records how long callers wait, for pool_health()."""
        ticket = next(self._tickets)
        started = self._wait_starts[ticket] = time.monotonic()
        try:
            conn = await self._pool.getconn()
            probed = False
            while _is_stale(conn):  # the server closed it: it is down, or restarted since
                await self._pool.putconn(conn)  # the pool drops it and opens a replacement
                if not probed:
                    await self._probe()  # down: fail now rather than after the pool timeout
                    probed = True
                conn = await self._pool.getconn()
        except PoolTimeout:
            if self._starved_since is None:
                self._starved_since = started
            raise
        finally:
            del self._wait_starts[ticket]
        self._starved_since = None
        return conn

    async def _probe(self) -> None:
        """Connect once outside the pool: raises at once while the server is down, else clears the flag."""
        try:
            conn = await AsyncConnection.connect(**self._connect_kwargs)
        except psycopg.OperationalError:
            self._starved_since = None  # the server is down: not an exhausted pool
            raise
        await conn.close()
        self._suspect_down = False

    def pool_health(self) -> PoolHealth:
        """The pool's state now (no I/O). `exhausted_for_s` > 0 while callers wait and no connection is
        free: since the oldest waiting caller began, or since the first caller that timed out with none
        (a pool whose connections leaked stays exhausted across many timeouts)."""
        stats = self._pool.get_stats()
        size = stats.get("pool_size", 0)
        idle = stats.get("pool_available", 0)
        waiting = stats.get("requests_waiting", 0)
        exhausted_for = 0.0
        if idle == 0:
            starts = [self._starved_since] if self._starved_since is not None else []
            if waiting and self._wait_starts:
                starts.append(next(iter(self._wait_starts.values())))
            if starts:
                exhausted_for = max(0.0, time.monotonic() - min(starts))
        return PoolHealth(size=size, idle=idle, waiting=waiting, exhausted_for_s=exhausted_for)

    async def ping(self) -> bool:
        """Whether the server answers now (never raises)."""
        try:
            async with self._connection() as conn:
                await conn.execute("SELECT 1")
        except (StoreError, psycopg.Error):
            return False
        return True

    # -- writes ----------------------------------------------------------------------------------------
    async def record_prediction(self, p: NewPrediction) -> int:
        """Store a prediction; return its id. With a `key` that a stored row has already, store nothing
        and return that row's id (an outbox replay or a client's retry is never stored twice).

        Calls made while a write is in flight are written together next, in one transaction (one
        disk flush), so the rate grows with the number of callers instead of being bound by the
        disk's flush rate or the pool size. A lone call is written at once.
        """
        validate_prediction(p)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((_params(p), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        return await future

    async def _write_pending(self) -> None:
        """Write the queued predictions, a batch at a time, and resolve their callers' futures."""
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                try:
                    ids = await self._insert([params for params, _ in batch])
                except InvalidPrediction:
                    if len(batch) == 1:
                        raise
                    # Not expected after validation; still, one bad row must not fail the others.
                    for params, future in batch:
                        try:
                            _resolve(future, (await self._insert([params]))[0])
                        except StoreError as exc:
                            _fail(future, exc)
                    continue
            except BaseException as exc:
                for _, future in batch:
                    _fail(future, exc)
                if not isinstance(exc, Exception):  # cancelled: fail the rest too, then stop
                    for _, future in self._pending:
                        _fail(future, exc)
                    self._pending = []
                    raise
            else:
                for (_, future), new_id in zip(batch, ids, strict=True):
                    _resolve(future, new_id)

    async def _insert(self, rows: list[tuple[Any, ...]]) -> list[int]:
        async with self._connection() as conn:
            try:
                if len(rows) == 1:
                    found = [await _one_id(await conn.execute(INSERT, rows[0]))]
                else:
                    async with conn.transaction():
                        cur = conn.cursor()
                        await cur.executemany(INSERT, rows, returning=True)
                        found = [await _one_id(cur)]
                        while cur.nextset():
                            found.append(await _one_id(cur))
                ids: list[int] = []
                for params, new_id in zip(rows, found, strict=True):
                    # A keyed row whose twin another transaction committed meanwhile: run it again
                    # as a statement of its own, which sees that row (or stores this one if it went).
                    for _ in range(KEY_RACE_RETRIES):
                        if new_id is not None:
                            break
                        new_id = await _one_id(await conn.execute(INSERT, params))
                    if new_id is None:
                        raise StoreError(f"could not store nor find the prediction with key {params[7]!r}")
                    ids.append(new_id)
                return ids
            except (psycopg.IntegrityError, psycopg.DataError) as exc:
                raise InvalidPrediction(f"rejected by the database: {exc.diag.message_primary}") from exc

    async def set_label(
        self,
        prediction_id: int,
        label: int | None,
        *,
        not_a_digit: bool = False,
        token_hash: str | None = None,
    ) -> None:
        """Set or replace the person's choice: a digit (`label`), or "not a digit" (`label` None,
        `not_a_digit` True). With `token_hash`, only if it is the row's (checked in the same
        statement): `Forbidden` otherwise; `PredictionNotFound`; `InvalidLabel`."""
        label = validate_choice(label, not_a_digit)
        params = self._guarded(prediction_id, token_hash)
        params.update(label=label, not_a_digit=label is None)
        await self._guarded_write(SET_LABEL, params)

    async def delete(self, prediction_id: int, *, token_hash: str | None = None) -> None:
        """Delete a prediction and its drawing; with `token_hash`, only if it is the row's
        (`Forbidden` otherwise); `PredictionNotFound` (also when deleted already)."""
        await self._guarded_write(DELETE, self._guarded(prediction_id, token_hash))

    async def count(self) -> int:
        """How many predictions are stored (from the trigger-kept counters: no scan)."""
        async with self._connection() as conn:
            cur = await conn.execute("SELECT coalesce(sum(n), 0) FROM prediction_counts")
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def prune_unlabelled(self, count: int) -> int:
        """Delete the `count` oldest drawings nobody labelled (and their images); how many went.

        What the storage quota frees when the operator allows it (`STORAGE_PRUNE`): labelled
        drawings, the ones that train the next model, are never pruned.
        """
        if not is_count(count, 1, 100_000):
            raise ValueError(f"count must be 1-100000, got {count!r}")
        async with self._connection() as conn:
            cur = await conn.execute(
                "DELETE FROM predictions WHERE id IN (SELECT id FROM predictions "
                "WHERE true_label IS NULL AND NOT not_a_digit ORDER BY id LIMIT %s)",
                (count,),
            )
            return cur.rowcount

    async def replace_label_token(self, prediction_id: int, token_hash: str) -> None:
        """Give a row a new label token hash (the old token stops working); `PredictionNotFound`."""
        prediction_id = validate_id(prediction_id)
        token_hash = validate_token_hash(token_hash)
        async with self._connection() as conn:
            cur = await conn.execute(
                "UPDATE predictions SET label_token_hash = %s WHERE id = %s", (token_hash, prediction_id)
            )
            if cur.rowcount == 0:
                raise PredictionNotFound(f"no prediction with id {prediction_id}")

    @staticmethod
    def _guarded(prediction_id: int, token_hash: str | None) -> dict[str, Any]:
        prediction_id = validate_id(prediction_id)
        if token_hash is not None and not isinstance(token_hash, str):
            raise Forbidden("a label token hash is a text")
        # Any text may come as a hash (it is compared, never stored): a malformed one matches nothing.
        return {"id": prediction_id, "hash": token_hash}

    async def _guarded_write(self, statement: str, params: dict[str, Any]) -> None:
        async with self._connection() as conn:
            cur = await conn.execute(statement, params)
            row = await cur.fetchone()
        allowed, changed = row if row is not None else (None, False)
        if allowed is False:
            raise Forbidden(f"the label token does not match prediction {params['id']}")
        if not changed:
            raise PredictionNotFound(f"no prediction with id {params['id']}")

    # -- reads -----------------------------------------------------------------------------------------
    async def get(self, prediction_id: int) -> PredictionRow:
        """One prediction (without blobs)."""
        prediction_id = validate_id(prediction_id)
        async with self._connection() as conn:
            cur = await conn.execute(f"SELECT {COLUMNS} FROM predictions WHERE id = %s", (prediction_id,))
            row = await cur.fetchone()
        if row is None:
            raise PredictionNotFound(f"no prediction with id {prediction_id}")
        return PredictionRow(*row)

    async def find_by_key(self, key: str) -> PredictionRow | None:
        """The prediction stored with this request key, if any (InvalidPrediction for an impossible key)."""
        key = validate_key(key)
        async with self._connection() as conn:
            cur = await conn.execute(f"SELECT {COLUMNS} FROM predictions WHERE key = %s", (key,))
            row = await cur.fetchone()
        return None if row is None else PredictionRow(*row)

    async def recent(
        self,
        limit: int = 20,
        before_id: int | None = None,
        *,
        only: Only = "all",
        ids: Collection[int] | None = None,
    ) -> list[PredictionRow]:
        """Newest first, at most `limit` (1-500), all or `only` the wrong (labelled with another digit),
        unlabelled or not-a-digit ones, and only rows in `ids` when given (a person's own drawings: the
        public page shows nobody else's); the next page is `recent(limit, before_id=last.id, ...)`."""
        where = FILTERS[validate_only(only)]
        if not is_count(limit, 1, MAX_PAGE):
            raise ValueError(f"limit must be 1-{MAX_PAGE}, got {limit!r}")
        if before_id is not None and not is_count(before_id, -(2**63)):
            raise ValueError(f"before_id must be an id, got {before_id!r}")
        before_id = 2**63 - 1 if before_id is None else min(before_id, 2**63 - 1)  # ids are below it
        wanted = None if ids is None else sorted({i for i in ids if is_count(i, 1, 2**63 - 1)})
        if wanted is not None and not wanted:
            return []
        only_ids = "" if wanted is None else "AND id = ANY(%s) "
        params: tuple[Any, ...] = (before_id, limit) if wanted is None else (before_id, wanted, limit)
        query = (
            f"SELECT {COLUMNS} FROM predictions WHERE id < %s {only_ids}AND {where} ORDER BY id DESC LIMIT %s"
        )
        async with self._connection() as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
        return [PredictionRow(*row) for row in rows]

    async def image_png(self, prediction_id: int) -> bytes:
        """The drawing of a prediction, as stored."""
        prediction_id = validate_id(prediction_id)
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT image_png FROM prediction_images WHERE prediction_id = %s", (prediction_id,)
            )
            row = await cur.fetchone()
        if row is None:
            raise PredictionNotFound(f"no prediction with id {prediction_id}")
        return bytes(row[0])

    async def stats(self) -> Stats:
        """Statistics over all rows, and per model version (from the trigger-kept counters)."""
        async with self._connection() as conn:
            cur = await conn.execute(STATS)
            groups = await cur.fetchall()
        return compute_stats(groups)

    async def labelled(self, batch_size: int = 500) -> AsyncGenerator[LabelledRow, None]:
        """The labelled predictions with their blobs, by id, `batch_size` rows per round trip.

        A server-side cursor: memory stays constant whatever the number of rows. The connection
        is held until the iteration ends; stop early with `contextlib.aclosing(store.labelled())`.
        `db.export.build_export` turns the rows into the zip.
        """
        if not is_count(batch_size, 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        async with (
            self._connection() as conn,
            conn.transaction(),
            conn.cursor(name="labelled") as cur,
        ):
            cur.itersize = batch_size
            await cur.execute(LABELLED)
            async for row in cur:
                yield _labelled_row(row)


def _labelled_row(row: tuple[Any, ...]) -> LabelledRow:
    """A row of LABELLED as a record (the blobs come as memoryview or bytes)."""
    return LabelledRow(
        id=row[0],
        true_label=row[1],
        digit=row[2],
        confidence=row[3],
        model_name=row[4],
        model_version=row[5],
        created_at=row[6],
        labelled_at=row[7],
        image_png=bytes(row[8]),
        input_pixels=bytes(row[9]),
    )


async def _one_id(cur: psycopg.AsyncCursor[Any]) -> int | None:
    """The id that one INSERT statement returned (None: see INSERT)."""
    row = await cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])
