"""What every page of the app shares: theme, header (title, API link, light/dark), touch and focus rules,
the one-at-a-time toast, the "reconnecting" banner, and the person's remembered choices.

A second page (the operator page) calls `page_frame` too, so the pages look and behave alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from nicegui import app, ui

APP_TITLE = "Digit classifier"

# No double-tap zoom on controls: a tap right after a stroke must be a click, not a zoom gesture.
TOUCH_CSS = "button, .q-btn, .q-toggle, .q-tab { touch-action: manipulation; }"
# Buttons and switches lose focus after a mouse click, so that Enter and the digit keys go to the
# page's shortcuts (a focused switch would take Enter for itself and toggle).
BLUR_AFTER_CLICK = """<script>
document.addEventListener('click', e => {
  const a = document.activeElement;
  if (e.detail > 0 && a && a.closest && a.closest('button, .q-toggle, .q-tab')) a.blur();
});
</script>"""
# NiceGUI's own "connection lost" popup (#popup, shown while the server is away) is a faint box in a
# corner; made a clear banner across the top. What is drawn meanwhile stays (canvas.js keeps the
# strokes in the tab's sessionStorage, across the automatic reload after a server restart).
RECONNECT_CSS = """
#popup.nicegui-error-popup {
  top: 0; bottom: auto; left: 0; right: 0; margin: 0; padding: 0.6em 1em; border: 0; border-radius: 0;
  flex-direction: row; flex-wrap: wrap; justify-content: center; align-items: center; gap: 0.5em;
  background: #ffb300; color: #000; z-index: 10000; font-weight: 500;
  box-shadow: 0 2px 6px rgba(0, 0, 0, 0.35);
}
#popup.nicegui-error-popup::before {
  content: ""; width: 1em; height: 1em; border: 2px solid #000; border-top-color: transparent;
  border-radius: 50%; animation: reconnect-spin 1s linear infinite;
}
#popup.nicegui-error-popup::after { content: "Your drawing is kept."; }
#popup.nicegui-error-popup[aria-hidden="false"] { transition-delay: 1000ms; }
@keyframes reconnect-spin { to { transform: rotate(360deg); } }
"""
# Charts are drawn on a canvas, which Quasar's dark mode does not reach: in dark mode they are
# inverted (hue kept), so axes, counts and the heatmap's scale read light on dark.
DARK_CHARTS_CSS = ".body--dark .chart canvas { filter: invert(1) hue-rotate(180deg); }"
TOAST_CSS = """
.toast {
  position: fixed; left: 50%; bottom: 16px; transform: translateX(-50%); z-index: 9000;
  max-width: min(92vw, 560px); padding: 10px 16px; border-radius: 6px;
  box-shadow: 0 3px 10px rgba(0, 0, 0, 0.3); font-size: 0.95rem;
}
.toast-positive { background: #1b5e20; color: #fff; }
.toast-info { background: #263238; color: #fff; }
.toast-warning { background: #ffe082; color: #000; }
.toast-negative { background: #b71c1c; color: #fff; }
"""

E = TypeVar("E", bound=ui.element)
ToastKind = Literal["positive", "info", "warning", "negative"]
TOAST_SECONDS: dict[ToastKind, float] = {"positive": 3.0, "info": 4.0, "warning": 6.0, "negative": 8.0}


def tag(element: E, name: str) -> E:
    """Name an element for the tests: `data-testid` for the browser, a marker for the simulated user."""
    element.props(f"data-testid={name}")
    return element.mark(name)


class Toast:
    """One message at a time at the bottom of the page: a new one replaces the last (no pile, no badge)."""

    def __init__(self) -> None:
        self.label = tag(ui.label(), "toast").classes("toast").props("role=status aria-live=polite")
        self.label.set_visibility(False)
        self.kind: ToastKind = "info"
        self._hide: asyncio.TimerHandle | None = None

    @property
    def text(self) -> str:
        return self.label.text if self.label.visible else ""

    def show(self, message: str, kind: ToastKind = "info") -> None:
        self.label.classes(remove=f"toast-{self.kind}", add=f"toast-{kind}")
        self.kind = kind
        self.label.set_text(message)
        self.label.set_visibility(True)
        if self._hide is not None:
            self._hide.cancel()
        self._hide = asyncio.get_running_loop().call_later(TOAST_SECONDS[kind], self.hide)

    def hide(self) -> None:
        self._hide = None
        if not self.label.is_deleted:
            self.label.set_visibility(False)


@dataclass(frozen=True)
class Frame:
    """The shared parts of a page; `actions` is the header's right-hand row, for a page's own links.

    `prefs` is the person's remembered choices (`app.storage.user`: kept on the server per browser,
    across reloads and tabs), e.g. `dark` (None: follow the system) and the page's own.
    """

    dark: ui.dark_mode
    actions: ui.row
    toast: Toast
    prefs: MutableMapping[str, Any]

    def toggle_dark(self) -> None:
        self.dark.set_value(not self.dark.value)
        self.prefs["dark"] = self.dark.value


def user_prefs() -> MutableMapping[str, Any]:
    """This browser's remembered choices (call in a page's context: it needs the request)."""
    return app.storage.user


def page_frame(title: str = APP_TITLE) -> Frame:
    """Theme and header of a page (call first, in the page's context)."""
    ui.add_body_html(BLUR_AFTER_CLICK)
    ui.add_css(TOUCH_CSS + RECONNECT_CSS + DARK_CHARTS_CSS + TOAST_CSS)
    prefs = user_prefs()
    remembered = prefs.get("dark")
    dark = ui.dark_mode(remembered if isinstance(remembered, bool) else None)  # None: the system's
    with ui.header().classes("items-center justify-between bg-primary py-1 px-3"):
        ui.label(title).classes("text-h6")
        actions = ui.row().classes("items-center gap-1")
    frame = Frame(dark, actions, Toast(), prefs)
    with actions:
        ui.link("API", "/docs", new_tab=True).classes("text-white")
        tag(ui.button(icon="contrast", on_click=frame.toggle_dark), "dark").props(
            "flat round color=white aria-label='Light / dark'"
        ).tooltip("Light / dark")
    return frame
