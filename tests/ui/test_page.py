"""Page logic through NiceGUI's simulated user, on in-memory fakes of the model server and database."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import pytest
from nicegui import Client, ui
from nicegui.nicegui import _on_handshake
from nicegui.testing.user import User

from db.records import PredictionRow
from db.stats import Stats
from tests.ui.conftest import Simulated, assert_no_error_logs, simulate
from tests.ui.fakes import FakeModel, FakeStore, digit_png
from ui.canvas import DigitCanvas
from ui.feed import Feed, feed_for
from ui.history import PAGE_SIZE
from ui.page import DB_DOWN, MODEL_DOWN
from ui.views import png_data_url


async def draw(sim: Simulated, png: bytes | None) -> DigitCanvas:
    """Play the browser's `change` event of the canvas."""
    canvas = next(iter(sim.user.find(DigitCanvas).elements))
    await canvas.receive(png_data_url(png) if png else None, 1 if png else 0)
    return canvas


async def eventually(check, timeout: float = 3.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    assert check()


async def test_predict_label_and_history(sim: Simulated) -> None:
    await sim.user.open("/")
    await sim.user.should_see("Draw a digit and press Predict.")
    await draw(sim, digit_png("zero"))
    sim.user.find(marker="predict").click()
    await sim.user.should_see("saved as #1")
    await sim.user.should_see(marker="digit", content="0")
    await sim.user.should_see("91.0 % sure")
    assert sim.store.rows[1][0].digit == 0
    sim.user.find(marker="label-6").click()
    sim.user.find(marker="submit").click()
    await sim.user.should_see("Saved: it was a 6 (the model was wrong).")
    assert sim.store.rows[1][1] == 6
    await sim.user.should_see("true 6")
    await sim.user.should_see("predicted 0")


async def test_empty_canvas_sends_nothing(sim: Simulated) -> None:
    await sim.user.open("/")
    sim.user.find(marker="predict").click()
    await sim.user.should_see("Draw a digit first.")
    assert sim.model.calls == 0


async def test_live_preview_is_not_stored(sim: Simulated) -> None:
    await sim.user.open("/")
    await draw(sim, digit_png("one"))
    await sim.user.should_see("live preview: press Predict to keep it")
    await sim.user.should_see(marker="digit", content="1")
    assert sim.store.rows == {}


async def test_model_down_shows_banner_and_keeps_drawing(sim: Simulated) -> None:
    await sim.user.open("/")
    sim.model.down = True
    canvas = await draw(sim, digit_png("one"))  # the live preview fails: 3 attempts
    sim.user.find(marker="predict").click()
    await eventually(lambda: sim.model.calls == 6)  # Predict tried 3 times too
    await sim.user.should_see(MODEL_DOWN)
    assert canvas.png is not None and sim.store.rows == {}
    sim.model.down = False
    sim.user.find(marker="predict").click()
    await sim.user.should_see("saved as #1", retries=20)
    await sim.user.should_not_see(MODEL_DOWN)


async def test_database_down_then_saved_with_label(sim: Simulated) -> None:
    await sim.user.open("/")
    sim.store.down = True
    await draw(sim, digit_png("one"))
    sim.user.find(marker="predict").click()
    await sim.user.should_see(DB_DOWN)
    await sim.user.should_see("not saved yet")
    await sim.user.should_see(marker="digit", content="1")
    sim.user.find(marker="label-7").click()
    sim.user.find(marker="submit").click()
    await sim.user.should_see("Label 7 kept; it is saved when the database is back.")
    sim.store.down = False
    await eventually(lambda: 1 in sim.store.rows and sim.store.rows[1][1] == 7)
    await sim.user.should_see("saved as #1, true label 7", retries=30)
    await sim.user.should_not_see(DB_DOWN)


def press(sim: Simulated, key: str, code: str) -> None:
    """A keydown as the browser's ui.keyboard sends it."""
    args = {
        "action": "keydown",
        "repeat": False,
        "key": key,
        "code": code,
        "location": 0,
        "altKey": False,
        "ctrlKey": False,
        "metaKey": False,
        "shiftKey": False,
    }
    sim.user.find(kind=ui.keyboard).trigger("key", args)


async def test_keyboard_label_enter_and_escape(sim: Simulated) -> None:
    await sim.user.open("/")
    canvas = await draw(sim, digit_png("one"))
    press(sim, "Enter", "Enter")  # predicts
    await sim.user.should_see("saved as #1", retries=20)
    press(sim, "4", "Digit4")
    press(sim, "Enter", "Enter")  # submits
    await eventually(lambda: sim.store.rows[1][1] == 4)
    press(sim, "Escape", "Escape")
    await eventually(lambda: canvas.png is None)
    await sim.user.should_see("Draw a digit and press Predict.")


async def test_statistics_per_model_version_and_download(sim: Simulated) -> None:
    for version, kind, label in (("1.0", "one", 1), ("1.0", "zero", 8), ("2.0", "one", 1)):
        sim.model.version = version
        outcome = await sim.service.predict(digit_png(kind))
        await sim.service.label(outcome, label)
    await sim.user.open("/")
    await sim.user.should_see(marker="stat-predictions", content="3")
    await sim.user.should_see(marker="stat-accuracy", content="66.7 %")
    sim.user.find(kind=ui.select).click()
    sim.user.find("model version 2.0").click()
    await sim.user.should_see(marker="stat-predictions", content="1")
    await sim.user.should_see(marker="stat-accuracy", content="100.0 %")
    sim.user.find("Download labelled drawings").click()
    response = await sim.user.download.next()
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"


async def test_history_pages(sim: Simulated) -> None:
    for _ in range(12):
        await sim.service.predict(digit_png("one"))
    await sim.service.predict(digit_png("zero"))
    await sim.user.open("/")
    await sim.user.should_see("predicted 0")
    assert len(sim.user.find(marker="history-row").elements) == 10
    sim.user.find("Older").click()
    await sim.user.should_not_see("predicted 0")
    assert len(sim.user.find(marker="history-row").elements) == 3
    sim.user.find("Newer").click()
    await sim.user.should_see("predicted 0")


async def test_malformed_drawing_from_the_browser_is_ignored(sim: Simulated, caplog) -> None:
    from nicegui.events import GenericEventArguments

    await sim.user.open("/")
    canvas = await draw(sim, digit_png("one"))
    args = {"png": "data:image/png;base64,@@", "strokes": 1}
    await canvas._handle_change(GenericEventArguments(sender=canvas, client=canvas.client, args=args))
    assert canvas.png == digit_png("one")
    assert "malformed drawing" in caplog.text


async def test_unsure_answer_gets_a_hint(sim: Simulated) -> None:
    sim.model.unsure = True
    await sim.user.open("/")
    await draw(sim, digit_png("one"))
    sim.user.find(marker="predict").click()
    await sim.user.should_see("55.0 % sure")
    await sim.user.should_see("Not sure: it could also be a 7 (40.0 %).")


# ---------------------------------------------------------------- several tabs: history and statistics pushed


@dataclass(eq=False)
class CountingStore(FakeStore):
    """The fake store, counting the reads that history and statistics cost."""

    reads: Counter[str] = field(default_factory=Counter)

    async def recent(self, limit: int = 20, before_id: int | None = None) -> list[PredictionRow]:
        self.reads["recent"] += 1
        return await super().recent(limit, before_id)

    async def stats(self) -> Stats:
        self.reads["stats"] += 1
        return await super().stats()


@pytest.fixture
async def counted(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> AsyncIterator[Simulated]:
    """The app on a counting in-memory store."""
    async with simulate(CountingStore(), FakeModel(), tmp_path) as simulated:
        yield simulated
    assert_no_error_logs(caplog)


async def open_tab(sim: Simulated) -> User:
    """One more browser tab on the same app."""
    tab = User(sim.client)
    await tab.open("/")
    return tab


def feed_of(sim: Simulated) -> Feed:
    return feed_for(sim.service, limit=PAGE_SIZE)


def sockets(client: Client) -> dict[str, str]:
    """The client's live (simulated) sockets: socket id -> document id."""
    return dict(client._socket_to_document_id)


async def test_two_tabs_see_a_prediction_made_in_a_third(sim: Simulated) -> None:
    await sim.user.open("/")
    others = [await open_tab(sim) for _ in range(2)]
    for other in others:
        await other.should_see("No predictions yet.")
    await draw(sim, digit_png("zero"))
    sim.user.find(marker="predict").click()
    await sim.user.should_see("saved as #1")
    for other in others:
        await other.should_see("predicted 0", retries=30)
        await other.should_see(marker="stat-predictions", content="1")
    sim.user.find(marker="label-8").click()
    sim.user.find(marker="submit").click()
    for other in others:
        await other.should_see("true 8", retries=30)
        await other.should_see(marker="stat-labelled", content="1")


async def test_one_change_costs_two_queries_whatever_the_number_of_tabs(counted: Simulated) -> None:
    tabs = [await open_tab(counted) for _ in range(6)]
    for tab in tabs:
        await tab.should_see("No predictions yet.")
    assert counted.store.reads == {"recent": 1, "stats": 1}  # the first tab's load, shared by the others
    counted.store.reads.clear()
    await counted.service.predict(digit_png("zero"))  # from the API, say
    for tab in tabs:
        await tab.should_see("predicted 0", retries=30)
        await tab.should_see(marker="stat-predictions", content="1")
    await asyncio.sleep(2 * feed_of(counted).interval_s)  # nothing more comes
    assert counted.store.reads == {"recent": 1, "stats": 1}


async def test_closed_tabs_leave_the_feed(counted: Simulated) -> None:
    tabs = [await open_tab(counted) for _ in range(6)]
    feed = feed_of(counted)
    await eventually(lambda: feed.subscribers == 6)
    for tab in tabs[:3]:  # a closed tab: its socket goes, the client is deleted after the reconnect timeout
        for socket_id in sockets(tab._client):
            tab._client.handle_disconnect(socket_id)
    assert feed.subscribers == 3
    for tab in tabs[3:]:
        tab._client.delete()
    assert feed.subscribers == 0
    counted.store.reads.clear()
    await counted.service.predict(digit_png("zero"))
    await asyncio.sleep(2 * feed.interval_s)
    assert counted.store.reads == {}  # nobody looks: no query


async def test_a_reconnected_tab_catches_up(counted: Simulated) -> None:
    tab = await open_tab(counted)
    await tab.should_see("No predictions yet.")
    feed = feed_of(counted)
    client = tab._client
    (socket_id, document_id), *_ = sockets(client).items()
    client.handle_disconnect(socket_id)
    assert feed.subscribers == 0
    await counted.service.predict(digit_png("zero"))  # while the tab is away
    await _on_handshake(
        f"test-{uuid4()}", {"client_id": client.id, "tab_id": tab.tab_id, "document_id": document_id}
    )
    await eventually(lambda: feed.subscribers == 1)
    await tab.should_see("predicted 0", retries=30)


async def test_a_page_build_does_no_database_work_before_the_browser_connects(counted: Simulated) -> None:
    for _ in range(5):  # page loads whose browser never connects
        response = await counted.client.get("/")
        assert response.status_code == 200
    await asyncio.sleep(0.1)
    assert counted.store.reads == {}
    assert feed_of(counted).subscribers == 0


async def test_history_and_statistics_come_back_with_the_database(sim: Simulated) -> None:
    await sim.service.predict(digit_png("zero"))
    feed_of(sim).retry_s = 0.1
    sim.store.down = True
    await sim.user.open("/")
    await sim.user.should_see("History is unavailable: the database is unreachable.")
    await sim.user.should_see("Statistics are unavailable: the database is unreachable.")
    await sim.user.should_not_see("No predictions yet.")
    sim.store.down = False  # nothing changed meanwhile: the feed's retry brings the data
    await sim.user.should_see("predicted 0", retries=30)
    await sim.user.should_see(marker="stat-predictions", content="1")
    await sim.user.should_not_see("History is unavailable: the database is unreachable.")
