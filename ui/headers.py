"""Security headers on every HTTP answer, the page's and the API's (an ASGI middleware).

The Content-Security-Policy is what NiceGUI works under: NiceGUI renders with Vue's in-browser
template compiler (`new Function`: `'unsafe-eval'`) and inline start-up scripts
(`'unsafe-inline'`), so the policy cannot stop injected script by itself (nothing on the page
renders people's text as HTML); what it does hold: no framing (`frame-ancestors 'none'`), no
plugins, no `<base>` or form targets elsewhere, and scripts, styles, fonts and connections from
this origin only (an injected script could not load code or send data to another host).
Cookies (NiceGUI's session) are made `HttpOnly`, `SameSite=Lax`, and `Secure` when configured.
"""

from __future__ import annotations

from dataclasses import dataclass

from .guard import ASGIApp, Message, Receive, Scope, Send

CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline' 'unsafe-eval'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
HSTS = "max-age=31536000; includeSubDomains"


@dataclass(frozen=True)
class HeaderPolicy:
    """`https`: the site is served over HTTPS (HSTS sent); `secure_cookies`: cookies get `Secure`."""

    https: bool = False
    secure_cookies: bool = False

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [
            (b"content-security-policy", CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        if self.https:
            out.append((b"strict-transport-security", HSTS.encode()))
        return out


def harden_cookie(value: str, *, secure: bool) -> str:
    """A `Set-Cookie` value with `HttpOnly`, `SameSite` (Lax unless set) and, when asked, `Secure`."""
    attributes = {part.strip().split("=", 1)[0].lower() for part in value.split(";")[1:]}
    extra = []
    if "httponly" not in attributes:
        extra.append("HttpOnly")
    if "samesite" not in attributes:
        extra.append("SameSite=Lax")
    if secure and "secure" not in attributes:
        extra.append("Secure")
    return "; ".join([value.rstrip("; "), *extra]) if extra else value


class SecurityHeaders:
    """Adds `HeaderPolicy.headers()` (those a route set itself are kept) and hardens cookies."""

    def __init__(self, app: ASGIApp, policy: HeaderPolicy) -> None:
        self.app = app
        self.policy = policy
        self._headers = policy.headers()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                given = list(message.get("headers", ()))
                names = {k.lower() for k, _ in given}
                secure = self.policy.secure_cookies
                headers = [
                    (k, harden_cookie(v.decode("latin-1"), secure=secure).encode("latin-1"))
                    if k.lower() == b"set-cookie"
                    else (k, v)
                    for k, v in given
                ]
                headers.extend((k, v) for k, v in self._headers if k not in names)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
