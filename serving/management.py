"""The one client of TorchServe's management API, and the one readiness rule.

    client = ManagementClient("http://127.0.0.1:8081", "mnist")
    client.register("mnist.mar", workers=2, batch_size=4, max_batch_delay_ms=0)
    client.ready()            # is_ready(client.describe())
    client.scale("1.0", 3)    # PUT /models/mnist/1.0?min_worker=3&max_worker=3&synchronous=true

`AsyncManagementClient` has the same methods as coroutines (the UI's readiness check). Both take
URLs and a model name, not a configuration object, so the UI, `make run`, `serving/` and the
container healthcheck share them. With TorchServe's token authorization on, pass
`auth=serving.keys.KeyFileAuth(key_file, "management")`: every call then carries the management
key from TorchServe's key file (re-read when TorchServe restarts). Every failure raises
`ManagementError` with TorchServe's own message (or why it could not be reached). Requests are
described by pure functions (`_Call`) that both clients send, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from serving.keys import key_refused

DEFAULT_TIMEOUT_S = 5.0
# Synchronous registration, scaling and unregistration answer once the workers have started or
# stopped: loading a model on a busy machine takes a while.
WORKERS_TIMEOUT_S = 180.0

Description = dict[str, Any]  # one version of the model as `GET /models/<name>` describes it
KEY_HINT = "read from TorchServe's key_file.json, TORCHSERVE_KEY_FILE (serving/keys.py)"


class ManagementError(RuntimeError):
    """A management call failed; the message says which call and TorchServe's reason."""

    def __init__(self, what: str, detail: str, status_code: int | None = None) -> None:
        super().__init__(f"{what} failed: {detail}")
        self.detail = detail
        self.status_code = status_code  # None: no answer (not reachable, timeout, not JSON)

    @property
    def not_found(self) -> bool:
        """TorchServe does not know the model (or version): not registered yet, or unregistered."""
        return self.status_code == 404


def is_ready(descriptions: Sequence[Mapping[str, Any]]) -> bool:
    """The readiness rule: the default version has at least one READY worker.

    `descriptions` is TorchServe's answer to `GET /models/<name>` (`describe()`), which holds the
    default version only. Why this rule and nothing else:
    - TorchServe answers `POST /predictions/<name>` with the default version, so that is the
      version that must work, whatever other versions are registered or loading;
    - `/ping` says "Healthy" before any model is loaded (and while none is registered at all);
    - one READY worker already answers requests, so waiting for all of them would report an
      answering server as down while a worker restarts or the model is scaled up.
    """
    if not descriptions:
        return False
    workers = descriptions[0].get("workers") or []
    return any(isinstance(w, Mapping) and w.get("status") == "READY" for w in workers)


def worker_states(descriptions: Sequence[Mapping[str, Any]]) -> list[str]:
    """The status of every worker of the default version (e.g. ["READY", "LOADING"])."""
    if not descriptions:
        return []
    return [str(w.get("status")) for w in descriptions[0].get("workers") or [] if isinstance(w, Mapping)]


def readiness_detail(descriptions: Sequence[Mapping[str, Any]]) -> str:
    """For people: the default version's worker states."""
    return f"workers: {', '.join(worker_states(descriptions)) or 'none'}"


def error_message(response: httpx.Response) -> str:
    """The human message of a TorchServe (or handler) error body, whatever its shape."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        for key in ("message", "error", "detail", "status"):
            if isinstance(body.get(key), str) and body[key]:
                return str(body[key])
    return str(body)[:300]


# -- requests, described once for both clients --------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One management request: what it does (for messages), method, path, query, timeout."""

    what: str
    method: str
    path: str
    params: dict[str, str | int] = field(default_factory=dict)
    timeout: float | None = None  # None: the client's timeout


def _versioned(model_name: str, version: str | None) -> str:
    return f"/models/{model_name}" + (f"/{version}" if version else "")


