"""The operator page's review list: labelled drawings the model disagrees with, each with its image and an
Exclude switch (a defence against poisoned labels: an excluded drawing never trains a version)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from nicegui import ui
from nicegui.events import ValueChangeEventArguments

from . import admin_views as views
from .frame import tag
from .learning import ReviewItem

PAGE = 24


class ReviewPanel:
    """The drawings it is given (`show`); paging and the switches call back."""

    def __init__(
        self,
        on_exclude: Callable[[int, bool], Awaitable[bool]],
        on_page: Callable[[int], Awaitable[None]],
        image_url: Callable[[int], str],
    ) -> None:
        self.on_exclude, self.on_page, self.image_url = on_exclude, on_page, image_url
        self.offset = 0
        self.shown: list[ReviewItem] | None = None
        self._reverting: set[int] = set()
        ui.label("Review: labels the model disagrees with").classes("text-h6")
        self.empty = ui.label("No labelled drawing disagrees with the model.").classes("text-grey")
        self.grid = tag(ui.element("div"), "review").classes("w-full grid gap-2")
        self.grid.style("grid-template-columns: repeat(auto-fill, minmax(150px, 1fr))")
        with ui.row().classes("gap-2"):
            self.newer = tag(ui.button("Newer", on_click=lambda: self._page(-PAGE)), "review-newer")
            self.older = tag(ui.button("Older", on_click=lambda: self._page(PAGE)), "review-older")
            for button in (self.newer, self.older):
                button.props("flat dense")

    async def _page(self, step: int) -> None:
        await self.on_page(max(0, self.offset + step))

    def show(self, items: Sequence[ReviewItem], offset: int) -> None:
        items = list(items)
        self.offset = offset
        self.newer.set_visibility(offset > 0)
        self.older.set_visibility(len(items) >= PAGE)
        if self.shown == items:
            return
        self.shown = items
        self.empty.set_visibility(not items and offset == 0)
        self.grid.clear()
        with self.grid:
            for item in items:
                with (
                    tag(ui.card(), f"review-{item.id}")
                    .classes("p-2 gap-1 items-center")
                    .props("flat bordered")
                ):
                    ui.image(self.image_url(item.id)).classes("w-28 h-28 bg-black").props(
                        f"fit=contain no-spinner alt='drawing {item.id}'"
                    )
                    ui.label(f"#{item.id}").classes("text-caption")
                    ui.label(
                        views.review_caption(item.label, item.digit, item.confidence, item.model_version)
                    ).classes("text-caption text-center")
                    switch = tag(ui.switch("Exclude", value=item.excluded), f"exclude-{item.id}")
                    switch.on_value_change(lambda e, i=item.id, s=switch: self._toggle(i, s, e))

    async def _toggle(
        self, prediction_id: int, switch: ui.switch, event: ValueChangeEventArguments[bool]
    ) -> None:
        if switch.id in self._reverting:
            self._reverting.discard(switch.id)
            return
        if not await self.on_exclude(prediction_id, bool(event.value)):
            self._reverting.add(switch.id)  # refused: the switch goes back to what is stored
            switch.set_value(not event.value)
