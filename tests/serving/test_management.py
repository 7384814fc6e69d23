"""The management client on a mocked TorchServe (requests sent, answers read, errors), and the readiness rule.

The same client against the real TorchServe: tests/serving/test_torchserve.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from serving.management import (
    AsyncManagementClient,
    ManagementClient,
    ManagementError,
    _new_version,
    is_ready,
    readiness_detail,
)

URL = "http://management.test"


def workers(*states: str) -> list[dict[str, Any]]:
    return [{"id": str(9000 + i), "status": state} for i, state in enumerate(states)]


def description(version: str, *states: str) -> dict[str, Any]:
    return {"modelName": "mnist", "modelVersion": version, "workers": workers(*states)}


def not_found(message: str = "Model not found: mnist") -> httpx.Response:
    return httpx.Response(404, json={"code": 404, "type": "ModelNotFoundException", "message": message})


class FakeManagement:
    """Answers like TorchServe's management API for one model; records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.versions: dict[str, list[str]] = {}  # version -> worker states
        self.default: str | None = None
        self.register_version = "1.0"  # what the next registered archive holds

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        parts = request.url.path.strip("/").split("/")
        if request.method == "POST" and parts == ["models"]:
            version = self.register_version
            if version in self.versions:
                return httpx.Response(409, json={"code": 409, "message": f"Model version {version} exists"})
            self.versions[version] = ["READY"] * int(request.url.params["initial_workers"])
            self.default = self.default or version
            message = f'Model "mnist" Version: {version} registered with 2 initial workers'
            return httpx.Response(200, json={"status": message})
        if parts == ["models"]:
            return httpx.Response(200, json={"models": []})
        if parts[:2] != ["models", "mnist"] or not self.versions:
            return not_found()
        asked = parts[2] if len(parts) > 2 else self.default
        if asked == "all":
            return httpx.Response(200, json=[description(v, *s) for v, s in self.versions.items()])
        if asked not in self.versions:
            return not_found(f"Model version: {asked} does not exist for model: mnist")
        version = asked
        if parts[-1] == "set-default":
            self.default = version
            return httpx.Response(
                200, json={"status": f'Default version successfully updated for model "mnist" to "{version}"'}
            )
        if request.method == "PUT":
            self.versions[version] = ["READY"] * int(request.url.params["min_worker"])
            return httpx.Response(200, json={"status": "Workers updated"})
        if request.method == "DELETE":
            if version == self.default and len(self.versions) > 1:
                return httpx.Response(
                    400, json={"code": 400, "message": f"Cannot remove default version {version}"}
                )
            del self.versions[version]
            return httpx.Response(200, json={"status": 'Model "mnist" unregistered'})
        return httpx.Response(200, json=[description(version, *self.versions[version])])

    def client(self) -> ManagementClient:
        return ManagementClient(URL, "mnist", transport=httpx.MockTransport(self.handler))

    def async_client(self) -> AsyncManagementClient:
        return AsyncManagementClient(URL, "mnist", transport=httpx.MockTransport(self.handler))


def register(client: ManagementClient, **kwargs: Any) -> str:
    return client.register("mnist.mar", workers=2, batch_size=4, max_batch_delay_ms=0, **kwargs)


# --- the readiness rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("descriptions", "ready"),
    [
        ([], False),  # nothing registered
        ([description("1.0")], False),  # registered with no worker
        ([description("1.0", "LOADING", "LOADING")], False),
        ([description("1.0", "UNLOADING", "READY")], True),  # one READY worker answers
        ([description("1.0", "READY", "READY")], True),
        ([{"workers": [{"status": "READY"}]}], True),  # only what the rule needs
        ([{"modelVersion": "1.0"}], False),  # no workers field at all
    ],
)
def test_is_ready_means_the_default_version_has_a_ready_worker(descriptions: list, ready: bool) -> None:
    assert is_ready(descriptions) is ready


def test_is_ready_reads_the_default_version_not_the_others() -> None:
    """`describe()` answers with the default version first; a READY other version does not count."""
    assert not is_ready([description("1.0", "LOADING"), description("2.0", "READY")])
    assert readiness_detail([description("1.0", "READY", "LOADING")]) == "workers: READY, LOADING"
    assert readiness_detail([]) == "workers: none"


# --- the client: what it sends and what it returns ---------------------------------------------


def test_register_sends_workers_batching_and_synchronous_and_returns_the_version() -> None:
    fake = FakeManagement()
    with fake.client() as client:
        assert register(client, response_timeout_s=30) == "1.0"
    (post,) = [r for r in fake.requests if r.method == "POST"]
    assert post.url.path == "/models"
    assert dict(post.url.params) == {
        "url": "mnist.mar",
        "model_name": "mnist",
        "initial_workers": "2",
        "batch_size": "4",
        "max_batch_delay": "0",
        "synchronous": "true",
        "response_timeout": "30",
    }


def test_register_an_archive_of_another_version_than_expected_is_undone() -> None:
    fake = FakeManagement()
    fake.register_version = "3.0"
    with (
        fake.client() as client,
        pytest.raises(ManagementError, match=r"expected version 2\.0, registered 3\.0"),
    ):
        register(client, version="2.0")
    assert fake.versions == {}
    assert [r.method for r in fake.requests][-1] == "DELETE"


