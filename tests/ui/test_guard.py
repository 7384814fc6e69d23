"""The web side's bounds: bodies (size, time, JSON depth), rate limits, security headers.

The middlewares alone on a small FastAPI app (fast), then `python -m ui` itself over real
sockets (uvicorn's own bounds, a short or trickled body, a 400 MB chunked body and the memory
it costs) on the session's PostgreSQL and a fake model server.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi import FastAPI, Request

from settings import Settings
from tests.ui.fakes import FakeModelServer, digit_png
from tests.ui.live import RunningApp
from tests.ui.test_outbox_crash import app_process
from ui.app import add_guards
from ui.headers import CSP, harden_cookie
from ui.ratelimit import INTERNAL_NETWORKS, client_address, is_internal, parse_networks

PNG = {"content-type": "image/png"}


def small_app(**settings: object) -> FastAPI:
    """Echo routes behind the app's guards (`add_guards`), with `settings` overridden."""
    app = FastAPI()

    @app.post("/api/predictions")
    async def predictions(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    @app.put("/api/predictions/{pid}/label")
    async def label(pid: int, request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    add_guards(app, Settings(**settings))  # type: ignore[arg-type]  # test overrides by keyword
    return app


def client(app: FastAPI, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app, client=(peer, 4711))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def chunks(size: int, chunk: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < size:
        yield b"x" * min(chunk, size - sent)
        sent += chunk


# -- bodies ---------------------------------------------------------------------------------------------
async def test_bodies_over_the_limit_are_413_declared_or_not() -> None:
    async with client(small_app(max_upload_bytes=1000)) as c:
        ok = await c.post("/api/predictions", content=b"x" * 1000, headers=PNG)
        assert ok.status_code == 200 and ok.json() == {"received": 1000}
        declared = await c.post("/api/predictions", content=b"x" * 1001, headers=PNG)
        streamed = await c.post("/api/predictions", content=chunks(50_000_000), headers=PNG)  # no length
        for response in (declared, streamed):
            assert response.status_code == 413 and "at most 1,000 bytes" in response.json()["detail"]


async def test_label_bodies_are_capped_at_a_few_kb() -> None:
    async with client(small_app()) as c:
        small = await c.put("/api/predictions/1/label", json={"label": 3})
        big = await c.put("/api/predictions/1/label", content=b'{"label": 3, "x": "' + b"y" * 5000 + b'"}')
        assert small.status_code == 200
        assert big.status_code == 413 and "4,096" in big.json()["detail"]


async def test_deeply_nested_json_is_400_before_any_parser() -> None:
    async with client(small_app()) as c:
        for body in (b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"[" * 1000):
            response = await c.post(
                "/api/predictions", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code in (400, 413), response.text
            assert "detail" in response.json()
        deep = b'{"data": ' + b"[" * 40 + b"]" * 40 + b"}"
        response = await c.post(
            "/api/predictions", content=deep, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and "nested deeper" in response.json()["detail"]
        shallow = b'{"data": ' + b"[" * 20 + b"]" * 20 + b"}"
        response = await c.post(
            "/api/predictions", content=shallow, headers={"content-type": "application/json"}
        )
        assert response.status_code == 200


# -- rate limits ----------------------------------------------------------------------------------------
def test_the_client_is_the_peer_unless_the_peer_is_a_trusted_proxy() -> None:
    proxies = parse_networks("10.0.0.0/8, 192.168.1.7")
    assert client_address("203.0.113.5", "1.2.3.4", proxies) == "203.0.113.5"  # not a proxy: forged
    assert client_address("10.1.2.3", "198.51.100.9", proxies) == "198.51.100.9"
    # The client's own (forged) entries are on the left; our proxies' on the right.
    assert client_address("10.1.2.3", "6.6.6.6, 198.51.100.9, 192.168.1.7", proxies) == "198.51.100.9"
    assert client_address("10.1.2.3", "not-an-address", proxies) == "10.1.2.3"
    assert client_address("10.1.2.3", None, proxies) == "10.1.2.3"
    assert client_address("10.1.2.3", "10.9.9.9", proxies) == "10.9.9.9"  # only proxies: the first


async def test_over_the_limit_is_429_with_retry_after_per_address_and_counted() -> None:
    from ui import metrics

    app = small_app(
        rate_limit_predictions="3/minute", rate_limit_labels="2/minute", trusted_proxies="10.0.0.1"
    )
    before = metrics.RATE_LIMITED.labels("predictions")._value.get()
    async with client(app, peer="203.0.113.5") as c, client(app, peer="10.0.0.1") as proxied:
        statuses = [
            (await c.post("/api/predictions", content=b"x", headers=PNG)).status_code for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 429]
        refused = await c.post("/api/predictions", content=b"x", headers=PNG)
        assert refused.status_code == 429 and "too many requests" in refused.json()["detail"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["x-content-type-options"] == "nosniff"  # the refusal has the headers too
        # Labels have their own budget; another address (here behind the trusted proxy) its own.
        assert (await c.put("/api/predictions/1/label", json={"label": 1})).status_code == 200
        other = await proxied.post(
            "/api/predictions", content=b"x", headers={**PNG, "X-Forwarded-For": "198.51.100.9"}
        )
        assert other.status_code == 200
        # Loopback gets RATE_LIMIT_LOOPBACK (generous) whatever the route's limit.
    async with client(app, peer="127.0.0.1") as local:
        for _ in range(10):
            assert (await local.post("/api/predictions", content=b"x", headers=PNG)).status_code == 200
    assert metrics.RATE_LIMITED.labels("predictions")._value.get() - before == 2


# -- headers --------------------------------------------------------------------------------------------
async def test_security_headers_and_hsts_only_with_https() -> None:
    async with client(small_app()) as c:
        plain = await c.post("/api/predictions", content=b"x", headers=PNG)
    async with client(small_app(https=True)) as c:
        secure = await c.post("/api/predictions", content=b"x", headers=PNG)
    for response in (plain, secure):
        assert response.headers["content-security-policy"] == CSP
        assert "frame-ancestors 'none'" in CSP and "object-src 'none'" in CSP
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-frame-options"] == "DENY"
    assert "strict-transport-security" not in plain.headers
    assert secure.headers["strict-transport-security"].startswith("max-age=")


def test_cookies_get_httponly_samesite_and_secure_when_asked() -> None:
    assert harden_cookie("session=abc; path=/", secure=False) == "session=abc; path=/; HttpOnly; SameSite=Lax"
    assert harden_cookie("s=1; Path=/; SameSite=Strict; HttpOnly", secure=True).endswith("; Secure")
    assert "SameSite=Lax" not in harden_cookie("s=1; samesite=strict", secure=False)


# -- the real server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> Iterator[FakeModelServer]:
    with FakeModelServer() as server:
        yield server


@pytest.fixture
def served(
    db_url: str, model: FakeModelServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunningApp]:
    monkeypatch.setenv("BODY_TIMEOUT_S", "1")
    with app_process(tmp_path, db_url, model.url) as app:
        yield app


def raw(app: RunningApp, request: bytes, wait: float = 10.0) -> tuple[float, bytes]:
    """Send `request` on a plain socket, read the answer until the server closes; (seconds, bytes)."""
    host, port = app.url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return time.monotonic() - started, answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def good_request_works(app: RunningApp) -> None:
    response = httpx.post(f"{app.url}/api/predictions", content=digit_png("one"), headers=PNG, timeout=10)
    assert response.status_code == 201, response.text


@pytest.mark.slow
def test_a_short_or_trickled_body_is_408_not_a_hang(served: RunningApp) -> None:
    head = (
        b"POST /api/predictions HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    seconds, answer = raw(served, head + b"only 15 bytes.")
    assert status_of(answer) == 408 and b"in time" in answer and seconds < 5
    # A trickle: a byte every 0.3 s keeps each read short, the whole body still has a deadline.
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        started, answer = time.monotonic(), b""
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(1000):
                sock.sendall(b"x")
                time.sleep(0.3)
        answer = sock.recv(65536)
    assert status_of(answer) == 408 and time.monotonic() - started < 5
    good_request_works(served)


@pytest.mark.slow
def test_a_400_mb_chunked_body_is_refused_early_in_constant_memory(served: RunningApp) -> None:
    """The issue: a chunked 400 MB body took the UI from 92 to 640 MB before its 413."""
    rss = psutil.Process(served.process.pid)
    good_request_works(served)  # warm: the first request loads what the process needs
    before = rss.memory_info().rss

    def body() -> Iterator[bytes]:  # streamed, never built: 400 MB of 64 KB chunks
        chunk = b"\x89PNG" + bytes(65532)
        for _ in range(400 * 16):
            yield chunk

    try:
        response = httpx.post(f"{served.url}/api/predictions", content=body(), headers=PNG, timeout=30)
        status, detail = response.status_code, response.json()["detail"]
    except httpx.TransportError:  # the server answered and closed while the client was still sending
        status, detail = 413, "closed"
    grown = (rss.memory_info().rss - before) / 1e6
    print(f"UI resident memory while refusing a 400 MB chunked body: +{grown:.1f} MB")
    assert status == 413 and ("too large" in detail or detail == "closed")
    assert grown < 20
    good_request_works(served)


@pytest.mark.slow
def test_unknown_routes_and_methods_under_api_are_json(served: RunningApp) -> None:
    missing = httpx.get(f"{served.url}/api/nothing-here", timeout=5)
    assert missing.status_code == 404 and "no such route" in missing.json()["detail"]
    wrong = httpx.delete(f"{served.url}/api/stats", timeout=5)
    assert wrong.status_code == 405 and "GET" in wrong.headers["allow"] and wrong.json()["detail"]
    page = httpx.get(served.url, timeout=5)
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert json.loads(httpx.get(f"{served.url}/openapi.json", timeout=5).text)["paths"]


def test_who_is_internal() -> None:
    proxies, internal = parse_networks("10.0.0.5"), parse_networks(INTERNAL_NETWORKS)
    assert is_internal("127.0.0.1", None, proxies, internal)  # loopback: Prometheus beside the app
    assert is_internal("172.18.0.4", None, proxies, internal)  # Compose's network
    assert not is_internal("203.0.113.9", None, proxies, internal)
    # A proxy we were not told to trust passed it on: public, whatever the proxy's own address.
    assert not is_internal("172.18.0.4", "203.0.113.9", proxies, internal)
    assert not is_internal("172.18.0.4", "10.1.2.3", proxies, internal)
    # Our proxy: the client it saw decides.
    assert not is_internal("10.0.0.5", "203.0.113.9", proxies, internal)
    assert is_internal("10.0.0.5", "192.168.1.20", proxies, internal)
