"""The JSON API beside the page (documented at /docs).

Labels and deletion belong to whoever made the drawing: `POST /api/predictions` answers a
`label_token`, which `PUT .../label` and `DELETE` need as `X-Label-Token`; the operator
(`Authorization: Bearer <ADMIN_TOKEN>`) may change any row. Without either: 403, before any
lookup (ids are sequential: guessing one must not be enough).

Drawings are private: the list of all drawings and the export are the operator's; a drawing's
image needs the operator token or its signed URL (`image_url`, given to whoever made it and on the
operator's lists: see `ui.signing`). Statistics are aggregate and public.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at definition time,
# and the dependency `authority` is local to `build_router`.
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Self

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, BeforeValidator, Field, StrictBool, model_validator
from starlette.background import BackgroundTask
from starlette.routing import Match

from db.errors import DatabaseUnavailable, Forbidden, InvalidPrediction, PredictionNotFound
from handlers.preprocess import PreprocessError, decode_payload

from . import metrics
from .inference import InferenceUnavailable, InvalidInput
from .outbox import QueueFull
from .service import Only, PredictionService, StorageFull, check_choice, check_label

MAX_IDEMPOTENCY_KEY = 200  # characters
EXPORT_CHUNK = 1 << 20  # bytes per chunk of the streamed export
LABEL_TOKEN_HEADER = "X-Label-Token"

IMAGE_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": 'An image (PNG, JPEG, WebP) as the body, or JSON `{"data": "<base64 or data URL>"}`.',
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
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


class ErrorOut(BaseModel):
    """Every 4xx and 5xx answer but 422 (whose `detail` lists the invalid fields)."""

    detail: str = Field(description="what went wrong, in words")


class PredictionOut(BaseModel):
    id: int | None = Field(description="the stored row's id; null when the database was down (stored later)")
    stored: bool
    digit: int
    confidence: float
    probabilities: list[float]
    model_version: str
    is_digit: bool | None = Field(
        None,
        description="false: the model says the drawing is not a digit (`digit` is still its best digit); "
        "null from a model version that does not say",
    )
    label_token: str = Field(
        description=f"a secret for this drawing only: send it as `{LABEL_TOKEN_HEADER}` to label or "
        "delete it (only its hash is stored; keep it, it cannot be shown again)"
    )
    image_url: str | None = Field(
        None,
        description="the stored drawing's image (a signed link: drawings are private); null until stored",
    )


def _label_or_null(value: object) -> object:
    return None if value is None else check_label(value)


class LabelIn(BaseModel):
    """`{"label": 0-9}`, or `{"label": null, "not_a_digit": true}` for a drawing that is not a digit."""

    label: Annotated[int | None, BeforeValidator(_label_or_null)] = Field(
        description="the true digit, 0-9; null with `not_a_digit: true`"
    )
    not_a_digit: StrictBool = Field(
        False, description="true: the drawing is not a digit (never used as one for training)"
    )

    @model_validator(mode="after")
    def _one_choice(self) -> Self:
        check_choice(self.label, self.not_a_digit)  # InvalidLabel is a ValueError: a 422
        return self

    model_config = {"json_schema_extra": {"examples": [{"label": 7}, {"label": None, "not_a_digit": True}]}}


class LabelOut(BaseModel):
    id: int
    label: int | None
    not_a_digit: bool
    stored: bool = Field(description="false when the database was down: kept and stored when it is back")


class HistoryItem(BaseModel):
    id: int
    created_at: datetime
    digit: int
    confidence: float
    true_label: int | None
    not_a_digit: bool = Field(description="the person said it is not a digit (then true_label is null)")
    correct: bool | None
    model_version: str
    image_url: str


class HistoryPage(BaseModel):
    items: list[HistoryItem]
    next_before_id: int | None = Field(description="pass as before_id for the next (older) page")


UNSUPPORTED_CONTENT_TYPE = (
    "send the image with Content-Type image/png, image/jpeg, image/webp or application/octet-stream, "
    'or JSON {"data": "<base64>"} with application/json (text and form posts are refused)'
)


def image_content_type(content_type: str) -> bool:
    """Whether a prediction body's Content-Type is one we read: an image, octet-stream, or JSON.

    `text/plain`, form encodings and no type at all are what an HTML form on any other site can
    send from a visitor's browser without asking (no CORS preflight): refused, so other sites
    cannot create rows.
    """
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind.startswith("image/") or kind in ("application/octet-stream", "application/json")


def database_down() -> HTTPException:
    return HTTPException(503, "the database is unreachable; try again shortly")


def errors(**described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, each with the `ErrorOut` schema: `errors(e404="...")`."""
    return {int(code[1:]): {"model": ErrorOut, "description": text} for code, text in described.items()}


