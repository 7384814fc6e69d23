"""Wiring: the page, the JSON API and the operations endpoints on one app; `serve` runs it.

`serve` only serves (what the UI image and a Kubernetes pod run): the database must exist and be
migrated (`python -m db migrate`), the model server is found at `INFERENCE_URL`. The development
stack that starts them is `stack.py` (`make run`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from nicegui import app, ui
from nicegui.storage import Storage

from db.notify import ChangeListener, replica_name
from db.store import Store
from settings import Settings

from . import api, ops
from .admin import AdminSite
from .admin_api import build_admin_router
from .admin_login import LoginLimit
from .docs import add_docs
from .frame import APP_TITLE
from .guard import BodyGuard
from .headers import HeaderPolicy, SecurityHeaders
from .inference import InferenceClient
from .learning import NO_DATABASE, Learning, LearningSlot, UnavailableLearning, open_learning
from .outbox import Outbox
from .page import DigitPage
from .protocol import with_head_timeout
from .ratelimit import Limits, RateLimit
from .service import PredictionService, PredictionStore, Quota

TITLE = APP_TITLE
SUMMARY = "Draw a digit, get the model's answer, correct it."
# The page keeps nothing in NiceGUI's per-tab storage, yet NiceGUI makes one for every tab that
# connects and keeps it 30 days by default: a closed tab's is dropped after this instead.
TAB_STORAGE_AGE_S = 600.0
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
    learning: Learning | None = None,
) -> PredictionService:
    """Register everything on NiceGUI's global app; call before `ui.run` (or a NiceGUI user simulation).

    A `store` or `inference` passed in is used as it is and left open; when omitted, it is made
    from the settings at startup (`database_url` overrides `settings.database_url`) and closed at
    shutdown; with it, a `db.notify.ChangeListener` on that database tells the service of rows
    other replicas wrote (`notify_external_change`), started and stopped with it. The outbox
    lives in `settings.data_dir / "outbox"`. The JSON API and operations routes go on `api_app`
    when given (the server: see `serve`), and the service starts in its lifespan, before the
    first request; else they go on NiceGUI's own app. The learning loop (the operator's `/admin`
    page and `/api/admin`) is `learning` when given, else opened on the database at startup (none:
    unavailable, the admin API answers 503). Returns the service.
    """
    url = database_url or settings.database_url
    if store is None and url is None:
        raise RuntimeError("no database: set DATABASE_URL")
    inference_owned = inference is None
    if inference is None:
        inference = InferenceClient.from_settings(settings)  # with TorchServe's key file
    outbox = Outbox(settings.data_dir / "outbox", settings.outbox_max_bytes)
    service = PredictionService(
        store,
        inference,
        outbox=outbox,
        max_image_bytes=settings.max_upload_bytes,
        admin_token=settings.admin_token,
        link_secret=settings.storage_secret,
        quota=Quota(settings.storage_max_rows, settings.storage_prune),
    )
    # The application_name this replica's notifications carry: its own writes are not news to it
    # (the service already told its listeners).
    own_name = replica_name()
    opened: list[Store] = []
    listeners: list[ChangeListener] = []
    if learning is not None:
        loop = LearningSlot(learning)
    elif url is not None:
        loop = LearningSlot(UnavailableLearning("starting"), opener=lambda: open_learning(settings, url))
    else:
        loop = LearningSlot(UnavailableLearning(NO_DATABASE))

    async def startup() -> None:
        if service.store is None:
            assert url is not None  # checked above
            opened.append(await Store.open(url, max_size=settings.db_pool_max, application_name=own_name))
            service.store = opened[0]
            # Rows written by other replicas: the feed and the read cache learn of them at once.
            listeners.append(ChangeListener(url, service.notify_external_change, ignore_payload=own_name))
        await service.start()
        for listener in listeners:
            await listener.start()
        await loop.get()  # the learning loop opened before the first request (tried again when it failed)

    async def shutdown() -> None:
        await loop.close()
        for listener in listeners:
            await listener.stop()
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
    add_docs(routes, TITLE)
    routes.include_router(api.build_router(service, settings.max_upload_bytes))
    routes.include_router(
        ops.build_router(
            service, trusted_proxies=settings.trusted_proxies, internal_networks=settings.internal_networks
        )
    )
    routes.include_router(build_admin_router(service, loop))
    api.add_error_handlers(routes)
    add_guards(routes, settings)

    @ui.page("/", title=TITLE)
    async def index() -> None:
        await DigitPage(service).build()

    login_limit = LoginLimit(settings.rate_limit_login, settings.trusted_proxies)
    operator_site = AdminSite(service, loop, login_limit)

    @ui.page("/admin", title=f"{TITLE} - operator")
    async def admin() -> None:
        await operator_site.build()

    return service


def add_guards(target: FastAPI, settings: Settings) -> None:
    """The middlewares every request passes, outermost first: security headers (also on the
    refusals below), rate limits (before any body is read), bounded bodies."""
    target.add_middleware(
        BodyGuard,
        max_bytes=settings.max_upload_bytes,
        label_max_bytes=settings.max_label_bytes,
        timeout_s=settings.body_timeout_s,
    )
    limits = Limits.from_strings(
        predictions=settings.rate_limit_predictions,
        labels=settings.rate_limit_labels,
        loopback=settings.rate_limit_loopback,
        trusted_proxies=settings.trusted_proxies,
    )
    target.add_middleware(RateLimit, limits=limits)
    policy = HeaderPolicy(https=settings.https, secure_cookies=settings.https or settings.cookie_secure)
    target.add_middleware(SecurityHeaders, policy=policy)


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
    return FastAPI(title=TITLE, summary=SUMMARY, version="1.0", docs_url=None, redoc_url=None)  # ui/docs.py


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
    # Browser sessions (a person's own drawings, their choices) under the data folder, not in
    # whatever folder the server was started from; NICEGUI_STORAGE_PATH still wins when set.
    if "NICEGUI_STORAGE_PATH" not in os.environ:
        Storage.path = (settings.data_dir / "nicegui").resolve()
    app.storage.max_tab_storage_age = TAB_STORAGE_AGE_S
    ui.run_with(
        api_app,
        title=TITLE,
        storage_secret=settings.storage_secret or secrets.token_urlsafe(32),
        session_middleware_kwargs={
            "https_only": settings.https or settings.cookie_secure,
            "same_site": "lax",
        },
        show_welcome_message=False,
    )
    config = uvicorn.Config(
        api_app,
        host=settings.ui_host,
        port=settings.ui_port,
        log_level="warning",
        ws="wsproto",
        # Bounds (docs/security.md): idle keep-alive connections closed, at most this many
        # connections and tasks at once (then 503), request heads of at most 64 KB (h11).
        timeout_keep_alive=settings.keep_alive_timeout_s,
        http=with_head_timeout(settings.head_timeout_s),
        limit_concurrency=settings.max_concurrency,
        h11_max_incomplete_event_size=64 * 1024,
    )
    server = _Server(config, on_started)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise RuntimeError(f"could not serve on {settings.ui_host}:{settings.ui_port}") from exc
    if not server.started:
        raise RuntimeError("the app could not start; see the messages above")
