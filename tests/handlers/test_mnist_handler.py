"""The handler: in-process on the unpacked archive (batches), and through a real TorchServe."""

from __future__ import annotations

import base64
import importlib
import io
import json
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from handlers.preprocess import normalize, preprocess
from tests.fixtures.torchserve import manifest_version
from tests.handlers.renditions import RENDITIONS, png, read_mnist_test, render

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"digit", "confidence", "probabilities", "input", "model_version", "is_digit"}


def check_prediction(body: dict, version: str) -> None:
    assert set(body) == FIELDS
    probs = body["probabilities"]
    assert len(probs) == 10 and all(0.0 <= p <= 1.0 for p in probs)
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert body["digit"] == int(np.argmax(probs))
    assert body["confidence"] == pytest.approx(max(probs))
    assert len(body["input"]) == 784 and all(isinstance(v, int) and 0 <= v <= 255 for v in body["input"])
    assert body["model_version"] == version
    assert isinstance(body["is_digit"], bool)


def classify(
    url: str, payloads: list[bytes], headers: dict[str, str], workers: int = 8
) -> list[httpx.Response]:
    """POST every payload as raw image bytes, `workers` at a time."""
    with httpx.Client(timeout=30, headers=headers) as client, ThreadPoolExecutor(workers) as pool:
        return list(
            pool.map(lambda p: client.post(url, content=p, headers={"Content-Type": "image/png"}), payloads)
        )


@pytest.fixture(scope="module")
def sample(mnist_dir):
    """600 official test images spread over the whole test set (every 16th)."""
    images, labels = read_mnist_test(mnist_dir)
    return images[::16][:600], labels[::16][:600]


# --- in-process: the archive's own files, a real ts.context.Context, a mixed batch ----------------


@pytest.fixture(scope="module")
def unpacked_handler(tmp_path_factory, torchserve):
    """MnistHandler imported from the unpacked .mar (flat layout, as a TorchServe worker sees it)."""
    from ts.context import Context

    model_dir = tmp_path_factory.mktemp("mar")
    with zipfile.ZipFile(torchserve.model_store / "mnist.mar") as z:
        z.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    sys.path.insert(0, str(model_dir))
    try:
        module = importlib.import_module(Path(manifest["model"]["handler"]).stem)
        handler = module.MnistHandler()
        context = Context("mnist", str(model_dir), manifest, 8, None, "0.12.0", model_yaml_config={})
        handler.initialize(context)
        yield handler, context, manifest
    finally:
        sys.path.remove(str(model_dir))
        for name in ("mnist_handler", "model_runtime", "preprocess", "model"):
            sys.modules.pop(name, None)


def test_archive_ships_this_handler_and_preprocessing(torchserve):
    with zipfile.ZipFile(torchserve.model_store / "mnist.mar") as z:
        names = set(z.namelist())
        assert z.read("mnist_handler.py") == (ROOT / "handlers" / "mnist_handler.py").read_bytes()
        assert z.read("preprocess.py") == (ROOT / "handlers" / "preprocess.py").read_bytes()
        assert z.read("model_runtime.py") == (ROOT / "handlers" / "model_runtime.py").read_bytes()
    assert "model.py" in names


def test_a_mixed_batch_answers_each_request_on_its_own(unpacked_handler, sample):
    from ts.context import RequestProcessor

    handler, context, manifest = unpacked_handler
    images, labels = sample
    requests = [
        ({"body": png(Image.fromarray(images[0]))}, "image/png"),
        ({"body": b"not an image"}, "application/octet-stream"),
        ({"body": png(Image.new("L", (280, 280)))}, "image/png"),
        ({"body": b"{broken"}, "application/json"),
        ({"body": {"data": base64.b64encode(png(Image.fromarray(images[1]))).decode()}}, "application/json"),
        ({"body": b""}, "image/png"),
    ]
    context.request_processor = [RequestProcessor({"body": {"content-type": ct}}) for _, ct in requests]
    answers = handler.handle([r for r, _ in requests], context)

    statuses = [context.get_response_status(i)[0] for i in range(len(requests))]
    assert statuses == [200, 415, 422, 400, 200, 400]
    bodies = [json.loads(a) for a in answers]
    for i in (0, 4):
        check_prediction(bodies[i], manifest["model"]["modelVersion"])
    assert [bodies[0]["digit"], bodies[4]["digit"]] == labels[:2].tolist()
    for i in (1, 2, 3, 5):
        assert bodies[i]["code"] == statuses[i] and bodies[i]["message"]
    assert all(context.get_response_content_type(i) == "application/json" for i in range(len(requests)))


