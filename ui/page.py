"""The page: draw (or upload), predict, label by an explicit choice; history and live statistics below.

`DigitPage` wires the parts (`drawing`, `result`, `history`, `statistics`, in the shared `frame`) to
the service. History and statistics come from the service's `Feed`, pushed when the data changes;
the page queries only for what one tab looks at alone (older pages, filtered views).

Labels: nothing is pre-selected and nothing is recorded before the person picks. A click selects
(Submit records it, Submit & next records it and clears the canvas); a key records at once and
goes on to the next drawing (R right, 0-9 it was that digit, N not a digit), so a series takes
one key per drawing after predicting. Enter predicts, or records a choice clicked before; with
nothing chosen it records nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from nicegui import Client, ui
from nicegui.events import KeyEventArguments

from db.errors import Forbidden, InvalidPrediction, PredictionNotFound, StoreError
from db.records import Only

from .canvas import DigitCanvas
from .drawing import DrawingPanel
from .feed import Feed, Snapshot, feed_for
from .frame import APP_TITLE, Frame, ToastKind, page_frame, tag
from .history import (
    PAGE_SIZE,
    Edit,
    HistoryItem,
    HistoryPanel,
    OwnDrawings,
    apply_edits,
    history_items,
    mark_own,
    older_cursor,
)
from .inference import InferenceUnavailable, InvalidInput
from .result import CHANGED_STATUS, DB_DOWN, NOT_A_DIGIT, Choice, ResultPanel, choice_of, label_message
from .service import Outcome, PredictionService, QueueFull, StorageFull
from .statistics import StatisticsPanel

__all__ = ["DB_DOWN", "MODEL_DOWN", "DigitPage"]

log = logging.getLogger(__name__)

MODEL_DOWN = "The model server is not answering. Your drawing is still here; try Predict again in a moment."
NEED_PREDICTION = "Predict first (Enter), then pick the true digit."
NEED_CHOICE = "Pick first: R right, 0-9 it was that digit, N not a digit. Nothing was recorded."
DATABASE_DOWN = "The database is unreachable: nothing was changed. Try again in a moment."

# Phone first: one column in the order canvas, tools, result, label bar, details, options (the two
# cards dissolve, `display: contents`, so their parts can interleave); from 768 px on, two cards
# side by side (drawing left; result, label bar and details right).
LAYOUT_CSS = """
.digit-layout { display: flex; flex-direction: column; gap: 8px; width: 100%; }
.digit-layout > .digit-col { display: contents; }
.area-canvas { order: 1; } .area-tools { order: 2; } .area-result { order: 3; }
.area-labels { order: 4; } .area-details { order: 5; } .area-options { order: 6; }
@media (min-width: 768px) {
  .digit-layout { flex-direction: row; align-items: flex-start; gap: 24px; }
  .digit-layout > .digit-col { display: flex; }
  .digit-col-draw { width: 384px; flex-shrink: 0; }
  .digit-col-result { flex: 1 1 0; min-width: 0; }
}
.area-tools .q-btn { min-height: 40px; }  /* a finger's target */
@media (max-width: 767px) { .nicegui-content { padding: 8px 10px; gap: 8px; } }
@media (pointer: coarse), (max-width: 599px) { .keys-hint { display: none; } }  /* no keyboard */
"""


def key_choice(event: KeyEventArguments, predicted: int | None) -> Choice | None:
    """The label a key stands for: R right (the predicted digit), 0-9 (top row or keypad), N not a digit."""
    if event.modifiers.ctrl or event.modifiers.meta or event.modifiers.alt:
        return None
    name = event.key.name
    if len(name) == 1 and name in "0123456789":
        return Choice(int(name))
    if event.key.number is not None:
        return Choice(event.key.number)
    if name.lower() == "r":
        return None if predicted is None else Choice(predicted)
    if name.lower() == "n":
        return NOT_A_DIGIT
    return None


def is_undo_key(event: KeyEventArguments) -> bool:
    """Backspace, or Ctrl+Z (Cmd+Z on a Mac)."""
    if event.key.name.lower() == "z" and (event.modifiers.ctrl or event.modifiers.meta):
        return not event.modifiers.shift  # Ctrl+Shift+Z is "redo" elsewhere: not an undo
    return bool(event.key.backspace) and not (event.modifiers.ctrl or event.modifiers.alt)


class DigitPage:
    """One browser tab's page; `service` (and its feed) are shared by all tabs."""

    client: Client  # set by `build`
    frame: Frame
    own: OwnDrawings

    def __init__(self, service: PredictionService, feed: Feed | None = None) -> None:
        self.service = service
        self.feed = feed if feed is not None else feed_for(service, limit=PAGE_SIZE)
        self.outcome: Outcome | None = None  # the kept (stored or waiting) prediction of the current drawing
        self.outcome_png: bytes | None = None  # the drawing it answers (None: an uploaded file)
        self.choice: Choice | None = None  # what the person picked for it (nothing before they pick)
        self.preview_seq = 0
        self.busy = False
        self.saving = False
        self.shown_state: tuple[bool, bool] | None = None  # (stored, label stored) of the outcome last shown
        self.snapshot: Snapshot | None = None  # the latest pushed history and statistics
        self.only: Only = "all"  # the history filter
        self.history_cursors: list[int] = []  # before_id of each older history page shown; [] = the first
        self.held: dict[str, Outcome] = {}  # this browser's predictions waiting for the database, by key
        self.edits: dict[int, Edit] = {}  # this tab's relabels and deletes, until the feed shows them
        # What the pushed first history page shows now: re-rendered only when it would change.
        self.history_shown: tuple[list[HistoryItem], bool, int | None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # ---------------------------------------------------------------- layout
    async def build(self) -> None:
        """Create the page's elements; history and statistics follow once the browser is connected.

        No database work happens here: a page load that never connects (or is cancelled while the
        server is busy) costs no query and holds no connection.
        """
        self.frame = page_frame(APP_TITLE)
        ui.add_css(LAYOUT_CSS)
        self.own = OwnDrawings(self.frame.prefs)
        ui.keyboard(on_key=self.on_key)
        self.banner = tag(ui.label(MODEL_DOWN), "model-banner").props("role=alert")
        self.banner.classes("w-full p-3 rounded bg-negative text-white")
        self.banner.set_visibility(False)
        with ui.element("div").classes("digit-layout"):
            with ui.card().classes("digit-col digit-col-draw"):
                self.drawing = DrawingPanel(
                    on_change=self.on_drawing,
                    on_undo=self.undo,
                    on_clear=self.clear,
                    on_predict=self.predict,
                    on_upload=self.upload,
                    live=self.frame.prefs.get("live") is not False,
                    on_live=self.remember_live,
                    max_upload_bytes=self.service.max_image_bytes,
                )
            with ui.card().classes("digit-col digit-col-result"):
                self.result = ResultPanel(
                    on_choose=self.choose, on_submit=self.submit, on_submit_next=self.submit_next
                )
        with ui.tabs().classes("w-full") as tabs:
            history_tab = ui.tab("History")
            stats_tab = ui.tab("Statistics")
        with ui.tab_panels(tabs, value=history_tab).classes("w-full"):
            with ui.tab_panel(history_tab).classes("px-0 sm:px-4"):
                self.history = HistoryPanel(
                    on_older=self.older,
                    on_newer=self.newer,
                    on_filter=self.filter,
                    on_label=self.edit_label,
                    on_delete=self.delete,
                )
            with ui.tab_panel(stats_tab).classes("px-0 sm:px-4"):
                self.statistics = StatisticsPanel()
        self.client = ui.context.client
        self.client.on_connect(self.connected)
        self.client.on_disconnect(self.disconnected)  # also on a reconnect: `connected` follows
        self.client.on_delete(self.disconnected)

    @property
    def canvas(self) -> DigitCanvas:
        return self.drawing.canvas

    def toast(self, message: str, kind: ToastKind = "info") -> None:
        self.frame.toast.show(message, kind)

    def remember_live(self, live: bool) -> None:
        self.frame.prefs["live"] = live

    # ---------------------------------------------------------------- the feed
    async def connected(self) -> None:
        """Subscribe to the feed and show its latest snapshot (loaded now if none is current)."""
        self.disconnected()
        self.follow_own_waiting()
        self._unsubscribe = self.feed.subscribe(self.on_snapshot, lambda: self.own.ids)
        self.on_snapshot(await self.feed.current(self.own.ids))

    def disconnected(self) -> None:
        """The tab went away (or reconnects): the feed no longer holds it."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def follow_own_waiting(self) -> None:
        """Hold this browser's predictions that wait for the database (made before a reload)."""
        keys = self.own.waiting_keys
        if not keys:
            return
        for outcome in self.service.waiting_outcomes():
            if outcome.key in keys:
                self.held.setdefault(outcome.key, outcome)
        self.own.drop_keys(keys - set(self.held))  # stored while nobody held them: not followable

    def on_snapshot(self, snapshot: Snapshot) -> None:
        """New history and statistics from the feed (no query): re-render what changed."""
        if self.client.is_deleted or (self.snapshot is not None and snapshot.seq <= self.snapshot.seq):
            return
        self.snapshot = snapshot
        self.edits = {i: e for i, e in self.edits.items() if e.version > snapshot.version}
        self.follow_outcome()
        if self.pushed_view:
            self.show_first_history_page()
        self.statistics.show(snapshot.stats)

    def follow_outcome(self) -> None:
        """Show a late save of the current prediction or its label (stored when the database came back)."""
        outcome = self.outcome
        if outcome is not None and (outcome.stored, outcome.label_stored) != self.shown_state:
            self.render_feedback()

    # ---------------------------------------------------------------- history
    @property
    def pushed_view(self) -> bool:
        """Whether the history shows the pushed first page (unfiltered), not a page this tab queried."""
        return self.only == "all" and not self.history_cursors

    def settle_held(self) -> None:
        """Held predictions stored by now are known by id from here on (editable from the history)."""
        stored = [o for o in self.held.values() if o.stored]
        if stored:
            self.own.settle(stored)
            for outcome in stored:
                self.held.pop(outcome.key, None)

    def own_waiting(self) -> list[Outcome]:
        """The predictions this browser made that wait for the database (nobody else's are shown)."""
        keys = self.own.waiting_keys | set(self.held)
        return [o for o in self.service.waiting_outcomes() if o.key in keys]

    def owned(self, items: list[HistoryItem]) -> list[HistoryItem]:
        return mark_own(items, self.own.ids, self.own.waiting_keys | set(self.held))

    def show_first_history_page(self) -> None:
        """From the latest snapshot, the waiting predictions and this tab's own latest prediction."""
        self.settle_held()
        snapshot = self.snapshot
        waiting = self.own_waiting()
        rows = [] if snapshot is None else snapshot.rows_for(self.own.ids, PAGE_SIZE)
        items = self.owned(
            apply_edits(history_items(waiting, rows, self.service.links.image_url, self.outcome), self.edits)
        )
        unavailable = snapshot is not None and snapshot.recent is None
        older_than = older_cursor(items, len(rows) >= PAGE_SIZE)
        shown = (items, unavailable, older_than)
        if shown == self.history_shown:
            return  # someone else's change: this tab's drawings are as shown (a push costs it nothing)
        self.history_shown = shown
        self.history.show(items, unavailable=unavailable, older_than=older_than)

    async def show_queried_page(self, before_id: int | None) -> bool:
        """Query one page of the current view (only this tab looks at it); False when unreachable."""
        try:
            rows = await self.service.recent(PAGE_SIZE, before_id, only=self.only, ids=self.own.ids)
        except StoreError as exc:
            log.warning("history page not loaded: %s", exc)
            self.toast("History is unavailable: the database is unreachable.", "warning")
            return False
        self.settle_held()
        items = self.owned(history_items([], rows, self.service.links.image_url))
        older = older_cursor(items, len(rows) >= PAGE_SIZE)
        self.history_shown = None  # another view: the pushed page is rendered again when it comes back
        self.history.show(items, older_than=older, newer=before_id is not None)
        return True

    async def older(self, before_id: int) -> None:
        if await self.show_queried_page(before_id):
            self.history_cursors.append(before_id)

    async def newer(self) -> None:
        if len(self.history_cursors) > 1:
            if await self.show_queried_page(self.history_cursors[-2]):
                self.history_cursors.pop()
        else:
            self.history_cursors.clear()
            await self.show_history()

    async def filter(self, only: Only) -> None:
        """All, or only the wrong / unlabelled / not-a-digit drawings (a filtered view queries itself)."""
        self.only = only
        self.history_cursors.clear()
        await self.show_history()

    async def show_history(self) -> None:
        """Re-render the page of the history shown now (after this tab changed something)."""
        if self.pushed_view:
            self.show_first_history_page()
        else:
            await self.show_queried_page(self.history_cursors[-1] if self.history_cursors else None)

    # ---------------------------------------------------------------- drawing and predicting
    @property
    def answered(self) -> bool:
        """Whether what is shown (the drawing, or an uploaded file) has its kept prediction."""
        return self.outcome is not None and self.outcome_png == self.canvas.png

    async def on_drawing(self, canvas: DigitCanvas) -> None:
        """A stroke ended (or undo/clear): show a live preview if wanted; nothing is stored."""
        png = canvas.png
        if png is None:
            if self.outcome is not None and self.outcome_png is None:
                return  # the canvas was emptied for an uploaded file: its answer stays
            self.reset_result()
            return
        if self.outcome is not None and self.outcome_png != png:
            self.outcome = None  # the drawing changed: a new prediction is due
            self.choice = None
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
            self.toast("Draw a digit first.", "warning")
            return
        if self.busy or self.answered:
            return  # answering already, or this drawing is predicted and kept
        await self.answer(png, drawn=True)

    async def upload(self, data: bytes | None, size: int) -> None:
        """An image file from the person's device: predicted and stored like a drawing."""
        if data is None:
            limit = self.service.max_image_bytes
            self.toast(f"This file is too large: {size:,} bytes, at most {limit:,} are accepted.", "warning")
            return
        if self.busy:
            self.toast("Still answering the last one; try again in a moment.", "info")
            return
        await self.answer(data, drawn=False)

    async def answer(self, png: bytes, *, drawn: bool) -> None:
        """Ask the model, show the answer, then keep it (stored, or queued while the database is down)."""
        self.busy = True
        self.preview_seq += 1  # drop any preview still on its way
        self.drawing.set_busy(True)
        try:
            outcome = await self.service.answer(png)
        except InvalidInput as exc:
            self.toast(str(exc), "warning")
            return
        except InferenceUnavailable as exc:
            log.warning("prediction failed: %s", exc)
            self.banner.set_visibility(True)
            return
        finally:
            self.busy = False
            self.drawing.set_busy(False)
        if not drawn:
            self.canvas.erase()  # the answer is the file's, not the canvas's
        self.banner.set_visibility(False)
        self.outcome, self.outcome_png, self.choice = outcome, (png if drawn else None), None
        self.result.show_prediction(outcome.prediction, preview=False)
        self.saving = True
        self.render_feedback()  # shown before storing: a slow or down database does not delay the answer
        try:
            await self.service.save(outcome)
        except (QueueFull, InvalidPrediction, StorageFull) as exc:  # shown, but neither stored nor queued
            self.outcome = None
            self.toast(f"This answer could not be kept: {exc}", "negative")
        else:
            self.own.remember(outcome)
            if not outcome.stored:
                self.held[outcome.key] = outcome
        finally:
            self.saving = False
        self.render_feedback()
        self.show_own_change()

    def render_feedback(self) -> None:
        self.shown_state = None if self.outcome is None else (self.outcome.stored, self.outcome.label_stored)
        self.result.show_outcome(self.outcome, self.choice, saving=self.saving)

    def show_own_change(self) -> None:
        """This tab sees its own prediction or label at once; other tabs get it from the feed."""
        if self.pushed_view:
            self.show_first_history_page()

    def reset_result(self) -> None:
        self.outcome = self.outcome_png = self.choice = None
        self.preview_seq += 1
        self.result.reset()

    def clear(self) -> None:
        self.canvas.erase()
        self.reset_result()

    def undo(self) -> None:
        self.canvas.undo()

    # ---------------------------------------------------------------- labels
    def choose(self, choice: Choice) -> None:
        """A click on the label bar: selected, not recorded (Submit or Enter records it)."""
        if self.outcome is None:
            self.toast(NEED_PREDICTION, "info")
            return
        self.choice = choice
        self.render_feedback()

    async def submit(self) -> bool:
        """Record the chosen label; True when it is recorded (stored, or kept until the database is back)."""
        outcome, choice = self.outcome, self.choice
        if outcome is None:
            self.toast(NEED_PREDICTION, "info")
            return False
        if choice is None:
            self.toast(NEED_CHOICE, "info")
            return False
        if choice_of(outcome) == choice and outcome.label_stored:
            return True  # recorded already
        try:
            stored = await self.service.label(outcome, choice.label, not_a_digit=choice.not_a_digit)
        except QueueFull as exc:
            self.toast(f"This label could not be kept: {exc}", "negative")
            return False
        except PredictionNotFound:
            self.toast("This drawing was deleted meanwhile.", "warning")
            self.clear()
            return False
        self.toast(
            label_message(choice, outcome.prediction.digit, stored), "positive" if stored else "warning"
        )
        self.render_feedback()
        self.show_own_change()
        return True

    async def submit_next(self) -> None:
        """Record the chosen label and clear the canvas for the next drawing."""
        if await self.submit():
            self.clear()

    async def label_and_next(self, choice: Choice) -> None:
        """One key: this label for the current answer, recorded at once, then the next drawing."""
        if not self.answered:
            self.toast(NEED_PREDICTION, "info")
            return
        self.choice = choice
        await self.submit_next()

    async def on_key(self, event: KeyEventArguments) -> None:
        if not event.action.keydown or event.action.repeat or self.history.dialog_open:
            return
        if is_undo_key(event):
            self.undo()
            return
        choice = key_choice(event, self.outcome.prediction.digit if self.outcome is not None else None)
        if choice is not None:
            await self.label_and_next(choice)
        elif event.key.name.lower() == "r":
            self.toast(NEED_PREDICTION, "info")  # "right" with no answer to confirm
        elif event.key.enter:
            if not self.answered:
                await self.predict()
            elif self.choice is not None:
                await self.submit_next()
            else:
                self.toast(NEED_CHOICE, "info")  # Enter alone records nothing
        elif event.key.escape:
            self.clear()

    # ---------------------------------------------------------------- the person's own rows (history)
    def held_outcome(self, item: HistoryItem) -> Outcome | None:
        """The outcome object this tab holds for a history line (the current one, or one waiting)."""
        for outcome in (self.outcome, *self.held.values()):
            if outcome is not None and (
                (item.id is not None and outcome.id == item.id)
                or (item.id is None and outcome.key == item.key)
            ):
                return outcome
        return None

    async def edit_label(self, item: HistoryItem, choice: Choice) -> None:
        """Change the label of one of the person's drawings, from the history."""
        outcome = self.held_outcome(item)
        name = "This drawing" if item.id is None else f"#{item.id}"
        try:
            if outcome is not None:
                stored = await self.service.label(outcome, choice.label, not_a_digit=choice.not_a_digit)
                if outcome is self.outcome:
                    self.choice = choice
                    self.render_feedback()
            else:
                token = None if item.id is None else self.own.token(item.id)
                if item.id is None or token is None:
                    self.toast(f"{name} was not drawn in this browser.", "warning")
                    return
                stored = await self.service.label_by_id(
                    item.id, choice.label, not_a_digit=choice.not_a_digit, token=token
                )
        except (Forbidden, PredictionNotFound) as exc:
            self.lost(item, exc)
            return
        except QueueFull as exc:
            self.toast(f"This label could not be kept: {exc}", "negative")
            return
        if item.id is not None:
            self.edits[item.id] = Edit(self.service.version, choice.label, choice.not_a_digit)
        message = label_message(choice, item.digit, stored)
        self.toast(f"{name}: {message[0].lower()}{message[1:]}", "positive" if stored else "warning")
        await self.show_history()

    async def delete(self, item: HistoryItem) -> None:
        """Delete one of the person's drawings and its row."""
        token = None if item.id is None else self.own.token(item.id)
        if item.id is None or token is None:
            self.toast("Only stored drawings made in this browser can be deleted.", "warning")
            return
        try:
            await self.service.delete(item.id, token=token)
        except (Forbidden, PredictionNotFound) as exc:
            self.lost(item, exc)
            return
        except StoreError as exc:
            log.warning("delete failed: %s", exc)
            self.toast(DATABASE_DOWN, "warning")
            return
        self.own.forget(item.id)
        self.edits[item.id] = Edit(self.service.version, deleted=True)
        if self.outcome is not None and self.outcome.id == item.id:
            self.clear()
        self.toast(f"Drawing #{item.id} deleted.", "positive")
        await self.show_history()

    def lost(self, item: HistoryItem, exc: Exception) -> None:
        """The row is gone, or its token no longer matches: this browser cannot change it any more."""
        if item.id is not None:
            self.own.forget(item.id)
        gone = isinstance(exc, PredictionNotFound)
        self.toast(
            f"Drawing #{item.id} " + ("no longer exists." if gone else "can no longer be changed from here."),
            "warning",
        )
        self.show_own_change()
