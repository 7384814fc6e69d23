"""The statistics tab: totals, accuracy per digit and per model version, confusion matrix, download.

Drawings the person marked as not a digit are counted apart (never labelled, never in an accuracy).

Rendered from a typed `Stats` it is given; choosing a model version re-renders from the same `Stats`.
Every open tab renders each change, so the elements are built once and updated in place, and
unchanged statistics are not sent again.
"""

from __future__ import annotations

from typing import Any

from nicegui import ui
from nicegui.events import ValueChangeEventArguments

from db.stats import Stats

from . import views
from .frame import tag

UNAVAILABLE = "Statistics are unavailable: the database is unreachable."
LOADING = "Loading ..."
ALL_VERSIONS = ""
VERSION_COLUMNS = [
    {"name": "version", "label": "version", "field": "version", "align": "left"},
    {"name": "total", "label": "predictions", "field": "total"},
    {"name": "labelled", "label": "labelled", "field": "labelled"},
    {"name": "not_a_digit", "label": "not a digit", "field": "not_a_digit"},
    {"name": "accuracy", "label": "accuracy", "field": "accuracy"},
]


def per_digit_accuracy(stats: Stats) -> list[float | None]:
    """Accuracy per true digit, None where a digit has no label yet."""
    return [entry.accuracy for entry in stats.per_digit]


def shown_stats(stats: Stats, version: str | None) -> Stats:
    """The figures of one model version, or of all when `version` is None or unknown."""
    if version is None:
        return stats
    return stats.by_version.get(version, stats)


def version_options(stats: Stats) -> dict[str, str]:
    """The model-version choice: all, then each version."""
    return {ALL_VERSIONS: "all model versions", **{v: f"model version {v}" for v in stats.by_version}}


def version_rows(stats: Stats) -> list[dict[str, Any]]:
    """The per-version table's rows."""
    return [
        {
            "version": name,
            "total": v.total,
            "labelled": v.labelled,
            "not_a_digit": v.not_a_digit,
            "accuracy": views.percent(v.accuracy),
        }
        for name, v in stats.by_version.items()
    ]


def set_chart(chart: ui.echart, options: dict[str, Any]) -> None:
    chart.options.clear()
    chart.options.update(options)
    chart.update()


class StatisticsPanel:
    """Builds the panel in the current context (hidden until `show` gets statistics)."""

    def __init__(self) -> None:
        self.version: str | None = None  # the model version shown; None: all
        self.stats: Stats | None = None
        self.shown: tuple[Stats, str | None] | None = None  # what the elements show now
        self.loading = ui.label(LOADING).classes("text-grey")
        self.unavailable = ui.label(UNAVAILABLE).classes("text-negative")
        self.unavailable.set_visibility(False)
        self.body = ui.column().classes("w-full")
        self.body.set_visibility(False)
        with self.body:
            with ui.row().classes("gap-x-8 gap-y-2 items-end"):
                self.total = self._figure("stat-predictions", "predictions")
                self.labelled = self._figure("stat-labelled", "labelled")
                self.not_a_digit = self._figure("stat-not-a-digit", "not a digit (apart)")
                self.accuracy = self._figure("stat-accuracy", "accuracy on labelled")
                self.select = ui.select({ALL_VERSIONS: "all model versions"}, value=ALL_VERSIONS)
                self.select.props("dense outlined").classes("min-w-[200px]")
                self.select.on_value_change(self._chosen)
            with ui.row().classes("w-full gap-6 no-wrap max-md:flex-wrap"):
                with ui.column().classes("grow min-w-[280px]"):
                    ui.label("Accuracy per true digit").classes("text-subtitle2")
                    self.per_digit = ui.echart(views.per_digit_chart([None] * 10)).classes(
                        "chart w-full h-48"
                    )
                with ui.column().classes("grow min-w-[280px]"):
                    ui.label("Confusion matrix (rows: true, columns: predicted)").classes("text-subtitle2")
                    zeros = [[0] * 10 for _ in range(10)]
                    self.confusion = ui.echart(views.confusion_chart(zeros)).classes("chart w-full h-80")
            self.versions = ui.column().classes("w-full")
            with self.versions:
                ui.label("Per model version").classes("text-subtitle2")
                self.table = ui.table(columns=VERSION_COLUMNS, rows=[]).props("dense flat")

    @staticmethod
    def _figure(key: str, name: str) -> ui.label:
        with ui.column().classes("gap-0"):
            value = tag(ui.label(), key).classes("text-h4")
            ui.label(name).classes("text-caption text-grey")
        return value

    def show(self, stats: Stats | None) -> None:
        """Render `stats` (None: the database was unreachable)."""
        self.stats = stats
        self.loading.set_visibility(False)
        self.unavailable.set_visibility(stats is None)
        self.body.set_visibility(stats is not None)
        if stats is None:
            return
        if self.version not in stats.by_version:
            self.version = None
        if self.shown == (stats, self.version):
            return  # the same figures: nothing to send
        self.shown = (stats, self.version)
        shown = shown_stats(stats, self.version)
        self.total.set_text(str(shown.total))
        self.labelled.set_text(str(shown.labelled))
        self.not_a_digit.set_text(str(shown.not_a_digit))
        self.accuracy.set_text(views.percent(shown.accuracy))
        self.select.set_visibility(len(stats.by_version) > 1)
        self.select.set_options(version_options(stats), value=self.version or ALL_VERSIONS)
        set_chart(self.per_digit, views.per_digit_chart(per_digit_accuracy(shown)))
        set_chart(self.confusion, views.confusion_chart(shown.confusion))
        self.versions.set_visibility(bool(stats.by_version))
        self.table.rows = version_rows(stats)

    def _chosen(self, event: ValueChangeEventArguments[Any]) -> None:
        version = event.value or None
        if version != self.version:
            self.version = version
            self.show(self.stats)
