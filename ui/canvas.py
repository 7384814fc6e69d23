"""`DigitCanvas`: a NiceGUI element to draw one digit with a mouse, a pen or a finger (see canvas.js)."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable

from nicegui import ui
from nicegui.events import GenericEventArguments

log = logging.getLogger(__name__)

DATA_URL_PREFIX = "data:image/png;base64,"


def decode_data_url(data_url: str | None) -> bytes | None:
    """PNG bytes from a `data:image/png;base64,...` URL; None for None; `ValueError` when malformed."""
    if data_url is None:
        return None
    if not data_url.startswith(DATA_URL_PREFIX):
        raise ValueError("not a PNG data URL")
    try:
        return base64.b64decode(data_url[len(DATA_URL_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64 in data URL: {exc}") from exc


ChangeHandler = Callable[["DigitCanvas"], Awaitable[None] | None]


class DigitCanvas(ui.element, component="canvas.js"):
    """Black square, round white strokes; keeps the latest drawing as PNG bytes in `png`.

    The browser sends the PNG after every finished stroke, undo and clear, so `png` is current when a
    button is clicked, with no extra round trip.
    """

    def __init__(self, size: int = 280, line_width: int = 20, on_change: ChangeHandler | None = None) -> None:
        super().__init__()
        self.props["size"] = size
        self.props["lineWidth"] = line_width
        self.png: bytes | None = None
        self.strokes = 0
        self._on_change = on_change
        self.on("change", self._handle_change, ["png", "strokes"])

    @property
    def empty(self) -> bool:
        return self.png is None

    async def _handle_change(self, event: GenericEventArguments) -> None:
        try:
            await self.receive(event.args.get("png"), int(event.args.get("strokes") or 0))
        except (ValueError, TypeError) as exc:  # not what canvas.js sends: ignore, keep the last drawing
            log.warning("ignored a malformed drawing from the browser: %s", exc)

    async def receive(self, data_url: str | None, strokes: int) -> None:
        """Take a drawing from the browser (the `change` event's payload); `ValueError` if malformed."""
        png = decode_data_url(data_url)
        self.png = png
        self.strokes = strokes if self.png is not None else 0
        if self._on_change is not None:
            result = self._on_change(self)
            if result is not None:
                await result

    def erase(self) -> None:
        """Wipe the drawing (at once on this side; the browser confirms with a `change`).

        Not `clear`: that is `Element.clear`, which removes child elements.
        """
        self.png = None
        self.strokes = 0
        self.run_method("clear")

    def undo(self) -> None:
        """Remove the last stroke; the browser sends the drawing that remains."""
        self.run_method("undo")
