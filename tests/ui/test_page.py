"""Page logic through NiceGUI's simulated user, on in-memory fakes of the model server and database."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from uuid import uuid4

import httpx
import pytest
from nicegui import Client, core, ui
from nicegui.nicegui import _on_handshake
from nicegui.storage import Storage
from nicegui.testing.user import User

from db.records import Only, PredictionRow
from db.stats import Stats
from tests.ui.conftest import Simulated, assert_no_error_logs, simulate
from tests.ui.fakes import FakeModel, FakeStore, digit_png
from ui.canvas import DigitCanvas
from ui.feed import Feed, feed_for
from ui.history import PAGE_SIZE
from ui.page import DB_DOWN, MODEL_DOWN, NEED_CHOICE, NEED_PREDICTION
from ui.result import PLACEHOLDER
from ui.service import Quota
from ui.views import png_data_url

E = TypeVar("E", bound=ui.element)


async def draw(sim: Simulated, png: bytes | None, user: User | None = None) -> DigitCanvas:
    """Play the browser's `change` event of the canvas (of `user`'s tab, default the first)."""
    canvas = next(iter((user or sim.user).find(DigitCanvas).elements))
    await canvas.receive(png_data_url(png) if png else None, 1 if png else 0)
    return canvas


async def drawn(sim: Simulated, kind: str, user: User | None = None) -> int:
    """Draw and predict in a tab: a drawing of this browser (its history shows only those); its id."""
    user = user or sim.user
    before = len(sim.store.rows)
    await draw(sim, None, user)  # a fresh drawing, even of the same digit
    await draw(sim, digit_png(kind), user)
    user.find(marker="predict").click()
    await eventually(lambda: len(sim.store.rows) > before)
    return max(sim.store.rows)


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


async def test_statistics_per_model_version_and_no_public_download(sim: Simulated) -> None:
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
    await sim.user.should_not_see("Download labelled drawings")  # the export is the operator's (/admin)


async def test_history_pages(sim: Simulated) -> None:
    await sim.user.open("/")
    for _ in range(12):
        await drawn(sim, "one")
    await drawn(sim, "zero")
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

    async def recent(
        self,
        limit: int = 20,
        before_id: int | None = None,
        *,
        only: Only = "all",
        ids: Collection[int] | None = None,
    ) -> list[PredictionRow]:
        self.reads["recent"] += 1
        return await super().recent(limit, before_id, only=only, ids=ids)

    async def stats(self) -> Stats:
        self.reads["stats"] += 1
        return await super().stats()


@pytest.fixture
async def counted(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> AsyncIterator[Simulated]:
    """The app on a counting in-memory store."""
    async with simulate(CountingStore(), FakeModel(), tmp_path) as simulated:
        yield simulated
    assert_no_error_logs(caplog)


async def open_tab(sim: Simulated, user: User | None = None) -> User:
    """One more tab of the same browser (its cookies), or the page opened by `user` (another browser)."""
    tab = user or User(sim.client)
    await tab.open("/")
    return tab


def another_browser() -> User:
    """A user of another browser: its own cookies, so its own session and its own drawings."""
    return User(httpx.AsyncClient(transport=httpx.ASGITransport(core.app), base_url="http://test"))


def feed_of(sim: Simulated) -> Feed:
    return feed_for(sim.service, limit=PAGE_SIZE)


def sockets(client: Client) -> dict[str, str]:
    """The client's live (simulated) sockets: socket id -> document id."""
    return dict(client._socket_to_document_id)


async def test_two_tabs_see_a_prediction_made_in_a_third(sim: Simulated) -> None:
    await sim.user.open("/")
    others = [await same_browser_tab(sim) for _ in range(2)]
    stranger = await open_tab(sim)  # another browser: the counts, never the drawing
    for other in [*others, stranger]:
        await other.should_see("No predictions yet.")
    await draw(sim, digit_png("zero"))
    sim.user.find(marker="predict").click()
    await sim.user.should_see("saved as #1")
    for other in others:
        await other.should_see("predicted 0", retries=30)
        await other.should_see(marker="stat-predictions", content="1")
    await stranger.should_see(marker="stat-predictions", content="1", retries=30)
    await stranger.should_see("No predictions yet.")
    sim.user.find(marker="label-8").click()
    sim.user.find(marker="submit").click()
    for other in others:
        await other.should_see("true 8", retries=30)
        await other.should_see(marker="stat-labelled", content="1")
    await stranger.should_see(marker="stat-labelled", content="1", retries=30)
    await stranger.should_not_see("true 8")


