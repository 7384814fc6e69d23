"""Rate limits per client address on the routes that write (an ASGI middleware on the `limits` library).

`limits` (not `slowapi`): slowapi is a decorator layer over `limits` for Starlette routes, which
needs a `Request` argument on every route and answers in its own format; here one middleware
names the routes it limits (`LIMITED_ROUTES`), before the body is read, and answers like the
rest of the API (`{"detail": ...}`, 429, `Retry-After`). `limits` is maintained (typed, async
storage, sliding windows); its in-memory storage is per process: each replica limits on its own.

The client is the peer address; `X-Forwarded-For` counts only when the peer is one of
`TRUSTED_PROXIES` (else anyone could claim any address), and then the nearest address in it that
is not a trusted proxy. Loopback clients (the development machine, its benchmarks) get the
generous `RATE_LIMIT_LOOPBACK`.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from . import metrics
from .guard import ASGIApp, Receive, Scope, Send, header, send_json

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# (route name in the metric, method, path): what is limited.
LIMITED_ROUTES: tuple[tuple[str, str, re.Pattern[str]], ...] = (
    ("predictions", "POST", re.compile(r"^/api/predictions/?$")),
    ("labels", "PUT", re.compile(r"^/api/predictions/[^/]+/label/?$")),
)


def parse_networks(text: str) -> tuple[Network, ...]:
    """`TRUSTED_PROXIES`: comma-separated addresses or CIDR blocks (`10.0.0.0/8, 192.168.1.7`)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(address: Address | None, proxies: Iterable[Network]) -> bool:
    return address is not None and any(address in net for net in proxies)


def client_address(peer: str | None, forwarded_for: str | None, proxies: Sequence[Network]) -> str:
    """Who the client is: the peer, or (peer a trusted proxy) the nearest untrusted `X-Forwarded-For` hop.

    Proxies append the address they saw: the right-most entries are the ones our proxies wrote,
    the left ones the client may have forged. So it is read from the right, skipping trusted hops.
    """
    peer = peer or "unknown"
    if not forwarded_for or not _trusted(_address(peer), proxies):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return peer  # garbage in a header our own proxy passed on: count the proxy
        if not _trusted(address, proxies):
            return str(address)
    return str(_address(hops[0])) if hops else peer


# Where Prometheus scrapes from: loopback and the private ranges (Compose's and Kubernetes' networks).
INTERNAL_NETWORKS = "127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7"


def is_internal(
    peer: str | None, forwarded_for: str | None, proxies: Sequence[Network], internal: Sequence[Network]
) -> bool:
    """Whether a request comes from the internal network (what may read `/metrics` without a token).

    A request that passed a proxy we do not trust (it carries `X-Forwarded-For`) is external
    whatever the proxy's address: behind a reverse proxy on the same private network, every
    public client would otherwise look internal.
    """
    if forwarded_for and not _trusted(_address(peer or ""), proxies):
        return False
    return _trusted(_address(client_address(peer, forwarded_for, proxies)), internal)


def is_loopback(client: str) -> bool:
    address = _address(client)
    return address is not None and address.is_loopback


@dataclass(frozen=True)
class Limits:
    """The limits of `settings.py`, parsed (`"60/minute"`: see the `limits` library's notation)."""

    per_route: dict[str, RateLimitItem]
    loopback: RateLimitItem
    trusted_proxies: tuple[Network, ...]

    @classmethod
    def from_strings(cls, *, predictions: str, labels: str, loopback: str, trusted_proxies: str) -> Limits:
        return cls(
            per_route={"predictions": parse(predictions), "labels": parse(labels)},
            loopback=parse(loopback),
            trusted_proxies=parse_networks(trusted_proxies),
        )


def route_of(method: str, path: str) -> str | None:
    """The limited route a request is for, or None."""
    return next((name for name, m, rx in LIMITED_ROUTES if m == method and rx.match(path)), None)


class RateLimit:
    """Answers 429 (`Retry-After`, JSON) when a client is over its limit on a route of `LIMITED_ROUTES`."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits
        self.limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_of(scope.get("method", ""), scope.get("path", "")) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        peer = scope.get("client")
        client = client_address(
            peer[0] if peer else None, header(scope, b"x-forwarded-for"), self.limits.trusted_proxies
        )
        item = self.limits.loopback if is_loopback(client) else self.limits.per_route[route]
        if await self.limiter.hit(item, route, client):
            await self.app(scope, receive, send)
            return
        stats = await self.limiter.get_window_stats(item, route, client)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        metrics.rate_limited(route)
        await send_json(
            send,
            429,
            f"too many requests: at most {item} for {route} from one address; try again in {retry_after} s",
            {"Retry-After": str(retry_after)},
        )
