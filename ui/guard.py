"""Bounded request bodies: read as a stream, cut at the limit, given a deadline (an ASGI middleware).

Nothing downstream may read an unbounded body: Starlette's `request.body()` reads all of it into
memory, and waits forever for a body shorter than its Content-Length. This middleware reads it
first, chunk by chunk, and answers itself:

- 413 as soon as the declared length or the bytes received pass the route's limit (the rest is
  never read: the connection is closed);
- 408 when the body does not come in time (`timeout_s` for its first bytes, `timeout_s` more for
  the rest: a short or trickled body);
- 400 for a JSON body nested deeper than `handlers.preprocess.MAX_JSON_DEPTH` (the parser would
  recurse once per level).

The route then gets the buffered body (at most the limit) as one message.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from handlers.preprocess import MAX_JSON_DEPTH, json_too_deep

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LABEL_PATH = re.compile(r"^/api/predictions/[^/]+/label/?$")


async def send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """An error answer `{"detail": ...}`; the connection is closed after it (the body may be unread)."""
    body = json.dumps({"detail": detail}).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (lower-case `name`), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class BodyTooLarge(Exception):
    pass


class BodyGuard:
    """Reads each HTTP request body first, bounded in size and time (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, label_max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.label_max_bytes = label_max_bytes
        self.timeout_s = timeout_s

    def limit(self, path: str) -> int:
        """The body limit of a route: a label is a few bytes of JSON, an image up to MAX_UPLOAD_BYTES."""
        return self.label_max_bytes if LABEL_PATH.match(path) else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = header(scope, b"content-length")
        chunked = "chunked" in (header(scope, b"transfer-encoding") or "").lower()
        if not chunked and (length is None or length.strip() in ("", "0")):
            await self.app(scope, receive, send)  # no body to read
            return
        limit = self.limit(scope["path"])
        too_large = f"body too large: at most {limit:,} bytes are accepted here"
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            await send_json(send, 413 if length.strip().isdigit() else 400, too_large)
            return
        try:
            body = await self._read(receive, limit)
        except BodyTooLarge:
            await send_json(send, 413, too_large)
            return
        except TimeoutError:
            await send_json(send, 408, f"the request body did not arrive in time ({self.timeout_s:g} s)")
            return
        if body is None:
            return  # the client left
        if "json" in (header(scope, b"content-type") or "").lower() and json_too_deep(body):
            await send_json(send, 400, f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive, limit: int) -> bytes | None:
        """The whole body, or `BodyTooLarge` as soon as it passes `limit`; None if the client left.

        `TimeoutError` when the first bytes take longer than `timeout_s`, or the rest longer than
        `timeout_s` after them. The clock runs only while waiting for the client: a request that
        waited for this busy process before its first read is not counted late.
        """
        chunks: list[bytes] = []
        size = 0
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            async with asyncio.timeout_at(loop.time() + self.timeout_s if deadline is None else deadline):
                message = await receive()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body once, then waits on the real one (disconnects)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
