"""Sample data for the db tests: valid predictions with real PNG drawings; `one()` for SQL checks."""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

import psycopg
from PIL import Image, ImageDraw

from db.records import NewPrediction


def drawing_png(seed: int = 0) -> bytes:
    """A small real PNG: a white canvas with a black stroke that depends on `seed`."""
    img = Image.new("L", (140, 140), 255)
    ImageDraw.Draw(img).line([(20 + seed % 50, 20), (100, 120 - seed % 60)], fill=0, width=12)
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def prediction(digit: int = 3, seed: int = 0, **changes: object) -> NewPrediction:
    """A valid prediction of `digit` (changes override fields)."""
    probabilities = [0.01] * 10
    probabilities[digit % 10] = 0.91
    base = NewPrediction(
        digit=digit,
        confidence=0.91,
        probabilities=probabilities,
        model_name="mnist",
        model_version="1.0",
        latency_ms=4.5,
        image_png=drawing_png(seed),
        input_pixels=bytes((seed + i) % 256 for i in range(784)),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def one(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The row a statement must return."""
    row = cur.fetchone()
    assert row is not None, "the statement returned no row"
    return row
