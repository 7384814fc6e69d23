"""The one client the UI uses to talk to TorchServe: shared connection pool, timeouts, a short retry.

Readiness is `serving.management`'s rule (the default version has a READY worker), asked through
its `AsyncManagementClient`. While the model is not registered (TorchServe just (re)started),
TorchServe answers predictions with 404 "Model not found": that is "model loading"
(`InferenceUnavailable`, a 503 for API clients), never a 404 of ours.

With TorchServe's token authorization on, both APIs need a key: `key_file` is TorchServe's
key_file.json (`serving.keys.key_file_of(settings)`); the inference key goes with every
prediction, the management key with every readiness check, each re-read when TorchServe restarts.
A refused key is the app's configuration, never the person's input: `InferenceUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from serving.keys import KeyFileAuth, key_file_of, key_refused
from serving.management import KEY_HINT, AsyncManagementClient, error_message
from settings import Settings

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.1, 0.4)  # after the first try; only for failures where nothing reached the model
DEFAULT_MODEL_NAME: str = Settings.model_fields["model_name"].default  # defined once, in settings.py


class InferenceError(Exception):
    """Base class of everything `InferenceClient.predict` raises."""


class InferenceUnavailable(InferenceError):
    """The model server cannot be reached, failed (timeout, 5xx) or has no model loaded yet."""


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
    # The handler's verdict on whether it is a digit at all (`digit` stays the best digit); None
    # from an archive that does not say (before the "not a digit" head).
    is_digit: bool | None = None

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
                is_digit=None if data.get("is_digit") is None else bool(data["is_digit"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InferenceUnavailable(f"the model server sent an unexpected answer: {exc!r}") from exc
        if len(probabilities) != 10 or len(pixels) != 784 or not 0 <= prediction.digit <= 9:
            raise InferenceUnavailable("the model server sent an answer of the wrong shape")
        return prediction


def model_not_loaded(response: httpx.Response) -> bool:
    """TorchServe's 404 for a model (or version) it has not registered (yet): not the input's fault.

    The handler itself never answers 404, so any 404 from the inference API means this.
    """
    return response.status_code == 404


class InferenceClient:
    """Async client for `POST {inference_url}/predictions/{model}` and readiness checks."""

    def __init__(
        self,
        inference_url: str,
        model_name: str = DEFAULT_MODEL_NAME,
        management_url: str | None = None,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.inference_url = inference_url.rstrip("/")
        self.model_name = model_name
        self.management_url = management_url.rstrip("/") if management_url else None
        self.key_file = key_file  # TorchServe's keys (None: send none)
        self._client = httpx.AsyncClient(
            base_url=self.inference_url,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 2.0)),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            transport=transport,
            auth=KeyFileAuth(key_file, "inference"),
        )
        self._management = (
            AsyncManagementClient(
                self.management_url,
                model_name,
                timeout=2.0,
                transport=transport,
                auth=KeyFileAuth(key_file, "management"),
            )
            if self.management_url is not None
            else None
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> InferenceClient:
        """The app's client: TorchServe's URLs, timeout and key file from `settings`."""
        return cls(
            settings.inference_url,
            settings.model_name,
            settings.management_url,
            settings.inference_timeout_s,
            key_file=key_file_of(settings),
        )

    async def close(self) -> None:
        await self._client.aclose()
        if self._management is not None:
            await self._management.close()

    async def predict(self, image: bytes) -> Prediction:
        """Send image bytes; `InvalidInput` for a 4xx, `InferenceUnavailable` when the server is down."""
        path = f"/predictions/{self.model_name}"
        last = InferenceUnavailable("the model server was not asked")  # replaced by each failed try
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S)):
            if delay:
                await asyncio.sleep(delay)
            try:
                response = await self._client.post(
                    path, content=image, headers={"Content-Type": "application/octet-stream"}
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                last = InferenceUnavailable(
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
            if model_not_loaded(response):  # TorchServe (re)starting: the model comes in a few seconds
                last = InferenceUnavailable(f"model loading: {error_message(response)}")
                continue
            if key_refused(response):  # already re-read once by KeyFileAuth: the app's configuration
                raise InferenceUnavailable(f"the model server refused the inference key ({KEY_HINT})")
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
        """The readiness rule (`serving.management.is_ready`), else (no management URL) `/ping`."""
        if self._management is not None:
            return await self._management.readiness()
        try:
            response = await self._client.get("/ping", timeout=2.0)
        except httpx.HTTPError as exc:
            return False, f"unreachable ({type(exc).__name__})"
        if key_refused(response):
            return False, f"the model server refused the inference key ({KEY_HINT})"
        if response.status_code != 200:
            return False, f"HTTP {response.status_code}: {error_message(response)}"
        return True, "healthy"
