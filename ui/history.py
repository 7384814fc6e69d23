"""The history list: one compact line per drawing, newest first, with filters, paging, edit and delete.

Rendered from rows it is given. Every open tab re-renders it on each change, so lines are updated in
place (a few changed texts go to the browser) rather than rebuilt. Edit and delete are offered on
the lines of the drawings this browser made (`OwnDrawings`: it holds their label tokens).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from nicegui import ui
from nicegui.events import ValueChangeEventArguments

from db.records import Only, PredictionRow

from . import views
from .frame import tag
from .result import NOT_A_DIGIT, Choice
from .service import Outcome

PAGE_SIZE = 10
UNAVAILABLE = "History is unavailable: the database is unreachable."
EMPTY = "No predictions yet."
LOADING = "Loading ..."
FILTERS: dict[Only, str] = {
    "all": "All",
    "wrong": "Wrong",
    "unlabelled": "Unlabelled",
    "not_a_digit": "Not a digit",
}
EMPTY_FILTERED: dict[Only, str] = {
    "all": EMPTY,
    "wrong": "No wrong predictions.",
    "unlabelled": "No unlabelled predictions.",
    "not_a_digit": "No drawings marked as not a digit.",
}
OWN_LIMIT = 1000  # label tokens kept per browser: the newest drawings stay editable


@dataclass(frozen=True)
class HistoryItem:
    """What one history line shows, for a stored row or a prediction still waiting for the database."""

    id: int | None  # None while waiting
    time: str
    thumbnail: str  # an image URL (stored rows) or a data URL (waiting ones)
    digit: int
    confidence: float
    label: int | None
    not_a_digit: bool = False
    top: str = ""  # the best three guesses as text
    key: str | None = None  # the outcome's key while waiting (rows are known by id)
    own: bool = False  # made in this browser: it may edit and delete it

    @property
    def stored(self) -> bool:
        return self.id is not None

    @property
    def labelled(self) -> bool:
        return self.label is not None or self.not_a_digit


ImageUrl = Callable[[int], str]  # a stored drawing's (signed) image URL: `UrlSigner.image_url`


def stored_item(row: PredictionRow, image_url: ImageUrl, now: datetime | None = None) -> HistoryItem:
    return HistoryItem(
        id=row.id,
        time=views.short_time(row.created_at, now or datetime.now(UTC)),
        thumbnail=image_url(row.id),
        digit=row.digit,
        confidence=row.confidence,
        label=row.true_label,
        not_a_digit=row.not_a_digit,
        top=views.top_guesses(row.probabilities),
    )


def outcome_item(outcome: Outcome, image_url: ImageUrl, now: datetime | None = None) -> HistoryItem:
    """A prediction the page holds: by its stored image once stored, else from the PNG in memory."""
    return HistoryItem(
        id=outcome.id,
        time=views.short_time(outcome.created_at, now or datetime.now(UTC)),
        thumbnail=views.png_data_url(outcome.image_png) if outcome.id is None else image_url(outcome.id),
        digit=outcome.prediction.digit,
        confidence=outcome.prediction.confidence,
        label=outcome.label,
        not_a_digit=outcome.not_a_digit,
        top=views.top_guesses(outcome.prediction.probabilities),
        key=outcome.key if outcome.id is None else None,
    )


def history_items(
    waiting: Sequence[Outcome], rows: Sequence[PredictionRow], image_url: ImageUrl, own: Outcome | None = None
) -> list[HistoryItem]:
    """The first history page: the newest `PAGE_SIZE` waiting predictions (listed oldest first by the
    service) newest first, then the stored rows.

    `own` is the tab's own latest prediction: shown with its label at once, and on top when it is
    newer than the rows, so the tab that made a change does not wait for the next push to see it.
    """
    items = [stored_item(r, image_url) for r in rows]
    if own is not None and own.id is not None:
        ids = [r.id for r in rows]
        if own.id in ids:
            if own.labelled:
                i = ids.index(own.id)
                items[i] = replace(items[i], label=own.label, not_a_digit=own.not_a_digit)
        elif not ids or own.id > ids[0]:
            items = [outcome_item(own, image_url), *items][: max(len(rows), PAGE_SIZE)]
    newest_waiting = [o for o in waiting if o.id is None][-PAGE_SIZE:]  # bounded: thousands may wait
    return [outcome_item(o, image_url) for o in reversed(newest_waiting)] + items


def older_cursor(items: Sequence[HistoryItem], full_page: bool) -> int | None:
    """The id to page on from (the last stored line), or None when there is no older page."""
    stored = [item.id for item in items if item.id is not None]
    return stored[-1] if full_page and stored else None


@dataclass(frozen=True)
class Edit:
    """A change this tab made to a row (relabelled or deleted), laid over the pushed history until a
    snapshot loaded after it (`version` = the service's version once made) shows it."""

    version: int
    label: int | None = None
    not_a_digit: bool = False
    deleted: bool = False


def apply_edits(items: Sequence[HistoryItem], edits: Mapping[int, Edit]) -> list[HistoryItem]:
    """The items with this tab's recent edits laid over them (deleted rows left out)."""
    out = []
    for item in items:
        edit = edits.get(item.id) if item.id is not None else None
        if edit is None:
            out.append(item)
        elif not edit.deleted:
            out.append(replace(item, label=edit.label, not_a_digit=edit.not_a_digit))
    return out


def mark_own(items: Iterable[HistoryItem], ids: Collection[int], keys: Collection[str]) -> list[HistoryItem]:
    """The items with `own` set for the drawings made in this browser (by id, or by key while waiting)."""
    return [
        replace(item, own=(item.id in ids) if item.id is not None else (item.key in keys)) for item in items
    ]


class OwnDrawings:
    """The label tokens of the drawings made in this browser: what lets it edit and delete them.

    Kept in `app.storage.user` (server-side, per browser): the tokens survive reloads (also the
    automatic one after a reconnect) and are shared by the person's tabs, yet never reach the
    browser itself. A prediction still waiting for the database is known by its key until stored.
    At most `limit` drawings are kept, the newest.
    """

    def __init__(self, storage: MutableMapping[str, Any], limit: int = OWN_LIMIT) -> None:
        self.storage = storage
        self.limit = limit

    def _map(self, name: str) -> dict[str, str]:
        found = self.storage.get(name)
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, Mapping) else {}

    def _save(self, name: str, entries: dict[str, str]) -> None:
        self.storage[name] = dict(list(entries.items())[-self.limit :])  # assigned: the storage persists it

    @property
    def ids(self) -> set[int]:
        return {int(k) for k in self._map("drawings") if k.isdigit()}

    @property
    def waiting_keys(self) -> set[str]:
        return set(self._map("waiting_drawings"))

    def token(self, prediction_id: int) -> str | None:
        return self._map("drawings").get(str(prediction_id))

    def remember(self, outcome: Outcome) -> None:
        """A prediction made here (stored or waiting)."""
        if outcome.id is None:
            waiting = self._map("waiting_drawings")
            waiting[outcome.key] = outcome.label_token
            self._save("waiting_drawings", waiting)
        else:
            self.settle([outcome])

    def settle(self, outcomes: Iterable[Outcome]) -> None:
        """Outcomes made here that are stored now: known by id from here on."""
        stored = [o for o in outcomes if o.id is not None]
        if not stored:
            return
        drawings, waiting = self._map("drawings"), self._map("waiting_drawings")
        for outcome in stored:
            drawings.pop(str(outcome.id), None)
            drawings[str(outcome.id)] = outcome.label_token  # moved to the end: the newest
            waiting.pop(outcome.key, None)
        self._save("drawings", drawings)
        self._save("waiting_drawings", waiting)

    def drop_keys(self, keys: Collection[str]) -> None:
        """Forget waiting keys that can no longer be followed (stored while no tab held them)."""
        waiting = self._map("waiting_drawings")
        if any(k in waiting for k in keys):
            self._save("waiting_drawings", {k: v for k, v in waiting.items() if k not in keys})

    def forget(self, prediction_id: int) -> None:
        drawings = self._map("drawings")
        if drawings.pop(str(prediction_id), None) is not None:
            self._save("drawings", drawings)


