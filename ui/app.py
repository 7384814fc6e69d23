"""Wiring: the page, the JSON API and the operations endpoints on one app; `serve` runs it.

`serve` only serves (what the UI image and a Kubernetes pod run): the database must exist and be
migrated (`python -m db migrate`), the model server is found at `INFERENCE_URL`. The development
stack that starts them is `stack.py` (`make run`).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from nicegui import app, ui

from db.store import Store
from settings import Settings

from . import api, ops
from .frame import APP_TITLE
from .inference import InferenceClient
from .outbox import Outbox
from .page import DigitPage
from .service import PredictionService, PredictionStore

TITLE = APP_TITLE
SUMMARY = "Draw a digit, get the model's answer, correct it."
# `ui.run` options shared by the server and the tests' simulated user.
UI_OPTIONS: dict[str, Any] = {
    "title": TITLE,
    "fastapi_docs": {"title": TITLE, "summary": SUMMARY},
    "show_welcome_message": False,
}


def create_app(
    settings: Settings,
    *,
    store: PredictionStore | None = None,
    inference: InferenceClient | None = None,
    database_url: str | None = None,
    api_app: FastAPI | None = None,
) -> PredictionService:
    """Register everything on NiceGUI's global app; call before `ui.run` (or a NiceGUI user simulation).

    A `store` or `inference` passed in is used as it is and left open; when omitted, it is made
    from the settings at startup (`database_url` overrides `settings.database_url`) and closed at
    shutdown. The outbox lives in `settings.data_dir / "outbox"`. The JSON API and operations
    routes go on `api_app` when given (the server: see `serve`), and the service starts in its
    lifespan, before the first request; else they go on NiceGUI's own app. Returns the service.
    """
    url = database_url or settings.database_url
    if store is None and url is None:
        raise RuntimeError("no database: set DATABASE_URL")
    inference_owned = inference is None
    if inference is None:
        inference = InferenceClient(
            settings.inference_url, settings.model_name, settings.management_url, settings.inference_timeout_s
        )
    outbox = Outbox(settings.data_dir / "outbox", settings.outbox_max_bytes)
    service = PredictionService(store, inference, outbox=outbox, max_image_bytes=settings.max_upload_bytes)
    opened: list[Store] = []

    async def startup() -> None:
        if service.store is None:
            assert url is not None  # checked above
            opened.append(await Store.open(url, max_size=settings.db_pool_max))
            service.store = opened[0]
        await service.start()

    async def shutdown() -> None:
        await service.stop()
        for s in opened:
            await s.close()
        if inference_owned:
            await service.inference.close()

    if api_app is not None:
        _run_in_lifespan(api_app, startup, shutdown)
        routes: FastAPI = api_app
    else:  # NiceGUI runs it as a task: requests may come first (the service waits for its outbox)
        app.on_startup(startup)
        app.on_shutdown(shutdown)
        routes = app
    routes.include_router(api.build_router(service, settings.max_upload_bytes))
    routes.include_router(ops.build_router(service))

    @ui.page("/", title=TITLE)
    async def index() -> None:
        await DigitPage(service).build()

    return service


def _run_in_lifespan(
    api_app: FastAPI, startup: Callable[[], Awaitable[None]], shutdown: Callable[[], Awaitable[None]]
) -> None:
    """Run `startup` before the server accepts requests, `shutdown` after the last."""
    inner = api_app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        await startup()
        try:
            async with inner(application) as state:
                yield state
        finally:
            await shutdown()

    api_app.router.lifespan_context = lifespan


def api_application() -> FastAPI:
    """The server's FastAPI app: the API and operations routes, NiceGUI mounted beside them.

    Requests to /api, /healthz, /readyz and /metrics skip NiceGUI's middlewares (about half the
    overhead of a request here); the page and its websocket go to NiceGUI.
    """
    return FastAPI(title=TITLE, summary=SUMMARY, version="1.0")


class _Server(uvicorn.Server):
    """uvicorn, telling the caller once it listens, and returning (not re-raising) on SIGINT/SIGTERM."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its graceful shutdown, which would kill the process
        # with it: `serve` returns instead, so that its caller (`python -m ui`, stack.py) decides.
        self._captured_signals.clear()


def serve(
    settings: Settings, database_url: str | None = None, on_started: Callable[[], None] | None = None
) -> None:
    """Serve the page and the API on `UI_HOST:UI_PORT` until SIGINT/SIGTERM (blocks).

    Does not migrate and starts nothing else. `on_started` is called once it listens.
    `RuntimeError` when it cannot start (no database URL, port taken, outbox unreadable).
    """
    url = database_url or settings.database_url
    if not url:
        raise RuntimeError("DATABASE_URL is not set: the app serves an existing, migrated database")
    api_app = api_application()
    create_app(settings, database_url=url, api_app=api_app)
    ui.run_with(
        api_app,
        title=TITLE,
        storage_secret=settings.storage_secret or secrets.token_urlsafe(32),
        show_welcome_message=False,
    )
    config = uvicorn.Config(
        api_app, host=settings.ui_host, port=settings.ui_port, log_level="warning", ws="wsproto"
    )
    server = _Server(config, on_started)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise RuntimeError(f"could not serve on {settings.ui_host}:{settings.ui_port}") from exc
    if not server.started:
        raise RuntimeError("the app could not start; see the messages above")
