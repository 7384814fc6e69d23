"""Data access for predictions and labels: psycopg 3, an async connection pool, parameterised SQL only.

Every failure to reach the server (refused, down, restarting, pool exhausted) is raised as
`DatabaseUnavailable`: at once when the server is known to be down, at worst after the pool
timeout (3 s). The pool reconnects by itself once the server is back, and connections a restart
broke are dropped before use. Other database errors are `StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import ConnStatus
from psycopg_pool import AsyncConnectionPool

from db.export import ExportRow, build_export
from db.stats import DigitStats, Stats, compute_stats

__all__ = [  # the statistics types live in db.stats; they are part of this module's interface
    "DatabaseUnavailable",
    "DigitStats",
    "InvalidLabel",
    "InvalidPrediction",
    "NewPrediction",
    "PredictionNotFound",
    "PredictionRow",
    "Stats",
    "Store",
    "StoreError",
    "compute_stats",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 2_000_000  # also a CHECK constraint in the schema
INPUT_PIXELS = 28 * 28
MAX_TEXT = 200
MAX_PAGE = 500
MAX_BATCH = 100  # predictions written in one transaction
POOL_TIMEOUT_S = 3.0  # how long a caller waits for a connection before DatabaseUnavailable
CONNECT_TIMEOUT_S = 3
RECONNECT_TIMEOUT_S = 5.0  # a background reconnect gives up after this; the next request retries


class StoreError(Exception):
    """Base of every error this module raises."""


class DatabaseUnavailable(StoreError):
    """The server cannot be reached (down, restarting, overloaded); nothing was saved, retry later."""


class PredictionNotFound(StoreError, LookupError):
    """No prediction has this id."""


class InvalidLabel(StoreError, ValueError):
    """A true label must be an integer digit 0-9."""


class InvalidPrediction(StoreError, ValueError):
    """A prediction breaks a rule of the schema (digit range, probabilities, PNG, ...)."""


@dataclass(frozen=True)
class NewPrediction:
    """A prediction to record. `input_pixels` is the model's 28x28 uint8 input, row-major (784 bytes)."""

    digit: int
    confidence: float
    probabilities: Sequence[float]
    model_name: str
    model_version: str
    latency_ms: float
    image_png: bytes
    input_pixels: bytes


@dataclass(frozen=True)
class PredictionRow:
    """A stored prediction without its blobs (`Store.image_png` fetches the drawing)."""

    id: int
    created_at: datetime
    digit: int
    confidence: float
    probabilities: list[float]
    model_name: str
    model_version: str
    latency_ms: float
    true_label: int | None
    labelled_at: datetime | None

    @property
    def correct(self) -> bool | None:
        """Whether the prediction matches the true label; None while unlabelled."""
        return None if self.true_label is None else self.true_label == self.digit


# -- pure logic ------------------------------------------------------------------------------------
def validate_prediction(p: NewPrediction) -> None:
    """Raise InvalidPrediction with a clear message if `p` breaks a rule of the schema."""

    def fail(message: str) -> None:
        raise InvalidPrediction(message)

    if not _is_digit(p.digit):
        fail(f"digit must be an integer 0-9, got {p.digit!r}")
    if not _is_probability(p.confidence):
        fail(f"confidence must be a number from 0 to 1, got {p.confidence!r}")
    if len(p.probabilities) != 10:
        fail(f"probabilities must have 10 values, got {len(p.probabilities)}")
    if not all(_is_probability(x) for x in p.probabilities):
        fail("probabilities must be numbers from 0 to 1")
    for name in ("model_name", "model_version"):
        value = getattr(p, name)
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_TEXT or "\x00" in value:
            fail(f"{name} must be a text of 1-{MAX_TEXT} characters without NUL")
    if not _is_number(p.latency_ms) or p.latency_ms < 0:
        fail(f"latency_ms must be a number >= 0, got {p.latency_ms!r}")
    if not isinstance(p.image_png, bytes | bytearray | memoryview) or bytes(p.image_png[:8]) != PNG_SIGNATURE:
        fail("image_png must be PNG bytes")
    if len(p.image_png) > MAX_PNG_BYTES:
        fail(f"image_png is {len(p.image_png):,} bytes; at most {MAX_PNG_BYTES:,} are stored")
    if not isinstance(p.input_pixels, bytes | bytearray | memoryview) or len(p.input_pixels) != INPUT_PIXELS:
        fail(f"input_pixels must be {INPUT_PIXELS} bytes (28x28 uint8)")


def validate_label(label: object) -> int:
    """The label as an int, or InvalidLabel."""
    if not _is_digit(label):
        raise InvalidLabel(f"a label is a digit 0-9, got {label!r}")
    return int(label)  # type: ignore[call-overload]


def validate_id(prediction_id: object) -> int:
    """An id as an int; anything that cannot be a stored id is PredictionNotFound."""
    if (
        not isinstance(prediction_id, int)
        or isinstance(prediction_id, bool)
        or not 1 <= prediction_id < 2**63
    ):
        raise PredictionNotFound(f"no prediction with id {prediction_id!r}")
    return prediction_id


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_probability(x: object) -> bool:
    return _is_number(x) and 0 <= x <= 1  # type: ignore[operator]


