"""The drawing panel: the canvas, Undo / Clear / Predict and the live-preview switch (no logic of its own)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nicegui import ui

from .canvas import ChangeHandler, DigitCanvas
from .frame import tag

KEYS_HINT = "Keys: 0-9 pick the true label, Enter submits, Esc clears."


class DrawingPanel:
    """Builds the panel in the current context; the page decides what the buttons do."""

    def __init__(
        self,
        *,
        on_change: ChangeHandler,
        on_undo: Callable[[], None],
        on_clear: Callable[[], None],
        on_predict: Callable[[], Awaitable[None]],
    ) -> None:
        with ui.card().classes("w-[320px] max-w-full shrink-0"):
            ui.label("Draw a digit").classes("text-subtitle1")
            self.canvas = DigitCanvas(on_change=on_change).classes("w-full")
            with ui.row().classes("w-full justify-between"):
                tag(ui.button("Undo", icon="undo", on_click=on_undo), "undo").props("outline")
                tag(ui.button("Clear", icon="clear", on_click=on_clear), "clear").props("outline")
                self.predict_button = tag(
                    ui.button("Predict", icon="psychology", on_click=on_predict), "predict"
                )
            self.live = tag(ui.switch("Predict as I draw", value=True), "live")
            ui.label(KEYS_HINT).classes("text-caption text-grey")

    @property
    def live_preview(self) -> bool:
        """Whether a finished stroke asks the model at once."""
        return bool(self.live.value)

    def set_busy(self, busy: bool) -> None:
        """Show Predict as loading while the model answers."""
        if busy:
            self.predict_button.props("loading")
        else:
            self.predict_button.props(remove="loading")
