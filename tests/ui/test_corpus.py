"""The issue's bad-input corpus against `python -m ui`: each a 4xx with a JSON message, then a good one works.

The real server (its middlewares and uvicorn) on the session's PostgreSQL and a fake model server
(the model's own refusals are tests/handlers'). Nothing here may be a 5xx, a hang or a 2xx.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from db.migrate import migrate
from tests.ui.fakes import FakeModelServer, digit_png
from tests.ui.live import RunningApp
from tests.ui.test_outbox_crash import app_process

pytestmark = pytest.mark.slow

PNG = {"content-type": "image/png"}
HEAD_TIMEOUT_S = 2.0  # the served app's request-head deadline (HEAD_TIMEOUT_S), short for the test
JSON = {"content-type": "application/json"}


def encoded(img: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def tiny_png(width: int, height: int) -> bytes:
    """A valid PNG of width x height black pixels, a few KB whatever its size (compressed zeros)."""
    raw = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(height)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def corpus() -> list[tuple[str, dict[str, Any], int]]:
    """(name, httpx arguments, expected status)."""
    digit = Image.open(io.BytesIO(digit_png("one")))
    palette = digit.convert("P")
    palette.info["transparency"] = 0
    return [
        ("truncated PNG", {"content": digit_png("one")[:300], "headers": PNG}, 400),
        ("decompression bomb", {"content": tiny_png(10_000, 10_000), "headers": PNG}, 413),
        ("16-megapixel tiny PNG", {"content": tiny_png(4097, 4097), "headers": PNG}, 413),
        ("50 MB chunked", {"content": (b"\x00" * 65536 for _ in range(800)), "headers": PNG}, 413),
        ("GIF", {"content": encoded(digit, "GIF"), "headers": {"content-type": "image/gif"}}, 415),
        ("BMP", {"content": encoded(digit, "BMP"), "headers": {"content-type": "image/bmp"}}, 415),
        ("TIFF", {"content": encoded(digit, "TIFF"), "headers": {"content-type": "image/tiff"}}, 415),
        ("ICO", {"content": encoded(digit, "ICO"), "headers": PNG}, 415),
        ("SVG", {"content": b'<svg xmlns="http://www.w3.org/2000/svg"/>', "headers": PNG}, 415),
        ("16-bit PNG, blank", {"content": encoded(Image.new("I;16", (50, 50)), "PNG"), "headers": PNG}, 400),
        ("CMYK JPEG, blank", {"content": encoded(Image.new("CMYK", (50, 50)), "JPEG"), "headers": PNG}, 400),
        (
            "palette with transparency, blank",
            {"content": encoded(Image.new("P", (50, 50)), "PNG"), "headers": PNG},
            400,
        ),
        ("1x1", {"content": encoded(Image.new("L", (1, 1)), "PNG"), "headers": PNG}, 400),
        ("10000x10", {"content": encoded(Image.new("L", (10_000, 10)), "PNG"), "headers": PNG}, 400),
        (
            "nested JSON",
            {"content": b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "headers": JSON},
            400,
        ),
        ("text/plain", {"content": digit_png("one"), "headers": {"content-type": "text/plain"}}, 415),
        ("form post", {"data": {"data": "x"}}, 415),
        ("no content type", {"content": digit_png("one")}, 415),
        ('{"data": ""}', {"json": {"data": ""}}, 400),
    ]


LABELS: list[tuple[str, bytes, int]] = [
    ("huge label", b'{"label": 1e400}', 422),
    ("NaN label", b'{"label": NaN}', 422),
    ("6.0 label", b'{"label": 6.0}', 422),
    ("nested label", b'{"label": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400),
    ("200 KB label", b'{"label": 1, "x": "' + b"y" * 200_000 + b'"}', 413),
]


@pytest.fixture(scope="module")
def served(postgres: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    url: str = postgres.create_database()
    migrate(url)
    tmp = tmp_path_factory.mktemp("corpus")
    with (
        FakeModelServer() as model,
        app_process(tmp, url, model.url, HEAD_TIMEOUT_S=str(HEAD_TIMEOUT_S)) as app,
    ):
        yield app


def good_request_works(app: RunningApp) -> dict[str, Any]:
    response = httpx.post(f"{app.url}/api/predictions", content=digit_png("one"), headers=PNG, timeout=10)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize(("name", "request_args", "status"), corpus(), ids=[c[0] for c in corpus()])
def test_bad_images_are_4xx_with_a_message(
    served: RunningApp, name: str, request_args: dict[str, Any], status: int
) -> None:
    try:
        response = httpx.post(f"{served.url}/api/predictions", timeout=20, **request_args)
        got, detail = response.status_code, response.json()["detail"]
    except httpx.WriteError:  # refused and closed while the client was still sending (the 50 MB body)
        got, detail = 413, "closed while sending"
    assert got == status, (name, detail)
    assert isinstance(detail, str) and detail
    good_request_works(served)


@pytest.mark.parametrize(("name", "body", "status"), LABELS, ids=[c[0] for c in LABELS])
def test_bad_labels_are_4xx_with_a_message(served: RunningApp, name: str, body: bytes, status: int) -> None:
    posted = good_request_works(served)
    url = f"{served.url}/api/predictions/{posted['id']}/label"
    headers = {**JSON, "X-Label-Token": posted["label_token"]}
    response = httpx.put(url, content=body, headers=headers, timeout=10)
    assert response.status_code == status, (name, response.text)
    assert response.json()["detail"]
    assert httpx.put(url, json={"label": 1}, headers=headers, timeout=10).status_code == 200


def test_a_trickled_request_head_is_cut_with_408(served: RunningApp) -> None:
    """Slowloris: one header byte every 0.2 s would hold a connection for ever without the deadline."""
    host, port = served.url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        with contextlib.suppress(OSError):  # the server may close while we still write
            for byte in b"X-Slow: " + b"a" * 200:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
                sock.settimeout(0.01)
                with contextlib.suppress(TimeoutError):
                    if chunk := sock.recv(65536):
                        answer += chunk
                        break
                sock.settimeout(30)
        sock.settimeout(30)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and b'"detail"' in answer, answer
    assert HEAD_TIMEOUT_S - 0.5 <= took <= HEAD_TIMEOUT_S + 3, took
    good_request_works(served)


def test_a_keep_alive_connection_gets_the_deadline_for_each_head(served: RunningApp) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as client:  # one connection, several requests
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(HEAD_TIMEOUT_S / 2)  # idle well within the keep-alive and head deadlines


def test_a_short_body_with_a_long_content_length_is_408(served: RunningApp) -> None:
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /api/predictions HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 5000\r\n\r\nshort"
        )
        answer = b""
        while chunk := sock.recv(65536):  # to the end: the server closes the connection after a 408
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b'"detail"' in answer
    good_request_works(served)
