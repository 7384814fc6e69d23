"""The HTTP protocol of the UI server: uvicorn's, with a deadline for the request head.

uvicorn bounds idle keep-alive connections and body reads (ui/guard.py), but not the time a
client takes to send a request's head: a client trickling one header byte a second holds its
connection (and a `limit_concurrency` slot) for ever, and a few hundred such clients lock
everyone out (slowloris). Here each request head must be complete within `head_timeout_s` of
the connection opening, or of its first byte on a kept-alive connection (idle kept-alive
connections are uvicorn's `timeout_keep_alive`'s); otherwise the server answers 408 and closes
the connection. Both uvicorn parsers are covered: httptools (used when installed, as
in the images) and h11.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 10.0
_BODY = json.dumps({"detail": "the request head did not arrive in time"}).encode()
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


class _HeadDeadline:
    """The deadline: armed when a head may begin, disarmed once it is complete."""

    head_timeout_s = HEAD_TIMEOUT_S
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()


class HeadTimeoutH11(_HeadDeadline, H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next head on a kept-alive connection
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state in (h11.SEND_BODY, h11.DONE):
            self._disarm()  # a head was complete: its request runs (its body has its own deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_class() -> type[Any]:
    """The httptools protocol with the deadline when httptools is installed, else h11's."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional
        return HeadTimeoutH11

    class HeadTimeoutHttpTools(_HeadDeadline, HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:
                self._arm()  # the first bytes of the next head on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadTimeoutHttpTools


def with_head_timeout(timeout_s: float) -> type[Any]:
    """The protocol class for `uvicorn.Config(http=...)` with this deadline."""
    base = protocol_class()
    return type(base.__name__, (base,), {"head_timeout_s": timeout_s})
