"""The one client the UI uses to talk to TorchServe: shared connection pool, timeouts, a short retry."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.1, 0.4)  # after the first try; only for failures where nothing reached the model


class InferenceError(Exception):
    """Base class of everything `InferenceClient.predict` raises."""


class InferenceUnavailable(InferenceError):
    """The model server cannot be reached or failed (connection refused, timeout, 5xx)."""


class InvalidInput(InferenceError):
    """The model server rejected the image (4xx); the message says why, for the person who sent it."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Prediction:
    """What the model answered for one image."""

    digit: int
    confidence: float
    probabilities: list[float]  # ten, summing to about 1
    input: list[int]  # 784 values 0-255: the 28x28 the model saw, row by row
    model_version: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prediction:
        """Validate TorchServe's JSON answer; `InferenceUnavailable` when it is not the expected shape."""
        try:
            probabilities = [min(max(float(p), 0.0), 1.0) for p in data["probabilities"]]
            pixels = [int(v) for v in data["input"]]
            prediction = cls(
                digit=int(data["digit"]),
                confidence=min(max(float(data["confidence"]), 0.0), 1.0),
                probabilities=probabilities,
                input=pixels,
                model_version=str(data.get("model_version", "unknown")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InferenceUnavailable(f"the model server sent an unexpected answer: {exc!r}") from exc
        if len(probabilities) != 10 or len(pixels) != 784 or not 0 <= prediction.digit <= 9:
            raise InferenceUnavailable("the model server sent an answer of the wrong shape")
        return prediction


def error_message(response: httpx.Response) -> str:
    """The human message in a TorchServe or handler error body, whatever its shape."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key]
    return str(body)[:300]


class InferenceClient:
    """Async client for `POST {inference_url}/predictions/{model}` and readiness checks."""

    def __init__(
        self,
        inference_url: str,
        model_name: str = "mnist",
        management_url: str | None = None,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.inference_url = inference_url.rstrip("/")
        self.model_name = model_name
        self.management_url = management_url.rstrip("/") if management_url else None
        self._client = httpx.AsyncClient(
            base_url=self.inference_url,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 2.0)),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            transport=transport,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def predict(self, image: bytes) -> Prediction:
        """Send image bytes; `InvalidInput` for a 4xx, `InferenceUnavailable` when the server is down."""
        path = f"/predictions/{self.model_name}"
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S)):
            if delay:
                await asyncio.sleep(delay)
            try:
                response = await self._client.post(
                    path, content=image, headers={"Content-Type": "application/octet-stream"}
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                last: InferenceError = InferenceUnavailable(
                    f"the model server at {self.inference_url} is not reachable ({type(exc).__name__})"
                )
                log.warning("inference attempt %d failed: %r", attempt + 1, exc)
                continue
            except httpx.TimeoutException as exc:
                raise InferenceUnavailable("the model server did not answer in time") from exc
            except httpx.HTTPError as exc:
                raise InferenceUnavailable(f"the model server failed: {exc!r}") from exc
            if response.status_code == 503:  # no worker free or model not loaded yet: worth one more try
                last = InferenceUnavailable(f"the model server is not ready: {error_message(response)}")
                continue
            if 400 <= response.status_code < 500:
                raise InvalidInput(error_message(response), response.status_code)
            if response.status_code >= 500:
                raise InferenceUnavailable(f"the model server failed: {error_message(response)}")
            try:
                return Prediction.from_json(response.json())
            except ValueError as exc:
                raise InferenceUnavailable("the model server sent an answer that is not JSON") from exc
        raise last

    async def ready(self) -> tuple[bool, str]:
        """Whether the model has a READY worker (management API), else whether `/ping` is healthy."""
        if self.management_url is not None:
            url = f"{self.management_url}/models/{self.model_name}"
            try:
                response = await self._client.get(url, timeout=2.0)
                versions = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as exc:
                return False, f"management API unreachable ({type(exc).__name__})"
            if versions is None:
                return False, f"HTTP {response.status_code}: {error_message(response)}"
            states = [w.get("status") for v in versions for w in v.get("workers", [])]
            return ("READY" in states), f"workers: {', '.join(states) or 'none'}"
        try:
            response = await self._client.get("/ping", timeout=2.0)
        except httpx.HTTPError as exc:
            return False, f"unreachable ({type(exc).__name__})"
        if response.status_code != 200:
            return False, f"HTTP {response.status_code}: {error_message(response)}"
        return True, "healthy"
