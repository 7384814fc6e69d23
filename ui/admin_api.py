"""The operator's JSON API under /api/admin: model versions, retraining jobs, the review of disagreements.

Every call needs `Authorization: Bearer <ADMIN_TOKEN>`, checked by the one operator rule
(`PredictionService.is_operator`, constant time): 401 with a JSON body without it or with a wrong
one, before anything else is read. Then the learning loop answers through the `ui.learning.Learning`
protocol; when it cannot run (no database, registry or management API), 503 in words.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at definition time.
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Security
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from db.errors import DatabaseUnavailable

from . import metrics
from .api import ErrorOut, errors, operator_bearer
from .learning import (
    MAX_WORKERS,
    RUN_STATUSES,
    Learning,
    LearningError,
    LearningSlot,
    ReviewItem,
    RunView,
    VersionView,
    with_labelled,
)
from .service import PredictionService

T = TypeVar("T")

MAX_ID = 2**63 - 1  # bigint: larger ids are not ids (422, not a database error)
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
UNAUTHORIZED = "needs `Authorization: Bearer <ADMIN_TOKEN>` (the operator token)"
NOT_OPERATOR = "the operator API needs Authorization: Bearer <ADMIN_TOKEN>"
UNAVAILABLE = "the learning loop is unavailable (no database, or TorchServe's management API is down)"

VersionPath = Annotated[
    str, Path(pattern=VERSION_PATTERN, description="a model version, e.g. `1.0`, `2.0`", examples=["1.0"])
]


class ModelOut(BaseModel):
    version: str
    live: bool = Field(description="the version public predictions go to (TorchServe's default)")
    state: str = Field(description="candidate, live, retired or failed")
    workers: int = Field(description="TorchServe workers of this version (0: not registered)")
    metrics: dict[str, Any] = Field(
        description="evaluation: `mnist` (test set) and `feedback` (held-out feedback) from the "
        "trainer, each `{accuracy, n, per_digit}`; `labelled`: accuracy on people's labels of "
        "the predictions this version answered"
    )
    reason: str = Field(description="why the version is in its state (the gate's numbers, the operator)")
    created_at: datetime | None
    parent_version: str | None
    feedback_count: int = Field(description="labelled drawings it was trained on")


class RetrainIn(BaseModel):
    """Options of one run; each overrides the trainer's default (all optional)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{}, {"epochs": 1, "mnist_eval_limit": 2000}]}
    )

    epochs: StrictInt | None = Field(None, ge=1, le=50)
    mnist_samples: StrictInt | None = Field(
        None, ge=1, le=60_000, description="MNIST training images per epoch (a fresh random subset each)"
    )
    feedback_weight: float | None = Field(
        None, ge=0, lt=1, description="share of every batch drawn from the feedback drawings"
    )
    batch_size: StrictInt | None = Field(None, ge=2, le=1024)
    lr: float | None = Field(None, gt=0, le=1, description="peak learning rate")
    weight_decay: float | None = Field(None, ge=0, le=1)
    label_smoothing: float | None = Field(None, ge=0, lt=1)
    warmup: float | None = Field(None, gt=0, lt=1, description="share of the steps warming the rate up")
    threads: StrictInt | None = Field(None, ge=1, le=64)
    seed: StrictInt | None = Field(None, ge=0, le=2**31 - 1)
    augment: StrictBool | None = None
    progress_every: StrictInt | None = Field(None, ge=1, le=100_000, description="steps between reports")
    mnist_eval_limit: StrictInt | None = Field(
        None, ge=1, le=10_000, description="MNIST test images the evaluation uses (default: the trainer's)"
    )
    auto_promote: StrictBool | None = Field(None, description="promote when the gate says so (default true)")

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class JobAccepted(BaseModel):
    job_id: int = Field(description="the training run's id: follow it at GET /api/admin/jobs/{job_id}")
    status: str


class JobOut(BaseModel):
    job_id: int = Field(validation_alias=AliasChoices("job_id", "id"))  # a `RunView`'s `id`
    status: str = Field(description=" / ".join(RUN_STATUSES))
    progress: float = Field(description="0..1")
    message: str
    version: str | None = Field(description="the version the run built, once built")
    promoted: bool
    history: list[dict[str, Any]] = Field(description="one entry per epoch: epoch, loss, accuracy")
    options: dict[str, Any]
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class WorkersIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"count": 2}]})

    count: StrictInt = Field(
        ge=0, le=MAX_WORKERS, description=f"0-{MAX_WORKERS} workers (at least 1 for the live version)"
    )


class ReviewOut(BaseModel):
    id: int
    created_at: datetime
    label: int = Field(description="the digit the person said it is")
    digit: int = Field(description="the digit the model answered")
    confidence: float
    model_version: str
    excluded: bool = Field(description="left out of training by the operator")
    image_url: str = Field(description="the drawing (a signed link: it loads without a header)")


class ExcludedIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"excluded": True}]})

    excluded: StrictBool


class ExcludedOut(BaseModel):
    id: int
    excluded: bool


def model_out(v: VersionView) -> ModelOut:
    return ModelOut.model_validate(v, from_attributes=True)


def job_out(run: RunView) -> JobOut:
    return JobOut.model_validate(run, from_attributes=True)