def label_text(item: HistoryItem) -> str:
    if item.not_a_digit:
        return "not a digit"
    return "–" if item.label is None else f"true {item.label}"


class HistoryLine:
    """One line's elements, refilled with `show`."""

    def __init__(
        self, on_edit: Callable[[HistoryItem], None], on_delete: Callable[[HistoryItem], None]
    ) -> None:
        self.item: HistoryItem | None = None
        with tag(ui.row(), "history-row").classes(
            "history-row items-center gap-2 sm:gap-4 w-full no-wrap"
        ) as self.row:
            self.thumbnail = ui.image().props("no-spinner no-transition").classes("shrink-0")
            self.thumbnail.style("width: 36px; height: 36px; background: #000; border-radius: 4px")
            with ui.column().classes("gap-0 w-[64px] sm:w-[96px] shrink-0"):
                self.id = tag(ui.label(), "history-id").classes("text-body2 font-medium")
                self.time = ui.label().classes("text-caption text-grey-7 whitespace-nowrap")
            with ui.column().classes("gap-0 w-[84px] shrink-0"):
                self.digit = ui.label().classes("text-body2 whitespace-nowrap")
                self.confidence = ui.label().classes("text-caption text-grey-7")
            with ui.row().classes("gap-1 items-center no-wrap w-[96px] shrink-0"):
                self.verdict = ui.icon("check_circle", size="20px")
                self.label = ui.label().classes("text-body2 whitespace-nowrap")
            self.top = tag(ui.label(), "history-top").classes("text-caption text-grey-7 max-sm:hidden")
            self.unsaved = ui.badge("not saved yet", color="warning").classes("text-black")
            ui.space()
            self.edit = tag(ui.button(icon="edit", on_click=lambda: self._call(on_edit)), "history-edit")
            self.edit.props("flat round dense size=sm aria-label='Change the label'").tooltip(
                "Change the label"
            )
            self.delete = tag(
                ui.button(icon="delete", on_click=lambda: self._call(on_delete)), "history-delete"
            )
            self.delete.props("flat round dense size=sm aria-label='Delete'").tooltip("Delete this drawing")

    def _call(self, fn: Callable[[HistoryItem], None]) -> None:
        if self.item is not None and self.item.own:
            fn(self.item)

    def show(self, item: HistoryItem) -> None:
        self.item = item
        self.row.mark(
            "history-row", f"history-row-{item.id}" if item.id is not None else "history-row-waiting"
        )
        self.id.set_text("waiting" if item.id is None else f"#{item.id}")
        self.time.set_text(item.time)
        self.thumbnail.set_source(item.thumbnail)
        self.digit.set_text(f"predicted {item.digit}")
        self.confidence.set_text(views.percent(item.confidence))
        self.label.set_text(label_text(item))
        self.verdict.set_visibility(item.labelled)
        if item.not_a_digit:
            self.verdict.set_name("block")
            self.verdict.set_text_color("grey")
        elif item.label is not None:
            right = item.label == item.digit
            self.verdict.set_name("check_circle" if right else "cancel")
            self.verdict.set_text_color("positive" if right else "negative")
        self.top.set_text(item.top)
        self.unsaved.set_visibility(not item.stored)
        self.edit.set_visibility(item.own)
        self.delete.set_visibility(item.own and item.stored)


