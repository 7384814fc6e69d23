"""Small in-memory stand-ins for fast unit tests (the real servers are tested in test_e2e / test_api_real)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import numpy as np
from PIL import Image, ImageDraw

from db.store import (
    DatabaseUnavailable,
    NewPrediction,
    PredictionNotFound,
    PredictionRow,
    Stats,
    compute_stats,
    validate_label,
    validate_prediction,
)
from handlers.preprocess import PreprocessError, preprocess


def digit_png(kind: str = "one", size: int = 280) -> bytes:
    """A canvas-like PNG: white strokes on black. kind: 'one' (a vertical bar), 'zero' (a ring), 'blank'."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if kind == "one":
        draw.line([(size // 2, size // 5), (size // 2, 4 * size // 5)], fill=255, width=size // 14)
    elif kind == "zero":
        draw.ellipse([size // 4, size // 6, 3 * size // 4, 5 * size // 6], outline=255, width=size // 14)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class FakeModel:
    """An httpx transport answering like the TorchServe handler: the digit is 0 for a ring, else 1."""

    down: bool = False
    calls: int = 0
    version: str = "1.0"
    unsure: bool = False  # answer 55 % for the digit and 40 % for a 7

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path.startswith("/models/"):
            return httpx.Response(200, json=[{"workers": [{"status": "READY"}]}])
        try:
            pixels = preprocess(request.content)
        except PreprocessError as exc:
            return httpx.Response(400, json={"code": 400, "type": "BadInput", "message": str(exc)})
        ring = pixels[14, 14] < 50  # a ring has no ink in its centre
        digit = 0 if ring else 1
        probabilities = [0.01] * 10
        probabilities[digit] = 0.91
        if self.unsure:
            probabilities = [0.05 / 8] * 10
            probabilities[digit], probabilities[7] = 0.55, 0.40
        body = {
            "digit": digit,
            "confidence": max(probabilities),
            "probabilities": probabilities,
            "input": pixels.reshape(-1).tolist(),
            "model_version": self.version,
        }
        return httpx.Response(200, content=json.dumps(body), headers={"content-type": "application/json"})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


@dataclass
class FakeStore:
    """The `db.store.Store` interface in memory, with a switch to play 'database down'."""

    down: bool = False
    rows: dict[int, tuple[NewPrediction, int | None, datetime]] = field(default_factory=dict)

    def _check(self) -> None:
        if self.down:
            raise DatabaseUnavailable("database unavailable: connection refused")

    async def ping(self) -> bool:
        return not self.down

    async def close(self) -> None:
        pass

    async def record_prediction(self, p: NewPrediction) -> int:
        self._check()
        validate_prediction(p)
        new_id = len(self.rows) + 1
        self.rows[new_id] = (p, None, datetime.now(UTC))
        return new_id

    async def set_label(self, prediction_id: int, label: int) -> None:
        label = validate_label(label)
        self._check()
        if prediction_id not in self.rows:
            raise PredictionNotFound(f"no prediction with id {prediction_id}")
        p, _, at = self.rows[prediction_id]
        self.rows[prediction_id] = (p, label, at)

    async def recent(self, limit: int = 20, before_id: int | None = None) -> list[PredictionRow]:
        self._check()
        ids = sorted((i for i in self.rows if before_id is None or i < before_id), reverse=True)[:limit]
        return [self._row(i) for i in ids]

    def _row(self, i: int) -> PredictionRow:
        p, label, at = self.rows[i]
        return PredictionRow(
            i,
            at,
            p.digit,
            p.confidence,
            list(p.probabilities),
            p.model_name,
            p.model_version,
            p.latency_ms,
            label,
            at if label is not None else None,
        )

    async def image_png(self, prediction_id: int) -> bytes:
        self._check()
        if prediction_id not in self.rows:
            raise PredictionNotFound(f"no prediction with id {prediction_id}")
        return self.rows[prediction_id][0].image_png

    async def stats(self) -> Stats:
        self._check()
        return compute_stats((p.model_version, label, p.digit, 1) for p, label, _ in self.rows.values())

    async def export_labelled(self) -> bytes:
        self._check()
        return b"PK\x05\x06" + bytes(18)


def mnist_like(digit_array: np.ndarray) -> bytes:
    """A 28x28 uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(digit_array.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()