def test_the_sped_up_model_gives_the_plain_models_answers(unpacked_handler, sample):
    import torch

    handler, _, manifest = unpacked_handler
    model_dir = Path(handler.model_pt_path).parent
    plain = sys.modules["model"].Net()
    plain.load_state_dict(torch.load(model_dir / manifest["model"]["serializedFile"], map_location="cpu"))
    plain.eval()
    images, _ = sample
    digits = [preprocess(png(Image.fromarray(image))) for image in images[:32]]
    with torch.inference_mode():
        logits = plain(torch.from_numpy(normalize(np.stack(digits))).unsqueeze(1))
        expected = torch.softmax(logits / handler.temperature, dim=1)  # the archive's calibration
    np.testing.assert_allclose(handler.predict(digits), expected.numpy(), atol=1e-4)


# --- through TorchServe -----------------------------------------------------------------------


def test_prediction_has_every_field(torchserve, sample):
    images, labels = sample
    version = manifest_version(torchserve.model_store / "mnist.mar")
    response = httpx.post(
        torchserve.predictions_url(),
        content=png(Image.fromarray(images[0])),
        headers=torchserve.inference_headers(),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    check_prediction(body, version)
    assert body["digit"] == labels[0]
    seen = np.array(body["input"], dtype=np.uint8).reshape(28, 28)
    assert np.array_equal(seen, preprocess(png(Image.fromarray(images[0]))))


def test_json_base64_and_data_url_are_accepted(torchserve, sample):
    images, labels = sample
    encoded = base64.b64encode(png(Image.fromarray(images[1]))).decode()
    for data in (encoded, f"data:image/png;base64,{encoded}"):
        response = httpx.post(
            torchserve.predictions_url(),
            json={"data": data},
            headers=torchserve.inference_headers(),
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json()["digit"] == labels[1]


def test_multipart_upload_is_accepted(torchserve, sample):
    images, labels = sample
    files = {"data": ("digit.png", png(Image.fromarray(images[3])), "image/png")}
    response = httpx.post(
        torchserve.predictions_url(), files=files, headers=torchserve.inference_headers(), timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["digit"] == labels[3]


def test_accuracy_on_official_test_images(torchserve, sample):
    images, labels = sample
    responses = classify(
        torchserve.predictions_url(),
        [png(Image.fromarray(i)) for i in images],
        torchserve.inference_headers(),
    )
    assert all(r.status_code == 200 for r in responses)
    predicted = np.array([r.json()["digit"] for r in responses])
    accuracy = float((predicted == labels).mean())
    assert accuracy >= 0.99, f"accuracy {accuracy:.4f} on {len(labels)} official test images"


def test_accuracy_on_canvas_renditions(torchserve, sample):
    images, labels = sample
    count = 120
    names = sorted(RENDITIONS)
    payloads = [render(image, name) for name in names for image in images[:count]]
    responses = classify(torchserve.predictions_url(), payloads, torchserve.inference_headers())
    assert all(r.status_code == 200 for r in responses)
    predicted = np.array([r.json()["digit"] for r in responses]).reshape(len(names), count)
    per_name = {
        name: float((row == labels[:count]).mean()) for name, row in zip(names, predicted, strict=True)
    }
    overall = float(np.mean(list(per_name.values())))
    assert overall >= 0.98 and min(per_name.values()) >= 0.95, per_name


# --- bad input: a 4xx with a JSON message, never a 5xx, and the worker keeps serving ------------


def bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")
    return buf.getvalue()


BAD_INPUTS = {
    "not_an_image": (b"hello, I am not a picture", "application/octet-stream", 415),
    "truncated_png": (png(Image.effect_noise((120, 120), 50))[:300], "image/png", 415),
    "empty_body": (b"", "image/png", 400),
    "empty_json": (b"", "application/json", 400),
    "invalid_json": (b'{"data": ', "application/json", 400),
    "json_without_data": (b'{"image": "x"}', "application/json", 400),
    "invalid_base64": (b'{"data": "%%%%"}', "application/json", 400),
    "base64_of_garbage": (b'{"data": "aGVsbG8="}', "application/json", 415),
    "blank_canvas": (png(Image.new("L", (280, 280))), "image/png", 422),
    "blank_transparent_canvas": (png(Image.new("RGBA", (280, 280), (0, 0, 0, 0))), "image/png", 422),
    "too_many_pixels": (bomb(), "image/png", 413),
    "body_over_limit": (b"\x89PNG\r\n\x1a\n" + bytes(2_100_000), "image/png", 413),
}


def worker_pids(torchserve) -> list[int]:
    response = httpx.get(
        f"{torchserve.management_url}/models/{torchserve.model_name}",
        headers=torchserve.management_headers(),
        timeout=10,
    )
    return sorted(w["pid"] for v in response.json() for w in v["workers"])


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gets_a_4xx_and_the_next_request_works(torchserve, sample, name):
    body, content_type, status = BAD_INPUTS[name]
    before = worker_pids(torchserve)
    response = httpx.post(
        torchserve.predictions_url(),
        content=body,
        headers={"Content-Type": content_type, **torchserve.inference_headers()},
        timeout=30,
    )
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == status and error["message"]
    images, labels = sample
    good = httpx.post(
        torchserve.predictions_url(),
        content=png(Image.fromarray(images[2])),
        headers=torchserve.inference_headers(),
        timeout=30,
    )
    assert good.status_code == 200 and good.json()["digit"] == labels[2]
    assert worker_pids(torchserve) == before


def test_body_over_the_frontend_limit_is_413(torchserve):
    """Bodies over TorchServe's max_request_size (8 MiB) never reach a worker: a bare 413."""
    response = httpx.post(
        torchserve.predictions_url(),
        content=bytes(9_000_000),
        headers=torchserve.inference_headers(),
        timeout=30,
    )
    assert response.status_code == 413


def test_concurrent_mixed_traffic_never_gets_a_5xx(torchserve, sample):
    images, labels = sample
    good = [png(Image.fromarray(i)) for i in images[:40]]
    bad = [
        BAD_INPUTS[name][0] for name in ("not_an_image", "blank_canvas", "truncated_png", "empty_body")
    ] * 10
    mixed = [p for pair in zip(good, bad, strict=True) for p in pair]
    responses = classify(torchserve.predictions_url(), mixed, torchserve.inference_headers(), workers=16)
    statuses = [r.status_code for r in responses]
    assert all(s < 500 for s in statuses), statuses
    assert [r.json()["digit"] for r in responses[::2]] == labels[:40].tolist()
    assert all(400 <= s < 500 for s in statuses[1::2])


# --- calibration, the fast runtime, the time split -----------------------------------------------


def test_the_temperature_comes_from_calibration_json_and_defaults_to_one(tmp_path):
    from handlers import model_runtime as mh

    assert mh.read_temperature(tmp_path) == 1.0  # an archive from before calibration
    (tmp_path / mh.CALIBRATION_FILE).write_text(json.dumps({"temperature": 0.5}))
    assert mh.read_temperature(tmp_path) == 0.5
    for bad in (0, -1, "nan"):
        (tmp_path / mh.CALIBRATION_FILE).write_text(json.dumps({"temperature": bad}))
        with pytest.raises(ValueError, match="positive"):
            mh.read_temperature(tmp_path)


def test_calibrated_probabilities_are_the_softmax_of_logits_over_t():
    import torch

    from handlers import model_runtime as mh

    logits = np.random.default_rng(0).normal(0, 8, (64, 10)).astype(np.float32)
    for t in (0.49, 1.0, 2.0):
        probs = mh.calibrated(logits, t)
        np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits) / t, 1).numpy(), atol=1e-6)
        assert (probs.argmax(1) == logits.argmax(1)).all()  # calibration never changes an answer
    assert np.isfinite(mh.calibrated(np.array([[1e4, -1e4] + [0.0] * 8]), 0.1)).all()


