"""Wiring: the page, the JSON API and the operations endpoints on NiceGUI's FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import uvicorn
from fastapi import FastAPI
from nicegui import app, ui

from db.store import Store
from settings import Settings

from . import api, ops, spill
from .inference import InferenceClient
from .page import DigitPage
from .service import PredictionService

log = logging.getLogger(__name__)

TITLE = "Digit classifier"
# `ui.run` options shared by the server and the tests' simulated user.
UI_OPTIONS = {
    "title": TITLE,
    "fastapi_docs": {"title": TITLE, "summary": "Draw a digit, get the model's answer, correct it."},
    "show_welcome_message": False,
}


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    inference: InferenceClient | None = None,
    database_url: str | None = None,
    api_app: FastAPI | None = None,
) -> PredictionService:
    """Register everything on NiceGUI's global app; call before `ui.run` (or a NiceGUI user simulation).

    A `store` or `inference` passed in is used as it is and left open; when omitted, it is made
    from the settings at startup (`database_url` overrides `settings.database_url`) and closed at
    shutdown. The JSON API and operations routes go on `api_app` when given (the server: see
    `api_application` and `run`), else on NiceGUI's own app. Returns the shared service.
    """
    inference_owned = inference is None
    if inference is None:
        inference = InferenceClient(
            settings.inference_url, settings.model_name, settings.management_url, settings.inference_timeout_s
        )
    service = PredictionService(store, inference, max_image_bytes=settings.max_upload_bytes)
    tasks: list[asyncio.Task[None]] = []
    spill_file = settings.run_dir / "unsaved.jsonl"

    async def startup() -> None:  # NiceGUI runs it as a task: requests may come first (see `service.db`)
        outcomes, labels = spill.load(spill_file)
        if outcomes or labels:
            for outcome in outcomes:
                service.pending[outcome.key] = outcome
            service.pending_labels.update(labels)
            spill_file.unlink()
            log.warning("%d unsaved predictions/labels from the last run will be stored", service.waiting)
        if service.store is None:
            url = database_url or settings.database_url
            if url is None:
                raise RuntimeError("no database: set DATABASE_URL or start the app with `python -m ui`")
            service.store = await Store.open(url, max_size=settings.db_pool_max)
        tasks.append(asyncio.create_task(service.retry_forever(), name="store-retry"))

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await service.flush()  # a last try to store what waits
        if service.waiting:
            count = spill.save(spill_file, list(service.pending.values()), service.pending_labels)
            log.warning(
                "database unreachable: %d unsaved records kept in %s for the next start", count, spill_file
            )
        if store is None and service.store is not None:
            await service.store.close()
        if inference_owned:
            await service.inference.close()

    app.on_startup(startup)
    app.on_shutdown(shutdown)
    routes = api_app if api_app is not None else app
    routes.include_router(api.build_router(service, settings.max_upload_bytes))
    routes.include_router(ops.build_router(service))

    @ui.page("/", title=TITLE)
    async def index() -> None:
        await DigitPage(service).build()

    return service


def api_application() -> FastAPI:
    """The server's FastAPI app: the API and operations routes, NiceGUI mounted beside them.

    Requests to /api, /healthz, /readyz and /metrics skip NiceGUI's middlewares (about half the
    overhead of a request here); the page and its websocket go to NiceGUI.
    """
    return FastAPI(title=TITLE, summary=UI_OPTIONS["fastapi_docs"]["summary"], version="1.0")  # type: ignore[index]


def run(settings: Settings, api_app: FastAPI) -> None:
    """Serve `api_app` with the page mounted on it until SIGINT/SIGTERM (blocks)."""
    ui.run_with(
        api_app,
        title=TITLE,
        storage_secret=settings.storage_secret or secrets.token_urlsafe(32),
        show_welcome_message=False,
    )
    uvicorn.run(api_app, host=settings.ui_host, port=settings.ui_port, log_level="warning", ws="wsproto")
