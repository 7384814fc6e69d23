"""Signed links: what lets a browser load a drawing or the export without a header it cannot send.

An `<img src>` or a download link carries no `Authorization` or `X-Label-Token`, yet drawings are
private (a person sees their own; the operator all of them). So the page hands out URLs signed
with a server secret (HMAC-SHA256): a drawing's URL is signed for that drawing only (it never
changes, so browsers cache it); the export's for a few minutes only. Replicas that share the
secret (`STORAGE_SECRET`) accept each other's links.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

SIGNATURE_CHARS = 32  # 128 bits of HMAC-SHA256, hex
EXPORT_TTL_S = 300


class UrlSigner:
    def __init__(self, secret: str | None = None) -> None:
        raw = (secret or secrets.token_urlsafe(32)).encode()
        # Derived: the links' key is not the browser-storage key itself.
        self._key = hashlib.sha256(b"signed links\0" + raw).digest()

    def sign(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()[:SIGNATURE_CHARS]

    def valid(self, message: str, signature: str | None) -> bool:
        """Constant time; False for a missing or malformed signature."""
        if signature is None or not signature.isascii():  # compare_digest takes ASCII strings only
            return False
        return hmac.compare_digest(self.sign(message), signature)

    def image_url(self, prediction_id: int) -> str:
        return f"/api/predictions/{prediction_id}/image.png?sig={self.sign(f'image:{prediction_id}')}"

    def image_allowed(self, prediction_id: int, signature: str | None) -> bool:
        return self.valid(f"image:{prediction_id}", signature)

    def export_url(self, ttl_s: float = EXPORT_TTL_S, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + ttl_s)
        return f"/api/export?expires={expires}&sig={self.sign(f'export:{expires}')}"

    def export_allowed(self, expires: int | None, signature: str | None, now: float | None = None) -> bool:
        if expires is None or expires < (time.time() if now is None else now):
            return False
        return self.valid(f"export:{expires}", signature)
