"""The page: draw, predict, correct; history and live statistics below."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from nicegui import ui
from nicegui.events import KeyEventArguments

from db.store import DatabaseUnavailable

from . import views
from .canvas import DigitCanvas
from .inference import InferenceUnavailable, InvalidInput, Prediction
from .service import Outcome, PredictionService

log = logging.getLogger(__name__)

HISTORY_PAGE_SIZE = 10
MODEL_DOWN = "The model server is not answering. Your drawing is still here; try Predict again in a moment."
DB_DOWN = "Not saved yet: the database is unreachable. It is kept and saved automatically when it is back."

# No double-tap zoom on controls: a tap right after a stroke must be a click, not a zoom gesture.
TOUCH_CSS = "button, .q-btn, .q-toggle, .q-tab { touch-action: manipulation; }"
# Buttons lose focus after a mouse click, so that Enter and the digit keys go to the page's shortcuts.
BLUR_AFTER_CLICK = """<script>
document.addEventListener('click', e => {
  const a = document.activeElement;
  if (e.detail > 0 && a && a.closest && a.closest('button')) a.blur();
});
</script>"""


E = TypeVar("E", bound=ui.element)


def tag(element: E, name: str) -> E:
    """Name an element for the tests: `data-testid` for the browser, a marker for the simulated user."""
    element.props(f"data-testid={name}")
    return element.mark(name)


class DigitPage:
    """One browser tab's page; `service` is shared by all tabs."""

    def __init__(self, service: PredictionService) -> None:
        self.service = service
        self.outcome: Outcome | None = None  # the stored (or waiting) prediction of the current drawing
        self.outcome_png: bytes | None = None
        self.selected: int | None = None
        self.preview_seq = 0
        self.busy = False
        self.saving = False
        self.stats_version: str | None = None  # statistics of one model version; None: all
        self.history_cursors: list[int | None] = [None]  # before_id of each page shown so far
        self.seen_version = -1
        self.rendered_state: tuple[bool, bool] | None = None  # (stored, label stored) last shown

    # ---------------------------------------------------------------- layout
    async def build(self) -> None:
        """Create the page's elements (in the current page context)."""
        ui.add_body_html(BLUR_AFTER_CLICK)
        ui.add_css(TOUCH_CSS)
        self.dark = ui.dark_mode(None)
        ui.keyboard(on_key=self.on_key)
        with ui.header().classes("items-center justify-between bg-primary"):
            ui.label("Digit classifier").classes("text-h6")
            with ui.row().classes("items-center gap-1"):
                ui.link("API", "/docs", new_tab=True).classes("text-white")
                ui.button(icon="contrast", on_click=self.toggle_dark).props("flat round color=white").tooltip(
                    "Light / dark"
                )
        self.banner = tag(ui.label(MODEL_DOWN), "model-banner").props("role=alert")
        self.banner.classes("w-full p-3 rounded bg-negative text-white")
        self.banner.set_visibility(False)

        with ui.row().classes("w-full gap-6 items-start no-wrap max-md:flex-wrap"):
            with ui.card().classes("w-[320px] max-w-full shrink-0"):
                ui.label("Draw a digit").classes("text-subtitle1")
                self.canvas = DigitCanvas(on_change=self.on_drawing).classes("w-full")
                with ui.row().classes("w-full justify-between"):
                    tag(ui.button("Undo", icon="undo", on_click=self.undo), "undo").props("outline")
                    tag(ui.button("Clear", icon="clear", on_click=self.clear), "clear").props("outline")
                    self.predict_button = tag(
                        ui.button("Predict", icon="psychology", on_click=self.predict), "predict"
                    )
                self.live = tag(ui.switch("Predict as I draw", value=True), "live")
                ui.label("Keys: 0-9 pick the true label, Enter submits, Esc clears.").classes(
                    "text-caption text-grey"
                )
            with ui.card().classes("grow min-w-[300px]"):
                self.build_result()

        with ui.tabs().classes("w-full") as tabs:
            history_tab = ui.tab("History")
            stats_tab = ui.tab("Statistics")
        with ui.tab_panels(tabs, value=history_tab).classes("w-full"):
            with ui.tab_panel(history_tab):
                await self.history()
            with ui.tab_panel(stats_tab):
                await self.statistics()
        ui.timer(1.0, self.tick)

    def build_result(self) -> None:
        self.placeholder = ui.label("Draw a digit and press Predict.").classes("text-grey")
        self.result = tag(ui.column(), "result").classes("w-full")
        self.result.set_visibility(False)
        with self.result:
            with ui.row().classes("items-center gap-6 w-full"):
                self.digit_label = tag(ui.label(), "digit").classes("text-8xl font-bold")
                with ui.column().classes("gap-1"):
                    self.confidence_label = tag(ui.label(), "confidence").classes("text-h6")
                    self.hint_label = tag(ui.label(), "hint").classes("text-warning")
                    self.status_label = tag(ui.label(), "status").classes("text-caption")
                ui.space()
                with ui.column().classes("items-center gap-0"):
                    self.input_image = ui.element("img").props('alt="what the model saw"')
                    self.input_image.style(
                        "width: 112px; height: 112px; image-rendering: pixelated; border-radius: 4px"
                    )
                    ui.label("what the model saw").classes("text-caption text-grey")
            self.chart = ui.echart(views.probability_chart([0.0] * 10, 0)).classes("w-full h-40")
            self.feedback = ui.column().classes("w-full gap-1")
            with self.feedback:
                ui.label("Is it right? Pick the true digit:").classes("text-subtitle2")
                with ui.row().classes("gap-1"):
                    self.label_buttons = [
                        tag(ui.button(str(d), on_click=lambda d=d: self.select(d)), f"label-{d}")
                        .props("dense outline")
                        .classes("w-10")
                        for d in range(10)
                    ]
                    self.submit_button = tag(
                        ui.button("Submit", icon="check", on_click=self.submit), "submit"
                    )
        self.db_warning = tag(ui.label(DB_DOWN), "db-warning").props("role=status")
        self.db_warning.classes("w-full p-2 rounded bg-warning text-black")
        self.db_warning.set_visibility(False)

    # ---------------------------------------------------------------- drawing and predicting
    async def on_drawing(self, canvas: DigitCanvas) -> None:
        """A stroke ended (or undo/clear): show a live preview if wanted; nothing is stored."""
        if canvas.empty:
            self.reset_result()
            return
        if self.outcome is not None and self.outcome_png != canvas.png:
            self.outcome = None  # the drawing changed: a new prediction is due
            self.render_feedback()
            self.status_label.set_text("the drawing changed: press Predict for a new answer")
        if not self.live.value or self.busy:
            return
        self.preview_seq += 1
        seq = self.preview_seq
        try:
            prediction = await self.service.inference.predict(canvas.png)
        except InvalidInput:
            return  # a stroke too small to be a digit yet; Predict gives the message
        except InferenceUnavailable:
            self.banner.set_visibility(True)
            return
        if seq == self.preview_seq and self.outcome is None and canvas.png is not None:
            self.banner.set_visibility(False)
            self.show_prediction(prediction, preview=True)

    async def predict(self) -> None:
        png = self.canvas.png
        if png is None:
            ui.notify("Draw a digit first.", type="warning")
            return
        if self.busy:
            return
        if self.outcome is not None and self.outcome_png == png:
            return  # this drawing is already predicted and stored
        self.busy = True
        self.preview_seq += 1  # drop any preview still on its way
        self.predict_button.props("loading")
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
            self.predict_button.props(remove="loading")
        self.banner.set_visibility(False)
        self.outcome, self.outcome_png = outcome, png
        self.selected = outcome.prediction.digit
        self.show_prediction(outcome.prediction, preview=False)
        self.saving = True
        self.render_feedback()  # shown before storing: a slow or down database does not delay the answer
        try:
            await self.service.save(outcome)
        finally:
            self.saving = False
        self.render_feedback()
        self.refresh_lists()

    def show_prediction(self, prediction: Prediction, preview: bool) -> None:
        self.placeholder.set_visibility(False)
        self.result.set_visibility(True)
        self.digit_label.set_text(str(prediction.digit))
        self.confidence_label.set_text(f"{views.percent(prediction.confidence)} sure")
        self.hint_label.set_text(views.unsure_hint(prediction.probabilities) or "")
        self.input_image._props["src"] = views.pixels_data_url(prediction.input)
        self.input_image.update()
        self.chart.options.clear()
        self.chart.options.update(views.probability_chart(prediction.probabilities, prediction.digit))
        self.chart.update()
        if preview:
            self.status_label.set_text("live preview: press Predict to keep it")
            self.feedback.set_visibility(False)
            self.db_warning.set_visibility(False)

    def render_feedback(self) -> None:
        """Feedback buttons and the saved / not-saved status of the current outcome."""
        outcome = self.outcome
        self.feedback.set_visibility(outcome is not None)
        if outcome is None:
            self.db_warning.set_visibility(False)
            return
        for digit, button in enumerate(self.label_buttons):
            chosen = digit == self.selected
            button.props(remove="outline unelevated")
            button.props("unelevated color=primary" if chosen else "outline")
        self.rendered_state = (outcome.stored, outcome.label_stored)
        waiting = not outcome.stored or (outcome.label is not None and not outcome.label_stored)
        self.db_warning.set_visibility(waiting and not self.saving)
        if self.saving:
            text = "saving ..."
        elif outcome.stored:
            text = f"saved as #{outcome.id}"
            if outcome.label is not None:
                text += f", true label {outcome.label}" + ("" if outcome.label_stored else " (not saved yet)")
        else:
            text = "not saved yet"
        self.status_label.set_text(text)

    def reset_result(self) -> None:
        self.outcome = self.outcome_png = self.selected = None
        self.preview_seq += 1
        self.status_label.set_text("")
        self.placeholder.set_visibility(True)
        self.result.set_visibility(False)
        self.db_warning.set_visibility(False)

    def clear(self) -> None:
        self.canvas.clear()
        self.reset_result()

    def undo(self) -> None:
        self.canvas.undo()

    # ---------------------------------------------------------------- feedback
    def select(self, digit: int) -> None:
        if self.outcome is None:
            ui.notify("Predict first, then pick the true digit.", type="info")
            return
        self.selected = digit
        self.render_feedback()

    async def submit(self) -> None:
        outcome = self.outcome
        if outcome is None or self.selected is None:
            ui.notify("Predict first, then pick the true digit.", type="info")
            return
        stored = await self.service.label(outcome, self.selected)
        verdict = "right" if self.selected == outcome.prediction.digit else "wrong"
        if stored:
            ui.notify(f"Saved: it was a {self.selected} (the model was {verdict}).", type="positive")
        else:
            ui.notify(f"Label {self.selected} kept; it is saved when the database is back.", type="warning")
        self.render_feedback()
        self.refresh_lists()

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

    def toggle_dark(self) -> None:
        self.dark.set_value(not self.dark.value)

    # ---------------------------------------------------------------- history and statistics
    def refresh_lists(self) -> None:
        self.seen_version = self.service.version
        self.history.refresh()
        self.statistics.refresh()

    async def tick(self) -> None:
        """Every second: follow late saves and other people's predictions."""
        outcome = self.outcome
        if outcome is not None and (outcome.stored, outcome.label_stored) != self.rendered_state:
            self.render_feedback()
        if self.service.version != self.seen_version:
            self.refresh_lists()

    def older(self, before_id: int) -> None:
        self.history_cursors.append(before_id)
        self.history.refresh()

    def newer(self) -> None:
        if len(self.history_cursors) > 1:
            self.history_cursors.pop()
        self.history.refresh()

    @ui.refreshable_method
    async def history(self) -> None:
        before_id = self.history_cursors[-1]
        waiting = list(self.service.pending.values()) if before_id is None else []
        try:
            rows = await self.service.db.recent(HISTORY_PAGE_SIZE, before_id)
        except DatabaseUnavailable:
            ui.label("History is unavailable: the database is unreachable.").classes("text-negative")
            rows = []
        items = [history_item(o) for o in reversed(waiting)] + [history_item(r) for r in rows]
        if not items:
            ui.label("No predictions yet.").classes("text-grey")
        with tag(ui.column(), "history").classes("w-full gap-1"):
            for item in items:
                self.history_row(item)
        with ui.row().classes("items-center"):
            ui.button("Newer", icon="chevron_left", on_click=self.newer).props("flat").set_enabled(
                len(self.history_cursors) > 1
            )
            older = ui.button("Older", icon="chevron_right", on_click=lambda: self.older(rows[-1].id))
            older.props("flat").set_enabled(len(rows) == HISTORY_PAGE_SIZE)

    def history_row(self, item: dict[str, Any]) -> None:
        with tag(ui.row(), "history-row").classes("items-center gap-4 w-full"):
            ui.label(item["time"]).classes("w-40 text-caption")
            thumb = ui.element("img").style("width: 36px; height: 36px; background: #000; border-radius: 4px")
            thumb._props["src"] = item["thumbnail"]
            ui.label(f"predicted {item['digit']}").classes("w-24")
            ui.label(views.percent(item["confidence"])).classes("w-20")
            label = item["label"]
            ui.label("–" if label is None else f"true {label}").classes("w-16")
            if label is not None:
                right = label == item["digit"]
                ui.icon("check_circle" if right else "cancel", color="positive" if right else "negative")
            if not item["stored"]:
                ui.badge("not saved yet", color="warning")

    def choose_version(self, event: Any) -> None:
        self.stats_version = event.value or None
        self.statistics.refresh()

    @ui.refreshable_method
    async def statistics(self) -> None:
        try:
            stats = (await self.service.db.stats()).to_dict()
        except DatabaseUnavailable:
            ui.label("Statistics are unavailable: the database is unreachable.").classes("text-negative")
            return
        versions = stats.get("by_version") or {}
        if self.stats_version not in versions:
            self.stats_version = None
        shown = stats if self.stats_version is None else versions[self.stats_version]
        with ui.row().classes("gap-8 items-end"):
            for name, value in (
                ("predictions", str(shown["total"])),
                ("labelled", str(shown["labelled"])),
                ("accuracy on labelled", views.percent(shown["accuracy"])),
            ):
                key = f"stat-{name.split()[0]}"
                with ui.column().classes("gap-0"):
                    tag(ui.label(value), key).classes("text-h4")
                    ui.label(name).classes("text-caption text-grey")
            if len(versions) > 1:
                options = {"": "all model versions", **{v: f"model version {v}" for v in versions}}
                ui.select(options, value=self.stats_version or "", on_change=self.choose_version).props(
                    "dense outlined"
                ).classes("min-w-[200px]")
            ui.button(
                "Download labelled drawings", icon="download", on_click=lambda: ui.download("/api/export")
            ).props("outline")
        with ui.row().classes("w-full gap-6 no-wrap max-md:flex-wrap"):
            with ui.column().classes("grow min-w-[280px]"):
                ui.label("Accuracy per true digit").classes("text-subtitle2")
                ui.echart(views.per_digit_chart(per_digit_accuracy(shown))).classes("w-full h-48")
            with ui.column().classes("grow min-w-[280px]"):
                ui.label("Confusion matrix (rows: true, columns: predicted)").classes("text-subtitle2")
                ui.echart(views.confusion_chart(shown["confusion"])).classes("w-full h-80")
        if versions:
            ui.label("Per model version").classes("text-subtitle2")
            ui.table(
                columns=[
                    {"name": "version", "label": "version", "field": "version", "align": "left"},
                    {"name": "total", "label": "predictions", "field": "total"},
                    {"name": "labelled", "label": "labelled", "field": "labelled"},
                    {"name": "accuracy", "label": "accuracy", "field": "accuracy"},
                ],
                rows=[
                    {
                        "version": name,
                        "total": v["total"],
                        "labelled": v["labelled"],
                        "accuracy": views.percent(v["accuracy"]),
                    }
                    for name, v in versions.items()
                ],
            ).props("dense flat")


def history_item(row: Any) -> dict[str, Any]:
    """A stored row or a waiting `Outcome` as what a history line shows."""
    if isinstance(row, Outcome):
        return {
            "time": row.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            "thumbnail": views.png_data_url(row.image_png),
            "digit": row.prediction.digit,
            "confidence": row.prediction.confidence,
            "label": row.label,
            "stored": False,
        }
    return {
        "time": row.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        "thumbnail": f"/api/predictions/{row.id}/image.png",
        "digit": row.digit,
        "confidence": row.confidence,
        "label": row.true_label,
        "stored": True,
    }


def per_digit_accuracy(stats: dict[str, Any]) -> list[float | None]:
    """Accuracy per true digit from the statistics, None where a digit has no label yet."""
    return [entry.get("accuracy") for entry in stats["per_digit"]]
