"""The JSON API beside the page (documented at /docs)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictInt

from db.store import DatabaseUnavailable, PredictionNotFound

from .inference import InferenceUnavailable, InvalidInput
from .service import PredictionService

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
    label: StrictInt = Field(ge=0, le=9, description="the true digit, 0-9")


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


def image_from_body(body: bytes, content_type: str) -> bytes:
    """The image bytes of a request: raw body, or JSON `{"data": base64 | data URL}`; `ValueError` if bad."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        return body
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError("the body is not valid JSON") from exc
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, str) or not data:
        raise ValueError('JSON body must be {"data": "<base64 image>"}')
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("data is not valid base64") from exc


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
            202: {"description": "answered; not stored yet (database down), stored when it is back"},
            400: {"description": "not an image, blank drawing, bad JSON"},
            413: {"description": "image too large"},
            503: {"description": "the model server is unreachable"},
        },
    )
    async def create_prediction(request: Request) -> Any:
        """Predict the digit in an image and store the prediction."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes * 2:
            raise HTTPException(413, f"body too large: images of at most {max_body_bytes:,} bytes")
        body = await request.body()
        try:
            image = image_from_body(body, request.headers.get("content-type", ""))
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        try:
            outcome = await service.predict(image)
        except InvalidInput as exc:
            raise HTTPException(exc.status_code if exc.status_code != 422 else 400, str(exc)) from exc
        except InferenceUnavailable as exc:
            raise HTTPException(503, str(exc)) from exc
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
            202: {"description": "kept; stored when the database is back"},
            404: {"description": "no prediction with this id"},
        },
    )
    async def set_label(prediction_id: int, body: LabelIn) -> Any:
        """Give a stored prediction its true label."""
        try:
            stored = await service.label_by_id(prediction_id, body.label)
        except PredictionNotFound as exc:
            raise HTTPException(404, f"no prediction with id {prediction_id}") from exc
        out = LabelOut(id=prediction_id, label=body.label, stored=stored)
        return JSONResponse(out.model_dump(), status_code=200 if stored else 202)

    @router.get("/predictions", response_model=HistoryPage)
    async def list_predictions(
        limit: int = Query(20, ge=1, le=200), before_id: int | None = Query(None, ge=1)
    ) -> HistoryPage:
        """Stored predictions, newest first; page with `before_id`."""
        try:
            rows = await service.db.recent(limit, before_id)
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
            png = await service.db.image_png(prediction_id)
        except PredictionNotFound as exc:
            raise HTTPException(404, f"no prediction with id {prediction_id}") from exc
        except DatabaseUnavailable as exc:
            raise database_down() from exc
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=86400, immutable"})

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        """Counts; accuracy on labelled drawings overall, per digit, per model version; confusion matrix."""
        try:
            return (await service.db.stats()).to_dict()
        except DatabaseUnavailable as exc:
            raise database_down() from exc

    @router.get("/export", response_class=Response, responses={200: {"content": {"application/zip": {}}}})
    async def export() -> Response:
        """The labelled drawings: a zip with labels.csv and the PNGs."""
        try:
            data = await service.db.export_labelled()
        except DatabaseUnavailable as exc:
            raise database_down() from exc
        return Response(
            data,
            media_type="application/zip",
            headers={"Content-Disposition": 'attachment; filename="labelled-digits.zip"'},
        )

    return router
