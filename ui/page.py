"""The page: draw, predict, correct; history and live statistics below.

`DigitPage` wires the parts (`drawing`, `result`, `history`, `statistics`, in the shared `frame`) to
the service. History and statistics come from the service's `Feed`, pushed when the data changes;
the page queries only for history pages older than the first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from nicegui import Client, ui
from nicegui.events import KeyEventArguments

from db.errors import InvalidPrediction, StoreError

from .canvas import DigitCanvas
from .drawing import DrawingPanel
from .feed import Feed, Snapshot, feed_for
from .frame import APP_TITLE, page_frame, tag
from .history import PAGE_SIZE, HistoryPanel, history_items, older_cursor
from .inference import InferenceUnavailable, InvalidInput
from .result import CHANGED_STATUS, DB_DOWN, ResultPanel
from .service import Outcome, PredictionService, QueueFull
from .statistics import StatisticsPanel

__all__ = ["DB_DOWN", "MODEL_DOWN", "DigitPage"]

log = logging.getLogger(__name__)

MODEL_DOWN = "The model server is not answering. Your drawing is still here; try Predict again in a moment."
NEED_PREDICTION = "Predict first, then pick the true digit."


class DigitPage:
    """One browser tab's page; `service` (and its feed) are shared by all tabs."""

    client: Client  # set by `build`

    def __init__(self, service: PredictionService, feed: Feed | None = None) -> None:
        self.service = service
        self.feed = feed if feed is not None else feed_for(service, limit=PAGE_SIZE)
        self.outcome: Outcome | None = None  # the kept (stored or waiting) prediction of the current drawing
        self.outcome_png: bytes | None = None
        self.selected: int | None = None
        self.preview_seq = 0
        self.busy = False
        self.saving = False
        self.shown_state: tuple[bool, bool] | None = None  # (stored, label stored) of the outcome last shown
        self.snapshot: Snapshot | None = None  # the latest pushed history and statistics
        self.history_cursors: list[int] = []  # before_id of each older history page shown; [] = the first
        self._unsubscribe: Callable[[], None] | None = None

    # ---------------------------------------------------------------- layout
    async def build(self) -> None:
        """Create the page's elements; history and statistics follow once the browser is connected.

        No database work happens here: a page load that never connects (or is cancelled while the
        server is busy) costs no query and holds no connection.
        """
        page_frame(APP_TITLE)
        ui.keyboard(on_key=self.on_key)
        self.banner = tag(ui.label(MODEL_DOWN), "model-banner").props("role=alert")
        self.banner.classes("w-full p-3 rounded bg-negative text-white")
        self.banner.set_visibility(False)
        with ui.row().classes("w-full gap-6 items-start no-wrap max-md:flex-wrap"):
            self.drawing = DrawingPanel(
                on_change=self.on_drawing, on_undo=self.undo, on_clear=self.clear, on_predict=self.predict
            )
            with ui.card().classes("grow min-w-[300px]"):
                self.result = ResultPanel(on_select=self.select, on_submit=self.submit)
        with ui.tabs().classes("w-full") as tabs:
            history_tab = ui.tab("History")
            stats_tab = ui.tab("Statistics")
        with ui.tab_panels(tabs, value=history_tab).classes("w-full"):
            with ui.tab_panel(history_tab):
                self.history = HistoryPanel(on_older=self.older, on_newer=self.newer)
            with ui.tab_panel(stats_tab):
                self.statistics = StatisticsPanel()
        self.client = ui.context.client
        self.client.on_connect(self.connected)
        self.client.on_disconnect(self.disconnected)  # also on a reconnect: `connected` follows
        self.client.on_delete(self.disconnected)

    @property
    def canvas(self) -> DigitCanvas:
        return self.drawing.canvas

    # ---------------------------------------------------------------- the feed
    async def connected(self) -> None:
        """Subscribe to the feed and show its latest snapshot (loaded now if none is current)."""
        self.disconnected()
        self._unsubscribe = self.feed.subscribe(self.on_snapshot)
        self.on_snapshot(await self.feed.current())

    def disconnected(self) -> None:
        """The tab went away (or reconnects): the feed no longer holds it."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def on_snapshot(self, snapshot: Snapshot) -> None:
        """New history and statistics from the feed (no query): re-render what changed."""
        if self.client.is_deleted or (self.snapshot is not None and snapshot.seq <= self.snapshot.seq):
            return
        self.snapshot = snapshot
        self.follow_outcome()
        if not self.history_cursors:
            self.show_first_history_page()
        self.statistics.show(snapshot.stats)

    def follow_outcome(self) -> None:
        """Show a late save of the current prediction or its label (stored when the database came back)."""
        outcome = self.outcome
        if outcome is not None and (outcome.stored, outcome.label_stored) != self.shown_state:
            self.render_feedback()

    def show_first_history_page(self) -> None:
        """From the latest snapshot, the waiting predictions and this tab's own latest prediction."""
        snapshot = self.snapshot
        waiting = self.service.waiting_outcomes()
        rows = () if snapshot is None or snapshot.recent is None else snapshot.recent
        items = history_items(waiting, rows, self.outcome)
        self.history.show(
            items,
            unavailable=snapshot is not None and snapshot.recent is None,
            older_than=older_cursor(items, len(rows) >= PAGE_SIZE),
        )

    async def show_older_page(self, before_id: int) -> bool:
        """Query one older page (only this tab looks at it); False when the database is unreachable."""
        try:
            rows = await self.service.recent(PAGE_SIZE, before_id)
        except StoreError as exc:
            log.warning("older history not loaded: %s", exc)
            ui.notify("History is unavailable: the database is unreachable.", type="warning")
            return False
        items = history_items([], rows)
        self.history.show(items, older_than=older_cursor(items, len(rows) >= PAGE_SIZE), newer=True)
        return True

    async def older(self, before_id: int) -> None:
        if await self.show_older_page(before_id):
            self.history_cursors.append(before_id)

    async def newer(self) -> None:
        if len(self.history_cursors) > 1:
            if await self.show_older_page(self.history_cursors[-2]):
                self.history_cursors.pop()
        else:
            self.history_cursors.clear()
            self.show_first_history_page()

    # ---------------------------------------------------------------- drawing and predicting
    async def on_drawing(self, canvas: DigitCanvas) -> None:
        """A stroke ended (or undo/clear): show a live preview if wanted; nothing is stored."""
        png = canvas.png
        if png is None:
            self.reset_result()
            return
        if self.outcome is not None and self.outcome_png != png:
            self.outcome = None  # the drawing changed: a new prediction is due
            self.render_feedback()
            self.result.set_status(CHANGED_STATUS)
        if not self.drawing.live_preview or self.busy:
            return
        self.preview_seq += 1
        seq = self.preview_seq
        try:
            prediction = await self.service.preview(png)
        except InvalidInput:
            return  # a stroke too small to be a digit yet; Predict gives the message
        except InferenceUnavailable:
            self.banner.set_visibility(True)
            return
        if seq == self.preview_seq and self.outcome is None and canvas.png is not None:
            self.banner.set_visibility(False)
            self.result.show_prediction(prediction, preview=True)

    async def predict(self) -> None:
        png = self.canvas.png
        if png is None:
            ui.notify("Draw a digit first.", type="warning")
            return
        if self.busy or (self.outcome is not None and self.outcome_png == png):
            return  # answering already, or this drawing is predicted and kept
        self.busy = True
        self.preview_seq += 1  # drop any preview still on its way
        self.drawing.set_busy(True)
        try:
            outcome = await self.service.answer(png)
        except InvalidInput as exc:
            ui.notify(str(exc), type="warning")
            return
        except InferenceUnavailable as exc:
            log.warning("prediction failed: %s", exc)
            self.banner.set_visibility(True)
            return
        finally:
            self.busy = False
            self.drawing.set_busy(False)
        self.banner.set_visibility(False)
        self.outcome, self.outcome_png = outcome, png
        self.selected = outcome.prediction.digit
        self.result.show_prediction(outcome.prediction, preview=False)
        self.saving = True
        self.render_feedback()  # shown before storing: a slow or down database does not delay the answer
        try:
            await self.service.save(outcome)
        except (QueueFull, InvalidPrediction) as exc:  # shown, but neither stored nor queued
            self.outcome = None
            ui.notify(f"This answer could not be kept: {exc}", type="negative")
        finally:
            self.saving = False
        self.render_feedback()
        self.show_own_change()

    def render_feedback(self) -> None:
        self.shown_state = None if self.outcome is None else (self.outcome.stored, self.outcome.label_stored)
        self.result.show_outcome(self.outcome, self.selected, saving=self.saving)

    def show_own_change(self) -> None:
        """This tab sees its own prediction or label at once; other tabs get it from the feed."""
        if not self.history_cursors:
            self.show_first_history_page()

    def reset_result(self) -> None:
        self.outcome = self.outcome_png = self.selected = None
        self.preview_seq += 1
        self.result.reset()

    def clear(self) -> None:
        self.canvas.erase()
        self.reset_result()

    def undo(self) -> None:
        self.canvas.undo()

    # ---------------------------------------------------------------- feedback
    def select(self, digit: int) -> None:
        if self.outcome is None:
            ui.notify(NEED_PREDICTION, type="info")
            return
        self.selected = digit
        self.render_feedback()

    async def submit(self) -> None:
        outcome, label = self.outcome, self.selected
        if outcome is None or label is None:
            ui.notify(NEED_PREDICTION, type="info")
            return
        stored = await self.service.label(outcome, label)
        verdict = "right" if label == outcome.prediction.digit else "wrong"
        if stored:
            ui.notify(f"Saved: it was a {label} (the model was {verdict}).", type="positive")
        else:
            ui.notify(f"Label {label} kept; it is saved when the database is back.", type="warning")
        self.render_feedback()
        self.show_own_change()

    async def on_key(self, event: KeyEventArguments) -> None:
        if not event.action.keydown or event.action.repeat:
            return
        if event.key.number is not None:
            self.select(event.key.number)
        elif event.key.enter:
            if self.outcome is not None and self.outcome_png == self.canvas.png:
                await self.submit()
            else:
                await self.predict()
        elif event.key.escape:
            self.clear()