async def test_one_change_costs_two_queries_whatever_the_number_of_tabs(counted: Simulated) -> None:
    tabs = [await open_tab(counted, User(counted.user.http_client)) for _ in range(6)]  # one browser
    strangers = [await open_tab(counted, another_browser()) for _ in range(3)]
    for tab in tabs + strangers:
        await tab.should_see("No predictions yet.")
    assert counted.store.reads == {"stats": 1}  # the first tab's load, shared; no drawings of theirs yet
    await drawn(counted, "zero", tabs[0])
    for tab in tabs:
        await tab.should_see("predicted 0", retries=30)
        await tab.should_see(marker="stat-predictions", content="1", retries=30)
    for stranger in strangers:  # another browser: the count, never the drawing
        await stranger.should_see(marker="stat-predictions", content="1", retries=30)
        await stranger.should_see("No predictions yet.")
    counted.store.reads.clear()
    await counted.service.predict(digit_png("one"))  # from the API, say
    for tab in tabs + strangers:
        await tab.should_see(marker="stat-predictions", content="2", retries=30)
    await asyncio.sleep(2 * feed_of(counted).interval_s)  # nothing more comes
    assert counted.store.reads == {"recent": 1, "stats": 1}  # all nine tabs, one query of each


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
    await tab.should_see(marker="stat-predictions", content="1", retries=30)


async def test_a_page_build_does_no_database_work_before_the_browser_connects(counted: Simulated) -> None:
    for _ in range(5):  # page loads whose browser never connects
        response = await counted.client.get("/")
        assert response.status_code == 200
    await asyncio.sleep(0.1)
    assert counted.store.reads == {}
    assert feed_of(counted).subscribers == 0


async def test_history_and_statistics_come_back_with_the_database(sim: Simulated) -> None:
    await sim.user.open("/")
    await drawn(sim, "zero")
    feed_of(sim).retry_s = 0.1
    sim.store.down = True
    await sim.user.open("/")  # a reload
    await sim.user.should_see("History is unavailable: the database is unreachable.")
    await sim.user.should_see("Statistics are unavailable: the database is unreachable.")
    await sim.user.should_not_see("No predictions yet.")
    sim.store.down = False  # nothing changed meanwhile: the feed's retry brings the data
    await sim.user.should_see("predicted 0", retries=30)
    await sim.user.should_see(marker="stat-predictions", content="1")
    await sim.user.should_not_see("History is unavailable: the database is unreachable.")


# ---------------------------------------------------------------- labels: an explicit choice


@pytest.fixture(autouse=True)
def user_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NiceGUI keeps `app.storage.user` in files: in the test's own folder, not the working directory."""
    monkeypatch.setattr(Storage, "path", tmp_path / "nicegui-storage")


def only(sim: Simulated, marker: str, kind: type[E]) -> E:
    """The one visible element with this marker (of this kind)."""
    (element,) = sim.user.find(marker=marker).elements
    assert isinstance(element, kind)
    return element


def label_of(sim: Simulated, prediction_id: int) -> int | None:
    """The true label the store holds for a row."""
    label: int | None = sim.store.rows[prediction_id][1]
    return label


async def predicted(sim: Simulated, kind: str = "zero", prediction_id: int = 1) -> DigitCanvas:
    """Draw, press Predict, wait for the stored answer."""
    canvas = await draw(sim, digit_png(kind))
    sim.user.find(marker="predict").click()
    await sim.user.should_see(f"saved as #{prediction_id}", retries=30)
    return canvas


async def row_shows(user: User, prediction_id: int, text: str) -> None:
    """The history line of this prediction shows `text`."""
    await user.should_see(marker=f"history-row-{prediction_id}", retries=30)
    with user.scope(marker=f"history-row-{prediction_id}"):
        await user.should_see(text, retries=30)


def highlighted(button: ui.element) -> bool:
    return "unelevated" in button.props


