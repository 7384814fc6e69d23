"""Operations endpoints: liveness, readiness (model and database), Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from db.store import StoreError

from .service import PredictionService


def build_router(service: PredictionService) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"description": "the model or the database is not ready"}})
    async def readyz() -> JSONResponse:
        """Ready when the model server answers healthy and the database is reachable."""
        (model_ok, model_detail), (db_ok, db_detail) = await asyncio.gather(
            service.inference.ready(), database_ready(service)
        )
        body = {
            "ready": model_ok and db_ok,
            "model": {"ready": model_ok, "detail": model_detail, "url": service.inference.inference_url},
            "database": {"ready": db_ok, "detail": db_detail},
            "waiting_to_store": service.waiting,
        }
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @router.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


async def database_ready(service: PredictionService) -> tuple[bool, str]:
    """`Store.ping` within 2 s (it returns False rather than raising when the server is down)."""
    try:
        reachable = await asyncio.wait_for(service.db.ping(), timeout=2.0)
    except (StoreError, TimeoutError) as exc:
        return False, f"unreachable: {exc or type(exc).__name__}"
    return (True, "reachable") if reachable else (False, "unreachable")