def _is_digit(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 9


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


# -- I/O -------------------------------------------------------------------------------------------
COLUMNS = (
    "id, created_at, digit, confidence, probabilities, model_name, model_version, latency_ms, "
    "true_label, labelled_at"
)

INSERT = """
WITH p AS (
    INSERT INTO predictions (digit, confidence, probabilities, model_name, model_version, latency_ms)
    VALUES (%s, %s, %s, %s, %s, %s)
    RETURNING id
)
INSERT INTO prediction_images (prediction_id, image_png, input_pixels)
SELECT id, %s, %s FROM p
RETURNING prediction_id
"""


# (model_version, true_label or None, predicted digit, count): the same as grouping `predictions`,
# read from the counters that migration 0003's triggers keep.
STATS = """
SELECT model_version, nullif(true_label, -1), digit, sum(n)::bigint
FROM prediction_counts
GROUP BY model_version, true_label, digit
HAVING sum(n) <> 0
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

    @classmethod
    async def open(cls, url: str, *, max_size: int = 8, timeout: float = POOL_TIMEOUT_S) -> Store:
        """A store with a pool of up to `max_size` connections; works even if the server is down now."""
        kwargs: dict[str, Any] = {
            # Each method is one atomic statement: autocommit saves the BEGIN/COMMIT round trips.
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": "digit-classifier",
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
        await self._pool.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled autocommit connection; connection failures become DatabaseUnavailable."""
        try:
            if self._suspect_down:
                await self._probe()
            conn = await self._pool.getconn()
            probed = False
            while _is_stale(conn):  # the server closed it: it is down, or restarted since
                await self._pool.putconn(conn)  # the pool drops it and opens a replacement
                if not probed:
                    await self._probe()  # down: fail now rather than after the pool timeout
                    probed = True
                conn = await self._pool.getconn()
            try:
                yield conn
            finally:
                await self._pool.putconn(conn)
        except psycopg.OperationalError as exc:  # includes PoolTimeout
            self._suspect_down = True
            raise DatabaseUnavailable(_short(exc)) from exc
        except psycopg.Error as exc:  # e.g. the schema is missing: migrations not applied
            raise StoreError(f"database error: {exc.diag.message_primary or exc}") from exc

    async def _probe(self) -> None:
        """Connect once outside the pool: raises at once while the server is down, else clears the flag."""
        conn = await AsyncConnection.connect(**self._connect_kwargs)
        await conn.close()
        self._suspect_down = False

    async def ping(self) -> bool:
        """Whether the server answers now (never raises)."""
        try:
            async with self._connection() as conn:
                await conn.execute("SELECT 1")
        except (StoreError, psycopg.Error):
            return False
        return True

    async def record_prediction(self, p: NewPrediction) -> int:
        """Store a prediction; return its id.

        Calls made while a write is in flight are written together next, in one transaction (one
        disk flush), so the rate grows with the number of callers instead of being bound by the
        disk's flush rate or the pool size. A lone call is written at once.
        """
        validate_prediction(p)
        params = (
            p.digit,
            float(p.confidence),
            [float(x) for x in p.probabilities],
            p.model_name,
            p.model_version,
            float(p.latency_ms),
            bytes(p.image_png),
            bytes(p.input_pixels),
        )
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((params, future))
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
                    cur = await conn.execute(INSERT, rows[0])
                    return [int(row[0]) for row in await cur.fetchall()]
                async with conn.transaction():
                    cur = conn.cursor()
                    await cur.executemany(INSERT, rows, returning=True)
                    ids = []
                    while True:
                        row = await cur.fetchone()
                        assert row is not None
                        ids.append(int(row[0]))
                        if not cur.nextset():
                            return ids
            except (psycopg.IntegrityError, psycopg.DataError) as exc:
                raise InvalidPrediction(f"rejected by the database: {exc.diag.message_primary}") from exc

    async def set_label(self, prediction_id: int, label: int) -> None:
        """Set or replace the true label of a prediction."""
        label = validate_label(label)
        prediction_id = validate_id(prediction_id)
        async with self._connection() as conn:
            cur = await conn.execute(
                "UPDATE predictions SET true_label = %s, labelled_at = now() WHERE id = %s",
                (label, prediction_id),
            )
            if cur.rowcount == 0:
                raise PredictionNotFound(f"no prediction with id {prediction_id}")

    async def get(self, prediction_id: int) -> PredictionRow:
        """One prediction (without blobs)."""
        prediction_id = validate_id(prediction_id)
        async with self._connection() as conn:
            cur = await conn.execute(f"SELECT {COLUMNS} FROM predictions WHERE id = %s", (prediction_id,))
            row = await cur.fetchone()
        if row is None:
            raise PredictionNotFound(f"no prediction with id {prediction_id}")
        return PredictionRow(*row)

    async def recent(self, limit: int = 20, before_id: int | None = None) -> list[PredictionRow]:
        """Newest first, at most `limit` (1-500); the next page is `recent(limit, before_id=last.id)`."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1-{MAX_PAGE}, got {limit!r}")
        if before_id is not None and (not isinstance(before_id, int) or isinstance(before_id, bool)):
            raise ValueError(f"before_id must be an id, got {before_id!r}")
        before_id = None if before_id is None else min(before_id, 2**63 - 1)
        async with self._connection() as conn:
            if before_id is None:
                cur = await conn.execute(
                    f"SELECT {COLUMNS} FROM predictions ORDER BY id DESC LIMIT %s", (limit,)
                )
            else:
                cur = await conn.execute(
                    f"SELECT {COLUMNS} FROM predictions WHERE id < %s ORDER BY id DESC LIMIT %s",
                    (before_id, limit),
                )
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

    async def export_labelled(self) -> bytes:
        """A zip of the labelled drawings: PNGs, labels.csv and MNIST-style IDX files (see db.export)."""
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT id, true_label, digit, confidence, model_name, model_version, created_at, "
                "labelled_at, image_png, input_pixels FROM predictions JOIN prediction_images "
                "ON prediction_id = id WHERE true_label IS NOT NULL ORDER BY id"
            )
            rows = [ExportRow(*row[:8], bytes(row[8]), bytes(row[9])) for row in await cur.fetchall()]
        return await asyncio.to_thread(build_export, rows)
