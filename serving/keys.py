"""TorchServe's access keys: read from the key file it writes, sent as `Authorization: Bearer <key>`.

With token authorization on (config.properties), TorchServe 0.12 makes three random keys at every
start (management, inference, and the API key that rotates the other two) and writes them to
`key_file.json` in its working folder (`ServeConfig.run_dir`, mode 0600). It cannot be given a
key, so every client reads that file: `KeyFileAuth` does, once, and again whenever TorchServe
refuses the key it sent (a restarted TorchServe has new keys), then retries that request once.

TorchServe refuses a missing or wrong key with **400** `InvalidKeyException` (not 401/403);
`key_refused` is that rule, in one place. The metrics API needs no key.

    auth = KeyFileAuth(config.key_file, "management")
    httpx.get(f"{config.management_url}/models", auth=auth)
    ManagementClient(url, "mnist", auth=auth)
"""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path
from typing import Literal

import httpx

from settings import Settings

KEY_FILE_NAME = "key_file.json"  # TorchServe's own name; written in its working folder
Api = Literal["management", "inference"]
REFUSED_TYPE = "InvalidKeyException"


def key_file_of(settings: Settings) -> Path:
    """Where a client configured by `settings` finds TorchServe's keys.

    `TORCHSERVE_KEY_FILE` when set (a TorchServe run elsewhere, e.g. the Compose volume the UI
    mounts), else the run folder `python -m serving` and `make run` give TorchServe.
    """
    if settings.torchserve_key_file is not None:
        return Path(settings.torchserve_key_file)
    return Path(settings.run_dir) / "torchserve" / KEY_FILE_NAME


def read_key(path: Path | None, api: Api) -> str | None:
    """The `api` key in TorchServe's key file; None when there is no such file (yet) or no such key."""
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(api) if isinstance(data, dict) else None
    key = entry.get("key") if isinstance(entry, dict) else None
    return key if isinstance(key, str) and key else None


def headers(path: Path | None, api: Api) -> dict[str, str]:
    """`{"Authorization": "Bearer <key>"}` for one request, or {} when there is no key to send."""
    key = read_key(path, api)
    return {"Authorization": f"Bearer {key}"} if key else {}


def key_refused(response: httpx.Response) -> bool:
    """TorchServe refused the request's key: 400 with `InvalidKeyException` (TorchServe 0.12)."""
    if response.status_code not in (400, 401, 403):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("type") == REFUSED_TYPE


class KeyFileAuth(httpx.Auth):
    """httpx authentication with one of TorchServe's keys, re-read when TorchServe refuses it.

    `path` None (or a file that never appears, e.g. token authorization off) sends no header.
    """

    requires_response_body = True  # `key_refused` reads the error body

    def __init__(self, path: Path | None, api: Api) -> None:
        self.path = path
        self.api = api
        self._key: str | None = None
        self._loaded = False

    def current_key(self) -> str | None:
        if not self._loaded:
            self._key, self._loaded = read_key(self.path, self.api), True
        return self._key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        sent = self.current_key()
        if sent:
            request.headers["Authorization"] = f"Bearer {sent}"
        response = yield request
        if not key_refused(response):
            return
        fresh = read_key(self.path, self.api)
        self._key = fresh
        if fresh and fresh != sent:  # TorchServe restarted with new keys since we read them
            request.headers["Authorization"] = f"Bearer {fresh}"
            yield request
