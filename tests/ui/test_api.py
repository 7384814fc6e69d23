"""The JSON API on a real PostgreSQL (a fresh migrated database per test) and a fake model server."""

from __future__ import annotations

import asyncio
import base64
import io
import zipfile
from typing import Any

from PIL import Image

from tests.ui.conftest import Simulated
from tests.ui.fakes import digit_png


async def post_png(sim: Simulated, png: bytes) -> dict:
    response = await sim.client.post("/api/predictions", content=png, headers={"content-type": "image/png"})
    assert response.status_code == 201, response.text
    return response.json()


async def test_post_image_body_is_predicted_and_stored(sim_db: Simulated) -> None:
    body = await post_png(sim_db, digit_png("zero"))
    assert body["stored"] is True and body["digit"] == 0
    assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 0.01
    assert body["confidence"] == max(body["probabilities"])
    row = await sim_db.store.get(body["id"])
    assert row.digit == 0 and row.model_name == "mnist" and row.true_label is None
    assert await sim_db.store.image_png(body["id"]) == digit_png("zero")


async def test_post_json_base64_and_data_url(sim_db: Simulated) -> None:
    encoded = base64.b64encode(digit_png("one")).decode()
    for data in (encoded, "data:image/png;base64," + encoded):
        response = await sim_db.client.post("/api/predictions", json={"data": data})
        assert response.status_code == 201, response.text
        assert response.json()["digit"] == 1


async def test_bad_input_gets_clear_4xx_and_nothing_stored(sim_db: Simulated) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"content": b"hello, not an image", "headers": {"content-type": "image/png"}}, 400, "not an image"),
        ({"content": digit_png("blank"), "headers": {"content-type": "image/png"}}, 400, "empty"),
        ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"json": {"data": "***"}}, 400, "base64"),
        ({"json": {"image": "x"}}, 400, '{"data"'),
        (
            {"content": b"\x89PNG" + bytes(2_100_000), "headers": {"content-type": "image/png"}},
            413,
            "too large",
        ),
    ]
    for kwargs, status, words in cases:
        response = await sim_db.client.post("/api/predictions", **kwargs)
        assert response.status_code == status, (kwargs.get("json"), response.text)
        assert words in response.json()["detail"]
    assert (await sim_db.store.stats()).total == 0


async def test_model_server_down_is_503(sim_db: Simulated) -> None:
    sim_db.model.down = True
    response = await sim_db.client.post("/api/predictions", content=digit_png("one"))
    assert response.status_code == 503
    assert "not reachable" in response.json()["detail"]


async def test_label_roundtrip_and_errors(sim_db: Simulated) -> None:
    prediction_id = (await post_png(sim_db, digit_png("one")))["id"]
    response = await sim_db.client.put(f"/api/predictions/{prediction_id}/label", json={"label": 7})
    assert response.status_code == 200 and response.json() == {
        "id": prediction_id,
        "label": 7,
        "stored": True,
    }
    assert (await sim_db.store.get(prediction_id)).true_label == 7
    for bad in (10, -1, "7", 7.5, None, True):
        response = await sim_db.client.put(f"/api/predictions/{prediction_id}/label", json={"label": bad})
        assert response.status_code == 422, bad
    response = await sim_db.client.put("/api/predictions/999999/label", json={"label": 3})
    assert response.status_code == 404 and "999999" in response.json()["detail"]
    assert (await sim_db.store.get(prediction_id)).true_label == 7