class EditDialog:
    """Change the label of one of the person's drawings: the same explicit choice as the label bar."""

    def __init__(self, on_label: Callable[[HistoryItem, Choice], Awaitable[None]]) -> None:
        self.item: HistoryItem | None = None
        self._on_label = on_label
        with ui.dialog() as self.dialog, ui.card().classes("gap-2"):
            self.title = ui.label().classes("text-subtitle1")
            with ui.row().classes("w-full gap-1 no-wrap"):
                self.right = tag(ui.button(icon="check", on_click=self._right), "edit-right").classes("grow")
                self.right.props("no-caps color=green-8")
                tag(
                    ui.button("Not a digit", icon="block", on_click=lambda: self._pick(NOT_A_DIGIT)),
                    "edit-not-a-digit",
                ).props("no-caps outline")
            ui.label("It was:").classes("text-caption")
            with ui.element("div").classes("w-full grid grid-cols-5 gap-1"):
                for d in range(10):
                    tag(ui.button(str(d), on_click=lambda d=d: self._pick(Choice(d))), f"edit-{d}").props(
                        "outline"
                    )
            ui.button("Cancel", on_click=self.dialog.close).props("flat no-caps")

    def open(self, item: HistoryItem) -> None:
        self.item = item
        self.title.set_text(
            f"Drawing {'#' + str(item.id) if item.id else '(waiting)'}: predicted {item.digit}"
        )
        self.right.set_text(f"Right, it is a {item.digit}")
        self.dialog.open()

    async def _right(self) -> None:
        if self.item is not None:
            await self._pick(Choice(self.item.digit))

    async def _pick(self, choice: Choice) -> None:
        item, self.item = self.item, None
        self.dialog.close()
        if item is not None:
            await self._on_label(item, choice)


