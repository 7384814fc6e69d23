"""The one free-port probe (TorchServe's start, `make run`, the tests) and loopback forms of bind URLs."""

from __future__ import annotations

import contextlib
import socket
from urllib.parse import urlsplit, urlunsplit

BIND_ALL = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now, i.e. nothing listens there.

    Binding is the only reliable test: connecting misses a server that is not accepting yet, and
    `torchserve --start` itself exits 0 even when it cannot bind. SO_REUSEADDR keeps a port whose
    last connections linger in TIME_WAIT (a server just stopped) counted as free, as servers see it.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` right now (chosen by the kernel, all held until chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port(host: str = "127.0.0.1") -> int:
    """One port free on `host` right now."""
    return free_ports(1, host)[0]


def local_url(url: str) -> str:
    """`url` with a bind-all host (0.0.0.0, ::) replaced by loopback: where a client on this machine connects.

    A container binds TorchServe on 0.0.0.0 (`MANAGEMENT_URL=http://0.0.0.0:8081`); its own
    healthcheck talks to the same server through 127.0.0.1.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host not in BIND_ALL:
        return url
    loopback = BIND_ALL[host]
    netloc = f"[{loopback}]" if ":" in loopback else loopback
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