async def test_history_is_paginated_newest_first(sim_db: Simulated) -> None:
    ids = [(await post_png(sim_db, digit_png(kind)))["id"] for kind in ("one", "zero", "one")]
    await sim_db.client.put(f"/api/predictions/{ids[1]}/label", json={"label": 6})
    first = (await sim_db.client.get("/api/predictions", params={"limit": 2})).json()
    assert [item["id"] for item in first["items"]] == [ids[2], ids[1]]
    assert first["items"][1]["true_label"] == 6 and first["items"][1]["correct"] is False
    assert first["next_before_id"] == ids[1]
    second = (await sim_db.client.get("/api/predictions", params={"limit": 2, "before_id": ids[1]})).json()
    assert [item["id"] for item in second["items"]] == [ids[0]] and second["next_before_id"] is None
    image = await sim_db.client.get(second["items"][0]["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (280, 280)
    assert (await sim_db.client.get("/api/predictions/999999/image.png")).status_code == 404
    assert (await sim_db.client.get("/api/predictions", params={"limit": 0})).status_code == 422


async def test_stats_and_export(sim_db: Simulated) -> None:
    a = (await post_png(sim_db, digit_png("one")))["id"]
    b = (await post_png(sim_db, digit_png("zero")))["id"]
    await post_png(sim_db, digit_png("one"))
    await sim_db.client.put(f"/api/predictions/{a}/label", json={"label": 1})
    await sim_db.client.put(f"/api/predictions/{b}/label", json={"label": 8})
    stats = (await sim_db.client.get("/api/stats")).json()
    assert (stats["total"], stats["labelled"], stats["accuracy"]) == (3, 2, 0.5)
    assert stats["confusion"][1][1] == 1 and stats["confusion"][8][0] == 1
    assert stats["per_digit"][1]["accuracy"] == 1.0 and stats["per_digit"][8]["accuracy"] == 0.0
    assert stats["by_version"]["1.0"]["total"] == 3
    export = await sim_db.client.get("/api/export")
    assert export.status_code == 200 and "attachment" in export.headers["content-disposition"]
    names = zipfile.ZipFile(io.BytesIO(export.content)).namelist()
    assert any(name.endswith(".csv") for name in names)
    assert sum(name.endswith(".png") for name in names) == 2


async def test_database_down_prediction_kept_then_stored(sim_db: Simulated, postgres) -> None:
    postgres.stop()
    try:
        response = await sim_db.client.post("/api/predictions", content=digit_png("zero"))
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["stored"] is False and body["id"] is None and body["digit"] == 0
        stats_down = await sim_db.client.get("/api/stats")
        assert stats_down.status_code == 503, stats_down.text
        ready = await sim_db.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"]["ready"] is False
        assert ready.json()["waiting_to_store"] == 1
    finally:
        postgres.start()
    for _ in range(200):  # the service retries in the background
        if not sim_db.service.waiting:
            break
        await asyncio.sleep(0.05)
    stats = (await sim_db.client.get("/api/stats")).json()
    assert stats["total"] == 1 and stats["per_digit"][0]["predicted"] == 1


async def test_openapi_documents_the_api(sim_db: Simulated) -> None:
    paths = (await sim_db.client.get("/openapi.json")).json()["paths"]
    for path in ("/api/predictions", "/api/predictions/{prediction_id}/label", "/api/stats", "/readyz"):
        assert path in paths
    assert "image/png" in paths["/api/predictions"]["post"]["requestBody"]["content"]
    assert "Idempotency-Key" in [p["name"] for p in paths["/api/predictions"]["post"]["parameters"]]


async def test_health_and_metrics(sim_db: Simulated) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (
        value("digit_ui_predictions_total", model_version="1.0", stored="true"),
        value("digit_ui_errors_total", kind="invalid_input"),
        value("digit_ui_feedback_total", model_version="1.0", correct="true"),
        value("digit_ui_prediction_latency_seconds_count"),
    )
    assert (await sim_db.client.get("/healthz")).json() == {"status": "ok"}
    ready = await sim_db.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    prediction_id = (await post_png(sim_db, digit_png("one")))["id"]
    await sim_db.client.put(f"/api/predictions/{prediction_id}/label", json={"label": 1})
    await sim_db.client.post("/api/predictions", content=b"not an image")
    after = (
        value("digit_ui_predictions_total", model_version="1.0", stored="true"),
        value("digit_ui_errors_total", kind="invalid_input"),
        value("digit_ui_feedback_total", model_version="1.0", correct="true"),
        value("digit_ui_prediction_latency_seconds_count"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]
    text = (await sim_db.client.get("/metrics")).text
    for name in ("predictions_total", "errors_total", "feedback_total", "prediction_latency_seconds_bucket"):
        assert f"digit_ui_{name}" in text


async def count_rows(sim: Simulated) -> int:
    return (await sim.store.stats()).total


async def test_idempotency_key_retry_of_a_stored_prediction(sim_db: Simulated) -> None:
    headers = {"content-type": "image/png", "Idempotency-Key": "client-42"}
    first = await sim_db.client.post("/api/predictions", content=digit_png("one"), headers=headers)
    again = await sim_db.client.post("/api/predictions", content=digit_png("one"), headers=headers)
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json() == first.json() and await count_rows(sim_db) == 1
    other = await sim_db.client.post(
        "/api/predictions", content=digit_png("one"), headers={"Idempotency-Key": "x"}
    )
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert await count_rows(sim_db) == 2


async def test_idempotency_key_retry_of_a_queued_prediction(sim_db: Simulated, postgres) -> None:
    headers = {"content-type": "image/png", "Idempotency-Key": "client-43"}
    postgres.stop()
    try:
        first = await sim_db.client.post("/api/predictions", content=digit_png("zero"), headers=headers)
        again = await sim_db.client.post("/api/predictions", content=digit_png("zero"), headers=headers)
        assert first.status_code == again.status_code == 202, (first.text, again.text)
        assert again.json() == first.json() and first.json()["id"] is None
        assert sim_db.service.waiting == 1
    finally:
        postgres.start()
    for _ in range(200):
        if not sim_db.service.waiting:
            break
        await asyncio.sleep(0.05)
    after = await sim_db.client.post("/api/predictions", content=digit_png("zero"), headers=headers)
    assert after.status_code == 201 and after.json()["id"] is not None
    assert after.json()["digit"] == first.json()["digit"] and await count_rows(sim_db) == 1


async def test_idempotency_key_longer_than_200_is_400(sim: Simulated) -> None:
    ok = await sim.client.post(
        "/api/predictions", content=digit_png("one"), headers={"Idempotency-Key": "k" * 200}
    )
    assert ok.status_code == 201
    response = await sim.client.post(
        "/api/predictions", content=digit_png("one"), headers={"Idempotency-Key": "k" * 201}
    )
    assert response.status_code == 400 and "Idempotency-Key" in response.json()["detail"]
    assert len(sim.store.rows) == 1


async def test_outbox_full_is_a_503_not_a_promise(sim: Simulated) -> None:
    sim.store.down = True
    sim.service.outbox.journal.max_bytes = 1_000  # less than one record
    response = await sim.client.post("/api/predictions", content=digit_png("one"))
    assert response.status_code == 503, response.text
    assert "full" in response.json()["detail"] and sim.service.waiting == 0
    sim.service.outbox.journal.max_bytes = 10  # less than one label
    response = await sim.client.put("/api/predictions/1/label", json={"label": 3})
    assert response.status_code == 503 and "full" in response.json()["detail"] and sim.service.waiting == 0


async def test_readyz_names_the_part_not_ready(sim: Simulated) -> None:
    from db.records import PoolHealth

    body = (await sim.client.get("/readyz")).json()
    assert body["ready"] and body["model"]["ready"] and body["database"]["ready"] and body["pool"]["ready"]
    sim.store.pool = PoolHealth(size=8, idle=0, waiting=30, exhausted_for_s=12.0)
    response = await sim.client.get("/readyz")
    body = response.json()
    assert response.status_code == 503 and not body["ready"] and not body["pool"]["ready"]
    assert body["database"]["ready"] and body["model"]["ready"] and "30 waiting" in body["pool"]["detail"]
    sim.store.pool = PoolHealth(size=8, idle=8, waiting=0, exhausted_for_s=0.0)
    sim.model.down = True
    body = (await sim.client.get("/readyz")).json()
    assert not body["ready"] and not body["model"]["ready"] and body["pool"]["ready"]
