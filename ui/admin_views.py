"""Pure helpers of the operator page: what a version's line, a run's line and the accuracy chart show."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .learning import RunView, VersionView, accuracy
from .views import GRID_LINE, percent

# (metric key, legend) of the accuracy chart and the versions' lines, in this order.
ACCURACIES: tuple[tuple[str, str], ...] = (
    ("mnist", "MNIST test"),
    ("feedback", "held-out feedback"),
    ("labelled", "labelled live"),
)
COLOURS = ("#1565c0", "#2e7d32", "#ef6c00")


def accuracy_line(v: VersionView) -> str:
    """'MNIST test 99.4 % · held-out feedback 97.0 % · labelled live –'."""
    return " · ".join(f"{name} {percent(accuracy(v.metrics, key))}" for key, name in ACCURACIES)


def version_title(v: VersionView) -> str:
    return f"Version {v.version}"


def version_detail(v: VersionView) -> str:
    """State, workers and where it came from."""
    parts = [v.state, f"{v.workers} worker{'s' if v.workers != 1 else ''}"]
    if v.parent_version:
        parts.append(f"from {v.parent_version}")
    if v.feedback_count:
        parts.append(f"{v.feedback_count} feedback drawings")
    if v.created_at is not None:
        parts.append(v.created_at.astimezone().strftime("%Y-%m-%d %H:%M"))
    return " · ".join(parts)


def promote_label(v: VersionView, live: VersionView | None) -> str | None:
    """The button of a version that is not live: 'Roll back' to an older one, 'Promote' a newer one
    (none for a failed one: its archive never served)."""
    if v.live or v.state == "failed":
        return None
    if live is not None and _order(v) < _order(live):
        return "Roll back"
    return "Promote"


def _order(v: VersionView) -> tuple[float, str]:
    """Versions are numbered '1.0', '2.0', ...; other names sort by creation time, then name."""
    try:
        return float(v.version), v.version
    except ValueError:
        return (v.created_at.timestamp() if v.created_at else math.inf), v.version


def can_retire(v: VersionView) -> bool:
    return not v.live and v.state != "retired"


def live_of(versions: Sequence[VersionView]) -> VersionView | None:
    return next((v for v in versions if v.live), None)


def accuracy_chart(versions: Sequence[VersionView]) -> dict[str, Any]:
    """ECharts options: accuracy per version (oldest left), one bar per kind; the axis starts near the
    lowest figure, so a difference of tenths of a point is visible."""
    ordered = sorted(versions, key=_order)
    series = []
    lowest = 100.0
    for (key, name), colour in zip(ACCURACIES, COLOURS, strict=True):
        data: list[float | None] = []
        for v in ordered:
            value = accuracy(v.metrics, key)
            data.append(None if value is None else round(100 * value, 2))
            if value is not None:
                lowest = min(lowest, 100 * value)
        series.append(
            {
                "name": name,
                "type": "bar",
                "data": data,
                "itemStyle": {"color": colour},
                "label": {"show": True, "position": "top", "formatter": "{c}", "fontSize": 10},
            }
        )
    floor = max(0.0, math.floor(lowest - 2))
    return {
        "animation": False,
        "tooltip": {"trigger": "axis"},
        "legend": {"top": 0},
        "grid": {"left": 44, "right": 12, "top": 32, "bottom": 28},
        "xAxis": {"type": "category", "data": [v.version + (" (live)" if v.live else "") for v in ordered]},
        "yAxis": {"type": "value", "min": floor, "max": 100, "name": "%", "splitLine": GRID_LINE},
        "series": series,
    }


def run_title(run: RunView) -> str:
    """'Run #3 · running · 40 %'."""
    return f"Run #{run.id} · {run.status} · {round(100 * run.progress)} %"


def run_detail(run: RunView) -> str:
    """The run's message, its last epoch and what it built."""
    parts = [run.message] if run.message else []
    if run.history:
        last = run.history[-1]
        epoch = last.get("epoch")
        loss, acc = last.get("loss"), last.get("accuracy")
        step = f"epoch {epoch}" if epoch is not None else "last step"
        if isinstance(loss, int | float):
            step += f", loss {loss:.3f}"
        if isinstance(acc, int | float):
            step += f", accuracy {percent(float(acc))}"
        parts.append(step)
    if run.version:
        parts.append(f"built {run.version}" + (", promoted" if run.promoted else ", not promoted"))
    return " · ".join(parts)


RUN_COLOURS = {"queued": "grey", "running": "primary", "succeeded": "positive", "failed": "negative"}


def run_colour(run: RunView) -> str:
    return RUN_COLOURS.get(run.status, "grey")


def review_caption(label: int, digit: int, confidence: float, model_version: str) -> str:
    """'labelled 7 · model 1 (80 %) · 1.0'."""
    return f"labelled {label} · model {digit} ({round(100 * confidence)} %) · {model_version}"