BAD_AUTHORIZATION = "`Authorization` is given but is not `Bearer <ADMIN_TOKEN>`"
NO_TOKEN_SHORT = f"needs its {LABEL_TOKEN_HEADER} (the label_token of its POST) or the operator token"
NO_TOKEN = (
    f"no `{LABEL_TOKEN_HEADER}`, or not this drawing's (checked before the id: also for an unknown id "
    "when no token is given)"
)

operator_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="operator",
    description="`Authorization: Bearer <ADMIN_TOKEN>`: the operator may label and delete any drawing, "
    "list them all, export them, and use /api/admin",
)
label_token_header = APIKeyHeader(
    name=LABEL_TOKEN_HEADER,
    auto_error=False,
    scheme_name="label token",
    description="the `label_token` that `POST /api/predictions` answered for this drawing",
)


@dataclass(frozen=True)
class Authority:
    """Who asks: the drawing's owner (with its label token), the operator, or nobody in particular."""

    token: str | None
    operator: bool


def build_router(service: PredictionService, max_body_bytes: int) -> APIRouter:
    """Routes under /api, bound to the shared service."""
    router = APIRouter(prefix="/api", tags=["predictions"])

    def authority(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(operator_bearer)],
        token: Annotated[str | None, Security(label_token_header)],
    ) -> Authority:
        """A wrong `Authorization` is refused (401) even with a label token: a typo must show."""
        if "authorization" in request.headers:
            if bearer is None or not service.is_operator(bearer.credentials):
                metrics.error("forbidden")
                raise HTTPException(
                    401, "the Authorization header is not the operator token", {"WWW-Authenticate": "Bearer"}
                )
            return Authority(token=None, operator=True)
        return Authority(token=token or None, operator=False)

    @router.post(
        "/predictions",
        status_code=201,
        response_model=PredictionOut,
        openapi_extra=IMAGE_BODY_DOC,
        responses={
            202: {
                "model": PredictionOut,
                "description": "answered; database down: kept on disk, stored when it is back",
            },
            **errors(
                e400='not an image, blank drawing, bad JSON (also `{"data": ""}`, nested too deep), '
                "Idempotency-Key too long",
                e408="the body did not arrive in time",
                e413="body or image too large (bytes or pixels)",
                e415="a format other than PNG, JPEG, WebP, or a Content-Type other than an image, "
                "application/octet-stream or application/json",
                e429="too many requests from this address: see Retry-After",
                e502="the model's answer could not be stored",
                e503="the model server is unreachable, or the database is down and the outbox full",
                e507="the storage quota is reached (STORAGE_MAX_ROWS; nothing stored)",
            ),
        },
    )
    async def create_prediction(
        request: Request,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description=f"1-{MAX_IDEMPOTENCY_KEY} characters; a retry with the same key returns "
                "the first answer (with the same label_token) and stores nothing more. Whoever knows "
                "the key gets the token: use a random key (a UUID)",
            ),
        ] = None,
    ) -> Any:
        """Predict the digit in an image and store the prediction (201), or keep it on disk (202)."""
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise HTTPException(400, f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters")
        content_type = request.headers.get("content-type", "")
        if not image_content_type(content_type):
            metrics.error("invalid_input")
            raise HTTPException(415, UNSUPPORTED_CONTENT_TYPE)
        body = await request.body()  # bounded and read with a deadline by ui/guard.py
        try:  # the model server's own rule: raw image bytes, or JSON {"data": base64 | data URL}
            image = decode_payload(body, content_type, max_body_bytes)
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
        except StorageFull as exc:
            raise HTTPException(507, str(exc)) from exc
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
            is_digit=p.is_digit,
            label_token=outcome.label_token,
            image_url=None if outcome.id is None else service.links.image_url(outcome.id),
        )
        return JSONResponse(out.model_dump(), status_code=201 if outcome.stored else 202)

    @router.put(
        "/predictions/{prediction_id}/label",
        response_model=LabelOut,
        responses={
            202: {"model": LabelOut, "description": "kept on disk; stored when the database is back"},
            **errors(
                e401=BAD_AUTHORIZATION,
                e403=NO_TOKEN,
                e404="no prediction with this id (or deleted)",
                e408="the body did not arrive in time",
                e413="body larger than a label needs (MAX_LABEL_BYTES)",
                e429="too many requests from this address: see Retry-After",
                e503="the database is down and the outbox full",
            ),
        },
    )
    async def set_label(
        prediction_id: int, body: LabelIn, who: Annotated[Authority, Depends(authority)]
    ) -> Any:
        """Give your drawing its true label (`{"label": 0-9}`) or say it is not a digit
        (`{"label": null, "not_a_digit": true}`); replaces an earlier label.

        Needs the drawing's `X-Label-Token` (or the operator's `Authorization: Bearer`). While the
        database is down the label is kept on disk (202) and its token checked when it is stored:
        a label with a wrong token is then dropped.
        """
        try:
            stored = await service.label_by_id(
                prediction_id,
                body.label,
                not_a_digit=body.not_a_digit,
                token=who.token,
                operator=who.operator,
            )
        except Forbidden as exc:
            raise HTTPException(403, f"prediction {prediction_id}: {NO_TOKEN_SHORT}") from exc
        except PredictionNotFound as exc:
            raise HTTPException(404, f"no prediction with id {prediction_id}") from exc
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from exc
        out = LabelOut(id=prediction_id, label=body.label, not_a_digit=body.not_a_digit, stored=stored)
        return JSONResponse(out.model_dump(), status_code=200 if stored else 202)

    @router.delete(
        "/predictions/{prediction_id}",
        status_code=204,
        response_class=Response,
        responses=errors(
            e401=BAD_AUTHORIZATION,
            e403=NO_TOKEN,
            e404="no prediction with this id (or deleted already)",
            e503="the database is unreachable: nothing was deleted, try again",
        ),
    )
    async def delete_prediction(
        prediction_id: int, who: Annotated[Authority, Depends(authority)]
    ) -> Response:
        """Delete your drawing and its prediction (the drawing, the row and its label: for good).

        Needs the drawing's `X-Label-Token` (or the operator's `Authorization: Bearer`). Nothing is
        queued while the database is down: 503, try again.
        """
        try:
            await service.delete(prediction_id, token=who.token, operator=who.operator)
        except Forbidden as exc:
            raise HTTPException(403, f"prediction {prediction_id}: {NO_TOKEN_SHORT}") from exc
        except PredictionNotFound as exc:
            raise HTTPException(404, f"no prediction with id {prediction_id}") from exc
        except DatabaseUnavailable as exc:
            raise database_down() from exc
        return Response(status_code=204)

    def operator_only(who: Authority, what: str) -> None:
        if not who.operator:
            metrics.error("forbidden")
            raise HTTPException(401, f"{what} are the operator's: send Authorization: Bearer <ADMIN_TOKEN>")

    @router.get(
        "/predictions",
        response_model=HistoryPage,
        responses=errors(e401="not the operator (drawings are private)", e503="the database is down"),
    )
    async def list_predictions(
        who: Annotated[Authority, Depends(authority)],
        limit: int = Query(20, ge=1, le=200),
        before_id: int | None = Query(None, ge=1),
        only: Annotated[
            Only,
            Query(
                description="wrong: labelled with another digit than predicted; unlabelled: no choice "
                "yet; not_a_digit: said not to be a digit"
            ),
        ] = "all",
    ) -> HistoryPage:
        """Stored predictions, newest first, all or only some (`only`); page with `before_id`. The
        operator's only: everyone's drawings are private (the page shows a person their own)."""
        operator_only(who, "all drawings")
        try:
            rows = await service.recent(limit, before_id, only=only)
        except DatabaseUnavailable as exc:
            raise database_down() from exc
        items = [
            HistoryItem(
                id=r.id,
                created_at=r.created_at,
                digit=r.digit,
                confidence=r.confidence,
                true_label=r.true_label,
                not_a_digit=r.not_a_digit,
                correct=r.correct,
                model_version=r.model_version,
                image_url=service.links.image_url(r.id),
            )
            for r in rows
        ]
        return HistoryPage(items=items, next_before_id=rows[-1].id if len(rows) == limit else None)

    @router.get(
        "/predictions/{prediction_id}/image.png",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}},
            **errors(
                e401="neither a signed link nor the operator token",
                e403="the link's signature is not this drawing's",
                e404="unknown id (or deleted)",
                e503="the database is down",
            ),
        },
    )
    async def prediction_image(
        prediction_id: int,
        who: Annotated[Authority, Depends(authority)],
        sig: Annotated[str | None, Query(description="the signature of the drawing's `image_url`")] = None,
    ) -> Response:
        """The drawing as it was sent: with the signed `image_url` (its maker has it) or as the operator."""
        if not who.operator:
            if sig is None:
                raise HTTPException(
                    401, "drawings are private: use the drawing's image_url or the operator token"
                )
            if not service.links.image_allowed(prediction_id, sig):
                raise HTTPException(403, "this link is not signed for this drawing")
        try:
            png = await service.image_png(prediction_id)
        except PredictionNotFound as exc:
            raise HTTPException(404, f"no prediction with id {prediction_id}") from exc
        except DatabaseUnavailable as exc:
            raise database_down() from exc
        return Response(
            png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400, immutable"}
        )

    @router.get("/stats", responses=errors(e503="the database is down"))
    async def stats() -> dict[str, Any]:
        """Counts; accuracy on labelled drawings overall, per digit, per model version; confusion matrix.

        `not_a_digit` counts the drawings said not to be a digit: in `total`, never in `labelled`,
        the accuracy or the confusion matrix.
        """
        try:
            return (await service.stats()).to_dict()
        except DatabaseUnavailable as exc:
            raise database_down() from exc

    @router.get(
        "/export",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"application/zip": {}}},
            **errors(e401="not the operator, and no valid signed link", e503="the database is down"),
        },
    )
    async def export(
        who: Annotated[Authority, Depends(authority)],
        expires: Annotated[int | None, Query(description="a signed export link's expiry (Unix time)")] = None,
        sig: Annotated[str | None, Query(description="a signed export link's signature")] = None,
    ) -> StreamingResponse:
        """The drawings labelled with a digit: a zip with labels.csv, the PNGs and MNIST-style IDX files
        (drawings said not to be a digit are left out). The operator's only (the token, or a link the
        operator page signs for a few minutes). Built in a scratch file on disk, then streamed: the
        memory it takes is the same for 10 or a million rows."""
        if not who.operator and not service.links.export_allowed(expires, sig):
            operator_only(who, "the export and the drawings in it")
        scratch = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the response's background task)
        try:
            await service.export_to(scratch)
        except DatabaseUnavailable as exc:
            scratch.close()
            raise database_down() from exc
        except BaseException:
            scratch.close()
            raise
        size = scratch.tell()
        scratch.seek(0)
        return StreamingResponse(
            iter(lambda: scratch.read(EXPORT_CHUNK), b""),  # a sync iterator: read in a thread
            media_type="application/zip",
            headers={
                "Content-Disposition": 'attachment; filename="labelled-digits.zip"',
                "Content-Length": str(size),
                "Cache-Control": "no-store",
            },
            background=BackgroundTask(scratch.close),
        )

    return router