def test_the_shipped_archive_is_calibrated_and_runs_in_onnx_runtime(unpacked_handler):
    handler, _, _ = unpacked_handler
    model_card = json.loads((ROOT / "model_store" / "mnist.json").read_text())
    assert handler.temperature == model_card["calibration"]["temperature"] != 1.0
    assert handler.runtime == "onnxruntime"
    assert handler.describe_handle()["runtime"] == "onnxruntime"


def test_onnx_runtime_gives_the_torch_answers_on_the_whole_test_set(unpacked_handler, mnist_dir):
    """Argmax equal on all 10,000 official test images, probabilities within 1e-5 of eager torch."""
    import torch

    handler, _, manifest = unpacked_handler
    module = sys.modules["model_runtime"]
    model_dir = Path(handler.model_pt_path).parent
    plain = sys.modules["model"].Net()
    plain.load_state_dict(torch.load(model_dir / manifest["model"]["serializedFile"], map_location="cpu"))
    plain.eval()
    images, _ = read_mnist_test(mnist_dir)
    batch = normalize(images)[:, None]
    with torch.inference_mode():
        eager = np.concatenate(
            [plain(torch.from_numpy(batch[i : i + 500])).numpy() for i in range(0, 10000, 500)]
        )
    fast = np.concatenate([handler.forward(batch[i : i + 500])[0] for i in range(0, 10000, 500)])
    assert (fast.argmax(1) == eager.argmax(1)).all()
    t = handler.temperature
    np.testing.assert_allclose(module.calibrated(fast, t), module.calibrated(eager, t), rtol=0, atol=1e-5)


