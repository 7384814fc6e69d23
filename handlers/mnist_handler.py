"""TorchServe handler: any drawing or upload in, the digit and what the model saw out.

Per request (TorchServe may batch several): raw PNG/JPEG/WebP bytes, or JSON
`{"data": "<base64 or data: URL>"}`. The answer is JSON:
`{"digit", "confidence", "probabilities", "input", "model_version", "is_digit"}`, where `input` is
the 28x28 the model saw as 784 integers 0-255, row-major, and `is_digit` (present when the archive
has a `digitness.json` head, training/digitness.py) says whether the drawing looks like a digit at
all; `digit` is still the best digit either way.

The probabilities are calibrated: softmax(logits / T) with the temperature T of the archive's
`calibration.json` (fitted by `training.calibrate`; T=1 when the file is absent, so older archives
answer as before). On the CPU the network runs in ONNX Runtime from the archive's `mnist.onnx`
(about 2x faster than eager torch at batch 1, same answers) when onnxruntime is installed; otherwise,
and on a GPU, in torch. Each answer carries a `Server-Timing` header with the handler's own time
split (decode, preprocess, model; milliseconds).

Bad input answers only its own request with a 4xx and a JSON body `{"code", "type", "message"}`
(400 bad payload, 413 too large, 415 not an image, 422 blank drawing); the rest of the batch is
still answered and the worker keeps running. Limits come from the environment:
`MAX_UPLOAD_BYTES` (body) and `MAX_IMAGE_PIXELS` (decoded image).
"""

from __future__ import annotations

import json
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

if __package__:
    from . import model_runtime as rt
    from . import preprocess as pp
else:  # inside the model archive every file sits flat in one folder on sys.path
    import model_runtime as rt  # type: ignore[no-redef,import-not-found]  # the archive's flat layout
    import preprocess as pp  # type: ignore[no-redef,import-not-found]  # the archive's flat layout

logger = logging.getLogger(__name__)

JSON = "application/json"
TIMING_HEADER = "Server-Timing"


def server_timing(decode_ms: float, preprocess_ms: float, model_ms: float, batch: int) -> str:
    """The Server-Timing value of one answer; `model` is the forward of its whole batch."""
    return (
        f"decode;dur={decode_ms:.3f}, preprocess;dur={preprocess_ms:.3f}, "
        f'model;dur={model_ms:.3f};desc="batch of {batch}"'
    )


def request_body(request: dict[str, Any]) -> Any:
    """The payload of one TorchServe request: the raw body, or the first form field."""
    for key in ("body", "data", "file", "image"):
        if request.get(key) is not None:
            return request[key]
    return next((value for value in request.values() if value is not None), None)


def error_body(exc: pp.PreprocessError) -> dict[str, Any]:
    """The JSON body of a 4xx answer, in TorchServe's own error shape."""
    return {"code": int(exc.status), "type": type(exc).__name__, "message": str(exc)}


def prediction_body(
    digit: np.ndarray, probabilities: list[float], model_version: str, is_digit: bool | None = None
) -> dict[str, Any]:
    """The JSON body of a prediction (`is_digit` only when the archive can tell)."""
    best = int(np.argmax(probabilities))
    body: dict[str, Any] = {
        "digit": best,
        "confidence": float(probabilities[best]),
        "probabilities": [float(p) for p in probabilities],
        "input": digit.reshape(-1).tolist(),
        "model_version": model_version,
    }
    if is_digit is not None:
        body["is_digit"] = bool(is_digit)
    return body


