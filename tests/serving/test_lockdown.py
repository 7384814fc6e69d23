"""TorchServe locked down, on the real server: keys on both APIs, no remote archives, no hang.

What holds and why is in docs/security.md ("The model server") and serving/README.md.
"""

from __future__ import annotations

import contextlib
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from serving.keys import key_refused
from serving.management import ManagementClient, ManagementError
from tests.handlers.renditions import png, read_mnist_test
from ui.inference import InferenceClient, InferenceUnavailable

ROOT = Path(__file__).resolve().parents[2]
SHORT_BODY_WAIT_S = 3.0


@pytest.fixture(scope="module")
def digit(mnist_dir) -> tuple[bytes, int]:
    images, labels = read_mnist_test(mnist_dir, 1)
    return png(Image.fromarray(images[0])), int(labels[0])


def model_names(torchserve) -> set[str]:
    listed = httpx.get(f"{torchserve.management_url}/models", headers=torchserve.management_headers())
    assert listed.status_code == 200, listed.text
    return {m["modelName"] for m in listed.json()["models"]}


# --- token authorization -----------------------------------------------------------------------


def test_a_registration_without_the_management_key_is_refused_with_it_it_works(torchserve) -> None:
    """A process outside the app (plain httpx, no key) cannot register a model; the app's code can."""
    url = f"{torchserve.management_url}/models"
    params: dict[str, str | int] = {
        "url": "mnist.mar",
        "model_name": "outsider",
        "initial_workers": 0,
        "synchronous": "true",
    }
    wrong = {"Authorization": "Bearer not-the-key"}
    for refused in (
        httpx.post(url, params=params, timeout=30),
        httpx.post(url, params=params, headers=wrong, timeout=30),
        httpx.post(url, params=params, headers=torchserve.inference_headers(), timeout=30),  # per API
    ):
        # TorchServe 0.12 answers a missing or wrong key with 400 InvalidKeyException (not 401/403)
        assert refused.status_code == 400 and key_refused(refused), refused.text
    assert httpx.get(url, timeout=10).status_code == 400  # not even a listing without the key
    assert "outsider" not in model_names(torchserve)

    accepted = httpx.post(url, params=params, headers=torchserve.management_headers(), timeout=60)
    try:
        assert accepted.status_code == 200, accepted.text
        assert "outsider" in model_names(torchserve)
    finally:
        gone = httpx.delete(f"{url}/outsider", headers=torchserve.management_headers(), timeout=60)
        assert gone.status_code == 200, gone.text
    assert "outsider" not in model_names(torchserve)


def test_the_key_file_is_private_to_torchserves_user(torchserve) -> None:
    mode = stat.S_IMODE(torchserve.key_file.stat().st_mode)
    assert mode == 0o600, oct(mode)


async def test_inference_needs_the_inference_key_which_the_ui_client_sends(torchserve, digit) -> None:
    image, label = digit
    bare = httpx.post(torchserve.predictions_url(), content=image, timeout=30)
    assert bare.status_code == 400 and key_refused(bare), bare.text
    assert key_refused(httpx.get(f"{torchserve.inference_url}/ping", timeout=10))
    # the metrics API needs no key (Prometheus scrapes it; it changes nothing)
    assert httpx.get(f"{torchserve.metrics_url}/metrics", timeout=10).status_code == 200

    urls = (torchserve.inference_url, torchserve.model_name, torchserve.management_url)
    client = InferenceClient(*urls, key_file=torchserve.key_file)  # as the UI makes it
    keyless = InferenceClient(*urls, key_file=torchserve.run_dir / "no-such-key-file.json")
    try:
        assert (await client.predict(image)).digit == label
        assert (await client.ready())[0]
        with pytest.raises(InferenceUnavailable, match="refused the inference key"):
            await keyless.predict(image)  # the app's configuration, never the person's input (a 4xx)
        ready, detail = await keyless.ready()
        assert not ready and "refused the management key" in detail
    finally:
        await client.close()
        await keyless.close()


# --- allowed_urls ------------------------------------------------------------------------------


@contextlib.contextmanager
def listener() -> Iterator[tuple[int, socket.socket]]:
    """A port on 127.0.0.1 that would see any fetch TorchServe tried."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        yield server.getsockname()[1], server


def test_archives_from_urls_are_refused_before_anything_is_fetched(torchserve) -> None:
    before = sorted(p.name for p in torchserve.model_store.iterdir())
    with (
        listener() as (port, server),
        ManagementClient(
            torchserve.management_url, torchserve.model_name, auth=torchserve.config.auth("management")
        ) as client,
    ):
        for url in (
            f"http://127.0.0.1:{port}/x.mar",
            f"HTTPS://127.0.0.1:{port}/x.mar",
            "http://example.invalid/x.mar",
            "file:///etc/passwd",
            f"file://{torchserve.model_store}/mnist.mar",  # even the model store, named as a URL
        ):
            with pytest.raises(ManagementError, match="does not match any allowed URL") as info:
                client.register(url, workers=0, batch_size=1, max_batch_delay_ms=0, timeout=30)
            assert info.value.status_code == 404, url
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected: TorchServe refused without fetching
    assert sorted(p.name for p in torchserve.model_store.iterdir()) == before
    assert model_names(torchserve) == {torchserve.model_name}


# --- a short body with a long Content-Length ---------------------------------------------------


def test_a_short_body_waits_on_its_own_connection_and_blocks_nothing_else(torchserve, digit) -> None:
    """TorchServe 0.12 has no read timeout (no setting; its Netty pipeline has no idle handler): a
    request whose body is shorter than its Content-Length waits for the rest as long as the client
    keeps the connection. Measured here; it is why TorchServe is never published (the UI, its only
    client, reads the whole body before forwarding it). Other connections are served meanwhile."""
    host, port = "127.0.0.1", int(torchserve.inference_url.rsplit(":", 1)[1])
    key = torchserve.inference_headers()["Authorization"]
    head = (
        f"POST /predictions/{torchserve.model_name} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: {key}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n"
    )
    with socket.create_connection((host, port), timeout=10) as short:
        short.sendall(head.encode() + b"0123456789")
        short.settimeout(SHORT_BODY_WAIT_S)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            short.recv(1024)  # no answer: TorchServe still waits for 990 bytes
        assert time.monotonic() - started >= SHORT_BODY_WAIT_S - 0.1
        meanwhile = httpx.post(
            torchserve.predictions_url(), content=digit[0], headers=torchserve.inference_headers(), timeout=30
        )
        assert meanwhile.status_code == 200 and meanwhile.json()["digit"] == digit[1]
    after = httpx.post(
        torchserve.predictions_url(), content=digit[0], headers=torchserve.inference_headers(), timeout=30
    )
    assert after.status_code == 200 and after.json()["digit"] == digit[1]


def test_compose_never_publishes_torchserve() -> None:
    """The short-body wait and the APIs stay on the Compose network: `expose`, never `ports`."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    torchserve = services["torchserve"]
    assert "ports" not in torchserve and "network_mode" not in torchserve
    assert {"8080", "8081"} <= {str(port) for port in torchserve["expose"]}
