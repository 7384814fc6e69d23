"""TorchServe's keys: the key file, the refusal rule, and the auth that re-reads a rotated key."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from serving.keys import KEY_FILE_NAME, KeyFileAuth, headers, key_file_of, key_refused, read_key
from serving.management import AsyncManagementClient, ManagementClient, ManagementError
from settings import Settings

REFUSED = {
    "code": 400,
    "type": "InvalidKeyException",
    "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
}


def write_keys(path: Path, management: str, inference: str) -> Path:
    """A key file as TorchServe 0.12 writes it."""
    path.write_text(
        json.dumps(
            {
                "management": {"key": management, "expiration time": "2036-11-28T10:24:37Z"},
                "inference": {"key": inference, "expiration time": "2036-11-28T10:24:37Z"},
                "API": {"key": "api-key"},
            }
        )
    )
    return path


class KeyedServer:
    """A mock TorchServe that answers 200 only to `Bearer <key>` and records what it was sent."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.sent: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return httpx.Response(400, json=REFUSED)
        return httpx.Response(200, json={"models": []})


def test_read_key_takes_each_apis_key_and_none_when_there_is_none(tmp_path: Path) -> None:
    path = write_keys(tmp_path / KEY_FILE_NAME, "m-key", "i-key")
    assert (read_key(path, "management"), read_key(path, "inference")) == ("m-key", "i-key")
    assert headers(path, "inference") == {"Authorization": "Bearer i-key"}
    assert read_key(tmp_path / "missing.json", "management") is None and read_key(None, "inference") is None
    (tmp_path / "half.json").write_text('{"management": {"key": ')  # caught while TorchServe writes it
    (tmp_path / "other.json").write_text('{"management": "not an object", "inference": {"key": ""}}')
    for name in ("half.json", "other.json"):
        assert read_key(tmp_path / name, "management") is None and headers(tmp_path / name, "inference") == {}


def test_key_file_of_settings_is_the_run_folders_unless_named() -> None:
    unset = Settings(run_dir=Path("/r"), torchserve_key_file=None)  # whatever the environment says
    assert key_file_of(unset) == Path("/r/torchserve/key_file.json")
    assert key_file_of(Settings(run_dir=Path("/r"), torchserve_key_file=Path("/k.json"))) == Path("/k.json")


def test_key_refused_is_torchserves_400_invalid_key_only() -> None:
    assert key_refused(httpx.Response(400, json=REFUSED))
    assert not key_refused(httpx.Response(400, json={"code": 400, "type": "BadRequestException"}))
    assert not key_refused(httpx.Response(400, text="not json"))
    assert not key_refused(httpx.Response(200, json={"type": "InvalidKeyException"}))


def test_the_key_is_sent_and_a_rotated_key_is_read_again_once(tmp_path: Path) -> None:
    path = write_keys(tmp_path / KEY_FILE_NAME, "old", "i")
    server = KeyedServer("old")
    auth = KeyFileAuth(path, "management")
    with httpx.Client(transport=httpx.MockTransport(server), auth=auth) as client:
        assert client.get("http://ts/models").status_code == 200
        write_keys(path, "new", "i")  # TorchServe restarted: new keys
        server.key = "new"
        assert client.get("http://ts/models").status_code == 200
        assert server.sent == ["Bearer old", "Bearer old", "Bearer new"]
        server.key = "another"  # refused, and the file holds nothing newer: one try, the refusal kept
        assert key_refused(client.get("http://ts/models"))
        assert server.sent[3:] == ["Bearer new"]


def test_no_key_file_sends_no_header_and_a_late_file_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    server = KeyedServer("k")
    with httpx.Client(transport=httpx.MockTransport(server), auth=KeyFileAuth(path, "management")) as client:
        assert key_refused(client.get("http://ts/models"))  # TorchServe not started yet: no file
        write_keys(path, "k", "i")
        assert client.get("http://ts/models").status_code == 200
    assert server.sent == [None, None, "Bearer k"]


def test_management_clients_send_the_management_key_and_say_why_when_refused(tmp_path: Path) -> None:
    path = write_keys(tmp_path / KEY_FILE_NAME, "m-key", "i-key")
    server = KeyedServer("m-key")
    client = ManagementClient(
        "http://ts", "mnist", transport=httpx.MockTransport(server), auth=KeyFileAuth(path, "management")
    )
    assert client.alive() and server.sent == ["Bearer m-key"]
    wrong = ManagementClient(
        "http://ts", "mnist", transport=httpx.MockTransport(server), auth=KeyFileAuth(path, "inference")
    )
    with pytest.raises(ManagementError, match="refused the management key") as info:
        wrong.versions()
    assert info.value.status_code == 400 and "TORCHSERVE_KEY_FILE" in str(info.value)
    ready, detail = wrong.readiness()
    assert not ready and "refused the management key" in detail


async def test_the_async_management_client_sends_the_key_too(tmp_path: Path) -> None:
    path = write_keys(tmp_path / KEY_FILE_NAME, "m-key", "i-key")
    server = KeyedServer("m-key")
    transport = httpx.MockTransport(server)
    async with AsyncManagementClient(
        "http://ts", "mnist", transport=transport, auth=KeyFileAuth(path, "management")
    ) as client:
        assert await client.alive()
    assert server.sent == ["Bearer m-key"]
