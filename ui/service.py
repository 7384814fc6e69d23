"""What the page and the API share: predict, store, label, and keep what could not be stored yet.

When the database is down, a prediction is still answered and kept in memory (`pending`), and a
label given meanwhile is kept with it; `flush` stores them once the database is back (the app runs
`retry_forever` in the background). Nothing the person entered is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from db.store import DatabaseUnavailable, InvalidPrediction, NewPrediction, PredictionNotFound, Store

from . import metrics
from .inference import InferenceClient, InferenceUnavailable, InvalidInput, Prediction

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One answered prediction as the page holds it; `id` is set once it is stored."""

    image_png: bytes
    prediction: Prediction
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    id: int | None = None
    latency_ms: float = 0.0  # the model server's round trip
    label: int | None = None
    label_stored: bool = False

    @property
    def stored(self) -> bool:
        return self.id is not None


def check_label(label: object) -> int:
    """A true label must be an int 0-9 (not a bool); `ValueError` with a clear message otherwise."""
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
        raise ValueError(f"label must be a whole number from 0 to 9, got {label!r}")
    return label


def new_prediction(outcome: Outcome, model_name: str) -> NewPrediction:
    """The row to store for an outcome."""
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
    )


class PredictionService:
    """Predict with the model server, store in PostgreSQL, retry storing what failed."""

    def __init__(
        self,
        store: Store | None,
        inference: InferenceClient,
        *,
        max_image_bytes: int = 2_000_000,
        retry_interval_s: float = 2.0,
        max_pending: int = 10_000,
    ) -> None:
        self.store = store  # None until the app's startup has opened it
        self.inference = inference
        self.max_image_bytes = max_image_bytes
        self.retry_interval_s = retry_interval_s
        self.max_pending = max_pending
        self.pending: OrderedDict[str, Outcome] = OrderedDict()  # answered, not stored yet
        self.pending_labels: dict[int, int] = {}  # stored prediction id -> label not stored yet
        self.version = 0  # bumped whenever stored data changes, so pages know to refresh
        self._flush_lock = asyncio.Lock()

    @property
    def db(self) -> Store:
        """The store; `DatabaseUnavailable` while it is not open yet (the first instants after start)."""
        if self.store is None:
            raise DatabaseUnavailable("database unavailable: still connecting")
        return self.store

    async def predict(self, image: bytes) -> Outcome:
        """Answer one image and try to store it (see `answer` and `save`)."""
        outcome = await self.answer(image)
        await self.save(outcome)
        return outcome

    async def answer(self, image: bytes) -> Outcome:
        """Ask the model; `InvalidInput` / `InferenceUnavailable` as the model server says. Not stored."""
        if len(image) > self.max_image_bytes:
            metrics.ERRORS.labels("invalid_input").inc()
            raise InvalidInput(
                f"image too large: {len(image):,} bytes, at most {self.max_image_bytes:,} are accepted", 413
            )
        started = time.perf_counter()
        try:
            prediction = await self.inference.predict(image)
        except InvalidInput:
            metrics.ERRORS.labels("invalid_input").inc()
            raise
        except InferenceUnavailable:
            metrics.ERRORS.labels("inference_unavailable").inc()
            raise
        latency_ms = 1000 * (time.perf_counter() - started)
        return Outcome(image_png=image, prediction=prediction, latency_ms=latency_ms)

    async def save(self, outcome: Outcome) -> bool:
        """Store an answered outcome; when the database is down keep it for `flush`. True if stored."""
        try:
            await self._record(outcome)
        except DatabaseUnavailable as exc:
            metrics.ERRORS.labels("database_unavailable").inc()
            log.warning("prediction kept in memory until the database is back: %s", exc)
            self._keep(outcome)
        except InvalidPrediction as exc:  # a model answer the schema refuses: storing it again cannot help
            metrics.ERRORS.labels("invalid_prediction").inc()
            log.error("prediction not storable: %s", exc)
        else:
            self.version += 1
        metrics.LATENCY.observe((datetime.now(UTC) - outcome.created_at).total_seconds())
        metrics.PREDICTIONS.labels(str(outcome.stored).lower()).inc()
        return outcome.stored

    async def _record(self, outcome: Outcome) -> None:
        """Insert the row, then its label if one was given meanwhile (kept for later if that fails)."""
        outcome.id = await self.db.record_prediction(new_prediction(outcome, self.inference.model_name))
        if outcome.label is not None:
            await self._store_label(outcome.id, outcome.label, outcome)

    def _keep(self, outcome: Outcome) -> None:
        self.pending[outcome.key] = outcome
        while len(self.pending) > self.max_pending:  # bounded memory: the oldest goes, loudly
            _, dropped = self.pending.popitem(last=False)
            metrics.ERRORS.labels("pending_dropped").inc()
            log.error("pending prediction dropped, too many waiting: %s", dropped.key)

    async def label(self, outcome: Outcome, label: int) -> bool:
        """Give an outcome its true label; True when stored now, False when kept for later."""
        outcome.label = check_label(label)
        outcome.label_stored = False
        metrics.FEEDBACK.labels(str(label == outcome.prediction.digit).lower()).inc()
        if outcome.id is None:
            return False  # stored with the prediction when the database is back
        return await self._store_label(outcome.id, label, outcome)

    async def label_by_id(self, prediction_id: int, label: int) -> bool:
        """Label a stored prediction; `PredictionNotFound`; False when kept until the database is back."""
        check_label(label)
        metrics.FEEDBACK.labels("unknown").inc()
        return await self._store_label(prediction_id, label, None)

    async def _store_label(self, prediction_id: int, label: int, outcome: Outcome | None) -> bool:
        try:
            await self.db.set_label(prediction_id, label)
        except DatabaseUnavailable as exc:
            metrics.ERRORS.labels("database_unavailable").inc()
            log.warning("label kept in memory until the database is back: %s", exc)
            self.pending_labels[prediction_id] = label
            return False
        except PredictionNotFound:
            metrics.ERRORS.labels("not_found").inc()
            raise
        self.pending_labels.pop(prediction_id, None)
        if outcome is not None:
            outcome.label_stored = True
        self.version += 1
        return True

    @property
    def waiting(self) -> int:
        """How many predictions and labels wait for the database."""
        return len(self.pending) + len(self.pending_labels)

    async def flush(self) -> int:
        """Store what waits, oldest first; stops at the first database failure. Returns how many."""
        stored = 0
        async with self._flush_lock:
            for key, outcome in list(self.pending.items()):
                try:
                    await self._record(outcome)
                except DatabaseUnavailable:
                    return self._flushed(stored)
                except InvalidPrediction as exc:
                    log.error("waiting prediction not storable, dropped: %s", exc)
                self.pending.pop(key, None)
                stored += 1
            for prediction_id, label in list(self.pending_labels.items()):
                try:
                    await self.db.set_label(prediction_id, label)
                except DatabaseUnavailable:
                    return self._flushed(stored)
                except PredictionNotFound:
                    log.error("label for unknown prediction %d dropped", prediction_id)
                self.pending_labels.pop(prediction_id, None)
                stored += 1
        return self._flushed(stored)

    def _flushed(self, stored: int) -> int:
        if stored:
            metrics.PENDING_SAVED.inc(stored)
            self.version += 1
            log.info("stored %d waiting predictions/labels", stored)
        return stored

    async def retry_forever(self) -> None:
        """Background task: flush what waits every `retry_interval_s`."""
        while True:
            await asyncio.sleep(self.retry_interval_s)
            if self.waiting:
                try:
                    await self.flush()
                except Exception:  # keep retrying whatever happens; a bug here must not stop saving
                    log.exception("storing waiting predictions failed")