async def test_nothing_is_chosen_or_recorded_before_the_person_picks(sim: Simulated) -> None:
    await sim.user.open("/")
    await predicted(sim)
    buttons = [only(sim, f"label-{d}", ui.button) for d in range(10)]
    assert not any(
        highlighted(b) for b in [*buttons, only(sim, "right", ui.button), only(sim, "not-a-digit", ui.button)]
    )
    assert not only(sim, "submit", ui.button).enabled and not only(sim, "submit-next", ui.button).enabled
    sim.user.find(marker="submit").click()  # disabled: nothing happens
    press(sim, "Enter", "Enter")  # Enter alone records nothing
    await sim.user.should_see(NEED_CHOICE)
    await asyncio.sleep(0.1)
    assert sim.store.rows[1][1] is None and 1 not in sim.store.not_a_digit
    assert sim.model.calls == 2  # the preview and Predict: Enter did not predict again


async def test_a_click_selects_and_submit_records(sim: Simulated) -> None:
    await sim.user.open("/")
    await predicted(sim)
    sim.user.find(marker="label-6").click()
    assert highlighted(only(sim, "label-6", ui.button)) and only(sim, "submit", ui.button).enabled
    await asyncio.sleep(0.1)
    assert label_of(sim, 1) is None  # selected, not recorded
    sim.user.find(marker="label-2").click()  # the person changes their mind
    assert highlighted(only(sim, "label-2", ui.button)) and not highlighted(only(sim, "label-6", ui.button))
    sim.user.find(marker="submit").click()
    await sim.user.should_see("Saved: it was a 2 (the model was wrong).")
    assert sim.store.rows[1][1] == 2
    await sim.user.should_see("saved as #1, true label 2")


async def test_right_confirms_the_predicted_digit(sim: Simulated) -> None:
    await sim.user.open("/")
    await predicted(sim, "zero")
    await sim.user.should_see(marker="right", content="Right, it is a 0")
    sim.user.find(marker="right").click()
    assert highlighted(only(sim, "right", ui.button)) and highlighted(only(sim, "label-0", ui.button))
    sim.user.find(marker="submit").click()
    await sim.user.should_see("Saved: it was a 0 (the model was right).")
    assert sim.store.rows[1][1] == 0


async def test_not_a_digit_is_stored_apart_and_counted_apart(sim: Simulated) -> None:
    await sim.user.open("/")
    await predicted(sim)
    sim.user.find(marker="not-a-digit").click()
    sim.user.find(marker="submit").click()
    await sim.user.should_see("Saved: not a digit.")
    assert sim.store.rows[1][1] is None and sim.store.not_a_digit == {1}
    await sim.user.should_see("saved as #1, not a digit")
    await row_shows(sim.user, 1, "not a digit")
    await sim.user.should_see(marker="stat-not-a-digit", content="1", retries=30)
    await sim.user.should_see(marker="stat-labelled", content="0")


async def test_submit_and_next_clears_the_canvas(sim: Simulated) -> None:
    await sim.user.open("/")
    canvas = await predicted(sim)
    sim.user.find(marker="label-3").click()
    sim.user.find(marker="submit-next").click()
    await sim.user.should_see("Saved: it was a 3 (the model was wrong).")
    await eventually(lambda: canvas.png is None)
    await sim.user.should_see(PLACEHOLDER)
    assert sim.store.rows[1][1] == 3


async def test_enter_records_a_clicked_choice_and_goes_on(sim: Simulated) -> None:
    await sim.user.open("/")
    canvas = await predicted(sim)
    sim.user.find(marker="not-a-digit").click()
    press(sim, "Enter", "Enter")
    await eventually(lambda: canvas.png is None)
    assert sim.store.not_a_digit == {1}


@pytest.mark.parametrize("digit", range(10))
async def test_each_digit_key_records_it_and_clears_for_the_next(sim: Simulated, digit: int) -> None:
    await sim.user.open("/")
    canvas = await draw(sim, digit_png("one"))
    press(sim, "Enter", "Enter")  # predicts
    await sim.user.should_see("saved as #1", retries=30)
    press(sim, str(digit), f"Digit{digit}")  # one key: recorded, next drawing
    await eventually(lambda: sim.store.rows[1][1] == digit)
    await eventually(lambda: canvas.png is None)
    verdict = "right" if digit == 1 else "wrong"
    await sim.user.should_see(f"Saved: it was a {digit} (the model was {verdict}).")


