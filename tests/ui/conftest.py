"""Fixtures for the UI tests: the app on fakes, driven through NiceGUI's simulated user."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from nicegui import core, ui
from nicegui.functions.download import download
from nicegui.functions.navigate import Navigate
from nicegui.functions.notify import notify
from nicegui.testing.general import nicegui_reset_globals, prepare_simulation
from nicegui.testing.user import User

from db.store import Store
from settings import Settings
from tests.ui.fakes import FakeModel, FakeStore
from ui.app import UI_OPTIONS, create_app
from ui.inference import InferenceClient
from ui.service import PredictionService


@dataclass
class Simulated:
    """A simulated browser user on the app, and the fakes behind it."""

    user: User
    client: httpx.AsyncClient  # plain HTTP to the same app (the JSON API)
    service: PredictionService
    store: Any  # FakeStore or a real db.store.Store
    model: FakeModel


@contextmanager
def simulated_nicegui() -> Iterator[None]:
    """NiceGUI's globals reset for a simulated app, and everything a simulation changes put back."""
    with nicegui_reset_globals():
        os.environ["NICEGUI_USER_SIMULATION"] = "true"
        # FastAPI nests the app's lifespan in every included router's: NiceGUI's app outlives the
        # test, so without this each test would nest its routers one level deeper (a RecursionError
        # after a few hundred tests).
        lifespan = core.app.router.lifespan_context
        try:
            prepare_simulation()
            yield
        finally:
            core.app.router.lifespan_context = lifespan
            os.environ.pop("NICEGUI_USER_SIMULATION", None)
            ui.navigate = Navigate()
            ui.notify = notify
            ui.download = download


@asynccontextmanager
async def simulate(store: Any, model: FakeModel, run_dir: Path) -> AsyncIterator[Simulated]:
    """Like nicegui.testing's `user` fixture, with the app built by `create_app` on `store` and `model`.

    The outbox lives in `run_dir / "data" / "outbox"`; the simulation waits until the service has
    started (its outbox open), as the server does before its first request.
    """
    transport = model.transport()
    inference = InferenceClient("http://model.test", management_url="http://model.test", transport=transport)
    try:
        with simulated_nicegui():
            settings = Settings(run_dir=run_dir, data_dir=run_dir / "data")
            service = create_app(settings, store=store, inference=inference)
            service.retry_interval_s = 0.05
            ui.run(storage_secret="simulated secret", **UI_OPTIONS)
            async with core.app.router.lifespan_context(core.app):
                await wait_started(service)
                app_transport = httpx.ASGITransport(core.app)
                async with (
                    httpx.AsyncClient(transport=app_transport, base_url="http://test") as user_client,
                    httpx.AsyncClient(transport=app_transport, base_url="http://test") as api_client,
                ):
                    yield Simulated(User(user_client), api_client, service, store, model)
    finally:
        await inference.close()


async def wait_started(service: PredictionService, timeout: float = 10.0) -> None:
    """NiceGUI runs startup handlers as tasks: wait for the service's."""
    for _ in range(int(timeout / 0.01)):
        if service.started:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the service did not start")


def assert_no_error_logs(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.get_records("call") if r.levelname == "ERROR"]
    assert not errors, f"unexpected ERROR logs: {[r.getMessage() for r in errors]}"


@pytest.fixture
async def sim(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> AsyncIterator[Simulated]:
    """The app on an in-memory store and a fake model server."""
    async with simulate(FakeStore(), FakeModel(), tmp_path) as simulated:
        yield simulated
    assert_no_error_logs(caplog)


@pytest.fixture
async def sim_db(store: Store, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> AsyncIterator[Simulated]:
    """The app on a real PostgreSQL (a fresh migrated database) and a fake model server."""
    async with simulate(store, FakeModel(), tmp_path) as simulated:
        yield simulated
    assert_no_error_logs(caplog)
