"""The bad-input corpus against the real TorchServe: the handler's half of what the UI is tried with.

Every malformed image the UI refuses is refused by the model server too, with a 4xx and a JSON
message, and the next good request works. What only the UI checks (Content-Type, cross-site
forms, labels) stays with the UI's corpus (tests/ui/test_corpus.py). One thing TorchServe does not
do: end a request whose body is shorter than its Content-Length (it waits for ever): that is
why TorchServe is never published (Compose, Kubernetes) and only the UI, which cuts such a
request with a 408, faces clients (docs/security.md).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.ui.fakes import digit_png
from tests.ui.test_corpus import corpus

# The UI's corpus cases that are about the image itself (the model server reads any content type).
IMAGE_CASES = {
    "truncated PNG",
    "decompression bomb",
    "16-megapixel tiny PNG",
    "50 MB chunked",
    "GIF",
    "BMP",
    "TIFF",
    "ICO",
    "SVG",
    "16-bit PNG, blank",
    "CMYK JPEG, blank",
    "palette with transparency, blank",
    "1x1",
    "10000x10",
    "nested JSON",
    '{"data": ""}',
}
CASES = [case for case in corpus() if case[0] in IMAGE_CASES]
# TorchServe's frontend (Netty, max_request_size in config.properties) refuses a body over the limit
# itself, with an empty 413: the UI, the public door, answers the same with a JSON message.
FRONTEND_REFUSALS = {"50 MB chunked": 413}


def test_the_corpus_covers_every_image_case() -> None:
    assert {name for name, _, _ in CASES} == IMAGE_CASES


def good_request_works(torchserve: Any) -> None:
    headers = torchserve.inference_headers()
    response = httpx.post(torchserve.predictions_url(), content=digit_png("one"), headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["digit"] == 1


@pytest.mark.parametrize(("name", "request_args", "status"), CASES, ids=[c[0] for c in CASES])
def test_bad_images_are_4xx_with_a_message_at_the_model_server(
    torchserve: Any, name: str, request_args: dict[str, Any], status: int
) -> None:
    args = dict(request_args)
    args["headers"] = {**args.get("headers", {}), **torchserve.inference_headers()}
    response = httpx.post(torchserve.predictions_url(), timeout=60, **args)
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
    if name in FRONTEND_REFUSALS:  # refused by the Java frontend before the handler: no body
        assert (response.status_code, response.content) == (FRONTEND_REFUSALS[name], b"")
    else:
        body = response.json()
        assert body.get("message") or body.get("detail"), (name, body)
    good_request_works(torchserve)
