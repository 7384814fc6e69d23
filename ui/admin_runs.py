"""The operator page's training runs: Retrain (with a few options) and the latest runs with progress bars."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nicegui import ui

from . import admin_views as views
from .frame import tag
from .learning import RunView

SHOWN_RUNS = 8


class RunsPanel:
    """The Retrain form and the runs it is given (`show`), newest first."""

    def __init__(self, on_retrain: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.on_retrain = on_retrain
        self.shown: list[RunView] | None = None
        ui.label("Training runs").classes("text-h6")
        with ui.row().classes("items-center gap-4"):
            self.epochs = self._number("epochs", "epochs", 1, 50)
            self.samples = self._number("MNIST images per epoch", "mnist-samples", 1, 60_000)
            self.eval_limit = self._number("MNIST test images to compare on", "mnist-eval-limit", 1, 10_000)
            self.auto = tag(ui.switch("Promote when better", value=True), "auto-promote")
            self.button = tag(ui.button("Retrain", icon="model_training", on_click=self._retrain), "retrain")
        ui.label("Empty fields: the trainer's defaults.").classes("text-caption text-grey-7")
        self.empty = ui.label("No training run yet.").classes("text-grey")
        self.lines = tag(ui.column().classes("w-full gap-2"), "runs")

    @staticmethod
    def _number(label: str, name: str, low: int, high: int) -> ui.number:
        field = tag(ui.number(label, min=low, max=high, step=1, precision=0), name)
        return field.props("dense outlined clearable").classes("w-56" if len(label) > 10 else "w-24")

    def options(self) -> dict[str, Any]:
        """The run's options from the form: only the fields filled in (else the trainer's defaults)."""
        options: dict[str, Any] = {"auto_promote": bool(self.auto.value)}
        for key, field in (
            ("epochs", self.epochs),
            ("mnist_samples", self.samples),
            ("mnist_eval_limit", self.eval_limit),
        ):
            if field.value:
                options[key] = int(field.value)
        return options

    async def _retrain(self) -> None:
        options = self.options()
        self.button.disable()
        try:
            await self.on_retrain(options)
        finally:
            self.button.enable()

    def show(self, runs: Sequence[RunView]) -> None:
        runs = list(runs)[:SHOWN_RUNS]
        if self.shown == runs:
            return
        self.shown = runs
        self.empty.set_visibility(not runs)
        self.lines.clear()
        with self.lines:
            for run in runs:
                name = f"run-{run.id}"
                with tag(ui.card(), name).classes("w-full p-3").props("flat bordered"):
                    tag(ui.label(views.run_title(run)), f"{name}-title").classes("text-subtitle2")
                    tag(
                        ui.linear_progress(value=run.progress, show_value=False, size="10px"),
                        f"{name}-progress",
                    ).props(f"color={views.run_colour(run)} rounded" + (" stripe" if run.active else ""))
                    detail = views.run_detail(run)
                    if detail:
                        tag(ui.label(detail), f"{name}-detail").classes("text-caption text-grey-8")
