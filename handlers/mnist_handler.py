"""TorchServe handler: any drawing or upload in, the digit and what the model saw out.

Per request (TorchServe may batch several): raw PNG/JPEG/WebP bytes, or JSON
`{"data": "<base64 or data: URL>"}`. The answer is JSON:
`{"digit", "confidence", "probabilities", "input", "model_version"}`, where `input` is the
28x28 the model saw as 784 integers 0-255, row-major.

Bad input answers only its own request with a 4xx and a JSON body `{"code", "type", "message"}`
(400 bad payload, 413 too large, 415 not an image, 422 blank drawing); the rest of the batch is
still answered and the worker keeps running. Limits come from the environment:
`MAX_UPLOAD_BYTES` (body) and `MAX_IMAGE_PIXELS` (decoded image).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from http import HTTPStatus
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

if __package__:
    from . import preprocess as pp
else:  # inside the model archive every file sits flat in one folder on sys.path
    import preprocess as pp  # type: ignore[no-redef,import-not-found]  # the archive's flat layout

logger = logging.getLogger(__name__)

JSON = "application/json"


def request_body(request: dict[str, Any]) -> Any:
    """The payload of one TorchServe request: the raw body, or the first form field."""
    for key in ("body", "data", "file", "image"):
        if request.get(key) is not None:
            return request[key]
    return next((value for value in request.values() if value is not None), None)


def error_body(exc: pp.PreprocessError) -> dict[str, Any]:
    """The JSON body of a 4xx answer, in TorchServe's own error shape."""
    return {"code": int(exc.status), "type": type(exc).__name__, "message": str(exc)}


def prediction_body(digit: np.ndarray, probabilities: list[float], model_version: str) -> dict[str, Any]:
    """The JSON body of a prediction."""
    best = int(np.argmax(probabilities))
    return {
        "digit": best,
        "confidence": float(probabilities[best]),
        "probabilities": [float(p) for p in probabilities],
        "input": digit.reshape(-1).tolist(),
        "model_version": model_version,
    }


def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """The same model, faster on CPU: BatchNorm folded into the convolutions, channels-last memory.

    About 1.5x faster at batch 1 to 32 on this machine (bench/serve.py); a model that cannot be
    traced is kept as it is.
    """
    model.eval()
    try:
        with warnings.catch_warnings():  # the module touches deprecated torch.jit APIs on import
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.fx.experimental.optimization import fuse

        model = fuse(model)
    except Exception:  # tracing failed: run the model unfused
        logger.warning(
            "could not fold BatchNorm into the convolutions; serving the model as it is", exc_info=True
        )
    # torch's stubs lack to(memory_format=...)
    fast: torch.nn.Module = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return fast


class MnistHandler(BaseHandler):
    """Canvas-robust MNIST classification with per-request 4xx errors."""

    def initialize(self, context: Any) -> None:
        """Load the model (BaseHandler), speed it up, read the version and the input limits."""
        super().initialize(context)
        self.model: torch.nn.Module = for_inference(self.model)
        self.model_version = str(context.manifest.get("model", {}).get("modelVersion", "unknown"))
        self.max_bytes = int(os.environ.get("MAX_UPLOAD_BYTES", pp.DEFAULT_MAX_BYTES))
        self.max_pixels = int(os.environ.get("MAX_IMAGE_PIXELS", pp.DEFAULT_MAX_PIXELS))

    def decode(self, request: dict[str, Any], content_type: str | None) -> np.ndarray:
        """One request -> the 28x28 uint8 digit (raises `PreprocessError` for bad input)."""
        image = pp.decode_payload(request_body(request), content_type, self.max_bytes)
        return pp.preprocess(image, self.max_pixels)

    def predict(self, digits: list[np.ndarray]) -> list[list[float]]:
        """A batch of 28x28 digits -> softmax probabilities."""
        batch = torch.from_numpy(pp.normalize(np.stack(digits))).unsqueeze(1).to(self.device)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return torch.softmax(self.model(batch), dim=1).tolist()

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        """Answer every request of the batch: a prediction, or its own 4xx."""
        self.context = context
        if self._is_describe():  # GET /models/mnist?customized=true on the management API
            return [json.dumps(self.describe_handle()).encode()]
        answers: list[bytes] = [b""] * len(data)
        digits: dict[int, np.ndarray] = {}
        for idx, request in enumerate(data):
            context.set_response_content_type(idx, JSON)
            try:
                digits[idx] = self.decode(request, _content_type(context, idx))
            except pp.PreprocessError as exc:
                answers[idx] = self._reject(context, idx, exc)
            except Exception as exc:  # an input we did not foresee is still the sender's problem
                logger.exception("request %d: unreadable input", idx)
                answers[idx] = self._reject(context, idx, pp.NotAnImageError(f"cannot read the image: {exc}"))
        if digits:
            probabilities = self.predict(list(digits.values()))
            for (idx, digit), probs in zip(digits.items(), probabilities, strict=True):
                answers[idx] = json.dumps(prediction_body(digit, probs, self.model_version)).encode()
        return answers

    def describe_handle(self) -> dict[str, Any]:
        """What the model takes and gives, for operators (the management API's customizedMetadata)."""
        return {
            "model_version": self.model_version,
            "input": "PNG, JPEG or WebP bytes, or JSON {'data': '<base64 or data: URL>'}",
            "output": sorted(prediction_body(np.zeros((28, 28), np.uint8), [0.1] * 10, "").keys()),
            "max_upload_bytes": self.max_bytes,
            "max_image_pixels": self.max_pixels,
        }

    @staticmethod
    def _reject(context: Any, idx: int, exc: pp.PreprocessError) -> bytes:
        status = HTTPStatus(int(exc.status))
        context.set_response_status(status.value, status.phrase, idx=idx)
        return json.dumps(error_body(exc)).encode()


def _content_type(context: Any, idx: int) -> str | None:
    """The request's Content-Type, as TorchServe passes it to the worker."""
    headers = context.get_all_request_header(idx) or {}
    for name, value in headers.items():
        if isinstance(value, dict) and value.get("content-type"):
            return str(value["content-type"])
        if name.lower() == "content-type":
            return str(value)
    return None