def test_describe_versions_set_default_scale_unregister() -> None:
    fake = FakeManagement()
    with fake.client() as client:
        assert client.versions() == []  # 404 from TorchServe: nothing registered
        register(client)
        fake.register_version = "2.0"
        assert register(client, version="2.0") == "2.0"
        assert [d["modelVersion"] for d in client.describe()] == ["1.0"]
        assert {d["modelVersion"] for d in client.versions()} == {"1.0", "2.0"}

        assert "2.0" in client.set_default("2.0")
        put = fake.requests[-1]
        assert (put.method, put.url.path) == ("PUT", "/models/mnist/2.0/set-default")
        assert [d["modelVersion"] for d in client.describe()] == ["2.0"]

        client.scale("1.0", 3)
        put = fake.requests[-1]
        assert (put.method, put.url.path) == ("PUT", "/models/mnist/1.0")
        assert dict(put.url.params) == {"min_worker": "3", "max_worker": "3", "synchronous": "true"}
        assert len(client.describe("1.0")[0]["workers"]) == 3

        client.unregister("1.0")
        assert (fake.requests[-1].method, fake.requests[-1].url.path) == ("DELETE", "/models/mnist/1.0")
        assert {d["modelVersion"] for d in client.versions()} == {"2.0"}


def test_errors_carry_torchserves_message_and_status() -> None:
    fake = FakeManagement()
    with fake.client() as client:
        with pytest.raises(
            ManagementError, match=r"describing mnist failed: HTTP 404 Model not found: mnist"
        ) as info:
            client.describe()
        assert info.value.not_found and info.value.status_code == 404
        register(client)
        fake.register_version = "2.0"
        register(client)
        with pytest.raises(
            ManagementError, match=r"unregistering mnist version 1\.0 failed: HTTP 400 Cannot remove default"
        ):
            client.unregister("1.0")
        with pytest.raises(ManagementError, match="does not exist for model: mnist") as info:
            client.scale("9.9", 1)
        assert info.value.not_found


def test_unreachable_timeout_and_garbage_are_management_errors() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    # (TorchServe's behaviour, the error, whether the API still counts as answering)
    cases: list[tuple[Callable[[httpx.Request], httpx.Response], str, bool]] = [
        (refused, f"the management API {URL} is not reachable \\(ConnectError\\)", False),
        (slow, "no answer from the management API .* in time", False),
        (lambda r: httpx.Response(200, text="<html>"), "the answer is not JSON", False),
        (lambda r: httpx.Response(200, json={"not": "a list"}), "unexpected answer", True),
    ]
    for handler, message, alive in cases:
        with ManagementClient(URL, "mnist", transport=httpx.MockTransport(handler)) as client:
            with pytest.raises(ManagementError, match=message) as info:
                client.describe()
            assert info.value.status_code is None
            assert not client.ready()
            assert client.alive() is alive


def test_readiness_says_why() -> None:
    fake = FakeManagement()
    with fake.client() as client:
        assert client.readiness() == (False, "model loading: 'mnist' is not registered yet")
        assert client.alive()  # the API answers while no model is registered
        register(client)
        assert client.readiness() == (True, "workers: READY, READY")
        fake.versions["1.0"] = ["LOADING"]
        assert client.readiness() == (False, "workers: LOADING")


async def test_the_async_client_has_the_same_behaviour() -> None:
    fake = FakeManagement()
    async with fake.async_client() as client:
        assert await client.readiness() == (False, "model loading: 'mnist' is not registered yet")
        assert await client.versions() == []
        assert await client.register("mnist.mar", workers=2, batch_size=4, max_batch_delay_ms=0) == "1.0"
        assert await client.ready()
        await client.scale(None, 1)
        assert (fake.requests[-1].method, fake.requests[-1].url.path) == ("PUT", "/models/mnist")
        assert len((await client.describe())[0]["workers"]) == 1
        fake.register_version = "2.0"
        await client.register("mnist-v2.mar", version="2.0", workers=1, batch_size=1, max_batch_delay_ms=1)
        await client.set_default("2.0")
        await client.unregister("1.0")
        assert [d["modelVersion"] for d in await client.versions()] == ["2.0"]
        with pytest.raises(ManagementError, match="HTTP 404"):
            await client.describe("1.0")
    posts = [json.loads(json.dumps(dict(r.url.params))) for r in fake.requests if r.method == "POST"]
    assert posts[1]["url"] == "mnist-v2.mar" and posts[1]["max_batch_delay"] == "1"


def test_a_named_registration_ignores_a_version_another_process_added_meanwhile() -> None:
    # TorchServe (re)starting registers the shipped 1.0 while the trainer restores the live 2.0.
    assert _new_version(set(), {"1.0", "2.0"}, "1.0", "mnist.mar") == "1.0"
    with pytest.raises(ManagementError, match="cannot tell the new version"):
        _new_version(set(), {"1.0", "2.0"}, None, "mnist.mar")
    with pytest.raises(ManagementError, match=r"expected version 1\.0, registered 2\.0"):
        _new_version(set(), {"2.0"}, "1.0", "mnist.mar")
