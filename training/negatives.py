"""Drawings that are not digits, as the page would send them: for the "not a digit" head.

Letters and symbols written with the DejaVu fonts shipped in Debian (`fonts-dejavu-core`) or
Pillow's own default font, and things people scribble: dashes, filled shapes, outlines, stars,
crosses, smileys, waves, scribbles and dots. Every one is drawn white on a black 280x280 canvas
(the page's canvas) with random size, position, slant and stroke width, encoded as PNG and then
goes through the handler's preprocessing, exactly like a drawing.

Shapes people read as digits are left out on purpose: letters such as O, I, l, S, Z, B, g, q
(0, 1, 5, 2, 8, 9), a single vertical stroke (a 1) and a ring (a 0). `make(n, seed, held_out=True)`
draws from fonts and a seed stream that training never uses.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from handlers import preprocess as pp

CANVAS = 280
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
TRAIN_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Italic.ttf")
HELD_OUT_FONTS = ("DejaVuSerif.ttf", "DejaVuSansCondensed-Oblique.ttf", "DejaVuSansMono-Bold.ttf")
# Letters that do not read as a digit (O o I l i S s Z z B b g q G D left out).
LETTERS = "ACEFHKMNPRTUVWXYacdefhkmnprtuvwxy"
SYMBOLS = "+=#@&%*?!$€<>~^×÷πΣΩ"
KINDS = (
    "letter",
    "symbol",
    "dash",
    "shape",
    "outline",
    "star",
    "cross",
    "smiley",
    "wave",
    "scribble",
    "dots",
)

Rng = np.random.Generator


@lru_cache(maxsize=64)
def _font(name: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if name is None or not (FONT_DIR / name).is_file():
        return ImageFont.load_default(size=size)  # Pillow's own font, wherever fonts are missing
    return ImageFont.truetype(str(FONT_DIR / name), size)


def _text(rng: Rng, alphabet: str, fonts: tuple[str, ...]) -> Image.Image:
    char = alphabet[rng.integers(len(alphabet))]
    name = None if rng.random() < 0.2 else fonts[rng.integers(len(fonts))]
    img = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(90, 220))
    width = int(rng.integers(0, 6))
    font = _font(name, size)
    draw.text(
        (CANVAS / 2, CANVAS / 2), char, fill=255, font=font, anchor="mm", stroke_width=width, stroke_fill=255
    )
    return img.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)


def _pen(rng: Rng) -> int:
    return int(rng.integers(8, 26))  # the page's pen is about 18 px on the 280 px canvas


def _box(rng: Rng) -> tuple[float, float, float]:
    """Centre x, y and half-size of the drawing on the canvas."""
    half = float(rng.uniform(40, 120))
    return float(rng.uniform(half, CANVAS - half)), float(rng.uniform(half, CANVAS - half)), half


def _polyline(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], width: int) -> None:
    draw.line(points, fill=255, width=width, joint="curve")
    r = width / 2
    for x, y in (points[0], points[-1]):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)  # round pen ends


def _strokes(rng: Rng, kind: str) -> Image.Image:
    img = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, h = _box(rng)
    pen = _pen(rng)
    if kind == "dash":  # within 30 degrees of horizontal: a steeper stroke is a 1
        a = math.radians(rng.uniform(-30, 30))
        dx, dy = h * math.cos(a), h * math.sin(a)
        _polyline(draw, [(cx - dx, cy - dy), (cx + dx, cy + dy)], pen)
    elif kind == "shape":  # filled blob, square, triangle or polygon
        sides = int(rng.choice([0, 3, 4, 5, 6]))
        if sides == 0:
            draw.ellipse(
                (cx - h, cy - h * rng.uniform(0.5, 1), cx + h, cy + h * rng.uniform(0.5, 1)), fill=255
            )
        else:
            draw.polygon(_regular(cx, cy, h, sides, rng.uniform(0, math.pi)), fill=255)
    elif kind == "outline":  # square, triangle, polygon outlines (not rings: a ring is a 0)
        pts = _regular(cx, cy, h, int(rng.choice([3, 4, 5, 6])), rng.uniform(0, math.pi))
        _polyline(draw, [*pts, pts[0]], pen)
    elif kind == "star":
        pts = [
            (cx + (h if i % 2 == 0 else h * 0.4) * math.cos(i * math.pi / 5),
             cy + (h if i % 2 == 0 else h * 0.4) * math.sin(i * math.pi / 5))
            for i in range(10)
        ]  # fmt: skip
        _polyline(draw, [*pts, pts[0]], pen) if rng.random() < 0.5 else draw.polygon(pts, fill=255)
    elif kind == "cross":  # + or x
        a = math.radians(rng.choice([0, 45]) + rng.uniform(-10, 10))
        for b in (a, a + math.pi / 2):
            dx, dy = h * math.cos(b), h * math.sin(b)
            _polyline(draw, [(cx - dx, cy - dy), (cx + dx, cy + dy)], pen)
    elif kind == "smiley":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), outline=255, width=pen)
        for ex in (-0.35, 0.35):
            r = h * 0.1 + 2
            draw.ellipse((cx + ex * h - r, cy - 0.3 * h - r, cx + ex * h + r, cy - 0.3 * h + r), fill=255)
        draw.arc((cx - 0.55 * h, cy - 0.35 * h, cx + 0.55 * h, cy + 0.6 * h), 20, 160, fill=255, width=pen)
    elif kind == "wave":
        turns = rng.uniform(1.5, 3.5)
        pts = [
            (cx - h + 2 * h * t, cy + 0.35 * h * math.sin(2 * math.pi * turns * t))
            for t in np.linspace(0, 1, 40)
        ]
        _polyline(draw, pts, pen)
    elif kind == "scribble":  # a smoothed random walk
        steps = rng.normal(0, h / 4, (int(rng.integers(8, 30)), 2)).cumsum(axis=0)
        steps -= steps.mean(axis=0)
        pts = [
            (float(np.clip(cx + x, 5, CANVAS - 5)), float(np.clip(cy + y, 5, CANVAS - 5))) for x, y in steps
        ]
        _polyline(draw, pts, pen)
    elif kind == "dots":
        for _ in range(int(rng.integers(1, 7))):
            x, y, r = rng.uniform(20, CANVAS - 20), rng.uniform(20, CANVAS - 20), rng.uniform(6, 18)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return img


def _regular(cx: float, cy: float, h: float, sides: int, phase: float) -> list[tuple[float, float]]:
    angles = [phase + 2 * math.pi * i / sides for i in range(sides)]
    return [(cx + h * math.cos(a), cy + h * math.sin(a)) for a in angles]


def drawing(kind: str, rng: Rng, held_out: bool = False) -> bytes:
    """One non-digit drawing of `kind`, as the PNG the page would send."""
    fonts = HELD_OUT_FONTS if held_out else TRAIN_FONTS
    makers: dict[str, Callable[[], Image.Image]] = {
        "letter": lambda: _text(rng, LETTERS, fonts),
        "symbol": lambda: _text(rng, SYMBOLS, fonts),
    }
    img = makers[kind]() if kind in makers else _strokes(rng, kind)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make(n: int, seed: int, held_out: bool = False) -> tuple[np.ndarray, list[str]]:
    """`n` non-digits through the handler's preprocessing: (n, 28, 28) uint8 and the kind of each.

    Kinds take turns; blank results (a shape drawn off the canvas) are drawn again.
    """
    rng = np.random.default_rng([seed, 1 if held_out else 0])
    digits: list[np.ndarray] = []
    kinds: list[str] = []
    while len(digits) < n:
        kind = KINDS[len(digits) % len(KINDS)]
        try:
            digits.append(pp.preprocess(drawing(kind, rng, held_out)))
        except pp.BlankImageError:
            continue
        kinds.append(kind)
    return np.stack(digits) if digits else np.empty((0, 28, 28), np.uint8), kinds
