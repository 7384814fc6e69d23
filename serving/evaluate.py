"""Evaluate one registered model version through the served path: `/predictions/<model>/<version>`.

Candidate and live version are compared on exactly what people's drawings go through: the PNG
bytes, TorchServe, the handler's preprocessing, the archive's weights. A version's own
in-process accuracy would hide a handler or packaging difference.

    result = await evaluate(inference_url, "mnist", "2.0", examples, headers)
    # {"accuracy": 0.97, "n": 200, "per_digit": {"0": {"accuracy": 1.0, "n": 21}, ...}}

`examples` are (PNG bytes, label) pairs: held-out feedback as stored, or MNIST test images
(`mnist_examples`). Answers that are not 200 are retried a few times (a 503 while a worker
restarts); one that still fails raises `EvaluationError`: a half-measured version must not be
compared with a fully measured one.
"""

from __future__ import annotations

import asyncio
import gzip
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

RETRIES = 3
TIMEOUT_S = 30.0


class EvaluationError(RuntimeError):
    """A version could not be evaluated (TorchServe kept refusing an example); the message says why."""


def summarise(labels: Sequence[int], predicted: Sequence[int]) -> dict[str, Any]:
    """Accuracy, count and per-digit accuracy of `predicted` against `labels` (pure)."""
    per: dict[str, dict[str, float | int]] = {}
    for digit in range(10):
        pairs = [p for label, p in zip(labels, predicted, strict=True) if label == digit]
        if pairs:
            per[str(digit)] = {"accuracy": sum(p == digit for p in pairs) / len(pairs), "n": len(pairs)}
    n = len(labels)
    correct = sum(label == p for label, p in zip(labels, predicted, strict=True))
    return {"accuracy": correct / n if n else 0.0, "n": n, "per_digit": per}


async def _predict(
    client: httpx.AsyncClient, url: str, png: bytes, gate: asyncio.Semaphore, headers: Mapping[str, str]
) -> int:
    detail, sent = "", {**headers, "Content-Type": "image/png"}
    for attempt in range(RETRIES):
        async with gate:
            try:
                response = await client.post(url, content=png, headers=sent)
            except httpx.HTTPError as exc:
                detail = f"{type(exc).__name__}"
            else:
                if response.status_code == 200:
                    return int(response.json()["digit"])
                detail = f"HTTP {response.status_code} {response.text[:200]}"
        await asyncio.sleep(0.2 * (attempt + 1))
    raise EvaluationError(f"{url}: {detail}")


async def evaluate(
    inference_url: str,
    model_name: str,
    version: str,
    examples: Sequence[tuple[bytes, int]],
    headers: Mapping[str, str],
    concurrency: int = 8,
) -> dict[str, Any]:
    """`summarise` of what `version` answers for every example (`EvaluationError` if it cannot)."""
    url = f"{inference_url.rstrip('/')}/predictions/{model_name}/{version}"
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits) as client:
        predicted = await asyncio.gather(*(_predict(client, url, png, gate, headers) for png, _ in examples))
    return summarise([label for _, label in examples], predicted)


def png(image: np.ndarray) -> bytes:
    """A 28x28 uint8 image (white on black, as MNIST) as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def spread(count: int, limit: int | None) -> np.ndarray:
    """`limit` indices evenly spread over `count` (all of them when `limit` is None or larger)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.linspace(0, count - 1, num=max(limit, 0)).round().astype(int)


def mnist_examples(mnist_dir: Path, limit: int | None = None) -> list[tuple[bytes, int]]:
    """The MNIST test set as (PNG, label), `limit` of them spread over the whole set."""
    with gzip.open(Path(mnist_dir) / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(Path(mnist_dir) / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return [(png(images[i]), int(labels[i])) for i in spread(len(labels), limit)]
