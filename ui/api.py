"""The JSON API beside the page (documented at /docs)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, Field

from db.errors import DatabaseUnavailable, InvalidPrediction, PredictionNotFound
from handlers.preprocess import PreprocessError, decode_payload

from .inference import InferenceUnavailable, InvalidInput
from .outbox import QueueFull
from .service import PredictionService, check_label

MAX_IDEMPOTENCY_KEY = 200  # characters

IMAGE_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": 'An image (PNG, JPEG, WebP) as the body, or JSON `{"data": "<base64 or data URL>"}`.',
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string", "description": "base64 image or data URL"}},
                }
            },
        },
    }
}


class PredictionOut(BaseModel):
    id: int | None = Field(description="the stored row's id; null when the database was down (stored later)")
    stored: bool
    digit: int
    confidence: float
    probabilities: list[float]
    model_version: str


class LabelIn(BaseModel):
    label: Annotated[int, BeforeValidator(check_label)] = Field(description="the true digit, 0-9")


class LabelOut(BaseModel):
    id: int
    label: int
    stored: bool = Field(description="false when the database was down: kept and stored when it is back")


class HistoryItem(BaseModel):
    id: int
    created_at: datetime
    digit: int
    confidence: float
    true_label: int | None
    correct: bool | None
    model_version: str
    image_url: str


class HistoryPage(BaseModel):
    items: list[HistoryItem]
    next_before_id: int | None = Field(description="pass as before_id for the next (older) page")


def database_down() -> HTTPException:
    return HTTPException(503, "the database is unreachable; try again shortly")


def build_router(service: PredictionService, max_body_bytes: int) -> APIRouter:
    """Routes under /api, bound to the shared service."""
    router = APIRouter(prefix="/api", tags=["predictions"])

    @router.post(
        "/predictions",
        status_code=201,
        response_model=PredictionOut,
        openapi_extra=IMAGE_BODY_DOC,
        responses={
            202: {"description": "answered; database down: kept on disk, stored when it is back"},
            400: {"description": "not an image, blank drawing, bad JSON, Idempotency-Key too long"},
            413: {"description": "image too large"},
            502: {"description": "the model's answer could not be stored"},
            503: {
                "description": "the model server is unreachable, or the database is down and the outbox full"
            },
        },
    )
    async def create_prediction(
        request: Request,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description=f"1-{MAX_IDEMPOTENCY_KEY} characters; a retry with the same key returns "
                "the first answer and stores nothing more",
            ),
        ] = None,
    ) -> Any:
        """Predict the digit in an image and store the prediction (201), or keep it on disk (202)."""
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise HTTPException(400, f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes * 2:
            raise HTTPException(413, f"body too large: images of at most {max_body_bytes:,} bytes")
        body = await request.body()
        try:  # the model server's own rule: raw image bytes, or JSON {"data": base64 | data URL}
            image = decode_payload(body, request.headers.get("content-type", ""), max_body_bytes)
        except PreprocessError as exc:
            raise HTTPException(int(exc.status), str(exc)) from exc
        try:
            outcome = await service.predict(image, idempotency_key)
        except InvalidInput as exc:
            raise HTTPException(exc.status_code if exc.status_code != 422 else 400, str(exc)) from exc
        except InferenceUnavailable as exc:
            raise HTTPException(503, str(exc)) from exc
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from exc
        except InvalidPrediction as exc:
            raise HTTPException(502, f"the model's answer could not be stored: {exc}") from exc
        p = outcome.prediction
        out = PredictionOut(
            id=outcome.id,
            stored=outcome.stored,
            digit=p.digit,
            confidence=p.confidence,
            probabilities=p.probabilities,
            model_version=p.model_version,
        )
        return JSONResponse(out.model_dump(), status_code=201 if outcome.stored else 202)

    @router.put(
        "/predictions/{prediction_id}/label",
        response_model=LabelOut,
        responses={
            202: {"description": "kept on disk; stored when the database is back"},
            404: {"description": "no prediction with this id"},
            503: {"description": "the database is down and the outbox full"},
        },
    )
    async def set_label(prediction_id: int, body: LabelIn) -> Any:
        """Give a stored prediction its true label."""
        try:
            stored = await service.label_by_id(prediction_id, body.label)
        except PredictionNotFound as exc:
            raise HTTPException(404, f"no prediction with id {prediction_id}") from exc
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from exc
        out = LabelOut(id=prediction_id, label=body.label, stored=stored)
        return JSONResponse(out.model_dump(), status_code=200 if stored else 202)

    @router.get("/predictions", response_model=HistoryPage)
    async def list_predictions(
        limit: int = Query(20, ge=1, le=200), before_id: int | None = Query(None, ge=1)
    ) -> HistoryPage:
        """Stored predictions, newest first; page with `before_id`."""
        try:
            rows = await service.recent(limit, before_id)
        except DatabaseUnavailable as exc:
            raise database_down() from exc
        items = [
            HistoryItem(
                id=r.id,
                created_at=r.created_at,
                digit=r.digit,
                confidence=r.confidence,
                true_label=r.true_label,
                correct=None if r.true_label is None else r.true_label == r.digit,
                model_version=r.model_version,
                image_url=f"/api/predictions/{r.id}/image.png",
            )
            for r in rows
        ]
        return HistoryPage(items=items, next_before_id=rows[-1].id if len(rows) == limit else None)

    @router.get(
        "/predictions/{prediction_id}/image.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"description": "unknown id"}},
    )
    async def prediction_image(prediction_id: int) -> Response:
        """The drawing as it was sent."""
        try:
            png = await service.image_png(prediction_id)
        except PredictionNotFound as exc:
            raise HTTPException(404, f"no prediction with id {prediction_id}") from exc
        except DatabaseUnavailable as exc:
            raise database_down() from exc
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=86400, immutable"})

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        """Counts; accuracy on labelled drawings overall, per digit, per model version; confusion matrix."""
        try:
            return (await service.stats()).to_dict()
        except DatabaseUnavailable as exc:
            raise database_down() from exc

    @router.get("/export", response_class=Response, responses={200: {"content": {"application/zip": {}}}})
    async def export() -> Response:
        """The labelled drawings: a zip with labels.csv and the PNGs."""
        try:
            data = await service.export_zip()
        except DatabaseUnavailable as exc:
            raise database_down() from exc
        return Response(
            data,
            media_type="application/zip",
            headers={"Content-Disposition": 'attachment; filename="labelled-digits.zip"'},
        )

    return router