def _describe_call(model_name: str, version: str | None, customized: bool) -> _Call:
    params: dict[str, str | int] = {"customized": "true"} if customized else {}
    what = f"describing {model_name}" + (f" version {version}" if version else "")
    return _Call(what, "GET", _versioned(model_name, version), params)


def _register_call(
    model_name: str,
    url: str,
    *,
    workers: int,
    batch_size: int,
    max_batch_delay_ms: int,
    response_timeout_s: int | None,
    synchronous: bool,
    timeout: float,
) -> _Call:
    params: dict[str, str | int] = {
        "url": url,
        "model_name": model_name,
        "initial_workers": workers,
        "batch_size": batch_size,
        "max_batch_delay": max_batch_delay_ms,
        "synchronous": str(synchronous).lower(),
    }
    if response_timeout_s is not None:
        params["response_timeout"] = response_timeout_s
    return _Call(f"registering {url}", "POST", "/models", params, timeout)


def _set_default_call(model_name: str, version: str) -> _Call:
    path = f"{_versioned(model_name, version)}/set-default"
    return _Call(f"making {model_name} version {version} the default", "PUT", path)


def _scale_call(
    model_name: str, version: str | None, workers: int, synchronous: bool, timeout: float
) -> _Call:
    params: dict[str, str | int] = {
        "min_worker": workers,
        "max_worker": workers,
        "synchronous": str(synchronous).lower(),
    }
    what = f"scaling {model_name}" + (f" version {version}" if version else "") + f" to {workers} workers"
    return _Call(what, "PUT", _versioned(model_name, version), params, timeout)


def _unregister_call(model_name: str, version: str | None, timeout: float) -> _Call:
    what = f"unregistering {model_name}" + (f" version {version}" if version else "")
    return _Call(what, "DELETE", _versioned(model_name, version), {}, timeout)


def _json(call: _Call, response: httpx.Response) -> Any:
    """The JSON body of a successful answer; `ManagementError` with TorchServe's message otherwise."""
    if response.status_code != 200:
        detail = f"HTTP {response.status_code} {error_message(response)}"
        if key_refused(response):
            detail += f" (TorchServe refused the management key: {KEY_HINT})"
        raise ManagementError(call.what, detail, response.status_code)
    try:
        return response.json()
    except ValueError:
        raise ManagementError(call.what, f"the answer is not JSON: {response.text[:200]!r}") from None


def _descriptions(call: _Call, body: Any) -> list[Description]:
    if not isinstance(body, list) or not all(isinstance(d, dict) for d in body):
        raise ManagementError(call.what, f"unexpected answer {str(body)[:200]!r}")
    return body


def _status(call: _Call, body: Any) -> str:
    """TorchServe's `{"status": "..."}` answer of a change (register, scale, set-default, unregister)."""
    return str(body.get("status", body)) if isinstance(body, dict) else str(body)


def _unreachable(call: _Call, base_url: str, exc: httpx.HTTPError) -> ManagementError:
    if isinstance(exc, httpx.TimeoutException):
        return ManagementError(call.what, f"no answer from the management API {base_url} in time")
    return ManagementError(
        call.what, f"the management API {base_url} is not reachable ({type(exc).__name__})"
    )


def _version_set(descriptions: list[Description]) -> set[str]:
    return {str(d.get("modelVersion")) for d in descriptions}


MANIFEST = "MAR-INF/MANIFEST.json"


def manifest_version(mar: Path) -> str:
    """The version in an archive's MANIFEST: what TorchServe registers it as."""
    with zipfile.ZipFile(mar) as z:
        return str(json.loads(z.read(MANIFEST))["model"]["modelVersion"])


def _new_version(before: set[str], after: set[str], expected: str | None, url: str) -> str:
    """The version a registration added; `ManagementError` when it is not the `expected` one.

    With `expected`, other versions added meanwhile (another process registering beside it) do
    not matter; without it, exactly one new version must have come."""
    added = sorted(after - before)
    if expected is not None:
        if expected not in added:
            got = ", ".join(added) or "nothing new"
            raise ManagementError(f"registering {url}", f"expected version {expected}, registered {got}")
        return expected
    if len(added) != 1:
        raise ManagementError(f"registering {url}", f"cannot tell the new version (added: {added})")
    return added[0]


