"""Small in-memory stand-ins for fast unit tests (the real servers are tested in test_e2e / test_api_real)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
from PIL import Image, ImageDraw

from db.errors import DatabaseUnavailable, Forbidden, PredictionNotFound
from db.records import (
    LabelledRow,
    NewPrediction,
    Only,
    PoolHealth,
    PredictionRow,
    validate_choice,
    validate_id,
    validate_only,
    validate_prediction,
    validate_token_hash,
)
from db.stats import NOT_A_DIGIT, Stats, compute_stats
from handlers.preprocess import PreprocessError, preprocess
from ui.service import PredictionStore


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
    is_digit: bool | None = True  # the handler's "not a digit" answer; None: an archive without it

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
        if self.is_digit is not None:
            body["is_digit"] = self.is_digit
        return httpx.Response(200, content=json.dumps(body), headers={"content-type": "application/json"})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


@dataclass
class FakeStore:
    """The `ui.service.PredictionStore` interface in memory, with a switch to play 'database down'.

    `rows`: id -> (prediction, true label, time); the ids of not-a-digit rows are in `not_a_digit`,
    the token hash of each row in `token_hashes` (replaced by `replace_label_token`).
    """

    down: bool = False
    rows: dict[int, tuple[NewPrediction, int | None, datetime]] = field(default_factory=dict)
    not_a_digit: set[int] = field(default_factory=set)
    token_hashes: dict[int, str | None] = field(default_factory=dict)
    last_id: int = 0
    pool: PoolHealth = field(
        default_factory=lambda: PoolHealth(size=1, idle=1, waiting=0, exhausted_for_s=0.0)
    )

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
        for i, (stored, _, _) in self.rows.items():
            if p.key is not None and stored.key == p.key:
                return i  # a known key: the first row's id, nothing stored
        self.last_id += 1  # ids are never reused, also after a deletion
        self.rows[self.last_id] = (p, None, p.created_at or datetime.now(UTC))
        self.token_hashes[self.last_id] = p.label_token_hash
        return self.last_id

    async def find_by_key(self, key: str) -> PredictionRow | None:
        self._check()
        await asyncio.sleep(0)  # a query: other requests run meanwhile
        return next((self._row(i) for i, (p, _, _) in self.rows.items() if p.key == key), None)

    def _allow(self, prediction_id: int, token_hash: str | None) -> None:
        """The store's rule: the row must exist, and have this token hash when one is given."""
        validate_id(prediction_id)
        if prediction_id not in self.rows:
            raise PredictionNotFound(f"no prediction with id {prediction_id}")
        if token_hash is not None and self.token_hashes.get(prediction_id) != token_hash:
            raise Forbidden(f"the label token does not match prediction {prediction_id}")

    async def set_label(
        self,
        prediction_id: int,
        label: int | None,
        *,
        not_a_digit: bool = False,
        token_hash: str | None = None,
    ) -> None:
        label = validate_choice(label, not_a_digit)
        self._check()
        self._allow(prediction_id, token_hash)
        p, _, at = self.rows[prediction_id]
        self.rows[prediction_id] = (p, label, at)
        if label is None:
            self.not_a_digit.add(prediction_id)
        else:
            self.not_a_digit.discard(prediction_id)

    async def delete(self, prediction_id: int, *, token_hash: str | None = None) -> None:
        self._check()
        self._allow(prediction_id, token_hash)
        del self.rows[prediction_id]
        self.not_a_digit.discard(prediction_id)
        self.token_hashes.pop(prediction_id, None)

    async def replace_label_token(self, prediction_id: int, token_hash: str) -> None:
        self._check()
        self._allow(prediction_id, None)
        self.token_hashes[prediction_id] = validate_token_hash(token_hash)

    async def recent(
        self,
        limit: int = 20,
        before_id: int | None = None,
        *,
        only: Only = "all",
        ids: Collection[int] | None = None,
    ) -> list[PredictionRow]:
        self._check()
        keep = {
            "all": lambda row: True,
            "wrong": lambda row: row.correct is False,
            "unlabelled": lambda row: row.true_label is None and not row.not_a_digit,
            "not_a_digit": lambda row: row.not_a_digit,
        }[validate_only(only)]
        wanted = sorted(
            (i for i in self.rows if (before_id is None or i < before_id) and (ids is None or i in ids)),
            reverse=True,
        )
        return [row for row in map(self._row, wanted) if keep(row)][:limit]

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
            at if label is not None or i in self.not_a_digit else None,
            i in self.not_a_digit,
        )

    async def image_png(self, prediction_id: int) -> bytes:
        self._check()
        if prediction_id not in self.rows:
            raise PredictionNotFound(f"no prediction with id {prediction_id}")
        return self.rows[prediction_id][0].image_png

    async def count(self) -> int:
        self._check()
        return len(self.rows)

    async def prune_unlabelled(self, count: int) -> int:
        self._check()
        unlabelled = [i for i, (_, label, _) in sorted(self.rows.items()) if label is None]
        gone = [i for i in unlabelled if i not in self.not_a_digit][:count]
        for i in gone:
            del self.rows[i]
        return len(gone)

    async def stats(self) -> Stats:
        self._check()
        return compute_stats(
            (p.model_version, NOT_A_DIGIT if i in self.not_a_digit else label, p.digit, 1)
            for i, (p, label, _) in self.rows.items()
        )

    async def labelled(self, batch_size: int = 500) -> AsyncIterator[LabelledRow]:
        self._check()
        for i, (p, label, at) in sorted(self.rows.items()):
            if label is not None:
                yield LabelledRow(
                    i,
                    label,
                    p.digit,
                    p.confidence,
                    p.model_name,
                    p.model_version,
                    at,
                    at,
                    p.image_png,
                    p.input_pixels,
                )

    def pool_health(self) -> PoolHealth:
        return self.pool


_: PredictionStore = FakeStore()  # mypy checks the fake against the service's view of the store


class FakeModelServer:
    """`FakeModel` on a real port (127.0.0.1), for an app running in another process."""

    def __init__(self, model: FakeModel | None = None) -> None:
        self.model = model or FakeModel()
        fake = self.model

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                request = httpx.Request(self.command, f"http://model.test{self.path}", content=body)
                response = fake.handler(request)
                self.send_response(response.status_code)
                self.send_header("content-type", response.headers.get("content-type", "application/json"))
                self.send_header("content-length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeModelServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def mnist_like(digit_array: np.ndarray) -> bytes:
    """A 28x28 uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(digit_array.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()