async def test_r_key_is_right_and_n_key_is_not_a_digit(sim: Simulated) -> None:
    await sim.user.open("/")
    press(sim, "r", "KeyR")  # nothing to confirm yet
    await sim.user.should_see(NEED_PREDICTION)
    canvas = await predicted(sim, "zero", 1)
    press(sim, "r", "KeyR")
    await eventually(lambda: sim.store.rows[1][1] == 0 and canvas.png is None)
    await sim.user.should_see("Saved: it was a 0 (the model was right).")
    canvas = await predicted(sim, "one", 2)
    press(sim, "N", "KeyN")
    await eventually(lambda: sim.store.not_a_digit == {2} and canvas.png is None)
    await sim.user.should_see("Saved: not a digit.")
    assert sim.store.rows[2][1] is None


async def test_a_series_takes_one_key_per_drawing_after_predicting(sim: Simulated) -> None:
    await sim.user.open("/")
    for i, (kind, key) in enumerate([("one", "1"), ("zero", "0"), ("one", "7")], start=1):
        await draw(sim, digit_png(kind))
        press(sim, "Enter", "Enter")
        await sim.user.should_see(f"saved as #{i}", retries=30)
        press(sim, key, f"Digit{key}")
        await eventually(lambda i=i, key=key: sim.store.rows[i][1] == int(key))
    assert [sim.store.rows[i][1] for i in (1, 2, 3)] == [1, 0, 7]


async def test_backspace_and_ctrl_z_undo(sim: Simulated) -> None:
    await sim.user.open("/")
    canvas = await draw(sim, digit_png("one"))
    undone: list[str] = []
    canvas.undo = lambda: undone.append("undo")  # type: ignore[method-assign]  # the browser's part is e2e
    press(sim, "Backspace", "Backspace")
    press_with(sim, "z", "KeyZ", ctrlKey=True)
    press_with(sim, "z", "KeyZ", metaKey=True)
    press_with(sim, "z", "KeyZ", ctrlKey=True, shiftKey=True)  # redo elsewhere: not an undo
    await eventually(lambda: len(undone) == 3)
    await asyncio.sleep(0.1)
    assert undone == ["undo"] * 3 and sim.store.rows == {}


def press_with(sim: Simulated, key: str, code: str, **modifiers: bool) -> None:
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
        **modifiers,
    }
    sim.user.find(kind=ui.keyboard).trigger("key", args)


async def test_success_toasts_replace_each_other(sim: Simulated) -> None:
    await sim.user.open("/")
    await predicted(sim)
    for digit in (4, 5):
        sim.user.find(marker=f"label-{digit}").click()
        sim.user.find(marker="submit").click()
        await sim.user.should_see(f"Saved: it was a {digit} (the model was wrong).")
    toasts = sim.user.find(marker="toast").elements
    assert [t.text for t in toasts if isinstance(t, ui.label)] == [
        "Saved: it was a 5 (the model was wrong)."
    ]  # one, the latest
    assert len(sim.user.notify.messages) == 0  # no stacking Quasar notifications


async def test_top_three_guesses_as_text(sim: Simulated) -> None:
    await sim.user.open("/")
    await predicted(sim, "zero")
    await sim.user.should_see(marker="top-guesses", content="0 91% · 1 1% · 2 1%")
    await sim.user.should_see(marker="history-top", content="0 91% · 1 1% · 2 1%")


async def test_upload_an_image_file(sim: Simulated) -> None:
    from nicegui.elements.upload_files import SmallFileUpload

    await sim.user.open("/")
    upload = next(iter(sim.user.find(marker="upload").elements))
    assert isinstance(upload, ui.upload)
    await upload.handle_uploads([SmallFileUpload("zero.png", "image/png", digit_png("zero"))])
    await sim.user.should_see("saved as #1", retries=30)
    await sim.user.should_see(marker="digit", content="0")
    assert sim.store.rows[1][0].image_png == digit_png("zero")  # the file as it was, like a drawing
    await asyncio.sleep(0.2)  # the canvas was emptied for it: the answer stays
    await sim.user.should_see("saved as #1")
    press(sim, "7", "Digit7")
    await eventually(lambda: sim.store.rows[1][1] == 7)
    await upload.handle_uploads(
        [SmallFileUpload("big.png", "image/png", b"\0" * (sim.service.max_image_bytes + 1))]
    )
    await sim.user.should_see("This file is too large")
    await upload.handle_uploads([SmallFileUpload("notes.txt", "text/plain", b"not an image")])
    await asyncio.sleep(0.2)
    assert len(sim.store.rows) == 1


