"""The one door to the data, shared by the page and the API: predict, store, label, read.

A prediction is answered by the model server and stored in PostgreSQL (201). When the database
is down it goes to the durable outbox first (`ui.outbox`, fsync'd before the 202), and a label
given meanwhile too; the retry loop stores them once the database is back, keeping the time the
person made the prediction. Nothing the person entered is dropped, not even by a crash.

Reads (history, statistics) are shared: all tabs asking at once wait for one query, and the
answer is kept while nothing changed, for about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Hashable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, TypeVar, cast, runtime_checkable

from db.errors import (
    DatabaseUnavailable,
    Forbidden,
    InvalidLabel,
    InvalidPrediction,
    PredictionNotFound,
    StoreError,
)
from db.export import export_zip, write_export
from db.records import (
    LabelledRow,
    NewPrediction,
    Only,
    PoolHealth,
    PredictionRow,
    token_hash,
    validate_choice,
    validate_label,
    validate_only,
)
from db.stats import Stats
from handlers.preprocess import ImageTooLargeError, PreprocessError, UnsupportedFormatError, as_png

from . import metrics
from .inference import InferenceClient, InferenceUnavailable, InvalidInput, Prediction
from .outbox import Outbox, QueueFull
from .outcome import Outcome, new_label_token
from .signing import UrlSigner

__all__ = [
    "Check",
    "Forbidden",
    "Only",
    "Outcome",
    "PredictionService",
    "PredictionStore",
    "QueueFull",
    "Readiness",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

FLUSH_CHUNK = 100  # waiting predictions stored together (the store writes them in one transaction)
POOL_EXHAUSTED_LIMIT_S = 5.0  # longer without a free connection: not ready, a supervisor should act
IDEMPOTENCY_PREFIX = "idem:"  # client keys never collide with the service's own (uuid hex) keys
REMEMBERED_ANSWERS = 1_000  # recent Idempotency-Key answers kept in memory


@runtime_checkable
class PredictionStore(Protocol):
    """What the service needs from the database (`db.store.Store`; the tests' `FakeStore`)."""

    async def ping(self) -> bool: ...

    async def record_prediction(self, p: NewPrediction) -> int: ...

    async def find_by_key(self, key: str) -> PredictionRow | None: ...

    async def set_label(
        self,
        prediction_id: int,
        label: int | None,
        *,
        not_a_digit: bool = False,
        token_hash: str | None = None,
    ) -> None: ...

    async def delete(self, prediction_id: int, *, token_hash: str | None = None) -> None: ...

    async def replace_label_token(self, prediction_id: int, token_hash: str) -> None: ...

    async def recent(
        self,
        limit: int = 20,
        before_id: int | None = None,
        *,
        only: Only = "all",
        ids: Collection[int] | None = None,
    ) -> list[PredictionRow]: ...

    async def image_png(self, prediction_id: int) -> bytes: ...

    async def stats(self) -> Stats: ...

    async def count(self) -> int: ...

    async def prune_unlabelled(self, count: int) -> int: ...

    def labelled(self, batch_size: int = 500) -> AsyncIterator[LabelledRow]: ...

    def pool_health(self) -> PoolHealth: ...


EXPORT_BATCH = 100  # rows an export fetches at a time
COUNT_TTL_S = 2.0  # the stored-row count for the quota is read again after this
PRUNE_BATCH = 100  # rows pruned beyond what the quota needs: not one DELETE per prediction


class StorageFull(Exception):
    """The storage quota is reached: the prediction is not stored (a 507, never a 2xx)."""


@dataclass(frozen=True)
class Quota:
    """`STORAGE_MAX_ROWS` (None: no quota) and `STORAGE_PRUNE` (make room by pruning the oldest
    unlabelled drawings instead of refusing new ones)."""

    max_rows: int | None = None
    prune: bool = False


@dataclass(frozen=True)
class Check:
    """One part's readiness, with a short reason for the operator."""

    ready: bool
    detail: str


@dataclass(frozen=True)
class Readiness:
    """Which part is ready: the model server, the database, its connection pool."""

    model: Check
    database: Check
    pool: Check
    model_url: str
    waiting: int  # predictions and labels not stored yet

    @property
    def ready(self) -> bool:
        return self.model.ready and self.database.ready and self.pool.ready


def check_label(label: object) -> int:
    """A true label as an int; `InvalidLabel` (a `ValueError`) in words for people otherwise.

    The rule is `db.records.validate_label`'s; only the message is the page's and the API's.
    """
    try:
        return validate_label(label)
    except InvalidLabel as exc:
        raise InvalidLabel(f"label must be a whole number from 0 to 9, got {label!r}") from exc


def check_choice(label: object, not_a_digit: object = False) -> int | None:
    """A person's choice (a digit, or None for "not a digit"); `InvalidLabel` in words otherwise.

    The rule is `db.records.validate_choice`'s; only the message is the page's and the API's.
    """
    try:
        return validate_choice(label, not_a_digit)
    except InvalidLabel as exc:
        if not_a_digit is True or label is None:
            raise
        raise InvalidLabel(f"label must be a whole number from 0 to 9, got {label!r}") from exc


def stored_key(client_key: str) -> str:
    """The stored key of a client's `Idempotency-Key`: namespaced and hashed (any text, fixed length)."""
    return IDEMPOTENCY_PREFIX + hashlib.sha256(client_key.encode()).hexdigest()


def new_prediction(outcome: Outcome, model_name: str) -> NewPrediction:
    """The row to store for an outcome: made when the person asked, unique by its key."""
    p = outcome.prediction
    return NewPrediction(
        digit=p.digit,
        confidence=p.confidence,
        probabilities=p.probabilities,
        model_name=model_name,
        model_version=p.model_version,
        latency_ms=outcome.latency_ms,
        image_png=outcome.image_png,
        input_pixels=bytes(p.input),
        created_at=outcome.created_at,
        key=outcome.key,
        label_token_hash=token_hash(outcome.label_token),
    )


def outcome_of_row(row: PredictionRow, image_png: bytes, key: str, label_token: str) -> Outcome:
    """An outcome for a row stored earlier (a retried request); the model's 28x28 is not kept here."""
    prediction = Prediction(row.digit, row.confidence, list(row.probabilities), [], row.model_version)
    outcome = Outcome(image_png, prediction, created_at=row.created_at, key=key, id=row.id)
    outcome.latency_ms, outcome.label, outcome.not_a_digit = row.latency_ms, row.true_label, row.not_a_digit
    outcome.label_stored = outcome.labelled
    outcome.label_token = label_token
    return outcome


def same_choice(outcome: Outcome, choice: int | None) -> bool:
    """Whether the outcome's current choice is `choice` (a digit, or None for "not a digit")."""
    return outcome.labelled and outcome.label == choice and outcome.not_a_digit == (choice is None)


class SharedRead:
    """One query for every caller at once, its answer kept while `version` is the same, up to `ttl_s`.

    Callers are cancelled alone (NiceGUI cancels page builds): the query itself goes on for the others.
    """

    def __init__(self, ttl_s: float, max_entries: int = 64) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries  # pages of history are keyed by their cursor: keep a few only
        self._cache: OrderedDict[Hashable, tuple[int, float, Any]] = OrderedDict()
        self._running: dict[Hashable, asyncio.Task[Any]] = {}

    async def get(self, key: Hashable, version: int, fetch: Callable[[], Awaitable[T]]) -> T:
        cached = self._cache.get(key)
        if cached is not None and cached[0] == version and time.monotonic() - cached[1] < self.ttl_s:
            return cast(T, cached[2])  # stored by `_fetch` for this key, whose fetch gives a T
        task: asyncio.Task[T] | None = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key, version, fetch))
            task.add_done_callback(_retrieve)
            self._running[key] = task
        return await asyncio.shield(task)

    async def _fetch(self, key: Hashable, version: int, fetch: Callable[[], Awaitable[T]]) -> T:
        try:
            value = await fetch()
            self._cache[key] = (version, time.monotonic(), value)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            return value
        finally:
            self._running.pop(key, None)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a failure as seen: every caller may have been cancelled before it came."""
    if not task.cancelled():
        task.exception()


class PredictionService:
    """Predict with the model server, store in PostgreSQL, keep in the outbox what could not be stored yet."""

    def __init__(
        self,
        store: PredictionStore | None,
        inference: InferenceClient,
        *,
        outbox: Outbox,
        max_image_bytes: int,
        retry_interval_s: float = 2.0,
        read_ttl_s: float = 1.0,
        admin_token: str | None = None,
        link_secret: str | None = None,
        quota: Quota | None = None,
    ) -> None:
        self.store = store  # wiring only (ui.app); None until the app's startup has opened it
        self.inference = inference
        self.outbox = outbox
        self.max_image_bytes = max_image_bytes
        self.retry_interval_s = retry_interval_s
        self.admin_token = admin_token or None  # `ADMIN_TOKEN`: may label and delete any row
        self.links = UrlSigner(link_secret)  # signed image and export URLs (`ui.signing`)
        self.quota = quota or Quota()
        self._stored_rows: tuple[float, int] | None = None  # (when counted, how many)
        self.version = 0  # bumped whenever the data changes, so pages know to refresh
        self._reads = SharedRead(read_ttl_s)
        self._listeners: list[Callable[[], None]] = []
        self._flush_lock = asyncio.Lock()
        self._opened = asyncio.Event()
        self._retry: asyncio.Task[None] | None = None
        self._answers: OrderedDict[str, Outcome] = OrderedDict()  # Idempotency-Key -> first answer
        self._in_flight: dict[str, asyncio.Future[Outcome]] = {}

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the outbox, take back what waits from the last run, and store it in the background."""
        count = await self.outbox.open()
        if count:
            log.warning("%d predictions/labels from the outbox wait for the database", count)
        self._opened.set()
        self._update_gauges()
        self._retry = asyncio.create_task(self._retry_forever(), name="store-retry")

    async def stop(self) -> None:
        """Stop retrying, try a last time to store what waits (it stays in the outbox otherwise), close."""
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        if self._opened.is_set():
            with contextlib.suppress(Exception):
                await self.flush()
            if self.waiting:
                log.warning(
                    "database unreachable: %d records stay in the outbox for the next start", self.waiting
                )
            self.outbox.close()
            self._opened.clear()

    @property
    def started(self) -> bool:
        """Whether `start` has opened the outbox (and `stop` not closed it)."""
        return self._opened.is_set()

    @property
    def _db(self) -> PredictionStore:
        """The store; `DatabaseUnavailable` while it is not open yet (the first instants after start)."""
        if self.store is None:
            raise DatabaseUnavailable("database unavailable: still connecting")
        return self.store

    # -- change notification ----------------------------------------------------------------------------
    def add_listener(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn` (synchronously: keep it cheap) after each change; returns its remover."""
        self._listeners.append(fn)

        def remove() -> None:
            if fn in self._listeners:
                self._listeners.remove(fn)

        return remove

    def _changed(self) -> None:
        self.version += 1
        self._update_gauges()
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:  # one broken listener (a closed tab) must not stop the others
                log.exception("change listener failed")

    def _update_gauges(self) -> None:
        metrics.waiting(self.waiting, self.outbox.size_bytes)

    # -- predictions ------------------------------------------------------------------------------------
    async def preview(self, image: bytes) -> Prediction:
        """The model's answer for a drawing in progress; nothing is stored."""
        self._check_size(image)
        return await self.inference.predict(image)

    async def predict(self, image: bytes, idempotency_key: str | None = None) -> Outcome:
        """Answer one image and store it (see `answer` and `save`).

        With an `idempotency_key`, a retry returns the first answer and stores nothing more,
        whether the first was stored or queued; concurrent retries wait for the first.
        `StorageFull` before the model is asked when the quota is reached (and pruning is off).
        """
        png = await self.stored_form(image)
        await self.make_room()
        if idempotency_key is None:
            outcome = await self._answer_png(png)
            await self.save(outcome)
            return outcome
        key = stored_key(idempotency_key)
        while key in self._in_flight:
            with contextlib.suppress(Exception):  # the first failed: this one tries itself
                return await asyncio.shield(self._in_flight[key])
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            first = await self._known_answer(key, png)
            if first is None:
                first = await self._answer_png(png)
                first.key = key
                await self.save(first)
                self._remember(first)
        except BaseException as exc:
            # Waiting retries try themselves, even when this one was cancelled.
            future.set_exception(
                exc if isinstance(exc, Exception) else RuntimeError("the first was cancelled")
            )
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        else:
            future.set_result(first)
            return first
        finally:
            self._in_flight.pop(key, None)

    async def _known_answer(self, key: str, image: bytes) -> Outcome | None:
        """The first answer for this key: remembered, waiting in the outbox, or stored."""
        if key in self._answers:
            return self._answers[key]
        for outcome in self.outbox.outcomes():
            if outcome.key == key:
                return outcome
        try:
            row = await self._db.find_by_key(key)
        except DatabaseUnavailable:
            return None  # answered anew; stored once: the store finds the first row by its key
        if row is None:
            return None
        # Only the hash of the first answer's token is stored: this answer gets a new token, which
        # replaces the stored hash (whoever holds the Idempotency-Key is the one who drew it).
        outcome = outcome_of_row(row, image, key, new_label_token())
        try:
            await self._db.replace_label_token(row.id, token_hash(outcome.label_token))
        except PredictionNotFound:
            return None  # deleted meanwhile: answered anew
        return self._remember(outcome)

    def _remember(self, outcome: Outcome) -> Outcome:
        self._answers[outcome.key] = outcome
        while len(self._answers) > REMEMBERED_ANSWERS:
            self._answers.popitem(last=False)
        return outcome

    def _check_size(self, image: bytes) -> None:
        if len(image) > self.max_image_bytes:
            metrics.error("invalid_input")
            raise InvalidInput(
                f"image too large: {len(image):,} bytes, at most {self.max_image_bytes:,} are accepted", 413
            )

    async def stored_form(self, image: bytes) -> bytes:
        """The PNG that is stored for an image: `handlers.preprocess.as_png` (PNG, JPEG or WebP only;
        JPEG and WebP re-encoded), in a thread (a large photo takes a while to decode).

        `InvalidInput`: 415 a format not accepted, 413 too many pixels, 400 not an image at all.
        Every answer is made from (and stored as) this PNG: the store takes only PNG, so a JPEG
        must never reach `save` as it was sent (it would be refused after a 202).
        """
        self._check_size(image)
        try:
            return await asyncio.to_thread(as_png, image)
        except PreprocessError as exc:
            metrics.error("invalid_input")
            status = exc.status if isinstance(exc, UnsupportedFormatError | ImageTooLargeError) else 400
            raise InvalidInput(str(exc), int(status)) from exc

    async def answer(self, image: bytes) -> Outcome:
        """Ask the model; `InvalidInput` / `InferenceUnavailable` as the model server says. Not stored."""
        return await self._answer_png(await self.stored_form(image))

    async def _answer_png(self, image: bytes) -> Outcome:
        started = time.perf_counter()
        try:
            prediction = await self.inference.predict(image)
        except InvalidInput:
            metrics.error("invalid_input")
            raise
        except InferenceUnavailable:
            metrics.error("inference_unavailable")
            raise
        latency_ms = 1000 * (time.perf_counter() - started)
        metrics.answered(prediction.model_version)
        return Outcome(image_png=image, prediction=prediction, latency_ms=latency_ms)

    async def make_room(self) -> None:
        """Check the storage quota (`STORAGE_MAX_ROWS`) before a new row: `StorageFull` when it is
        reached, unless the operator lets the oldest unlabelled drawings go (`STORAGE_PRUNE`).

        The count comes from the trigger-kept counters, read at most every `COUNT_TTL_S` and
        counted up locally in between (replicas may overshoot the quota by their last seconds'
        rows). While the database is down nothing is checked: the outbox has its own bound.
        """
        limit = self.quota.max_rows
        if limit is None:
            return
        try:
            stored = await self._count()
            if stored < limit:
                return
            if self.quota.prune:
                freed = await self._db.prune_unlabelled(min(stored - limit + PRUNE_BATCH, 100_000))
                if freed:
                    log.info("storage quota: pruned the %d oldest unlabelled drawings", freed)
                    metrics.pruned(freed)
                    self._stored_rows = None
                    self._changed()
                    if await self._count() < limit:
                        return
        except DatabaseUnavailable:
            return
        metrics.error("storage_full")
        raise StorageFull(
            f"storage is full: {limit:,} drawings are kept at most; the operator can raise "
            "STORAGE_MAX_ROWS, delete drawings, or let the oldest unlabelled ones go (STORAGE_PRUNE=true)"
        )

    async def _count(self) -> int:
        now = time.monotonic()
        if self._stored_rows is None or now - self._stored_rows[0] > COUNT_TTL_S:
            self._stored_rows = (now, await self._db.count())
        return self._stored_rows[1]

    async def save(self, outcome: Outcome) -> bool:
        """Store an answered outcome: True = stored; False = durably queued (fsync'd) for the retry loop.

        `QueueFull` when the database is down and the outbox is full; `InvalidPrediction` when the
        database refuses the model's answer (storing it again cannot help); `StorageFull` at the quota.
        """
        await self.make_room()
        try:
            await self._record(outcome)
            if self._stored_rows is not None:
                self._stored_rows = (self._stored_rows[0], self._stored_rows[1] + 1)
        except DatabaseUnavailable as exc:
            metrics.error("database_unavailable")
            await self._keep(lambda: self.outbox.add(outcome))
            log.warning("prediction kept in the outbox until the database is back: %s", exc)
        except InvalidPrediction as exc:
            metrics.error("invalid_prediction")
            log.error("prediction not storable: %s", exc)
            raise
        metrics.saved(outcome)
        self._changed()
        return outcome.stored

    async def _keep(self, adding: Callable[[], Awaitable[None]]) -> None:
        """Put something in the outbox (durable when this returns); `QueueFull` when it is full."""
        try:
            await self._opened.wait()  # requests may come in the instants before start()
            await adding()
        except QueueFull:
            metrics.error("outbox_full")
            raise

    async def _record(self, outcome: Outcome) -> None:
        """Insert the row, then its label if one was given meanwhile (kept for later if that fails)."""
        outcome.id = await self._db.record_prediction(new_prediction(outcome, self.inference.model_name))
        if outcome.labelled:  # the row was made from this outcome just now: no token to check
            await self._store_label(outcome.id, outcome.label, outcome, None)

    # -- labels and deletion -------------------------------------------------------------------------
    def is_operator(self, token: str | None) -> bool:
        """Whether `token` is the operator's (`ADMIN_TOKEN`); constant time, False when none is set."""
        if not token or self.admin_token is None:
            return False
        return hmac.compare_digest(token.encode(), self.admin_token.encode())

    def _authorize(self, token: str | None, operator: bool) -> str | None:
        """The token hash the store must find on the row (None: the operator, any row); `Forbidden`
        when there is neither a token nor the operator (no query: ids are sequential, guessable)."""
        if operator:
            return None
        if not token:
            metrics.error("forbidden")
            raise Forbidden("a label token (X-Label-Token) or the operator token is needed")
        return token_hash(token)

    async def label(self, outcome: Outcome, label: int | None, *, not_a_digit: bool = False) -> bool:
        """The person's choice for their own drawing (a digit, or "not a digit" with `label` None).

        True when stored now, False when durably kept for later (stored with the prediction).
        """
        choice = check_choice(label, not_a_digit)
        outcome.label, outcome.not_a_digit = choice, choice is None
        outcome.label_stored = False
        metrics.labelled(outcome, choice)
        if outcome.id is not None:
            return await self._store_label(outcome.id, choice, outcome, token_hash(outcome.label_token))
        if self.outbox.has_outcome(outcome.key):  # waiting: the label waits with it
            await self._keep(lambda: self.outbox.add_label_by_key(outcome.key, choice))
            self._changed()
        return False  # else its save is on its way and stores the label with it

    async def label_by_id(
        self,
        prediction_id: int,
        label: int | None,
        *,
        not_a_digit: bool = False,
        token: str | None = None,
        operator: bool = False,
    ) -> bool:
        """Label a stored prediction with its label token (or as the operator: any row).

        `Forbidden` without a token or with another row's, `PredictionNotFound`, `InvalidLabel`;
        False when the database is down and the label is durably kept (the token is checked
        when it is stored: a label with a wrong token is then dropped).
        """
        choice = check_choice(label, not_a_digit)
        needed = self._authorize(token, operator)
        metrics.labelled_by_id(prediction_id, choice)
        return await self._store_label(prediction_id, choice, None, needed)

    async def _store_label(
        self, prediction_id: int, choice: int | None, outcome: Outcome | None, needed: str | None
    ) -> bool:
        try:
            await self._db.set_label(prediction_id, choice, not_a_digit=choice is None, token_hash=needed)
        except DatabaseUnavailable as exc:
            metrics.error("database_unavailable")
            await self._keep(lambda: self.outbox.add_label_by_id(prediction_id, choice, token_hash=needed))
            log.warning("label kept in the outbox until the database is back: %s", exc)
            self._changed()
            return False
        except PredictionNotFound:
            metrics.error("not_found")
            raise
        except Forbidden:
            metrics.error("forbidden")
            raise
        await self._forget_older_labels(prediction_id, outcome)
        if outcome is not None:
            outcome.label_stored = same_choice(outcome, choice)
        self._changed()
        return True

    async def delete(self, prediction_id: int, *, token: str | None = None, operator: bool = False) -> None:
        """Delete a stored prediction and its drawing, with its label token (or as the operator).

        `Forbidden`, `PredictionNotFound` (also once deleted), `DatabaseUnavailable` (nothing is
        queued: the person is told to try again).
        """
        needed = self._authorize(token, operator)
        try:
            await self._db.delete(prediction_id, token_hash=needed)
        except DatabaseUnavailable:
            metrics.error("database_unavailable")
            raise
        except PredictionNotFound:
            metrics.error("not_found")
            raise
        except Forbidden:
            metrics.error("forbidden")
            raise
        waiting = self.outbox.id_labels()
        if prediction_id in waiting:  # a label queued for it has nothing to go to
            await self.outbox.remove(id_labels=[(prediction_id, waiting[prediction_id])])
        for key in [k for k, o in self._answers.items() if o.id == prediction_id]:
            del self._answers[key]  # a retry must not answer with a row that is gone
        metrics.deleted()
        self._changed()

    async def _forget_older_labels(self, prediction_id: int, outcome: Outcome | None) -> None:
        """A label just stored replaces any older one still waiting for the same prediction."""
        by_id = self.outbox.id_labels().get(prediction_id)
        by_key = self.outbox.key_labels().get(outcome.key) if outcome is not None else None
        if by_id is not None or by_key is not None:
            await self.outbox.remove(
                id_labels=[(prediction_id, by_id)] if by_id is not None else [],
                key_labels=[(outcome.key, by_key)] if outcome is not None and by_key is not None else [],
            )

    # -- reads ------------------------------------------------------------------------------------------
    async def recent(
        self,
        limit: int,
        before_id: int | None = None,
        *,
        only: Only = "all",
        ids: Collection[int] | None = None,
    ) -> list[PredictionRow]:
        """Stored predictions, newest first, all or `only` the wrong / unlabelled / not-a-digit ones,
        and only those in `ids` when given (a person's own); `DatabaseUnavailable` while it is down."""
        only = validate_only(only)
        wanted = None if ids is None else frozenset(ids)
        return await self._reads.get(
            ("recent", limit, before_id, only, wanted),
            self.version,
            lambda: self._db.recent(limit, before_id, only=only, ids=wanted),
        )

    def waiting_outcomes(self) -> list[Outcome]:
        """Answered predictions not stored yet, oldest first."""
        return self.outbox.outcomes()

    async def stats(self) -> Stats:
        """Statistics of every stored prediction (one query for every caller at once)."""
        return await self._reads.get("stats", self.version, lambda: self._db.stats())

    async def image_png(self, prediction_id: int) -> bytes:
        """The drawing of a stored prediction; `PredictionNotFound`, `DatabaseUnavailable`."""
        return await self._db.image_png(prediction_id)

    async def export_zip(self) -> bytes:
        """The labelled drawings as a zip for retraining (see `db.export`), in memory: small exports."""
        return await export_zip(self._db.labelled())

    async def export_to(self, out: BinaryIO) -> int:
        """The same zip written into `out` (a scratch file: constant memory); the number of drawings."""
        # Small batches: two exports at once hold only a few hundred rows between them.
        return await write_export(self._db.labelled(batch_size=EXPORT_BATCH), out)

    @property
    def waiting(self) -> int:
        """How many predictions and labels wait for the database."""
        return len(self.outbox)

    async def readiness(self) -> Readiness:
        """Model, database and pool, checked together within about 2 s."""
        (model_ok, model_detail), database = await asyncio.gather(
            self.inference.ready(), self._database_check()
        )
        return Readiness(
            model=Check(model_ok, model_detail),
            database=database,
            pool=self._pool_check(),
            model_url=self.inference.inference_url,
            waiting=self.waiting,
        )

    async def _database_check(self) -> Check:
        try:
            reachable = await asyncio.wait_for(self._db.ping(), timeout=2.0)
        except (StoreError, TimeoutError) as exc:
            return Check(False, f"unreachable: {str(exc) or type(exc).__name__}")
        return Check(True, "reachable") if reachable else Check(False, "unreachable")

    def _pool_check(self) -> Check:
        if self.store is None:
            return Check(False, "not open yet")
        health = self.store.pool_health()
        detail = (
            f"{health.size} connections, {health.idle} idle, {health.waiting} waiting, "
            f"exhausted for {health.exhausted_for_s:.1f} s"
        )
        return Check(health.exhausted_for_s <= POOL_EXHAUSTED_LIMIT_S, detail)

    # -- the retry loop ------------------------------------------------------------------------------------
    async def flush(self) -> int:
        """Store what waits, oldest first; stops at the first database failure. Returns how many."""
        async with self._flush_lock:
            stored = 0
            try:
                outcomes = self.outbox.outcomes()
                for start in range(0, len(outcomes), FLUSH_CHUNK):
                    stored += await self._flush_outcomes(outcomes[start : start + FLUSH_CHUNK])
                stored += await self._flush_key_labels()
                stored += await self._flush_id_labels()
            except DatabaseUnavailable:
                pass
            finally:
                if stored:
                    metrics.stored_late(stored)
                    log.info("stored %d waiting predictions/labels", stored)
                    self._changed()
        return stored

    async def _flush_outcomes(self, outcomes: list[Outcome]) -> int:
        """Store a chunk together, then their labels; raises `DatabaseUnavailable` after the chunk."""
        model_name = self.inference.model_name
        new = [o for o in outcomes if o.id is None]  # an id is set: stored, its label or tombstone was not
        results = await asyncio.gather(
            *(self._db.record_prediction(new_prediction(o, model_name)) for o in new), return_exceptions=True
        )
        unavailable: DatabaseUnavailable | None = None
        dropped: list[str] = []
        for outcome, result in zip(new, results, strict=True):
            if isinstance(result, DatabaseUnavailable):
                unavailable = result
            elif isinstance(result, InvalidPrediction):
                log.error("waiting prediction not storable, dropped: %s", result)
                dropped.append(outcome.key)
            elif isinstance(result, BaseException):
                raise result
            else:
                outcome.id = result
        done: list[str] = []
        labels_done: list[tuple[str, int | None]] = []
        key_labels = self.outbox.key_labels()
        recorded_now = {o.key for o in new}
        for outcome in outcomes:
            if outcome.id is None:
                continue
            if outcome.key.startswith(IDEMPOTENCY_PREFIX) and outcome.key in recorded_now:
                # A retry answered while the database was down may find the first row stored by
                # now: the token this retry was given must be the one that works.
                try:
                    await self._db.replace_label_token(outcome.id, token_hash(outcome.label_token))
                except DatabaseUnavailable as exc:
                    outcome.id, unavailable = None, exc
                    break
                except PredictionNotFound:
                    pass  # deleted meanwhile: nothing to give a token to
            if outcome.key in key_labels:  # given on the page that made it: no token to check
                choice = key_labels[outcome.key]
                try:
                    await self._db.set_label(outcome.id, choice, not_a_digit=choice is None)
                except DatabaseUnavailable as exc:
                    unavailable = exc
                    break
                except PredictionNotFound:  # deleted meanwhile (the row was just stored)
                    log.warning("label for prediction %d dropped: the row is gone", outcome.id)
                labels_done.append((outcome.key, choice))
                outcome.label_stored = same_choice(outcome, choice)
            done.append(outcome.key)
        await self.outbox.remove(predictions=done + dropped, key_labels=labels_done)
        if unavailable is not None:
            raise unavailable
        return len(done)

    async def _flush_key_labels(self) -> int:
        """Labels given while their prediction waited, whose prediction is stored by now."""
        stored = 0
        for key, choice in self.outbox.key_labels().items():
            if self.outbox.has_outcome(key):
                continue
            row = await self._db.find_by_key(key)
            try:
                if row is None:
                    raise PredictionNotFound(key)
                await self._db.set_label(row.id, choice, not_a_digit=choice is None)
                stored += 1
            except PredictionNotFound:
                log.warning("label %s for a prediction that is not stored (deleted?), dropped", choice)
            await self.outbox.remove(key_labels=[(key, choice)])
        return stored

    async def _flush_id_labels(self) -> int:
        stored = 0
        for prediction_id, choice in self.outbox.id_labels().items():
            needed = self.outbox.id_label_token(prediction_id)
            try:
                await self._db.set_label(prediction_id, choice, not_a_digit=choice is None, token_hash=needed)
                stored += 1
            except PredictionNotFound:
                log.warning("label for unknown (or deleted) prediction %d dropped", prediction_id)
            except Forbidden:
                log.warning("label for prediction %d dropped: its label token does not match", prediction_id)
            await self.outbox.remove(id_labels=[(prediction_id, choice)])
        return stored

    async def _retry_forever(self) -> None:
        """Background task: store what waits, at once and then every `retry_interval_s`."""
        while True:
            if self.waiting:
                try:
                    await self.flush()
                except Exception:  # keep retrying whatever happens; a bug here must not stop storing
                    log.exception("storing waiting predictions failed")
            await asyncio.sleep(self.retry_interval_s)

    # -- changes made by other replicas -------------------------------------------------------------------
    def notify_external_change(self) -> None:
        """Another writer (another replica) changed the stored data: reads start afresh, listeners are told.

        Called by the database change listener (`db.notify`, wired in `ui.app`), synchronously. A
        fresh `SharedRead` also stops new callers from joining a query already running, which may
        have begun before the other replica's commit and would answer without its row.
        """
        self._reads = SharedRead(self._reads.ttl_s, self._reads.max_entries)
        self._changed()
