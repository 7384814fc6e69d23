"""The operator page's model versions: one line per version with its accuracies and actions, and the
accuracy per version as a bar chart (people compare bars faster than columns of percentages)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from nicegui import ui

from . import admin_views as views
from .frame import tag
from .learning import MAX_WORKERS, VersionView
from .statistics import set_chart

Action = Callable[[str], Awaitable[None]]


class VersionsPanel:
    """Rendered from the versions it is given; the buttons call back with the version string."""

    def __init__(
        self, on_promote: Action, on_retire: Action, on_scale: Callable[[str, int], Awaitable[None]]
    ):
        self.on_promote, self.on_retire, self.on_scale = on_promote, on_retire, on_scale
        self.shown: list[VersionView] | None = None
        ui.label("Model versions").classes("text-h6")
        self.chart = tag(ui.echart(views.accuracy_chart([])), "accuracy-chart").classes("chart w-full h-56")
        self.lines = tag(ui.column().classes("w-full gap-2"), "versions")

    def show(self, versions: Sequence[VersionView]) -> None:
        if self.shown == list(versions):
            return  # nothing changed: nothing sent
        self.shown = list(versions)
        set_chart(self.chart, views.accuracy_chart(versions))
        live = views.live_of(versions)
        self.lines.clear()
        with self.lines:
            for v in versions:
                self._line(v, live)

    def _line(self, v: VersionView, live: VersionView | None) -> None:
        name = f"version-{v.version}"
        with tag(ui.card(), name).classes("w-full p-3").props("flat bordered"):
            with ui.row().classes("w-full items-center gap-x-4 gap-y-1"):
                ui.label(views.version_title(v)).classes("text-subtitle1 text-weight-medium")
                if v.live:
                    tag(ui.badge("live", color="positive"), f"{name}-live")
                ui.label(views.version_detail(v)).classes("text-caption text-grey-7")
                ui.space()
                label = views.promote_label(v, live)
                if label is not None:
                    tag(
                        ui.button(label, on_click=lambda v=v: self.on_promote(v.version)),
                        f"promote-{v.version}",
                    )
                if views.can_retire(v):
                    tag(
                        ui.button("Retire", on_click=lambda v=v: self.on_retire(v.version)),
                        f"retire-{v.version}",
                    ).props("outline color=negative")
                count = (
                    tag(
                        ui.number("workers", value=v.workers, min=0, max=MAX_WORKERS, step=1, precision=0),
                        f"workers-{v.version}",
                    )
                    .props("dense outlined")
                    .classes("w-24")
                )
                tag(
                    ui.button(
                        "Scale", on_click=lambda v=v, c=count: self.on_scale(v.version, int(c.value or 0))
                    ),
                    f"scale-{v.version}",
                ).props("outline")
            tag(ui.label(views.accuracy_line(v)), f"{name}-accuracy").classes("text-body2")
            if v.reason:
                ui.label(v.reason).classes("text-caption text-grey-8")
