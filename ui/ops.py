"""Operations endpoints: liveness, readiness (model, database, connection pool), Prometheus metrics."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics as ui_metrics
from .ratelimit import INTERNAL_NETWORKS, is_internal, parse_networks
from .service import PredictionService, Readiness


def readiness_body(r: Readiness) -> dict[str, Any]:
    """The JSON of `/readyz`: overall, then each part with its reason."""
    return {
        "ready": r.ready,
        "model": {**asdict(r.model), "url": r.model_url},
        "database": asdict(r.database),
        "pool": asdict(r.pool),
        "waiting_to_store": r.waiting,
    }


def build_router(
    service: PredictionService, *, trusted_proxies: str = "", internal_networks: str = INTERNAL_NETWORKS
) -> APIRouter:
    """`/healthz`, `/readyz`, `/metrics`; who counts as internal: `ui.ratelimit.is_internal`."""
    router = APIRouter(tags=["operations"])
    proxies, internal = parse_networks(trusted_proxies), parse_networks(internal_networks)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @router.get(
        "/readyz",
        responses={503: {"description": "the model, the database or its connection pool is not ready"}},
    )
    async def readyz() -> JSONResponse:
        """Ready when the model has a READY worker, the database answers, and the pool is not exhausted.

        The pool counts as exhausted when callers have found no free connection for more than a
        few seconds: a supervisor (Compose, Kubernetes) restarting the app is the remedy.
        """
        readiness = await service.readiness()
        ui_metrics.checked(
            model=readiness.model.ready, database=readiness.database.ready, pool=readiness.pool.ready
        )
        return JSONResponse(readiness_body(readiness), status_code=200 if readiness.ready else 503)

    @router.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus text format: counters and gauges kept in memory, no database query. For the
        internal network (Prometheus) and the operator (`Authorization: Bearer <ADMIN_TOKEN>`) only."""
        peer = request.client.host if request.client else None
        if not is_internal(peer, request.headers.get("x-forwarded-for"), proxies, internal) and not operator(
            request
        ):
            return JSONResponse(
                {"detail": "metrics are for the internal network or the operator (Authorization: Bearer)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def operator(request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and service.is_operator(token.strip())

    return router