async def test_dark_mode_and_live_preview_are_remembered(sim: Simulated) -> None:
    await sim.user.open("/")
    assert next(iter(sim.user.find(kind=ui.dark_mode).elements)).value is None  # the system's at first
    sim.user.find(marker="dark").click()
    sim.user.find(marker="live").click()
    assert only(sim, "live", ui.switch).value is False
    again = await same_browser_tab(sim)  # a reload, or another tab of the same browser (its cookie)
    assert next(iter(again.find(kind=ui.dark_mode).elements)).value is True
    (live,) = again.find(marker="live").elements
    assert isinstance(live, ui.switch) and live.value is False
    await draw_in(again, digit_png("one"))
    await asyncio.sleep(0.2)
    assert sim.model.calls == 0  # no live preview


async def same_browser_tab(sim: Simulated) -> User:
    """Another tab (or a reload) in the simulated user's browser: the same cookie, so the same session."""
    tab = User(sim.user.http_client)
    await tab.open("/")
    return tab


async def draw_in(user: User, png: bytes) -> DigitCanvas:
    canvas = next(iter(user.find(DigitCanvas).elements))
    await canvas.receive(png_data_url(png), 1)
    return canvas


# ---------------------------------------------------------------- the person's own drawings in the history


async def test_own_rows_can_be_edited_and_deleted_others_cannot(sim: Simulated) -> None:
    other = await sim.service.predict(digit_png("one"))  # someone else's (the API, say): row 1
    await sim.user.open("/")
    await predicted(sim, "zero", 2)
    await sim.user.should_see(marker="history-row-2")
    await sim.user.should_not_see(marker="history-row-1")  # private: not even shown
    await sim.user.should_see(marker="stat-predictions", content="2", retries=30)  # but counted
    with sim.user.scope(marker="history-row-2"):
        await sim.user.should_see("#2")
        sim.user.find(marker="history-edit").click()
    await sim.user.should_see("Drawing #2: predicted 0")
    sim.user.find(marker="edit-5").click()
    await eventually(lambda: sim.store.rows[2][1] == 5)
    await row_shows(sim.user, 2, "true 5")
    with sim.user.scope(marker="history-row-2"):
        sim.user.find(marker="history-edit").click()
    sim.user.find(marker="edit-not-a-digit").click()
    await eventually(lambda: sim.store.not_a_digit == {2})
    with sim.user.scope(marker="history-row-2"):
        sim.user.find(marker="history-delete").click()
    await sim.user.should_see("Delete drawing #2?")
    sim.user.find(marker="confirm-delete").click()
    await eventually(lambda: 2 not in sim.store.rows)
    await sim.user.should_see("Drawing #2 deleted.")
    await sim.user.should_not_see(marker="history-row-2")
    assert other.id == 1 and 1 in sim.store.rows and sim.store.rows[1][1] is None


async def test_own_rows_stay_editable_after_a_reload_not_in_another_browser(sim: Simulated) -> None:
    await sim.user.open("/")
    await predicted(sim, "zero", 1)
    again = await same_browser_tab(sim)  # the same browser: its session knows the token
    await again.should_see(marker="history-row-1")
    with again.scope(marker="history-row-1"):
        again.find(marker="history-edit").click()
    again.find(marker="edit-right").click()
    await eventually(lambda: sim.store.rows[1][1] == 0)
    stranger = await open_tab(sim)  # another browser (its own cookie): neither the drawing nor a token
    await stranger.should_see(marker="stat-predictions", content="1", retries=30)
    await stranger.should_not_see(marker="history-row-1")
    await stranger.should_see("No predictions yet.")


