"""The TorchServe client: answers, 4xx messages, retries, failures (the real server: test_e2e)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.keys import key_file_of
from settings import Settings
from tests.serving.test_keys import REFUSED, write_keys
from tests.ui.fakes import FakeModel, digit_png
from ui.inference import InferenceClient, InferenceUnavailable, InvalidInput


def client_for(handler) -> InferenceClient:
    return InferenceClient("http://ts.test", transport=httpx.MockTransport(handler), timeout_s=1.0)


def answer(**overrides) -> dict:
    body: dict[str, Any] = {
        "digit": 3,
        "confidence": 0.8,
        "probabilities": [0.02] * 10,
        "input": [0] * 784,
        "model_version": "2",
    }
    body["probabilities"][3] = 0.8
    body.update(overrides)
    return body


async def test_answer_is_parsed() -> None:
    model = FakeModel()
    client = InferenceClient("http://ts.test", transport=model.transport())
    prediction = await client.predict(digit_png("zero"))
    assert prediction.digit == 0 and len(prediction.input) == 784 and max(prediction.input) == 255


async def test_4xx_message_is_passed_on() -> None:
    client = client_for(lambda r: httpx.Response(400, json={"code": 400, "message": "the drawing is empty"}))
    with pytest.raises(InvalidInput, match="the drawing is empty") as info:
        await client.predict(b"x")
    assert info.value.status_code == 400
    client = client_for(lambda r: httpx.Response(413, text="Request Entity Too Large"))
    with pytest.raises(InvalidInput, match="Too Large"):
        await client.predict(b"x")


async def test_connection_errors_and_503_are_retried_briefly() -> None:
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            return httpx.Response(503, json={"message": "no worker"})
        return httpx.Response(200, content=json.dumps(answer()))

    prediction = await client_for(flaky).predict(b"png")
    assert prediction.digit == 3 and len(calls) == 3


async def test_down_server_raises_unavailable_after_three_tries() -> None:
    calls = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(InferenceUnavailable, match="not reachable"):
        await client_for(down).predict(b"png")
    assert len(calls) == 3


async def test_timeout_500_and_bad_answers_are_unavailable() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(InferenceUnavailable, match="in time"):
        await client_for(timeout).predict(b"png")
    with pytest.raises(InferenceUnavailable, match="failed"):
        await client_for(lambda r: httpx.Response(500, json={"message": "boom"})).predict(b"png")
    with pytest.raises(InferenceUnavailable, match="not JSON"):
        await client_for(lambda r: httpx.Response(200, text="<html>")).predict(b"png")
    with pytest.raises(InferenceUnavailable, match="wrong shape"):
        await client_for(lambda r: httpx.Response(200, json=answer(input=[0] * 10))).predict(b"png")
    with pytest.raises(InferenceUnavailable, match="unexpected"):
        await client_for(lambda r: httpx.Response(200, json={"digit": 1})).predict(b"png")


async def test_ready_reads_worker_status() -> None:
    def management(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/models/mnist"
        return httpx.Response(200, json=[{"workers": [{"status": "LOADING"}]}])

    client = InferenceClient(
        "http://ts.test", management_url="http://m.test", transport=httpx.MockTransport(management)
    )
    assert await client.ready() == (False, "workers: LOADING")
    assert (await client_for(lambda r: httpx.Response(200, json={"status": "Healthy"})).ready())[0]


async def test_model_not_registered_yet_is_model_loading_not_a_client_error() -> None:
    """TorchServe (re)starting answers 404 "Model not found": unavailable (a 503 for API clients)."""
    calls = []

    def starting(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        body = {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: mnist"}
        return httpx.Response(404, json=body)

    with pytest.raises(InferenceUnavailable, match=r"^model loading: Model not found: mnist$"):
        await client_for(starting).predict(b"png")
    assert len(calls) == 3  # retried briefly, like a 503: the model comes back in seconds


async def test_model_registered_while_retrying_answers() -> None:
    answers = iter([httpx.Response(404, json={"message": "Model not found: mnist"})])

    def registering(request: httpx.Request) -> httpx.Response:
        return next(answers, httpx.Response(200, json=answer()))

    assert (await client_for(registering).predict(b"png")).digit == 3


async def test_ready_follows_the_one_readiness_rule() -> None:
    """The default version (what `GET /models/mnist` describes) needs one READY worker, not all."""
    states: list[object] = [[{"workers": [{"status": "READY"}, {"status": "LOADING"}]}]]

    def management(request: httpx.Request) -> httpx.Response:
        if isinstance(states[0], int):
            return httpx.Response(states[0], json={"code": 404, "message": "Model not found: mnist"})
        return httpx.Response(200, json=states[0])

    client = InferenceClient(
        "http://ts.test", management_url="http://m.test", transport=httpx.MockTransport(management)
    )
    assert await client.ready() == (True, "workers: READY, LOADING")
    states[0] = 404  # TorchServe restarted, the model not registered yet
    assert await client.ready() == (False, "model loading: 'mnist' is not registered yet")
    states[0] = [{"workers": []}]
    assert await client.ready() == (False, "workers: none")
    await client.close()


async def test_ready_when_the_management_api_is_down() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = InferenceClient(
        "http://ts.test", management_url="http://m.test", transport=httpx.MockTransport(down)
    )
    ready, detail = await client.ready()
    assert not ready and "not reachable (ConnectError)" in detail
    await client.close()


async def test_the_inference_key_goes_with_the_whole_image_and_the_management_key_with_readiness(
    tmp_path: Path,
) -> None:
    """What the UI forwards: the full body with its exact length (never a short body), and the keys."""
    keys = write_keys(tmp_path / "key_file.json", "m-key", "i-key")
    seen: list[httpx.Request] = []

    def torchserve(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.startswith("/models/"):
            return httpx.Response(200, json=[{"workers": [{"status": "READY"}]}])
        return httpx.Response(200, json=answer())

    transport = httpx.MockTransport(torchserve)
    client = InferenceClient("http://ts.test", "mnist", "http://m.test", transport=transport, key_file=keys)
    image = digit_png("zero")
    assert (await client.predict(image)).digit == 3
    assert (await client.ready())[0]
    await client.close()
    predict, ready = seen
    assert predict.headers["Authorization"] == "Bearer i-key"
    assert ready.headers["Authorization"] == "Bearer m-key"
    assert predict.headers["Content-Length"] == str(len(image)) and predict.content == image


async def test_a_refused_key_is_the_model_server_unavailable_never_the_inputs_fault(tmp_path: Path) -> None:
    """TorchServe refuses a wrong key with a 400: not an InvalidInput (a 4xx for the person)."""
    calls = []

    def refusing(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("Authorization"))
        return httpx.Response(400, json=REFUSED)

    keys = write_keys(tmp_path / "key_file.json", "m-key", "stale")
    client = InferenceClient("http://ts.test", transport=httpx.MockTransport(refusing), key_file=keys)
    with pytest.raises(InferenceUnavailable, match=r"refused the inference key.*TORCHSERVE_KEY_FILE"):
        await client.predict(b"png")
    assert calls == ["Bearer stale"]  # the file has no newer key: not retried
    ready, detail = await client.ready()  # no management URL: /ping, with the inference key
    assert not ready and "refused the inference key" in detail
    await client.close()


def test_from_settings_reads_the_key_file_the_settings_name() -> None:
    base = Settings(run_dir=Path("/r"), inference_url="http://ts.test:1", management_url="http://m.test:2")
    unset = base.model_copy(update={"torchserve_key_file": None})  # whatever the environment says
    client = InferenceClient.from_settings(unset)
    assert (client.inference_url, client.management_url) == ("http://ts.test:1", "http://m.test:2")
    assert client.key_file == key_file_of(unset) == Path("/r/torchserve/key_file.json")
    named = base.model_copy(update={"torchserve_key_file": Path("/keys/key_file.json")})
    assert InferenceClient.from_settings(named).key_file == Path("/keys/key_file.json")
