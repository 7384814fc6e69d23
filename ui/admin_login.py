"""The operator page's log-in: the operator token, checked by the one rule (`PredictionService.is_operator`),
attempts limited per client address (the `limits` library, as `ui/ratelimit.py` does for the API).

The token is kept in `app.storage.user` (on the server, per browser: the browser holds only a signed
cookie) and checked again on every page load, so a changed `ADMIN_TOKEN` logs everyone out.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from starlette.requests import Request

from .ratelimit import Network, client_address, parse_networks

DEFAULT_LOGIN_LIMIT = "10/minute"
TOKEN_KEY = "operator_token"  # in app.storage.user


@dataclass(frozen=True)
class Refused:
    """Too many attempts from this address: `retry_after` seconds."""

    retry_after: int

    @property
    def message(self) -> str:
        return f"Too many log-in attempts from this address: try again in {self.retry_after} s."


class LoginLimit:
    """At most `limit` log-in attempts per client address (loopback too: a token is not guessed slowly)."""

    def __init__(self, limit: str = DEFAULT_LOGIN_LIMIT, trusted_proxies: str = "") -> None:
        self.item: RateLimitItem = parse(limit)
        self.proxies: tuple[Network, ...] = parse_networks(trusted_proxies)
        self.limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    def client_of(self, request: Request | None) -> str:
        """The client address of the page's request (X-Forwarded-For only from a trusted proxy)."""
        if request is None:
            return "unknown"
        peer = request.client.host if request.client else None
        return client_address(peer, request.headers.get("x-forwarded-for"), self.proxies)

    async def attempt(self, client: str) -> Refused | None:
        """Count one attempt; `Refused` when over the limit (the attempt is not checked then)."""
        if await self.limiter.hit(self.item, "login", client):
            return None
        stats = await self.limiter.get_window_stats(self.item, "login", client)
        return Refused(max(1, math.ceil(stats.reset_time - time.time())))
