"""Pure helpers that turn predictions and statistics into what the page shows (no I/O, no NiceGUI)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from PIL import Image


def pixels_data_url(pixels: Sequence[int] | bytes, side: int = 28) -> str:
    """The model's 28x28 input (row-major 0-255) as a PNG data URL."""
    img = Image.frombytes("L", (side, side), bytes(pixels))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return png_data_url(buf.getvalue())


GRID_LINE = {"lineStyle": {"color": "rgba(128, 128, 128, 0.25)"}}  # readable on light and dark


def png_data_url(png: bytes) -> str:
    """PNG bytes as a data URL for an <img>."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def percent(value: float | None) -> str:
    """0.934 -> '93.4 %'; None -> '–'."""
    return "–" if value is None else f"{100 * value:.1f} %"


def ranked(probabilities: Sequence[float]) -> list[int]:
    """The digits from the most to the least likely (ties: the smaller digit first)."""
    return sorted(range(len(probabilities)), key=lambda d: (-probabilities[d], d))


def top_guesses(probabilities: Sequence[float], n: int = 3) -> str:
    """The best `n` guesses as text beside the bars: '1 61% · 7 32% · 9 3%'."""
    return " · ".join(f"{d} {round(100 * probabilities[d])}%" for d in ranked(probabilities)[:n])


def short_time(at: datetime, now: datetime) -> str:
    """A history line's time, short enough for a phone: the time of day today, else the date too."""
    local, today = at.astimezone(), now.astimezone()
    return local.strftime("%H:%M:%S" if local.date() == today.date() else "%Y-%m-%d %H:%M")


# The "not sure" hint carries its own background, so the pair is the same in light and dark mode;
# its contrast is checked against WCAG AA (4.5:1 for normal text) by a unit test.
HINT_TEXT = "#5c3c00"
HINT_BACKGROUND = "#fff3cd"


def relative_luminance(colour: str) -> float:
    """WCAG 2 relative luminance of a '#rrggbb' colour."""
    value = colour.lstrip("#")
    if len(value) != 6:
        raise ValueError(f"not a #rrggbb colour: {colour!r}")
    channels = [int(value[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two colours, from 1 (the same) to 21 (black on white)."""
    light, dark = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


UNSURE_BELOW = 0.9  # calibrated confidence under which the page says it is not sure


def unsure_hint(probabilities: Sequence[float]) -> str | None:
    """A sentence when the model is unsure (its calibrated top probability under 90 %), else None.

    The handler's probabilities are calibrated (a temperature fitted on held-out data:
    training/README.md), so 90 % means right about 9 times in 10. On the MNIST test set this marks
    68 % of the model's mistakes, and answers it does not mark are right 99.91 % of the time (the
    former rule, top under 60 % or the best two within 20 points, marked 14 %).
    """
    first, second = ranked(probabilities)[:2]
    if probabilities[first] < UNSURE_BELOW:
        return f"Not sure: it could also be a {second} ({percent(probabilities[second])})."
    return None


NOT_A_DIGIT_TEXT = "That does not look like a digit"


def digit_bars(data: Sequence[Any], color: str | None = None) -> dict[str, Any]:
    """ECharts options: one bar per digit 0-9 on a 0-1 axis (bars may carry their own colours)."""
    series: dict[str, Any] = {"type": "bar", "data": list(data)}
    if color:
        series["itemStyle"] = {"color": color}
    return {
        "animation": False,
        "grid": {"left": 36, "right": 8, "top": 8, "bottom": 24},
        "xAxis": {"type": "category", "data": [str(d) for d in range(10)]},
        "yAxis": {"type": "value", "min": 0, "max": 1, "splitLine": GRID_LINE},
        "tooltip": {"trigger": "axis"},
        "series": [series],
    }


def probability_chart(probabilities: Sequence[float], digit: int) -> dict[str, Any]:
    """ECharts options: ten bars, the predicted digit highlighted."""
    return digit_bars(
        [
            {"value": round(float(p), 4), "itemStyle": {"color": "#1976d2" if d == digit else "#9e9e9e"}}
            for d, p in enumerate(probabilities)
        ]
    )


def confusion_chart(confusion: Sequence[Sequence[int]]) -> dict[str, Any]:
    """ECharts heatmap of confusion[true][predicted], true labels down, predictions across."""
    counts = [(pred, true, int(confusion[true][pred])) for true in range(10) for pred in range(10)]
    peak = max((count for _, _, count in counts), default=0)
    cells = [
        {"value": [pred, true, count], "label": {"show": count > 0, "color": cell_text(count, peak)}}
        for pred, true, count in counts
    ]
    digits = [str(d) for d in range(10)]
    axis = {"type": "category", "data": digits, "nameLocation": "middle", "splitArea": {"show": True}}
    return {
        "animation": False,
        "tooltip": {"position": "top"},
        "grid": {"left": 48, "right": 16, "top": 8, "bottom": 48},
        "xAxis": {**axis, "name": "predicted", "nameGap": 28},
        "yAxis": {**axis, "name": "true", "nameGap": 32, "inverse": True},
        "visualMap": {
            "show": False,
            "min": 0,
            "max": max(peak, 1),
            "inRange": {"color": ["#eef4fb", "#1976d2", "#0d2c66"]},
        },
        "series": [{"type": "heatmap", "data": cells, "label": {"show": True}}],
    }


def cell_text(count: int, peak: int) -> str:
    """The count's colour on its heatmap cell: white on the darker half of the scale, else near black."""
    return "#ffffff" if peak and count > peak / 2 else "#1a1a1a"


def per_digit_chart(accuracy: Sequence[float | None]) -> dict[str, Any]:
    """ECharts bars of accuracy per true digit (empty bar where a digit has no label yet)."""
    return digit_bars([None if a is None else round(a, 4) for a in accuracy], color="#43a047")
