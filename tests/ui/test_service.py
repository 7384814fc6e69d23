"""The shared service: storing, keeping what the database could not take, and retrying."""

from __future__ import annotations

import asyncio

import pytest

from tests.ui.fakes import FakeModel, FakeStore, digit_png
from ui.inference import InferenceClient, InvalidInput
from ui.service import PredictionService, check_label


@pytest.fixture
async def service() -> PredictionService:
    inference = InferenceClient("http://ts.test", transport=FakeModel().transport())
    return PredictionService(FakeStore(), inference, max_image_bytes=100_000)  # type: ignore[arg-type]


async def test_stored_at_once(service: PredictionService) -> None:
    outcome = await service.predict(digit_png("one"))
    assert outcome.stored and outcome.id == 1 and service.version == 1
    assert await service.label(outcome, 1) is True and outcome.label_stored


async def test_kept_while_database_down_then_flushed_with_label(service: PredictionService) -> None:
    store: FakeStore = service.store  # type: ignore[assignment]
    store.down = True
    first = await service.predict(digit_png("one"))
    second = await service.predict(digit_png("zero"))
    assert not first.stored and service.waiting == 2
    assert await service.label(second, 6) is False
    assert await service.flush() == 0  # still down: nothing lost, nothing stored
    store.down = False
    assert await service.flush() == 2
    assert (first.id, second.id) == (1, 2) and service.waiting == 0
    assert store.rows[2][1] == 6 and store.rows[1][1] is None and second.label_stored


async def test_label_by_id_kept_while_down(service: PredictionService) -> None:
    store: FakeStore = service.store  # type: ignore[assignment]
    outcome = await service.predict(digit_png("one"))
    store.down = True
    assert await service.label_by_id(outcome.id, 3) is False
    store.down = False
    await service.flush()
    assert store.rows[outcome.id][1] == 3


async def test_too_large_is_refused_before_the_model(service: PredictionService) -> None:
    with pytest.raises(InvalidInput, match="too large") as info:
        await service.predict(b"\x89PNG" + bytes(200_000))
    assert info.value.status_code == 413


def test_check_label() -> None:
    assert check_label(0) == 0 and check_label(9) == 9
    for bad in (-1, 10, True, "3", 2.0, None):
        with pytest.raises(ValueError, match="0 to 9"):
            check_label(bad)


async def test_what_waits_survives_a_restart_through_the_spill_file(tmp_path) -> None:
    """Database down at shutdown: the app writes what waits to run_dir and stores it after the next start."""
    from tests.ui.conftest import simulate

    store, model = FakeStore(down=True), FakeModel()
    async with simulate(store, model, tmp_path) as first:
        outcome = await first.service.predict(digit_png("zero"))
        await first.service.label(outcome, 9)
        assert first.service.waiting == 1
    assert (tmp_path / "unsaved.jsonl").exists() and not store.rows
    store.down = False
    async with simulate(store, model, tmp_path) as second:
        for _ in range(100):  # startup runs as a task: reads the file, then the retry loop stores
            if not (tmp_path / "unsaved.jsonl").exists() and not second.service.waiting:
                break
            await asyncio.sleep(0.05)
    assert [(p.digit, label) for p, label, _ in store.rows.values()] == [(0, 9)]
    assert store.rows[1][0].image_png == digit_png("zero")
    assert not (tmp_path / "unsaved.jsonl").exists()