class DeleteDialog:
    """Confirm before deleting a drawing and its row."""

    def __init__(self, on_delete: Callable[[HistoryItem], Awaitable[None]]) -> None:
        self.item: HistoryItem | None = None
        self._on_delete = on_delete
        with ui.dialog() as self.dialog, ui.card().classes("gap-2"):
            self.title = ui.label().classes("text-subtitle1")
            ui.label("The drawing and its row are removed for good.").classes("text-body2")
            with ui.row().classes("w-full justify-end gap-1"):
                ui.button("Cancel", on_click=self.dialog.close).props("flat no-caps")
                tag(ui.button("Delete", icon="delete", on_click=self._confirmed), "confirm-delete").props(
                    "no-caps color=negative"
                )

    def open(self, item: HistoryItem) -> None:
        self.item = item
        self.title.set_text(f"Delete drawing #{item.id}?")
        self.dialog.open()

    async def _confirmed(self) -> None:
        item, self.item = self.item, None
        self.dialog.close()
        if item is not None:
            await self._on_delete(item)


class HistoryPanel:
    """Builds the (empty) list in the current context; `show` fills it."""

    def __init__(
        self,
        *,
        on_older: Callable[[int], Awaitable[None]],
        on_newer: Callable[[], Awaitable[None]],
        on_filter: Callable[[Only], Awaitable[None]],
        on_label: Callable[[HistoryItem, Choice], Awaitable[None]],
        on_delete: Callable[[HistoryItem], Awaitable[None]],
    ) -> None:
        self.older_than: int | None = None
        self.only: Only = "all"
        self.filter = tag(ui.toggle(dict(FILTERS), value="all"), "history-filter").props("dense no-caps")
        self.filter.on_value_change(lambda e: self._filtered(e, on_filter))
        self.message = ui.label(LOADING).classes("text-grey")  # loading, then "no predictions yet"
        self.unavailable = ui.label(UNAVAILABLE).classes("text-negative")
        self.unavailable.set_visibility(False)
        self.list = tag(ui.column(), "history").classes("w-full gap-1")
        self.lines: list[HistoryLine] = []
        self.edit_dialog = EditDialog(on_label)
        self.delete_dialog = DeleteDialog(on_delete)
        with ui.row().classes("items-center"):
            self.newer = ui.button("Newer", icon="chevron_left", on_click=on_newer).props("flat no-caps")
            self.older = ui.button("Older", icon="chevron_right", on_click=lambda: self._older(on_older))
            self.older.props("flat no-caps")
        self.newer.set_enabled(False)
        self.older.set_enabled(False)

    @property
    def dialog_open(self) -> bool:
        """Whether the edit or delete dialog is open (the page's keys are not for the page then)."""
        return bool(self.edit_dialog.dialog.value or self.delete_dialog.dialog.value)

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
        self.message.set_text(EMPTY_FILTERED[self.only])
        self.message.set_visibility(not unavailable and not items)
        while len(self.lines) > len(items):
            self.lines.pop().row.delete()
        with self.list:
            while len(self.lines) < len(items):
                self.lines.append(HistoryLine(self.edit_dialog.open, self.delete_dialog.open))
        for line, item in zip(self.lines, items, strict=True):
            line.show(item)
        self.older_than = older_than
        self.newer.set_enabled(newer)
        self.older.set_enabled(older_than is not None)

    async def _filtered(
        self, event: ValueChangeEventArguments[Any], on_filter: Callable[[Only], Awaitable[None]]
    ) -> None:
        only: Only = next((o for o in FILTERS if o == event.value), "all")
        if only != self.only:
            self.only = only
            await on_filter(only)

    async def _older(self, on_older: Callable[[int], Awaitable[None]]) -> None:
        if self.older_than is not None:
            await on_older(self.older_than)
