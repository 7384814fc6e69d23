"""The history list: one line per drawing, newest first, with paging; rendered from rows it is given.

Every open tab re-renders it on each change, so lines are updated in place (a few changed texts go to
the browser) rather than rebuilt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from nicegui import ui

from db.records import PredictionRow

from . import views
from .frame import tag
from .service import Outcome

PAGE_SIZE = 10
UNAVAILABLE = "History is unavailable: the database is unreachable."
EMPTY = "No predictions yet."
LOADING = "Loading ..."


@dataclass(frozen=True)
class HistoryItem:
    """What one history line shows, for a stored row or a prediction still waiting for the database."""

    id: int | None  # None while waiting
    time: str
    thumbnail: str  # an image URL (stored rows) or a data URL (waiting ones)
    digit: int
    confidence: float
    label: int | None

    @property
    def stored(self) -> bool:
        return self.id is not None


def local_time(at: datetime) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def stored_item(row: PredictionRow) -> HistoryItem:
    return HistoryItem(
        id=row.id,
        time=local_time(row.created_at),
        thumbnail=image_url(row.id),
        digit=row.digit,
        confidence=row.confidence,
        label=row.true_label,
    )


def image_url(prediction_id: int) -> str:
    return f"/api/predictions/{prediction_id}/image.png"


def outcome_item(outcome: Outcome) -> HistoryItem:
    """A prediction the page holds: by its stored image once stored, else from the PNG in memory."""
    return HistoryItem(
        id=outcome.id,
        time=local_time(outcome.created_at),
        thumbnail=views.png_data_url(outcome.image_png) if outcome.id is None else image_url(outcome.id),
        digit=outcome.prediction.digit,
        confidence=outcome.prediction.confidence,
        label=outcome.label,
    )


def history_items(
    waiting: Sequence[Outcome], rows: Sequence[PredictionRow], own: Outcome | None = None
) -> list[HistoryItem]:
    """The first history page: the newest `PAGE_SIZE` waiting predictions (listed oldest first by the
    service) newest first, then the stored rows.

    `own` is the tab's own latest prediction: shown with its label at once, and on top when it is
    newer than the rows, so the tab that made a change does not wait for the next push to see it.
    """
    items = [stored_item(r) for r in rows]
    if own is not None and own.id is not None:
        ids = [r.id for r in rows]
        if own.id in ids:
            if own.label is not None:
                i = ids.index(own.id)
                items[i] = replace(items[i], label=own.label)
        elif not ids or own.id > ids[0]:
            items = [outcome_item(own), *items][: max(len(rows), PAGE_SIZE)]
    newest_waiting = [o for o in waiting if o.id is None][-PAGE_SIZE:]  # bounded: thousands may wait
    return [outcome_item(o) for o in reversed(newest_waiting)] + items


def older_cursor(items: Sequence[HistoryItem], full_page: bool) -> int | None:
    """The id to page on from (the last stored line), or None when there is no older page."""
    stored = [item.id for item in items if item.id is not None]
    return stored[-1] if full_page and stored else None


class HistoryLine:
    """One line's elements, refilled with `show`."""

    def __init__(self) -> None:
        with tag(ui.row(), "history-row").classes("items-center gap-4 w-full") as self.row:
            self.time = ui.label().classes("w-40 text-caption")
            self.thumbnail = ui.image().props("no-spinner no-transition")
            self.thumbnail.style("width: 36px; height: 36px; background: #000; border-radius: 4px")
            self.digit = ui.label().classes("w-24")
            self.confidence = ui.label().classes("w-20")
            self.label = ui.label().classes("w-16")
            self.verdict = ui.icon("check_circle")
            self.unsaved = ui.badge("not saved yet", color="warning")

    def show(self, item: HistoryItem) -> None:
        self.time.set_text(item.time)
        self.thumbnail.set_source(item.thumbnail)
        self.digit.set_text(f"predicted {item.digit}")
        self.confidence.set_text(views.percent(item.confidence))
        self.label.set_text("–" if item.label is None else f"true {item.label}")
        self.verdict.set_visibility(item.label is not None)
        if item.label is not None:
            right = item.label == item.digit
            self.verdict.set_name("check_circle" if right else "cancel")
            self.verdict.set_text_color("positive" if right else "negative")
        self.unsaved.set_visibility(not item.stored)


class HistoryPanel:
    """Builds the (empty) list in the current context; `show` fills it."""

    def __init__(
        self, *, on_older: Callable[[int], Awaitable[None]], on_newer: Callable[[], Awaitable[None]]
    ) -> None:
        self.older_than: int | None = None
        self.message = ui.label(LOADING).classes("text-grey")  # loading, then "no predictions yet"
        self.unavailable = ui.label(UNAVAILABLE).classes("text-negative")
        self.unavailable.set_visibility(False)
        self.list = tag(ui.column(), "history").classes("w-full gap-1")
        self.lines: list[HistoryLine] = []
        with ui.row().classes("items-center"):
            self.newer = ui.button("Newer", icon="chevron_left", on_click=on_newer).props("flat")
            self.older = ui.button("Older", icon="chevron_right", on_click=lambda: self._older(on_older))
            self.older.props("flat")
        self.newer.set_enabled(False)
        self.older.set_enabled(False)

    def show(
        self,
        items: Sequence[HistoryItem],
        *,
        unavailable: bool = False,
        older_than: int | None = None,
        newer: bool = False,
    ) -> None:
        """List `items`; `older_than`: the id the Older button pages from (None: no older page)."""
        self.unavailable.set_visibility(unavailable)
        self.message.set_text(EMPTY)
        self.message.set_visibility(not unavailable and not items)
        while len(self.lines) > len(items):
            self.lines.pop().row.delete()
        with self.list:
            while len(self.lines) < len(items):
                self.lines.append(HistoryLine())
        for line, item in zip(self.lines, items, strict=True):
            line.show(item)
        self.older_than = older_than
        self.newer.set_enabled(newer)
        self.older.set_enabled(older_than is not None)

    async def _older(self, on_older: Callable[[int], Awaitable[None]]) -> None:
        if self.older_than is not None:
            await on_older(self.older_than)