class MnistHandler(BaseHandler):
    """Canvas-robust MNIST classification with per-request 4xx errors."""

    def initialize(self, context: Any) -> None:
        """Load the model (BaseHandler), pick the fastest runtime, read calibration, version and limits."""
        super().initialize(context)
        model_dir = Path(context.system_properties.get("model_dir") or ".")
        self.model: torch.nn.Module = rt.for_inference(rt.LogitsAndFeatures(self.model))
        self.temperature = rt.read_temperature(model_dir)
        self.digit_head = rt.read_digit_head(model_dir)
        on_cpu = torch.device(self.device).type == "cpu"
        fast = rt.onnx_forward(model_dir / rt.ONNX_FILE, torch.get_num_threads()) if on_cpu else None
        self.runtime = "onnxruntime" if fast else "torch"
        self.forward: rt.Forward = fast or rt.torch_forward(self.model, torch.device(self.device))
        self.model_version = str(context.manifest.get("model", {}).get("modelVersion", "unknown"))
        self.max_bytes = int(os.environ.get("MAX_UPLOAD_BYTES", pp.DEFAULT_MAX_BYTES))
        self.max_pixels = int(os.environ.get("MAX_IMAGE_PIXELS", pp.DEFAULT_MAX_PIXELS))
        logger.info(
            "model %s on %s (%s), temperature %.4g",
            self.model_version,
            self.device,
            self.runtime,
            self.temperature,
        )

    def decode(self, request: dict[str, Any], content_type: str | None) -> np.ndarray:
        """One request -> the 28x28 uint8 digit (raises `PreprocessError` for bad input)."""
        return self._decode_timed(request, content_type)[0]

    def predict(self, digits: list[np.ndarray]) -> list[list[float]]:
        """A batch of 28x28 digits -> calibrated softmax probabilities."""
        return self.answer(digits)[0]

    def answer(self, digits: list[np.ndarray]) -> tuple[list[list[float]], list[bool] | None]:
        """A batch of 28x28 digits -> calibrated probabilities, and is-a-digit when the archive can tell."""
        logits, features = self.forward(np.ascontiguousarray(pp.normalize(np.stack(digits))[:, None]))
        probabilities: list[list[float]] = rt.calibrated(logits, self.temperature).tolist()
        if self.digit_head is None:
            return probabilities, None
        return probabilities, [bool(v) for v in self.digit_head.is_digit(features)]

    def _decode_timed(
        self, request: dict[str, Any], content_type: str | None
    ) -> tuple[np.ndarray, float, float]:
        """The digit, the decode time (body and image) and the preprocessing time, in ms."""
        t0 = time.perf_counter()
        image = pp.load_image(
            pp.decode_payload(request_body(request), content_type, self.max_bytes), self.max_pixels
        )
        t1 = time.perf_counter()
        digit = pp.preprocess(image, self.max_pixels)
        return digit, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        """Answer every request of the batch: a prediction, or its own 4xx."""
        self.context = context
        if self._is_describe():  # GET /models/mnist?customized=true on the management API
            return [json.dumps(self.describe_handle()).encode()]
        answers: list[bytes] = [b""] * len(data)
        digits: dict[int, np.ndarray] = {}
        timings: dict[int, tuple[float, float]] = {}
        for idx, request in enumerate(data):
            context.set_response_content_type(idx, JSON)
            try:
                digits[idx], *times = self._decode_timed(request, _content_type(context, idx))
                timings[idx] = (times[0], times[1])
            except pp.PreprocessError as exc:
                answers[idx] = self._reject(context, idx, exc)
            except Exception as exc:  # an input we did not foresee is still the sender's problem
                logger.exception("request %d: unreadable input", idx)
                answers[idx] = self._reject(context, idx, pp.NotAnImageError(f"cannot read the image: {exc}"))
        if digits:
            t0 = time.perf_counter()
            probabilities, verdicts = self.answer(list(digits.values()))
            model_ms = (time.perf_counter() - t0) * 1000
            for i, ((idx, digit), probs) in enumerate(zip(digits.items(), probabilities, strict=True)):
                is_digit = None if verdicts is None else verdicts[i]
                answers[idx] = json.dumps(
                    prediction_body(digit, probs, self.model_version, is_digit)
                ).encode()
                timing = server_timing(*timings[idx], model_ms, len(digits))
                context.set_response_header(idx, TIMING_HEADER, timing)
        return answers

    def describe_handle(self) -> dict[str, Any]:
        """What the model takes and gives, for operators (the management API's customizedMetadata)."""
        return {
            "model_version": self.model_version,
            "input": "PNG, JPEG or WebP bytes, or JSON {'data': '<base64 or data: URL>'}",
            "output": sorted(
                prediction_body(np.zeros((28, 28), np.uint8), [0.1] * 10, "", self._can_tell).keys()
            ),
            "max_upload_bytes": self.max_bytes,
            "max_image_pixels": self.max_pixels,
            "runtime": self.runtime,
            "temperature": self.temperature,
        }

    @property
    def _can_tell(self) -> bool | None:
        """True when answers carry `is_digit` (a placeholder value, for the list of fields)."""
        return True if self.digit_head is not None else None

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
