"""The result panel: digit, confidence, unsure hint, the label bar, then the bars and the 28x28 the model saw.

The label bar is an explicit choice: "Right", the ten digits ("it was ..."), "Not a digit"; nothing is
pre-selected and nothing is recorded until the person picks. Its three parts carry `area-*` classes
so that on a phone the label bar sits right under the canvas, before the bars (`page.LAYOUT_CSS`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nicegui import ui

from . import views
from .frame import tag
from .inference import Prediction
from .service import Outcome

PLACEHOLDER = "Draw a digit and press Predict."
DB_DOWN = "Not saved yet: the database is unreachable. It is kept and saved automatically when it is back."
PREVIEW_STATUS = "live preview: press Predict to keep it"
CHANGED_STATUS = "the drawing changed: press Predict for a new answer"
HINT_STYLE = (
    f"color: {views.HINT_TEXT}; background: {views.HINT_BACKGROUND}; padding: 1px 6px; border-radius: 4px"
)


@dataclass(frozen=True)
class Choice:
    """What the person says the drawing is: a digit, or not a digit at all (`label` None)."""

    label: int | None

    @property
    def not_a_digit(self) -> bool:
        return self.label is None


NOT_A_DIGIT = Choice(None)


def choice_of(outcome: Outcome) -> Choice | None:
    """The choice recorded for an outcome so far (None: none yet)."""
    if outcome.not_a_digit:
        return NOT_A_DIGIT
    return None if outcome.label is None else Choice(outcome.label)


def choice_text(choice: Choice, predicted: int) -> str:
    """'it was a 6 (the model was wrong)', 'not a digit'."""
    if choice.label is None:
        return "not a digit"
    verdict = "right" if choice.label == predicted else "wrong"
    return f"it was a {choice.label} (the model was {verdict})"


def label_message(choice: Choice, predicted: int, stored: bool) -> str:
    """The toast after a label: saved, or kept until the database is back."""
    if stored:
        return f"Saved: {choice_text(choice, predicted)}."
    what = "'Not a digit'" if choice.label is None else f"Label {choice.label}"
    return f"{what} kept; it is saved when the database is back."


def status_text(outcome: Outcome, saving: bool) -> str:
    """What the status line says about a kept prediction and its label."""
    if saving:
        return "saving ..."
    if not outcome.stored:
        return "not saved yet"
    text = f"saved as #{outcome.id}"
    if outcome.labelled:
        text += ", not a digit" if outcome.not_a_digit else f", true label {outcome.label}"
        text += "" if outcome.label_stored else " (not saved yet)"
    return text


def waits_for_database(outcome: Outcome) -> bool:
    """True while the prediction, or the label given to it, is not stored yet."""
    return not outcome.stored or (outcome.labelled and not outcome.label_stored)


def highlight(button: ui.button, chosen: bool, colour: str = "primary") -> None:
    button.props(remove="outline unelevated color")
    button.props(f"unelevated color={colour}" if chosen else f"outline color={colour}")


class ResultPanel:
    """Builds the panel in the current context (a column of the page's layout).

    `on_choose(choice)` selects (records nothing); `on_submit()` records the selected choice;
    `on_submit_next()` records it and clears the canvas for the next drawing.
    """

    def __init__(
        self,
        *,
        on_choose: Callable[[Choice], None],
        on_submit: Callable[[], Awaitable[object]],
        on_submit_next: Callable[[], Awaitable[None]],
    ) -> None:
        self.predicted: int | None = None
        with ui.column().classes("area-result w-full gap-1"):
            self.placeholder = ui.label(PLACEHOLDER).classes("text-grey")
            self.result = tag(ui.row(), "result").classes("w-full items-center gap-4 no-wrap")
            self.result.set_visibility(False)
            with self.result:
                self.digit = tag(ui.label(), "digit").classes("text-6xl font-bold leading-none")
                with ui.column().classes("gap-0 min-w-0"):
                    self.confidence = tag(ui.label(), "confidence").classes("text-h6 leading-tight")
                    self.hint = tag(ui.label(), "hint").classes("text-body2").style(HINT_STYLE)
                    self.status = tag(ui.label(), "status").classes("text-caption")
            self.db_warning = tag(ui.label(DB_DOWN), "db-warning").props("role=status")
            self.db_warning.classes("w-full p-2 rounded bg-warning text-black")
            self.db_warning.set_visibility(False)
        self.feedback = tag(ui.column(), "label-bar").classes("area-labels w-full gap-1")
        with self.feedback:
            with ui.row().classes("w-full gap-1 no-wrap"):
                self.right = tag(ui.button(on_click=self._choose_right), "right").classes("grow")
                self.right.props("no-caps icon=check")
                self.not_a_digit = tag(
                    ui.button("Not a digit", on_click=lambda: on_choose(NOT_A_DIGIT)), "not-a-digit"
                )
                self.not_a_digit.props("no-caps icon=block")
            ui.label("Wrong? It was:").classes("text-caption")
            with ui.element("div").classes("w-full grid grid-cols-10 gap-1"):
                self.label_buttons = [
                    tag(ui.button(str(d), on_click=lambda d=d: on_choose(Choice(d))), f"label-{d}")
                    .props("padding='8px 0'")
                    .classes("min-w-0")
                    for d in range(10)
                ]
            with ui.row().classes("w-full gap-1 no-wrap"):
                self.submit = tag(ui.button("Submit", icon="check", on_click=on_submit), "submit")
                self.submit.props("no-caps outline")
                self.submit_next = tag(
                    ui.button("Submit & next", icon="skip_next", on_click=on_submit_next), "submit-next"
                ).classes("grow")
                self.submit_next.props("no-caps")
        self.feedback.set_visibility(False)
        self._on_choose = on_choose
        self.details = ui.row().classes("area-details w-full gap-4 items-start no-wrap")
        self.details.set_visibility(False)
        with self.details:
            with ui.column().classes("grow gap-0 min-w-0"):
                self.top = tag(ui.label(), "top-guesses").classes("text-body2")
                self.chart = ui.echart(views.probability_chart([0.0] * 10, 0)).classes("chart w-full h-36")
            with ui.column().classes("items-center gap-0 shrink-0"):
                self.input_image = ui.image().props('alt="what the model saw" no-spinner no-transition')
                self.input_image.style(
                    "width: 84px; height: 84px; image-rendering: pixelated; border-radius: 4px"
                )
                ui.label("what the model saw").classes("text-caption text-grey")

    def _choose_right(self) -> None:
        if self.predicted is not None:
            self._on_choose(Choice(self.predicted))

    def show_prediction(self, prediction: Prediction, *, preview: bool) -> None:
        """The model's answer; a preview hides the label bar (nothing is kept yet)."""
        self.predicted = prediction.digit
        self.placeholder.set_visibility(False)
        self.result.set_visibility(True)
        self.details.set_visibility(True)
        if prediction.is_digit is False:  # the handler's "not a digit" head: no confident digit shown
            self.digit.set_text("?")
            guess = f"best guess {prediction.digit}, {views.percent(prediction.confidence)}"
            self.confidence.set_text(f"{views.NOT_A_DIGIT_TEXT} ({guess})")
        else:
            self.digit.set_text(str(prediction.digit))
            self.confidence.set_text(f"{views.percent(prediction.confidence)} sure")
        hint = None if prediction.is_digit is False else views.unsure_hint(prediction.probabilities)
        self.hint.set_text(hint or "")
        self.hint.set_visibility(hint is not None)
        self.right.set_text(f"Right, it is a {prediction.digit}")
        self.top.set_text(views.top_guesses(prediction.probabilities))
        if prediction.input:
            self.input_image.set_source(views.pixels_data_url(prediction.input))
        self.chart.options.clear()
        self.chart.options.update(views.probability_chart(prediction.probabilities, prediction.digit))
        self.chart.update()
        if preview:
            self.status.set_text(PREVIEW_STATUS)
            self.feedback.set_visibility(False)
            self.db_warning.set_visibility(False)

    def show_outcome(self, outcome: Outcome | None, choice: Choice | None, *, saving: bool) -> None:
        """The label bar (the chosen answer highlighted; none before the person picks) and the status."""
        self.feedback.set_visibility(outcome is not None)
        if outcome is None:
            self.db_warning.set_visibility(False)
            return
        predicted = outcome.prediction.digit
        # green-8, not Quasar's brighter "positive": readable as outline text on light and on dark
        highlight(self.right, choice is not None and choice.label == predicted, "green-8")
        highlight(self.not_a_digit, choice is not None and choice.not_a_digit)
        for digit, button in enumerate(self.label_buttons):
            highlight(button, choice is not None and choice.label == digit)
        self.submit.set_enabled(choice is not None)
        self.submit_next.set_enabled(choice is not None)
        self.db_warning.set_visibility(waits_for_database(outcome) and not saving)
        self.status.set_text(status_text(outcome, saving))

    def set_status(self, text: str) -> None:
        self.status.set_text(text)

    def reset(self) -> None:
        """Back to the placeholder (an empty canvas)."""
        self.predicted = None
        self.status.set_text("")
        self.placeholder.set_visibility(True)
        self.result.set_visibility(False)
        self.details.set_visibility(False)
        self.feedback.set_visibility(False)
        self.db_warning.set_visibility(False)
