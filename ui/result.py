"""The result panel: digit, confidence, unsure hint, bars, the 28x28 the model saw, and the 0-9 feedback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nicegui import ui

from . import views
from .frame import tag
from .inference import Prediction
from .service import Outcome

PLACEHOLDER = "Draw a digit and press Predict."
DB_DOWN = "Not saved yet: the database is unreachable. It is kept and saved automatically when it is back."
PREVIEW_STATUS = "live preview: press Predict to keep it"
CHANGED_STATUS = "the drawing changed: press Predict for a new answer"


def status_text(outcome: Outcome, saving: bool) -> str:
    """What the status line says about a kept prediction and its label."""
    if saving:
        return "saving ..."
    if not outcome.stored:
        return "not saved yet"
    text = f"saved as #{outcome.id}"
    if outcome.label is not None:
        text += f", true label {outcome.label}" + ("" if outcome.label_stored else " (not saved yet)")
    return text


def waits_for_database(outcome: Outcome) -> bool:
    """True while the prediction, or the label given to it, is not stored yet."""
    return not outcome.stored or (outcome.label is not None and not outcome.label_stored)


class ResultPanel:
    """Builds the panel in the current context; `on_select(digit)` and `on_submit()` are the page's."""

    def __init__(self, *, on_select: Callable[[int], None], on_submit: Callable[[], Awaitable[None]]) -> None:
        self.placeholder = ui.label(PLACEHOLDER).classes("text-grey")
        self.result = tag(ui.column(), "result").classes("w-full")
        self.result.set_visibility(False)
        with self.result:
            with ui.row().classes("items-center gap-6 w-full"):
                self.digit = tag(ui.label(), "digit").classes("text-8xl font-bold")
                with ui.column().classes("gap-1"):
                    self.confidence = tag(ui.label(), "confidence").classes("text-h6")
                    self.hint = tag(ui.label(), "hint").classes("text-warning")
                    self.status = tag(ui.label(), "status").classes("text-caption")
                ui.space()
                with ui.column().classes("items-center gap-0"):
                    self.input_image = ui.image().props('alt="what the model saw" no-spinner no-transition')
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
                        tag(ui.button(str(d), on_click=lambda d=d: on_select(d)), f"label-{d}")
                        .props("dense outline")
                        .classes("w-10")
                        for d in range(10)
                    ]
                    tag(ui.button("Submit", icon="check", on_click=on_submit), "submit")
        self.db_warning = tag(ui.label(DB_DOWN), "db-warning").props("role=status")
        self.db_warning.classes("w-full p-2 rounded bg-warning text-black")
        self.db_warning.set_visibility(False)

    def show_prediction(self, prediction: Prediction, *, preview: bool) -> None:
        """The model's answer; a preview hides the feedback (nothing is kept yet)."""
        self.placeholder.set_visibility(False)
        self.result.set_visibility(True)
        self.digit.set_text(str(prediction.digit))
        self.confidence.set_text(f"{views.percent(prediction.confidence)} sure")
        self.hint.set_text(views.unsure_hint(prediction.probabilities) or "")
        self.input_image.set_source(views.pixels_data_url(prediction.input))
        self.chart.options.clear()
        self.chart.options.update(views.probability_chart(prediction.probabilities, prediction.digit))
        self.chart.update()
        if preview:
            self.status.set_text(PREVIEW_STATUS)
            self.feedback.set_visibility(False)
            self.db_warning.set_visibility(False)

    def show_outcome(self, outcome: Outcome | None, selected: int | None, *, saving: bool) -> None:
        """The feedback buttons (the selected digit highlighted) and the saved / not-saved status."""
        self.feedback.set_visibility(outcome is not None)
        if outcome is None:
            self.db_warning.set_visibility(False)
            return
        for digit, button in enumerate(self.label_buttons):
            button.props(remove="outline unelevated")
            button.props("unelevated color=primary" if digit == selected else "outline")
        self.db_warning.set_visibility(waits_for_database(outcome) and not saving)
        self.status.set_text(status_text(outcome, saving))

    def set_status(self, text: str) -> None:
        self.status.set_text(text)

    def reset(self) -> None:
        """Back to the placeholder (an empty canvas)."""
        self.status.set_text("")
        self.placeholder.set_visibility(True)
        self.result.set_visibility(False)
        self.db_warning.set_visibility(False)
