"""What every page of the app shares: theme, header (title, API link, light/dark), touch and focus rules.

A second page (the operator page) calls `page_frame` too, so the pages look and behave alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from nicegui import ui

APP_TITLE = "Digit classifier"

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


@dataclass(frozen=True)
class Frame:
    """The shared parts of a page; `actions` is the header's right-hand row, for a page's own links."""

    dark: ui.dark_mode
    actions: ui.row

    def toggle_dark(self) -> None:
        self.dark.set_value(not self.dark.value)


def page_frame(title: str = APP_TITLE) -> Frame:
    """Theme and header of a page (call first, in the page's context)."""
    ui.add_body_html(BLUR_AFTER_CLICK)
    ui.add_css(TOUCH_CSS)
    dark = ui.dark_mode(None)  # None: follow the system's setting until the person picks one
    with ui.header().classes("items-center justify-between bg-primary"):
        ui.label(title).classes("text-h6")
        actions = ui.row().classes("items-center gap-1")
    frame = Frame(dark, actions)
    with actions:
        ui.link("API", "/docs", new_tab=True).classes("text-white")
        ui.button(icon="contrast", on_click=frame.toggle_dark).props("flat round color=white").tooltip(
            "Light / dark"
        )
    return frame