async def test_a_prediction_kept_while_the_database_was_down_becomes_editable(sim: Simulated) -> None:
    await sim.user.open("/")
    sim.store.down = True
    await draw(sim, digit_png("one"))
    sim.user.find(marker="predict").click()
    await sim.user.should_see(DB_DOWN)
    with sim.user.scope(marker="history-row-waiting"):
        await sim.user.should_see(marker="history-edit")  # its label waits with it
        await sim.user.should_not_see(marker="history-delete")  # nothing stored to delete yet
    sim.store.down = False
    await sim.user.should_see("saved as #1", retries=40)
    sim.user.find(marker="clear").click()  # no longer the current drawing: edited by its id and token
    await sim.user.should_see(marker="history-row-1", retries=30)
    with sim.user.scope(marker="history-row-1"):
        sim.user.find(marker="history-edit").click()
    sim.user.find(marker="edit-4").click()
    await eventually(lambda: sim.store.rows[1][1] == 4)


def shown_ids(user: User) -> list[int]:
    """The ids of the history lines shown (their "#id" labels)."""
    try:
        labels = user.find(marker="history-id").elements
    except AssertionError:
        return []
    return sorted(int(e.text[1:]) for e in labels if isinstance(e, ui.label) and e.text.startswith("#"))


async def test_history_filters_query_their_own_rows(sim: Simulated) -> None:
    await sim.user.open("/")
    wrong, right, unlabelled, scribble = [await drawn(sim, kind) for kind in ("one", "zero", "one", "zero")]
    await sim.service.label_by_id(wrong, 7, operator=True)
    await sim.service.label_by_id(right, 0, operator=True)
    await sim.service.label_by_id(scribble, None, not_a_digit=True, operator=True)
    await sim.service.predict(digit_png("one"))  # someone else's: in no view of this page
    await sim.user.should_see(marker="history-row-4")
    (toggle,) = sim.user.find(marker="history-filter").elements
    assert isinstance(toggle, ui.toggle)

    async def shows(ids: list[int | None]) -> None:
        await eventually(lambda: shown_ids(sim.user) == sorted(i for i in ids if i is not None))

    cases: list[tuple[str, list[int | None]]] = [
        ("wrong", [wrong]),
        ("unlabelled", [unlabelled]),
        ("not_a_digit", [scribble]),
        ("all", [1, 2, 3, 4]),
    ]
    for value, ids in cases:
        toggle.value = value
        await shows(ids)
    toggle.value = "wrong"
    await shows([1])
    await drawn(sim, "one")  # row 6, pushed to the unfiltered page only
    await asyncio.sleep(2 * feed_of(sim).interval_s)
    await shows([1])
    toggle.value = "unlabelled"
    await sim.user.should_see("#6")
    await shows([3, 6])


async def test_a_filtered_view_with_nothing_in_it_says_so(sim: Simulated) -> None:
    await sim.user.open("/")
    await drawn(sim, "one")
    await sim.user.should_see(marker="history-row-1")
    toggle = only(sim, "history-filter", ui.toggle)
    toggle.value = "wrong"
    await sim.user.should_see("No wrong predictions.")


async def test_keys_are_not_the_pages_while_a_history_dialog_is_open(sim: Simulated) -> None:
    await sim.user.open("/")
    canvas = await predicted(sim, "zero", 1)
    with sim.user.scope(marker="history-row-1"):
        sim.user.find(marker="history-edit").click()
    press(sim, "3", "Digit3")
    press(sim, "Escape", "Escape")
    await asyncio.sleep(0.2)
    assert sim.store.rows[1][1] is None and canvas.png is not None  # neither labelled nor cleared


async def test_at_the_storage_quota_the_page_answers_but_says_it_was_not_kept(sim: Simulated) -> None:
    sim.service.quota = Quota(max_rows=1)
    await sim.user.open("/")
    await drawn(sim, "one")
    await draw(sim, None)
    await draw(sim, digit_png("zero"))
    sim.user.find(marker="predict").click()
    await sim.user.should_see(marker="digit", content="0")  # the answer is still shown
    await sim.user.should_see("This answer could not be kept: storage is full", retries=30)
    assert len(sim.store.rows) == 1


async def test_not_a_digit_says_so_instead_of_a_confident_digit(sim: Simulated) -> None:
    sim.model.is_digit = False
    await sim.user.open("/")
    await draw(sim, digit_png("one"))
    sim.user.find(marker="predict").click()
    await sim.user.should_see("That does not look like a digit (best guess 1, 91.0 %)")
    await sim.user.should_see(marker="digit", content="?")
    await sim.user.should_not_see("91.0 % sure")
    await sim.user.should_see(marker="not-a-digit")  # the person can still say what it is
