"""The UI's metrics (`ui.metrics`): what the service records, read back from the Prometheus registry."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.ui.fakes import FakeModel, FakeStore, digit_png
from ui import metrics
from ui.inference import InferenceClient, InferenceUnavailable, Prediction
from ui.outbox import Outbox
from ui.outcome import Outcome
from ui.service import PredictionService


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def outcome(digit: int = 3, version: str = "9.9", *, latency_ms: float = 0.0, age_s: float = 0.0) -> Outcome:
    prediction = Prediction(digit, 0.9, [0.01] * 10, [], version)
    return Outcome(
        b"png", prediction, created_at=datetime.now(UTC) - timedelta(seconds=age_s), latency_ms=latency_ms
    )


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[PredictionService, FakeModel, FakeStore]]:
    model, store = FakeModel(version="7.1"), FakeStore()
    inference = InferenceClient(
        "http://ts.test", management_url="http://ts.test", transport=model.transport()
    )
    service = PredictionService(
        store, inference, outbox=Outbox(tmp_path / "outbox", 10_000_000), max_image_bytes=100_000
    )
    await service.start()
    yield service, model, store
    await service.stop()


def test_latency_counts_the_model_call_and_the_storing() -> None:
    """Request to stored answer: the model's round trip (latency_ms) plus the time since the answer."""
    assert metrics.answer_seconds(outcome(latency_ms=300, age_s=0.2), time.time()) == pytest.approx(
        0.5, abs=0.05
    )
    before = value("digit_ui_prediction_latency_seconds_sum")
    metrics.saved(outcome(latency_ms=300, age_s=0.2))
    assert value("digit_ui_prediction_latency_seconds_sum") - before == pytest.approx(0.5, abs=0.05)
    assert metrics.LATENCY_BUCKETS[0] == 0.005 and metrics.LATENCY_BUCKETS[-1] == 5.0


async def test_predictions_and_labels_are_counted_per_model_version(
    service: tuple[PredictionService, FakeModel, FakeStore],
) -> None:
    svc, _, _ = service

    def counts() -> tuple[float, ...]:
        return (
            value("digit_ui_predictions_total", model_version="7.1", stored="true"),
            value("digit_ui_feedback_total", model_version="7.1", correct="true"),
            value("digit_ui_feedback_total", model_version="7.1", correct="false"),
        )

    before = counts()
    first = await svc.predict(digit_png("one"))  # the fake model answers 1 for a stroke
    second = await svc.predict(digit_png("one"))
    await svc.label(first, 1)
    assert second.id is not None
    await svc.label_by_id(
        second.id, 4, token=second.label_token
    )  # by id (the API): judged from what this process stored
    assert [a - b for a, b in zip(counts(), before, strict=True)] == [2, 1, 1]
    assert value("digit_ui_model_version_info", model_version="7.1") == 1


async def test_queued_predictions_count_as_not_stored_and_the_database_as_down(
    service: tuple[PredictionService, FakeModel, FakeStore],
) -> None:
    svc, _, store = service
    before = value("digit_ui_predictions_total", model_version="7.1", stored="false")
    store.down = True
    await svc.predict(digit_png("one"))
    assert value("digit_ui_predictions_total", model_version="7.1", stored="false") - before == 1
    assert value("digit_ui_dependency_up", dependency="database") == 0
    assert value("digit_ui_waiting") == 1 and value("digit_ui_outbox_bytes") > 0
    store.down = False
    assert await svc.flush() == 1
    assert value("digit_ui_dependency_up", dependency="database") == 1
    assert value("digit_ui_waiting") == 0


async def test_the_model_server_down_and_back(
    service: tuple[PredictionService, FakeModel, FakeStore],
) -> None:
    svc, model, _ = service
    model.down = True
    with pytest.raises(InferenceUnavailable):
        await svc.predict(digit_png("one"))
    assert value("digit_ui_dependency_up", dependency="model_server") == 0
    model.down = False
    await svc.predict(digit_png("one"))
    assert value("digit_ui_dependency_up", dependency="model_server") == 1


def test_a_label_for_a_prediction_not_seen_is_unknown() -> None:
    before = value("digit_ui_feedback_total", model_version="unknown", correct="unknown")
    metrics.labelled_by_id(10**12, 3)
    assert value("digit_ui_feedback_total", model_version="unknown", correct="unknown") - before == 1


def test_a_new_model_version_replaces_the_old_info_series() -> None:
    metrics.answered("1.0")
    metrics.answered("2.0")
    assert value("digit_ui_model_version_info", model_version="2.0") == 1
    assert REGISTRY.get_sample_value("digit_ui_model_version_info", {"model_version": "1.0"}) is None


def test_readiness_sets_every_part() -> None:
    metrics.checked(model=True, database=False, pool=True)
    parts = {d: value("digit_ui_dependency_up", dependency=d) for d in metrics.DEPENDENCIES}
    assert parts == {"model_server": 1, "database": 0, "db_pool": 1}


def test_recent_predictions_are_bounded() -> None:
    recent = metrics.RecentPredictions(size=2)
    for prediction_id in (1, 2, 3):
        recent.add(prediction_id, prediction_id, "1.0")
    assert recent.get(1) is None and recent.get(3) == (3, "1.0")


def test_every_metric_has_help_and_follows_the_naming_rules() -> None:
    families = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest().decode())
        if f.name.startswith("digit_ui")
    }
    assert {"digit_ui_predictions", "digit_ui_feedback", "digit_ui_errors", "digit_ui_dependency_up"} <= set(
        families
    )
    for name, family in families.items():
        assert family.documentation, name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
    # Every error kind exists from the start (rates and ratios exist before the first error).
    kinds = {s.labels["kind"] for s in families["digit_ui_errors"].samples if s.name.endswith("_total")}
    assert kinds == set(metrics.ERROR_KINDS)


async def test_not_a_digit_labels_forbidden_requests_and_deletions_are_counted(
    service: tuple[PredictionService, FakeModel, FakeStore],
) -> None:
    from db.errors import Forbidden

    svc, _, _ = service
    before = (
        value("digit_ui_feedback_total", model_version="7.1", correct="not_a_digit"),
        value("digit_ui_errors_total", kind="forbidden"),
        value("digit_ui_deleted_total"),
    )
    first = await svc.predict(digit_png("one"))
    second = await svc.predict(digit_png("one"))
    assert first.id is not None and second.id is not None
    await svc.label(first, None, not_a_digit=True)  # the page's own drawing
    await svc.label_by_id(second.id, None, not_a_digit=True, token=second.label_token)  # by id
    with pytest.raises(Forbidden):
        await svc.label_by_id(second.id, 1, token="a guess")
    await svc.delete(first.id, token=first.label_token)
    after = (
        value("digit_ui_feedback_total", model_version="7.1", correct="not_a_digit"),
        value("digit_ui_errors_total", kind="forbidden"),
        value("digit_ui_deleted_total"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1]
    assert metrics.correctness(3, None) == "not_a_digit" and metrics.correctness(3, 3) == "true"