def review_out(item: ReviewItem, image_url: str) -> ReviewOut:
    return ReviewOut.model_validate({**asdict(item), "image_url": image_url})


async def answer(loop: LearningSlot, call: Callable[[Learning], Awaitable[T]]) -> T:
    """The loop's refusals as JSON errors: 503 unavailable, 404 unknown, 409 the live version, 422 bad."""
    try:
        return await call(await loop.get())
    except LearningError as exc:
        status = 422 if exc.status == 400 else exc.status
        raise HTTPException(status, str(exc)) from exc


# Every operation: 401 first, 503 when the loop is unavailable.
COMMON = errors(e401=UNAUTHORIZED, e503=UNAVAILABLE)


def build_admin_router(service: PredictionService, loop: LearningSlot) -> APIRouter:
    """Routes under /api/admin, for the operator only (see the module docstring)."""

    def operator(
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(operator_bearer)],
    ) -> None:
        if bearer is None or not service.is_operator(bearer.credentials):
            metrics.error("forbidden")
            raise HTTPException(401, NOT_OPERATOR, {"WWW-Authenticate": "Bearer"})

    router = APIRouter(
        prefix="/api/admin", tags=["operator"], dependencies=[Depends(operator)], responses=COMMON
    )

    @router.get("/models", response_model=list[ModelOut])
    async def list_models() -> list[ModelOut]:
        """Every registered model version, newest first: live or not, workers, metrics, state, reason."""
        versions = await answer(loop, lambda it: it.models())
        try:
            stats = await service.stats()
        except DatabaseUnavailable:
            stats = None
        return [model_out(v) for v in with_labelled(versions, stats)]

    @router.post(
        "/retrain",
        status_code=202,
        response_model=JobAccepted,
        responses=errors(e413="body too large"),
    )
    async def retrain(body: RetrainIn | None = None) -> JobAccepted:
        """Queue a training run (fine-tune the live version on the labelled feedback); 202 with its id.

        One run at a time: a second request waits in the queue. The run evaluates the new version
        beside the live one and promotes it only when the gate says so (`auto_promote`).
        """
        run = await answer(loop, lambda it: it.retrain(body.options() if body is not None else {}))
        return JobAccepted(job_id=run.id, status=run.status)

    @router.get("/jobs", response_model=list[JobOut])
    async def list_jobs(limit: int = Query(20, ge=1, le=200)) -> list[JobOut]:
        """The latest training runs, newest first."""
        return [job_out(r) for r in await answer(loop, lambda it: it.runs(limit))]

    @router.get(
        "/jobs/{job_id}", response_model=JobOut, responses=errors(e404="no training run with this id")
    )
    async def get_job(job_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> JobOut:
        """One training run: status, progress 0..1, message, the version built, promoted or not."""
        return job_out(await answer(loop, lambda it: it.job(job_id)))

    @router.post(
        "/models/{version}/promote",
        response_model=ModelOut,
        responses=errors(e404="no such version", e409="a failed version, or TorchServe refused"),
    )
    async def promote(version: VersionPath) -> ModelOut:
        """Make this version the live one (TorchServe's default); the old live one stays registered,
        so a rollback is promoting it again."""
        return model_out(await answer(loop, lambda it: it.promote(version)))

    @router.post(
        "/models/{version}/retire",
        response_model=ModelOut,
        responses=errors(
            e404="no such version", e409="the live version cannot be retired, or TorchServe refused"
        ),
    )
    async def retire(version: VersionPath) -> ModelOut:
        """Unregister a version that is not live from TorchServe (kept in the registry as retired)."""
        return model_out(await answer(loop, lambda it: it.retire(version)))

    @router.put(
        "/models/{version}/workers",
        response_model=ModelOut,
        responses=errors(
            e404="no such version",
            e409="0 workers for the live version, or TorchServe refused",
            e413="body too large",
        ),
    )
    async def scale(version: VersionPath, body: WorkersIn) -> ModelOut:
        """Set how many TorchServe workers serve this version (waits until they run)."""
        return model_out(await answer(loop, lambda it: it.scale(version, body.count)))

    @router.get("/review", response_model=list[ReviewOut])
    async def review(
        limit: int = Query(50, ge=1, le=200), offset: int = Query(0, ge=0, le=1_000_000)
    ) -> list[ReviewOut]:
        """Labelled drawings whose label is not the model's digit, newest first (a poisoned label
        shows here: exclude it from training)."""
        items = await answer(loop, lambda it: it.review(limit, offset))
        return [review_out(item, service.links.image_url(item.id)) for item in items]

    @router.put(
        "/predictions/{prediction_id}/excluded",
        response_model=ExcludedOut,
        responses=errors(e404="no prediction with this id", e413="body too large"),
    )
    async def set_excluded(
        prediction_id: Annotated[int, Path(ge=1, le=MAX_ID)], body: ExcludedIn
    ) -> ExcludedOut:
        """Leave a drawing out of training (`{"excluded": true}`) or take it back in."""
        await answer(loop, lambda it: it.exclude(prediction_id, body.excluded))
        return ExcludedOut(id=prediction_id, excluded=body.excluded)

    return router


__all__ = ["ErrorOut", "build_admin_router"]