def _readiness(exc: ManagementError, model_name: str) -> tuple[bool, str]:
    if exc.not_found:
        return False, f"model loading: {model_name!r} is not registered yet"
    return False, exc.detail


class _Base:
    def __init__(self, management_url: str, model_name: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.management_url = management_url.rstrip("/")
        self.model_name = model_name
        self.timeout = timeout

    def _timeout(self, call: _Call) -> httpx.Timeout:
        total = self.timeout if call.timeout is None else call.timeout
        return httpx.Timeout(total, connect=min(total, 2.0))


class ManagementClient(_Base):
    """Synchronous client (serving/, `make run`, the healthcheck); a context manager."""

    def __init__(
        self,
        management_url: str,
        model_name: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        auth: httpx.Auth | None = None,
    ) -> None:
        super().__init__(management_url, model_name, timeout)
        self._client = httpx.Client(base_url=self.management_url, transport=transport, auth=auth)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: _Call) -> Any:
        try:
            response = self._client.request(
                call.method, call.path, params=call.params, timeout=self._timeout(call)
            )
        except httpx.HTTPError as exc:
            raise _unreachable(call, self.management_url, exc) from exc
        return _json(call, response)

    def alive(self) -> bool:
        """Whether the management API answers at all (`GET /models`), whatever is registered."""
        try:
            self._send(_Call("listing models", "GET", "/models"))
        except ManagementError:
            return False
        return True

    def describe(self, version: str | None = None, *, customized: bool = False) -> list[Description]:
        """`GET /models/<name>[/<version>]`: the default version (or `version`; "all" for every one)."""
        call = _describe_call(self.model_name, version, customized)
        return _descriptions(call, self._send(call))

    def versions(self) -> list[Description]:
        """Every registered version of the model (`GET /models/<name>/all`); [] when none is."""
        try:
            return self.describe("all")
        except ManagementError as exc:
            if exc.not_found:
                return []
            raise

    def register(
        self,
        url: str,
        *,
        version: str | None = None,
        workers: int,
        batch_size: int,
        max_batch_delay_ms: int,
        response_timeout_s: int | None = None,
        synchronous: bool = True,
        timeout: float = WORKERS_TIMEOUT_S,
    ) -> str:
        """Register the archive `url` (a file name in the model store, or a URL); return its version.

        The version comes from the archive's manifest; with `version` given, an archive holding
        another version is unregistered again and `ManagementError` raised. Synchronous: the
        answer comes once the workers have started (they may still be loading the model).
        """
        before = _version_set(self.versions())
        call = _register_call(
            self.model_name,
            url,
            workers=workers,
            batch_size=batch_size,
            max_batch_delay_ms=max_batch_delay_ms,
            response_timeout_s=response_timeout_s,
            synchronous=synchronous,
            timeout=timeout,
        )
        self._send(call)
        after = _version_set(self.versions())
        try:
            return _new_version(before, after, version, url)
        except ManagementError:
            for stray in after - before:
                self.unregister(stray, timeout=timeout)
            raise

    def set_default(self, version: str) -> str:
        """Make `version` the one `POST /predictions/<name>` answers with."""
        call = _set_default_call(self.model_name, version)
        return _status(call, self._send(call))

    def scale(
        self,
        version: str | None,
        workers: int,
        *,
        synchronous: bool = True,
        timeout: float = WORKERS_TIMEOUT_S,
    ) -> str:
        """Run exactly `workers` workers for `version` (None: the default version)."""
        call = _scale_call(self.model_name, version, workers, synchronous, timeout)
        return _status(call, self._send(call))

    def unregister(self, version: str | None = None, *, timeout: float = WORKERS_TIMEOUT_S) -> str:
        """Remove `version` (None: the model's only version; TorchServe refuses the default of several)."""
        call = _unregister_call(self.model_name, version, timeout)
        return _status(call, self._send(call))

    def readiness(self) -> tuple[bool, str]:
        """`is_ready` of the default version, and why, for people; never raises."""
        try:
            descriptions = self.describe()
        except ManagementError as exc:
            return _readiness(exc, self.model_name)
        return is_ready(descriptions), readiness_detail(descriptions)

    def ready(self) -> bool:
        """The readiness rule (`is_ready`) applied to the model's default version."""
        return self.readiness()[0]


