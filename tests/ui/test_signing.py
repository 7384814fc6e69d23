"""Signed links: one drawing per signature, the export's for a while, nothing forgeable or crashing."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from ui.signing import UrlSigner


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_an_image_link_is_for_its_drawing_and_its_secret_only() -> None:
    signer = UrlSigner("secret")
    sig = query(signer.image_url(7))["sig"]
    assert signer.image_allowed(7, sig)
    assert not signer.image_allowed(8, sig)
    assert not UrlSigner("another secret").image_allowed(7, sig)
    assert UrlSigner("secret").image_allowed(7, sig)  # replicas sharing the secret agree
    for bad in (None, "", "0" * 32, sig.upper(), "\x1b\u00e0\u00c0" * 10, sig + "0"):
        assert not signer.image_allowed(7, bad)


def test_an_export_link_expires() -> None:
    signer = UrlSigner("secret")
    q = query(signer.export_url(ttl_s=60, now=1_000))
    expires, sig = int(q["expires"]), q["sig"]
    assert expires == 1_060
    assert signer.export_allowed(expires, sig, now=1_059)
    assert not signer.export_allowed(expires, sig, now=1_061)
    assert not signer.export_allowed(expires + 1, sig, now=1_000)
    assert not signer.export_allowed(None, sig, now=1_000)
    assert not signer.image_allowed(expires, sig)  # an export signature is no image signature
