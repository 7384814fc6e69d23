"""The drawing panel: the canvas, Undo / Clear / Upload / Predict, and the options (live preview, keys).

No logic of its own: the page decides what the buttons do. Each part carries an `area-*` class, so
the page's layout can put the options after the result on a phone (see `page.LAYOUT_CSS`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nicegui import ui
from nicegui.events import UploadEventArguments, ValueChangeEventArguments

from .canvas import ChangeHandler, DigitCanvas
from .frame import tag
from .upload import PageUpload

KEYS_HINT = (
    "Keys: Enter predicts. Then one key saves the label and clears for the next drawing: "
    "R right, 0-9 it was that digit, N not a digit. "
    "Enter saves a choice you clicked (nothing without one). Backspace or Ctrl+Z undo, Esc clears."
)
IMAGE_TYPES = "image/png,image/jpeg,image/webp"  # what the API takes too


class DrawingPanel:
    """Builds the panel in the current context (a column of the page's layout)."""

    def __init__(
        self,
        *,
        on_change: ChangeHandler,
        on_undo: Callable[[], None],
        on_clear: Callable[[], None],
        on_predict: Callable[[], Awaitable[None]],
        on_upload: Callable[[bytes | None, int], Awaitable[None]],
        live: bool,
        on_live: Callable[[bool], None],
        max_upload_bytes: int | None = None,
    ) -> None:
        """`on_upload(data, size)`: a file was chosen; `data` is None when it is over `max_upload_bytes`."""
        self.max_upload_bytes = max_upload_bytes
        with ui.column().classes("area-canvas w-full gap-1"):
            ui.label("Draw a digit").classes("text-subtitle1 max-md:hidden")
            self.canvas = DigitCanvas(on_change=on_change).classes("w-full")
        with ui.row().classes("area-tools w-full gap-1 no-wrap items-center"):
            tag(ui.button("Undo", icon="undo", on_click=on_undo), "undo").props(
                "outline dense no-caps no-wrap"
            )
            tag(ui.button("Clear", icon="clear", on_click=on_clear), "clear").props(
                "outline dense no-caps no-wrap"
            )
            self.upload = tag(
                PageUpload(
                    on_upload=lambda e: self._uploaded(e, on_upload),
                    auto_upload=True,
                    max_file_size=max_upload_bytes,
                ),
                "upload",
            )
            self.upload.props(f"accept='{IMAGE_TYPES}'").classes("hidden")
            self.upload_button = tag(ui.button("Upload", icon="upload_file"), "upload-button")
            self.upload_button.props("outline dense no-caps no-wrap").tooltip("Predict an image file")
            # The file picker must open within the click itself (browsers refuse it later): in the browser.
            self.upload_button.on(
                "click", js_handler=f"() => getElement({self.upload.id}).$refs.qRef.pickFiles()"
            )
            ui.space()
            self.predict_button = tag(ui.button("Predict", icon="psychology", on_click=on_predict), "predict")
            self.predict_button.props("no-caps no-wrap")
        with ui.column().classes("area-options w-full gap-0"):
            self.live = tag(ui.switch("Predict as I draw", value=live), "live")
            self.live.on_value_change(lambda e: self._live_changed(e, on_live))
            ui.label(KEYS_HINT).classes("keys-hint text-caption text-grey")

    @property
    def live_preview(self) -> bool:
        """Whether a finished stroke asks the model at once."""
        return bool(self.live.value)

    @staticmethod
    def _live_changed(event: ValueChangeEventArguments[bool], on_live: Callable[[bool], None]) -> None:
        on_live(bool(event.value))

    async def _uploaded(
        self, event: UploadEventArguments, on_upload: Callable[[bytes | None, int], Awaitable[None]]
    ) -> None:
        self.upload.reset()  # the same file can be chosen again
        if self.max_upload_bytes is not None and event.file.size() > self.max_upload_bytes:
            await on_upload(None, event.file.size())  # refused before it is read into memory
            return
        data = await event.file.read()
        await on_upload(data, len(data))

    def set_busy(self, busy: bool) -> None:
        """Show Predict as loading while the model answers."""
        if busy:
            self.predict_button.props("loading")
        else:
            self.predict_button.props(remove="loading")
