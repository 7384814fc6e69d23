"""The learning loop as the operator sees it: model versions, training runs, the review of disagreements.

`LearningService` is the one door from `ui/` to the model registry (`db.registry`), the job queue
(`db.queue`) and the served versions (`serving.registry`): the admin API and the operator page use
only the `Learning` protocol below, and get plain views (`VersionView`, `RunView`, `ReviewItem`)
back, so neither knows the database or TorchServe, and the tests can swap in a fake.

When the loop cannot run (no database configured, the registry or TorchServe's management API
unreachable), every call raises `LoopUnavailable` with the reason in words: the API answers 503,
the page says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from db.errors import DatabaseUnavailable, PredictionNotFound, StoreError
from db.records import Disagreement, RunNotFound, TrainingRun, VersionNotFound
from db.registry import Registry
from db.stats import Stats
from serving.management import ManagementError
from serving.registry import ArchiveMismatch, ModelInfo, ModelRegistry
from settings import Settings

if TYPE_CHECKING:
    import procrastinate

log = logging.getLogger(__name__)

T = TypeVar("T")
Closer = Callable[[], Awaitable[None]]

RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
OPEN_TIMEOUT_S = 15.0  # opening the loop's parts (none of them waits for the database)
QUEUE_OPEN_TIMEOUT_S = 10.0  # the queue's connection, on the first retrain
MAX_WORKERS = 16  # per version (serving.registry's bound); 0 for a version that is not live


class LearningError(Exception):
    """A request the loop refuses; `status` is the HTTP answer the API gives."""

    status = 400


class LoopUnavailable(LearningError):
    """The learning loop cannot run now (no database, registry or management API): try later."""

    status = 503


class UnknownVersion(LearningError, LookupError):
    status = 404


class UnknownRun(LearningError, LookupError):
    status = 404


class UnknownPrediction(LearningError, LookupError):
    status = 404


class LiveVersion(LearningError):
    """The live version cannot be retired: promote another one first."""

    status = 409


@dataclass(frozen=True)
class VersionView:
    """A model version: the registry's row and what TorchServe says of it (`workers`).

    `metrics` is the worker's evaluation JSON (MNIST test set, held-out feedback), with
    `labelled` added from the people's labels of the predictions this version answered.
    """

    version: str
    live: bool
    state: str  # candidate / live / retired / failed
    workers: int
    metrics: dict[str, Any]
    reason: str
    created_at: datetime | None = None
    parent_version: str | None = None
    feedback_count: int = 0


@dataclass(frozen=True)
class RunView:
    """A training run (the API calls it a job: its `job_id` is the run's id)."""

    id: int
    status: str  # one of RUN_STATUSES
    progress: float  # 0..1
    message: str
    version: str | None = None  # built by the run
    promoted: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # {epoch, loss, accuracy} per step
    options: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclass(frozen=True)
class ReviewItem:
    """A labelled drawing whose label is not the digit the model answered (its image: a signed link,
    `PredictionService.links.image_url(id)`: drawings are private)."""

    id: int
    created_at: datetime
    label: int
    digit: int
    confidence: float
    model_version: str
    excluded: bool


class Learning(Protocol):
    """What the admin API and the operator page use (`LearningService`, `UnavailableLearning`, fakes)."""

    async def models(self) -> list[VersionView]: ...

    async def retrain(self, options: Mapping[str, Any]) -> RunView: ...

    async def job(self, run_id: int) -> RunView: ...

    async def runs(self, limit: int = 20) -> list[RunView]: ...

    async def promote(self, version: str) -> VersionView: ...

    async def retire(self, version: str) -> VersionView: ...

    async def scale(self, version: str, count: int) -> VersionView: ...

    async def review(self, limit: int = 50, offset: int = 0) -> list[ReviewItem]: ...

    async def exclude(self, prediction_id: int, excluded: bool) -> None: ...


class UnavailableLearning:
    """The loop when it cannot run at all (e.g. no database configured): every call says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _refuse(self) -> LoopUnavailable:
        return LoopUnavailable(self.reason)

    async def models(self) -> list[VersionView]:
        raise self._refuse()

    async def retrain(self, options: Mapping[str, Any]) -> RunView:
        raise self._refuse()

    async def job(self, run_id: int) -> RunView:
        raise self._refuse()

    async def runs(self, limit: int = 20) -> list[RunView]:
        raise self._refuse()

    async def promote(self, version: str) -> VersionView:
        raise self._refuse()

    async def retire(self, version: str) -> VersionView:
        raise self._refuse()

    async def scale(self, version: str, count: int) -> VersionView:
        raise self._refuse()

    async def review(self, limit: int = 50, offset: int = 0) -> list[ReviewItem]:
        raise self._refuse()

    async def exclude(self, prediction_id: int, excluded: bool) -> None:
        raise self._refuse()


# ------------------------------------------------------------------ pure helpers (the page and the API)


def accuracy(metrics: Mapping[str, Any], kind: str) -> float | None:
    """One accuracy out of a version's metrics: `mnist` (test set) and `feedback` (held out), as the
    trainer stores them (`{"mnist": {"accuracy", "n", "per_digit"}, ...}`), or `labelled`; None
    when the version has no such figure (the shipped one before its first comparison)."""
    value = metrics.get(kind)
    if isinstance(value, Mapping):
        value = value.get("accuracy")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def with_labelled(versions: Sequence[VersionView], stats: Stats | None) -> list[VersionView]:
    """Each version's metrics with `labelled`: accuracy on the drawings people labelled that it answered."""
    if stats is None:
        return list(versions)
    out = []
    for v in versions:
        mine = stats.by_version.get(v.version)
        if mine is None or mine.labelled == 0:
            out.append(v)
            continue
        labelled = {"accuracy": mine.accuracy, "n": mine.labelled}
        out.append(replace(v, metrics={**v.metrics, "labelled": labelled}))
    return out


def check_count(count: int) -> int:
    """A version's worker count: 0..MAX_WORKERS (0 only for a version that is not live)."""
    if not 0 <= count <= MAX_WORKERS:
        raise LearningError(f"workers must be 0-{MAX_WORKERS}, not {count}")
    return count


# ------------------------------------------------------------------ the real service


class LearningService:
    """The loop's parts behind the `Learning` protocol (see the module docstring): the registry's rows,
    the served versions (`ModelRegistry`: TorchServe and the registry changed together), the queue.

    `defer` is `db.queue.defer_retrain` (a parameter so that `procrastinate` is imported only where
    the queue is opened, in `open_learning`).
    """

    def __init__(
        self,
        registry: Registry,
        models: ModelRegistry,
        queue_app: procrastinate.App,
        defer: Callable[[procrastinate.App, int], Awaitable[int]],
    ) -> None:
        self.registry = registry
        self.model_registry = models
        self.queue_app = queue_app
        self.defer = defer
        self._queue_open = False
        self._queue_lock = asyncio.Lock()

    async def _open_queue(self) -> None:
        """The queue's connection, opened on the first retrain (procrastinate waits for its pool
        while the database is down: the rest of the loop, and the app's start, must not)."""
        async with self._queue_lock:
            if self._queue_open:
                return
            try:
                await asyncio.wait_for(self.queue_app.open_async(), QUEUE_OPEN_TIMEOUT_S)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await self.queue_app.close_async()
                raise LoopUnavailable(f"the job queue: cannot connect to the database ({exc!r})") from exc
            self._queue_open = True

    async def close(self) -> None:
        """Close the queue's connection if it was opened (the registry and TorchServe client are the
        caller's)."""
        async with self._queue_lock:
            if self._queue_open:
                self._queue_open = False
                await self.queue_app.close_async()

    async def models(self) -> list[VersionView]:
        infos = await _call("the model versions", self.model_registry.models)
        return [version_view(info) for info in infos]

    async def _version(self, version: str) -> VersionView:
        found = next((v for v in await self.models() if v.version == version), None)
        if found is None:
            raise UnknownVersion(f"no model version {version!r}")
        return found

    async def retrain(self, options: Mapping[str, Any]) -> RunView:
        """A queued run: its row first (the page shows it at once), then the queue's job, linked to it.

        A job that could not be queued leaves the run failed with the reason (never "queued" for ever).
        """
        run = await _call("a training run", lambda: self.registry.create_run(dict(options)))
        try:
            await self._open_queue()
            job_id = await _call("the job queue", lambda: self.defer(self.queue_app, run.id))
            await _call("the training run", lambda: self.registry.set_job(run.id, job_id))
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self.registry.finish_run(run.id, "failed", f"could not be queued: {exc}")
            raise
        return await self.job(run.id)

    async def job(self, run_id: int) -> RunView:
        run = await _call("the training run", lambda: self.registry.get_run(run_id))
        if run is None:
            raise UnknownRun(f"no training run {run_id}")
        return run_view(run)

    async def runs(self, limit: int = 20) -> list[RunView]:
        return [run_view(r) for r in await _call("the training runs", lambda: self.registry.runs(limit))]

    async def promote(self, version: str) -> VersionView:
        await self._version(version)
        await _call(
            f"promoting {version}",
            lambda: self.model_registry.promote(version, "promoted by the operator"),
            refused=LiveVersion,
        )
        return await self._version(version)

    async def retire(self, version: str) -> VersionView:
        if (await self._version(version)).live:
            raise LiveVersion(f"version {version} is live: promote another version first")
        await _call(f"retiring {version}", lambda: self.model_registry.retire(version), refused=LiveVersion)
        return await self._version(version)

    async def scale(self, version: str, count: int) -> VersionView:
        check_count(count)
        await self._version(version)
        await _call(f"scaling {version}", lambda: self.model_registry.scale(version, count), refused=Refused)
        return await self._version(version)

    async def review(self, limit: int = 50, offset: int = 0) -> list[ReviewItem]:
        rows = await _call("the review list", lambda: self.registry.disagreements(limit, offset))
        return [review_item(r) for r in rows]

    async def exclude(self, prediction_id: int, excluded: bool) -> None:
        await _call(
            f"excluding #{prediction_id}", lambda: self.registry.set_excluded(prediction_id, excluded)
        )


class Refused(LearningError):
    """TorchServe or the registry refused the change (a 4xx from the management API, an archive that
    does not match its checksum): the message says why."""

    status = 409


async def _call(
    what: str, action: Callable[[], Awaitable[T]], refused: type[LearningError] = LearningError
) -> T:
    """One call of the loop's parts, its failures as the loop's errors (one mapping, here):
    unreachable -> LoopUnavailable (503); unknown -> 404; a rule broken -> `refused` (a ValueError
    from `ModelRegistry`: the live version, a failed one; 422 by default); TorchServe's refusal -> 409."""
    try:
        return await action()
    except LearningError:
        raise
    except DatabaseUnavailable as exc:
        raise LoopUnavailable(f"{what}: the database is unreachable ({exc})") from exc
    except ManagementError as exc:
        if exc.status_code is None or exc.status_code >= 500:
            raise LoopUnavailable(f"{what}: TorchServe's management API: {exc}") from exc
        raise Refused(f"{what}: {exc}") from exc
    except (VersionNotFound, RunNotFound) as exc:
        raise (UnknownVersion if isinstance(exc, VersionNotFound) else UnknownRun)(str(exc)) from exc
    except PredictionNotFound as exc:
        raise UnknownPrediction(str(exc)) from exc
    except ArchiveMismatch as exc:
        raise Refused(f"{what}: {exc}") from exc
    except ValueError as exc:  # InvalidRegistryValue too
        raise refused(f"{what}: {exc}") from exc
    except StoreError as exc:
        raise LoopUnavailable(f"{what}: {exc}") from exc
    except OSError as exc:  # the queue's connection (procrastinate wraps psycopg's errors)
        raise LoopUnavailable(f"{what}: {exc}") from exc


def version_view(info: ModelInfo) -> VersionView:
    """A `serving.registry.ModelInfo` as the page and the API show it."""
    return VersionView(
        version=info.version,
        live=info.live,
        state=info.state,
        workers=info.workers,
        metrics=dict(info.metrics),
        reason=info.reason,
        created_at=info.created_at,
        parent_version=info.parent_version,
        feedback_count=info.feedback_count,
    )


def run_view(run: TrainingRun) -> RunView:
    """A `db.registry.TrainingRun` as the page and the API show it."""
    return RunView(
        id=run.id,
        status=run.status,
        progress=min(1.0, max(0.0, float(run.progress))),
        message=run.message,
        version=run.version,
        promoted=run.promoted,
        history=[dict(h) for h in run.history],
        options=dict(run.options),
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )


def review_item(row: Disagreement) -> ReviewItem:
    """A `db.registry.Disagreement` as the review list shows it."""
    return ReviewItem(
        id=row.id,
        created_at=row.created_at,
        label=row.label,
        digit=row.digit,
        confidence=row.confidence,
        model_version=row.model_version,
        excluded=row.excluded,
    )


class LearningSlot:
    """Where the admin API and the page find the loop.

    With an `opener` (the app's startup: `open_learning` on the database), the loop is opened on
    first use and, when that fails (the database down at start), tried again on a later use at
    most every `retry_s`: meanwhile it is `UnavailableLearning` with the reason. `close()` at shutdown.
    """

    def __init__(
        self,
        learning: Learning,
        opener: Callable[[], Awaitable[tuple[Learning, Closer]]] | None = None,
        retry_s: float = 5.0,
    ) -> None:
        self.learning = learning
        self.opener = opener
        self.retry_s = retry_s
        self._closer: Closer | None = None
        self._tried_at = -math.inf
        self._lock = asyncio.Lock()

    async def get(self) -> Learning:
        async with self._lock:
            opener = self.opener
            if opener is not None and time.monotonic() - self._tried_at >= self.retry_s:
                self._tried_at = time.monotonic()
                try:
                    self.learning, self._closer = await asyncio.wait_for(opener(), OPEN_TIMEOUT_S)
                    self.opener = None
                except Exception as exc:
                    log.warning("the learning loop could not be opened: %s", exc)
                    self.learning = UnavailableLearning(f"the learning loop could not be opened: {exc}")
        return self.learning

    async def close(self) -> None:
        if self._closer is not None:
            closer, self._closer = self._closer, None
            await closer()


NO_DATABASE = "the learning loop needs PostgreSQL: no database is configured (DATABASE_URL)"


async def open_learning(settings: Settings, url: str) -> tuple[Learning, Closer]:
    """The real loop on `url` and TorchServe's management API (from `settings`), and how to close it.

    Nothing here waits for the database (the registry's pool opens in the background, the queue
    connects on the first retrain), so the app starts while PostgreSQL is still coming up. Without
    procrastinate installed the loop is `UnavailableLearning` with the reason.
    """
    from db.queue import defer_retrain, make_app

    try:
        queue_app = make_app(url)  # not connected yet: see LearningService._open_queue
    except ImportError as exc:  # procrastinate is not installed (an image without the loop)
        log.warning("the learning loop is not available: %s", exc)
        return UnavailableLearning(f"the learning loop is not installed here ({exc})"), _nothing
    registry = await Registry.open(url, application_name="admin")  # works while the server is down
    models = ModelRegistry.from_settings(settings, registry)  # the trainer's and make run's too
    service = LearningService(registry, models, queue_app, defer_retrain)

    async def close() -> None:
        await service.close()
        await models.close()
        await registry.close()

    return service, close


async def _nothing() -> None:
    return None
