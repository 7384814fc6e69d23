"""Digits in styles MNIST rarely has, drawn as the page's canvas draws them.

MNIST's writers were mostly American: their 7s have no crossbar and their 1s are a single stroke.
People on the page write European 7s with a crossbar and 1s with a long flag and a base, which the
shipped model often reads as something else. This renderer makes such drawings to measure that
and to stand in for people's feedback in the tests and the benchmark.

Drawn like `ui/canvas.js`: a 280x280 canvas, black background, white round-capped and round-joined
strokes (20 px by default), saved as an opaque RGBA PNG like the browser's `toDataURL`. Strokes are
drawn at 4x and box-filtered down, which is close to the browser's anti-aliasing. Every sample gets
seeded random jitter: control points, stroke width, size, aspect, slant, rotation and position.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 280  # ui/canvas.js `size`
LINE_WIDTH = 20  # ui/canvas.js `lineWidth`
SUPERSAMPLE = 4

Point = tuple[float, float]
Stroke = list[Point]
# A glyph: strokes in height units (y 0 at the top .. 1 at the bottom, x about -0.5 .. 0.5).
Glyph = Callable[[np.random.Generator], list[Stroke]]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _bezier(p0: Point, p1: Point, p2: Point, n: int = 12) -> Stroke:
    """A quadratic Bezier curve as n+1 points (a hand's slightly bent straight line)."""
    out = []
    for i in range(n + 1):
        t = i / n
        a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t**2
        out.append((a * p0[0] + b * p1[0] + c * p2[0], a * p0[1] + b * p1[1] + c * p2[1]))
    return out


def _bent(p0: Point, p2: Point, rng: np.random.Generator, bend: float = 0.05) -> Stroke:
    """A straight line from p0 to p2 bent sideways by up to `bend` of the height."""
    mid = ((p0[0] + p2[0]) / 2 + _u(rng, -bend, bend), (p0[1] + p2[1]) / 2 + _u(rng, -bend, bend))
    return _bezier(p0, mid, p2)


def seven_crossbar(rng: np.random.Generator) -> list[Stroke]:
    """A European 7: top bar, long diagonal, a short crossbar through the middle (sometimes a serif)."""
    width = _u(rng, 0.55, 0.8)
    left, right = -width / 2, width / 2
    top_left = (left, _u(rng, -0.03, 0.05))
    top_right = (right, _u(rng, -0.03, 0.03))
    foot = (_u(rng, left - 0.05, left + 0.25), 1.0)
    head: Stroke = [(left + _u(rng, -0.02, 0.02), _u(rng, 0.1, 0.2))] if rng.random() < 0.35 else []
    stroke = [*head, *_bent(top_left, top_right, rng, 0.03)[:-1], *_bent(top_right, foot, rng, 0.06)]
    t = _u(rng, 0.42, 0.6)  # where the crossbar crosses the diagonal
    cx = top_right[0] + t * (foot[0] - top_right[0])
    cy = top_right[1] + t * (foot[1] - top_right[1])
    half = _u(rng, 0.16, 0.28)
    tilt = _u(rng, -0.05, 0.05)
    shift = _u(rng, -0.06, 0.04)
    bar = _bent((cx - half + shift, cy + tilt), (cx + half + shift, cy - tilt), rng, 0.02)
    return [stroke, bar]


def _one(rng: np.random.Generator, base: bool) -> list[Stroke]:
    """A 1 with a long flag (a third to a half of the height), with or without a base."""
    top = (0.0, 0.0)
    reach = _u(rng, 0.2, 0.4)  # a long flag, but steeper than a 7's bar (35-60 degrees)
    flag = (-reach, reach * math.tan(math.radians(_u(rng, 35.0, 60.0))))
    bottom = (_u(rng, -0.04, 0.04), 1.0)
    strokes = [[*_bent(flag, top, rng, 0.03)[:-1], *_bent(top, bottom, rng, 0.03)]]
    if base:
        half = _u(rng, 0.18, 0.32)
        y = 1.0 + _u(rng, -0.02, 0.03)
        strokes.append(_bent((bottom[0] - half, y), (bottom[0] + half, y + _u(rng, -0.03, 0.03)), rng, 0.02))
    return strokes


def one_flag_base(rng: np.random.Generator) -> list[Stroke]:
    """A 1 with a long flag and a base."""
    return _one(rng, base=True)


def one_flag(rng: np.random.Generator) -> list[Stroke]:
    """A 1 with a long flag and no base."""
    return _one(rng, base=False)


def four_open(rng: np.random.Generator) -> list[Stroke]:
    """An open 4 in two strokes: a down-left line turning right, then a separate tall upright."""
    arm_y = _u(rng, 0.55, 0.7)
    right = _u(rng, 0.3, 0.42)
    upright_x = _u(rng, 0.05, 0.2)
    first = [
        *_bent((_u(rng, -0.15, 0.0), 0.0), (-_u(rng, 0.3, 0.42), arm_y), rng, 0.03)[:-1],
        *_bent((-0.36, arm_y), (right, arm_y + _u(rng, -0.04, 0.02)), rng, 0.02),
    ]
    first[len(first) // 2] = (first[len(first) // 2][0], arm_y)
    upright = _bent((upright_x, _u(rng, 0.0, 0.12)), (upright_x + _u(rng, -0.05, 0.05), 1.0), rng, 0.03)
    return [first, upright]


STYLES: dict[str, tuple[int, Glyph]] = {
    "seven_crossbar": (7, seven_crossbar),
    "one_flag_base": (1, one_flag_base),
    "one_flag": (1, one_flag),
    "four_open": (4, four_open),
}
# The styles the tests and the benchmark train on: the ones the shipped model gets wrong most.
DEFAULT_STYLES: tuple[str, ...] = ("seven_crossbar", "one_flag_base", "one_flag")


def _place(strokes: list[Stroke], rng: np.random.Generator, width: float) -> list[Stroke]:
    """Glyph units -> canvas pixels: slant, rotation, size, aspect and position drawn at random."""
    slant = _u(rng, -0.12, 0.3)  # people lean their digits right more often than left
    angle = math.radians(_u(rng, -8.0, 8.0))
    cos, sin = math.cos(angle), math.sin(angle)
    squash = _u(rng, 0.85, 1.15)
    moved = []
    for stroke in strokes:
        pts = []
        for x, y in stroke:
            x, y = (x + slant * (0.5 - y)) * squash, y - 0.5
            pts.append((x * cos - y * sin, x * sin + y * cos))
        moved.append(pts)
    xs = [p[0] for s in moved for p in s]
    ys = [p[1] for s in moved for p in s]
    extent = max(max(xs) - min(xs), max(ys) - min(ys))
    height = _u(rng, 0.4, 0.8) * CANVAS  # the drawing's larger side, in canvas pixels
    scale = height / extent
    margin = width / 2 + 2
    box_w, box_h = (max(xs) - min(xs)) * scale, (max(ys) - min(ys)) * scale
    left = _u(rng, margin, max(margin, CANVAS - margin - box_w))
    top = _u(rng, margin, max(margin, CANVAS - margin - box_h))
    wobble = 0.012 * height  # a hand's small tremor, in pixels
    return [
        [
            (
                left + (x - min(xs)) * scale + float(rng.normal(0, wobble / 3)),
                top + (y - min(ys)) * scale + float(rng.normal(0, wobble / 3)),
            )
            for x, y in stroke
        ]
        for stroke in moved
    ]


def draw(strokes: Sequence[Stroke], width: float = LINE_WIDTH) -> Image.Image:
    """Strokes in canvas pixels -> the 280x280 canvas (L): white round strokes on black, anti-aliased."""
    big = Image.new("L", (CANVAS * SUPERSAMPLE, CANVAS * SUPERSAMPLE), 0)
    pen = ImageDraw.Draw(big)
    w = width * SUPERSAMPLE
    for stroke in strokes:
        pts = [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in stroke]
        if len(pts) > 1:
            pen.line(pts, fill=255, width=round(w), joint="curve")
        for x, y in (pts[0], pts[-1]):  # round caps (and a dot for a one-point stroke)
            pen.ellipse((x - w / 2, y - w / 2, x + w / 2, y + w / 2), fill=255)
    return big.reduce(SUPERSAMPLE)


def png(canvas: Image.Image) -> bytes:
    """The canvas as the browser exports it: an opaque RGBA PNG."""
    out = io.BytesIO()
    canvas.convert("RGBA").save(out, format="PNG")
    return out.getvalue()


def render(digit: int, style: str, rng: np.random.Generator) -> bytes:
    """One drawing of `digit` in `style` (a key of STYLES), as PNG bytes, jittered by `rng`."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: use one of {', '.join(STYLES)}")
    label, glyph = STYLES[style]
    if digit != label:
        raise ValueError(f"style {style!r} draws the digit {label}, not {digit}")
    width = LINE_WIDTH * _u(rng, 0.6, 1.4)
    return png(draw(_place(glyph(rng), rng, width), width))


def make_set(n: int, seed: int, styles: Sequence[str] = DEFAULT_STYLES) -> list[tuple[bytes, int]]:
    """n drawings (PNG, label), the styles taken in turn; the same seed gives the same bytes."""
    if not styles:
        raise ValueError("no styles given")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        style = styles[i % len(styles)]
        label = STYLES[style][0]
        out.append((render(label, style, rng), label))
    return out