def test_an_archive_without_calibration_or_onnx_answers_as_before(tmp_path, unpacked_handler, sample):
    """Older archives: no calibration.json (T=1), no mnist.onnx (torch): the plain softmax."""
    import torch
    from ts.context import Context

    handler, _, manifest = unpacked_handler
    module = sys.modules["mnist_handler"]
    source = Path(handler.model_pt_path).parent
    old = tmp_path / "old"
    old.mkdir()
    for name in (manifest["model"]["serializedFile"], "model.py"):
        (old / name).write_bytes((source / name).read_bytes())
    context = Context("mnist", str(old), manifest, 1, None, "0.12.0", model_yaml_config={})
    legacy = module.MnistHandler()
    legacy.initialize(context)
    assert (legacy.temperature, legacy.runtime, legacy.digit_head) == (1.0, "torch", None)
    images, _ = sample
    digits = [preprocess(png(Image.fromarray(image))) for image in images[:16]]
    plain = sys.modules["model"].Net()
    plain.load_state_dict(torch.load(old / manifest["model"]["serializedFile"], map_location="cpu"))
    plain.eval()
    with torch.inference_mode():
        expected = torch.softmax(plain(torch.from_numpy(normalize(np.stack(digits))).unsqueeze(1)), dim=1)
    np.testing.assert_allclose(legacy.predict(digits), expected.numpy(), atol=1e-5)
    assert legacy.answer(digits)[1] is None  # no head: answers without `is_digit`
    assert "is_digit" not in legacy.describe_handle()["output"]


def timing_parts(value: str) -> dict[str, float]:
    parts = {}
    for item in value.split(","):
        name, *params = (p.strip() for p in item.split(";"))
        parts[name] = float(next(p for p in params if p.startswith("dur="))[4:])
    return parts


def test_every_answer_carries_the_handlers_time_split(unpacked_handler, sample):
    from ts.context import RequestProcessor

    handler, context, _ = unpacked_handler
    images, _ = sample
    requests = [{"body": png(Image.fromarray(images[i]))} for i in range(3)] + [{"body": b"not an image"}]
    context.request_processor = [RequestProcessor({"body": {"content-type": "image/png"}}) for _ in requests]
    handler.handle(requests, context)
    for idx in range(3):
        value = context.get_response_headers(idx)["Server-Timing"]
        parts = timing_parts(value)
        assert set(parts) == {"decode", "preprocess", "model"} and all(v >= 0 for v in parts.values())
        assert 'desc="batch of 3"' in value
    assert "Server-Timing" not in context.get_response_headers(3)  # a 4xx has no model time


def test_server_timing_through_torchserve(torchserve, sample):
    images, _ = sample
    response = httpx.post(
        torchserve.predictions_url(),
        content=png(Image.fromarray(images[5])),
        headers=torchserve.inference_headers(),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    parts = timing_parts(response.headers["server-timing"])
    assert set(parts) == {"decode", "preprocess", "model"}
    assert 0 < parts["model"] < 1000


# --- "not a digit" ------------------------------------------------------------------------------------


def test_drawn_non_digits_are_not_digits_and_test_digits_are(unpacked_handler, sample):
    """Held-out non-digits (fonts and a seed the head never saw) refused; official test digits kept."""
    from training import negatives

    handler, _, _ = unpacked_handler
    others, _ = negatives.make(220, seed=7, held_out=True)
    _, refused = handler.answer(list(others))
    assert refused is not None and 1 - np.mean(refused) >= 0.9
    images, _ = sample
    _, kept = handler.answer([preprocess(png(Image.fromarray(i))) for i in images])
    assert kept is not None and np.mean(kept) >= 0.99
    assert "is_digit" in handler.describe_handle()["output"]


def test_a_letter_through_torchserve_is_not_a_digit_but_still_has_a_best_digit(torchserve, sample):
    from training import negatives

    letter = negatives.drawing("letter", np.random.default_rng(3), held_out=True)
    images, _ = sample
    for body, expected in ((letter, False), (png(Image.fromarray(images[7])), True)):
        response = httpx.post(
            torchserve.predictions_url(), content=body, headers=torchserve.inference_headers(), timeout=30
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["is_digit"] is expected
        assert 0 <= answer["digit"] <= 9 and answer["digit"] == int(np.argmax(answer["probabilities"]))