def _finite(value: Any) -> Any:
    """A validation error's echoed input, JSON-safe (`NaN`, `1e400` are not JSON numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, with its inputs made JSON-safe: `{"label": NaN}` was a 500 (unserialisable echo)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)


def add_error_handlers(app: FastAPI) -> None:
    """JSON for every error under /api: validation (422) and unknown routes and methods (404, 405).

    Registered after the routes: the catch-all below answers only what no API route matched
    (the page's app, mounted at `/`, would answer an HTML 404 otherwise).
    """
    app.add_exception_handler(RequestValidationError, invalid_request)

    @app.api_route("/api/{rest:path}", methods=[*ALL_METHODS], include_in_schema=False)
    async def unknown_route(request: Request, rest: str) -> JSONResponse:
        routes = app.router.routes
        earlier = routes[
            : next(i for i, r in enumerate(routes) if getattr(r, "endpoint", None) is unknown_route)
        ]
        allowed = [
            method
            for method in ALL_METHODS
            if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in earlier)
        ]
        if allowed:
            return JSONResponse(
                {"detail": f"method {request.method} not allowed on {request.url.path}"},
                status_code=405,
                headers={"Allow": ", ".join(allowed)},
            )
        return JSONResponse({"detail": f"no such route: {request.url.path}"}, status_code=404)


ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