class AsyncManagementClient(_Base):
    """The same client for asyncio code (the UI's readiness check)."""

    def __init__(
        self,
        management_url: str,
        model_name: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        auth: httpx.Auth | None = None,
    ) -> None:
        super().__init__(management_url, model_name, timeout)
        self._client = httpx.AsyncClient(base_url=self.management_url, transport=transport, auth=auth)

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, call: _Call) -> Any:
        try:
            response = await self._client.request(
                call.method, call.path, params=call.params, timeout=self._timeout(call)
            )
        except httpx.HTTPError as exc:
            raise _unreachable(call, self.management_url, exc) from exc
        return _json(call, response)

    async def alive(self) -> bool:
        """Whether the management API answers at all (`GET /models`), whatever is registered."""
        try:
            await self._send(_Call("listing models", "GET", "/models"))
        except ManagementError:
            return False
        return True

    async def describe(self, version: str | None = None, *, customized: bool = False) -> list[Description]:
        """`GET /models/<name>[/<version>]`: the default version (or `version`; "all" for every one)."""
        call = _describe_call(self.model_name, version, customized)
        return _descriptions(call, await self._send(call))

    async def versions(self) -> list[Description]:
        """Every registered version of the model (`GET /models/<name>/all`); [] when none is."""
        try:
            return await self.describe("all")
        except ManagementError as exc:
            if exc.not_found:
                return []
            raise

    async def register(
        self,
        url: str,
        *,
        version: str | None = None,
        workers: int,
        batch_size: int,
        max_batch_delay_ms: int,
        response_timeout_s: int | None = None,
        synchronous: bool = True,
        timeout: float = WORKERS_TIMEOUT_S,
    ) -> str:
        """Register the archive `url`; return its version (see `ManagementClient.register`)."""
        before = _version_set(await self.versions())
        call = _register_call(
            self.model_name,
            url,
            workers=workers,
            batch_size=batch_size,
            max_batch_delay_ms=max_batch_delay_ms,
            response_timeout_s=response_timeout_s,
            synchronous=synchronous,
            timeout=timeout,
        )
        await self._send(call)
        after = _version_set(await self.versions())
        try:
            return _new_version(before, after, version, url)
        except ManagementError:
            for stray in after - before:
                await self.unregister(stray, timeout=timeout)
            raise

    async def set_default(self, version: str) -> str:
        """Make `version` the one `POST /predictions/<name>` answers with."""
        call = _set_default_call(self.model_name, version)
        return _status(call, await self._send(call))

    async def scale(
        self,
        version: str | None,
        workers: int,
        *,
        synchronous: bool = True,
        timeout: float = WORKERS_TIMEOUT_S,
    ) -> str:
        """Run exactly `workers` workers for `version` (None: the default version)."""
        call = _scale_call(self.model_name, version, workers, synchronous, timeout)
        return _status(call, await self._send(call))

    async def unregister(self, version: str | None = None, *, timeout: float = WORKERS_TIMEOUT_S) -> str:
        """Remove `version` (None: the model's only version)."""
        call = _unregister_call(self.model_name, version, timeout)
        return _status(call, await self._send(call))

    async def readiness(self) -> tuple[bool, str]:
        """`is_ready` of the default version, and why, for people; never raises."""
        try:
            descriptions = await self.describe()
        except ManagementError as exc:
            return _readiness(exc, self.model_name)
        return is_ready(descriptions), readiness_detail(descriptions)

    async def ready(self) -> bool:
        """The readiness rule (`is_ready`) applied to the model's default version."""
        return (await self.readiness())[0]
