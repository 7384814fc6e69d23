"""The shared service: storing, keeping what the database could not take in the outbox, retrying, reading."""

from __future__ import annotations

import asyncio
import io
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from db.errors import DatabaseUnavailable, Forbidden, InvalidLabel, PredictionNotFound
from db.export import drawing_files
from db.records import PoolHealth, token_hash
from db.stats import Stats
from db.store import Store
from tests.ui.fakes import FakeModel, FakeStore, digit_png
from ui.inference import InferenceClient, InvalidInput
from ui.outbox import Outbox, QueueFull
from ui.outcome import Outcome
from ui.service import (
    PredictionService,
    PredictionStore,
    check_choice,
    check_label,
    new_prediction,
    stored_key,
)


def make_service(
    store: FakeStore, folder: Path, model: FakeModel | None = None, **outbox: int
) -> PredictionService:
    inference = InferenceClient(
        "http://ts.test", management_url="http://ts.test", transport=(model or FakeModel()).transport()
    )
    box = Outbox(folder / "outbox", outbox.get("max_bytes", 10_000_000))
    service = PredictionService(store, inference, outbox=box, max_image_bytes=100_000, retry_interval_s=3600)
    return service


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[PredictionService]:
    service = make_service(FakeStore(), tmp_path)
    await service.start()
    yield service
    await service.stop()


def fake(service: PredictionService) -> FakeStore:
    assert isinstance(service.store, FakeStore)
    return service.store


async def test_stored_at_once(service: PredictionService) -> None:
    outcome = await service.predict(digit_png("one"))
    assert outcome.stored and outcome.id == 1 and service.version == 1
    assert await service.label(outcome, 1) is True and outcome.label_stored
    row = fake(service).rows[1][0]
    assert row.key == outcome.key and row.created_at == outcome.created_at


async def test_kept_while_database_down_then_flushed_with_label(service: PredictionService) -> None:
    store = fake(service)
    store.down = True
    first = await service.predict(digit_png("one"))
    second = await service.predict(digit_png("zero"))
    assert not first.stored and service.waiting == 2
    assert await service.label(second, 6) is False
    assert service.waiting == 3  # two predictions and the label, each on disk
    assert await service.flush() == 0  # still down: nothing lost, nothing stored
    store.down = False
    assert await service.flush() == 2
    assert (first.id, second.id) == (1, 2) and service.waiting == 0
    assert store.rows[2][1] == 6 and store.rows[1][1] is None and second.label_stored
    # the rows keep the time the person predicted, not the time they were stored
    assert [at for _, _, at in store.rows.values()] == [first.created_at, second.created_at]


async def test_label_by_id_kept_while_down(service: PredictionService) -> None:
    store = fake(service)
    outcome = await service.predict(digit_png("one"))
    assert outcome.id is not None
    store.down = True
    assert await service.label_by_id(outcome.id, 3, token=outcome.label_token) is False
    assert service.waiting == 1
    store.down = False
    await service.flush()
    assert store.rows[outcome.id][1] == 3 and service.waiting == 0


async def test_a_newer_label_replaces_the_one_waiting(service: PredictionService) -> None:
    store = fake(service)
    outcome = await service.predict(digit_png("one"))
    assert outcome.id is not None
    store.down = True
    assert await service.label(outcome, 3) is False
    store.down = False
    assert await service.label(outcome, 4) is True and service.waiting == 0
    await service.flush()
    assert store.rows[outcome.id][1] == 4


async def test_too_large_is_refused_before_the_model(service: PredictionService) -> None:
    with pytest.raises(InvalidInput, match="too large") as info:
        await service.predict(b"\x89PNG" + bytes(200_000))
    assert info.value.status_code == 413


def test_check_label() -> None:
    assert check_label(0) == 0 and check_label(9) == 9
    for bad in (-1, 10, True, "3", 2.0, None):
        with pytest.raises(ValueError, match="0 to 9"):
            check_label(bad)


async def test_preview_stores_nothing(service: PredictionService) -> None:
    prediction = await service.preview(digit_png("zero"))
    assert prediction.digit == 0 and not fake(service).rows and service.version == 0


async def test_what_waits_survives_a_restart_through_the_outbox(tmp_path: Path) -> None:
    """Database down at shutdown: what waits stays in data_dir/outbox and is stored after the next start."""
    from tests.ui.conftest import simulate

    store, model = FakeStore(down=True), FakeModel()
    async with simulate(store, model, tmp_path) as first:
        outcome = await first.service.predict(digit_png("zero"))
        await first.service.label(outcome, 9)
        assert first.service.waiting == 2
    journal = tmp_path / "data" / "outbox" / "outbox.jsonl"
    assert journal.stat().st_size > 0 and not store.rows
    store.down = False
    async with simulate(store, model, tmp_path) as second:
        for _ in range(100):  # the retry loop stores what the outbox gave back
            if store.rows and not second.service.waiting:
                break
            await asyncio.sleep(0.05)
    assert [(p.digit, label) for p, label, _ in store.rows.values()] == [(0, 9)]
    assert store.rows[1][0].image_png == digit_png("zero")
    assert store.rows[1][2] == outcome.created_at
    assert journal.stat().st_size == 0  # compacted: nothing waits


async def test_a_replay_after_a_crash_between_commit_and_tombstone_stores_once(tmp_path: Path) -> None:
    store = FakeStore(down=True)
    first = make_service(store, tmp_path)
    await first.start()
    outcome = await first.predict(digit_png("one"))
    await first.label(outcome, 7)
    # The crash: the row was committed, the process died before writing the tombstone.
    store.down = False
    await store.record_prediction(new_prediction(outcome, "mnist"))
    first.outbox.close()

    second = make_service(store, tmp_path)
    await second.start()
    assert second.waiting == 2
    assert await second.flush() == 1
    await second.stop()
    assert len(store.rows) == 1 and store.rows[1][1] == 7


async def test_outbox_full_raises_and_promises_nothing(tmp_path: Path) -> None:
    service = make_service(FakeStore(down=True), tmp_path, max_bytes=20_000)  # a record is about 3 KB
    await service.start()
    accepted = 0
    with pytest.raises(QueueFull, match="full"):
        for _ in range(10):
            await service.predict(digit_png("one"))
            accepted += 1
    assert 1 <= accepted < 10 and service.waiting == accepted
    await service.stop()


async def test_idempotency_key_stored_first(service: PredictionService) -> None:
    first = await service.predict(digit_png("one"), idempotency_key="order-1")
    again = await service.predict(digit_png("zero"), idempotency_key="order-1")  # a retry: the first answer
    assert first.stored and (again.id, again.prediction.digit, again.stored) == (first.id, 1, True)
    assert len(fake(service).rows) == 1 and fake(service).rows[1][0].key == stored_key("order-1")


async def test_idempotency_key_queued_first(service: PredictionService) -> None:
    store = fake(service)
    store.down = True
    first = await service.predict(digit_png("one"), idempotency_key="order-2")
    again = await service.predict(digit_png("one"), idempotency_key="order-2")
    assert (again.id, again.stored, again.prediction.digit) == (None, False, first.prediction.digit)
    assert service.waiting == 1
    store.down = False
    await service.flush()
    after = await service.predict(digit_png("one"), idempotency_key="order-2")
    assert after.id == first.id == 1 and len(store.rows) == 1


async def test_idempotency_key_after_a_restart_and_concurrently(tmp_path: Path) -> None:
    store, model = FakeStore(), FakeModel()
    first = make_service(store, tmp_path / "a", model)
    await first.start()
    answers = await asyncio.gather(*(first.predict(digit_png("zero"), idempotency_key="k") for _ in range(5)))
    assert {a.id for a in answers} == {1} and len(store.rows) == 1 and model.calls == 1
    await first.stop()
    second = make_service(store, tmp_path / "b", model)  # nothing in memory: found by its key in the store
    await second.start()
    again = await second.predict(digit_png("zero"), idempotency_key="k")
    assert (again.id, again.prediction.digit, again.stored) == (1, 0, True) and model.calls == 1
    await second.stop()


def test_client_keys_cannot_collide_with_outcome_keys() -> None:
    key = stored_key("anything")
    assert key.startswith("idem:") and len(key) == len("idem:") + 64 and stored_key("x" * 5000) != key


def protocol_methods() -> set[str]:
    return {name for name in vars(PredictionStore) if not name.startswith("_")}


def test_the_fake_and_the_real_store_are_prediction_stores() -> None:
    assert isinstance(FakeStore(), PredictionStore)
    assert {"record_prediction", "find_by_key", "labelled", "pool_health"} <= protocol_methods()
    missing = [name for name in protocol_methods() if not callable(getattr(Store, name, None))]
    assert not missing, f"db.store.Store lacks {missing}"

    class Incomplete(FakeStore):
        find_by_key = None  # type: ignore[assignment]  # a store without one of the methods

    assert not isinstance(Incomplete(), PredictionStore)


async def test_reads_are_shared_and_follow_changes(
    service: PredictionService, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fake(service)
    calls = 0
    real_stats = store.stats

    async def counted() -> Stats:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return await real_stats()

    monkeypatch.setattr(store, "stats", counted)  # count the queries
    results = await asyncio.gather(*(service.stats() for _ in range(20)))
    assert calls == 1 and all(r.total == 0 for r in results)
    assert (await service.stats()).total == 0 and calls == 1  # cached
    await service.predict(digit_png("one"))
    assert (await service.stats()).total == 1 and calls == 2  # a change: one new query


async def test_listeners_are_told_of_changes(service: PredictionService) -> None:
    seen: list[int] = []
    remove = service.add_listener(lambda: seen.append(service.version))

    def broken() -> None:
        raise RuntimeError("a closed tab")

    service.add_listener(broken)  # a broken listener does not stop the others
    outcome = await service.predict(digit_png("one"))
    await service.label(outcome, 1)
    assert seen == [1, 2]
    remove()
    await service.predict(digit_png("one"))
    assert seen == [1, 2]


async def test_readiness_names_the_part(service: PredictionService) -> None:
    ready = await service.readiness()
    assert ready.ready and ready.model.ready and ready.database.ready and ready.pool.ready
    store = fake(service)
    store.pool = PoolHealth(size=8, idle=0, waiting=12, exhausted_for_s=9.0)
    ready = await service.readiness()
    assert not ready.ready and not ready.pool.ready and ready.database.ready and "9.0 s" in ready.pool.detail
    store.pool, store.down = PoolHealth(1, 1, 0, 0.0), True
    ready = await service.readiness()
    assert not ready.ready and not ready.database.ready and ready.pool.ready


async def test_export_zip_holds_the_labelled_drawings(service: PredictionService) -> None:
    a = await service.predict(digit_png("one"))
    await service.predict(digit_png("zero"))
    await service.label(a, 1)
    archive = zipfile.ZipFile(io.BytesIO(await service.export_zip()))
    assert len(drawing_files(archive)) == 1 and "labels.csv" in archive.namelist()


async def test_waiting_outcomes_oldest_first(service: PredictionService) -> None:
    fake(service).down = True
    first = await service.predict(digit_png("one"))
    second = await service.predict(digit_png("zero"))
    assert service.waiting_outcomes() == [first, second]
    assert first.created_at <= second.created_at <= datetime.now(UTC)


# -- label tokens, "not a digit", deletion ------------------------------------------------------------
ADMIN = "the operator's token"


async def test_label_by_id_needs_the_rows_token_or_the_operator(service: PredictionService) -> None:
    store = fake(service)
    mine = await service.predict(digit_png("one"))
    theirs = await service.predict(digit_png("zero"))
    assert mine.id is not None and theirs.id is not None and mine.label_token != theirs.label_token
    assert len(mine.label_token) == 32 and store.token_hashes[mine.id] == token_hash(mine.label_token)
    for token in (None, "", "wrong", theirs.label_token):
        with pytest.raises(Forbidden):
            await service.label_by_id(mine.id, 3, token=token)
    assert store.rows[mine.id][1] is None
    assert await service.label_by_id(mine.id, 3, token=mine.label_token) is True
    assert await service.label_by_id(mine.id, 4, operator=True) is True
    assert store.rows[mine.id][1] == 4
    with pytest.raises(PredictionNotFound):
        await service.label_by_id(99, 4, operator=True)
    with pytest.raises(InvalidLabel):
        await service.label_by_id(mine.id, None, token=mine.label_token)  # no choice at all


def test_is_operator(tmp_path: Path) -> None:
    service = make_service(FakeStore(), tmp_path)
    assert not service.is_operator(ADMIN) and not service.is_operator(None)  # no ADMIN_TOKEN: nobody
    service.admin_token = ADMIN
    assert service.is_operator(ADMIN)
    for wrong in (None, "", ADMIN + " ", ADMIN[:-1], ADMIN.upper(), "é"):
        assert not service.is_operator(wrong), wrong


def test_check_choice() -> None:
    assert check_choice(7) == 7 and check_choice(None, True) is None
    with pytest.raises(ValueError, match="0 to 9"):
        check_choice(6.0)
    for label, not_a_digit in [(None, False), (3, True)]:
        with pytest.raises(ValueError, match="not_a_digit"):
            check_choice(label, not_a_digit)


def choice_of(outcome: Outcome) -> tuple[int | None, bool]:
    return outcome.label, outcome.not_a_digit


async def test_not_a_digit_for_the_own_drawing_and_in_the_statistics(service: PredictionService) -> None:
    store = fake(service)
    a = await service.predict(digit_png("one"))
    b = await service.predict(digit_png("zero"))
    assert await service.label(a, None, not_a_digit=True) is True
    assert choice_of(a) == (None, True) and a.label_stored
    assert await service.label(b, 0) is True  # the old call form
    stats = await service.stats()
    assert (stats.total, stats.labelled, stats.not_a_digit, stats.accuracy) == (2, 1, 1, 1.0)
    assert [r.id for r in await service.recent(10, only="not_a_digit")] == [a.id]
    assert [r.id for r in await service.recent(10, only="unlabelled")] == []
    assert await service.label(a, 1) is True and choice_of(a) == (1, False)  # changed their mind
    assert a.id not in store.not_a_digit and (await service.stats()).not_a_digit == 0
    with pytest.raises(ValueError, match="only"):
        await service.recent(10, only="mine")  # type: ignore[arg-type]


async def test_not_a_digit_waits_with_its_prediction(service: PredictionService) -> None:
    store = fake(service)
    store.down = True
    outcome = await service.predict(digit_png("one"))
    assert await service.label(outcome, None, not_a_digit=True) is False
    store.down = False
    assert await service.flush() == 1
    assert outcome.id is not None and outcome.id in store.not_a_digit and outcome.label_stored
    assert (await service.stats()).not_a_digit == 1


async def test_a_queued_prediction_gets_its_token_when_stored(service: PredictionService) -> None:
    store = fake(service)
    store.down = True
    outcome = await service.predict(digit_png("one"))
    token = outcome.label_token
    store.down = False
    await service.flush()
    assert outcome.id is not None and store.token_hashes[outcome.id] == token_hash(token)
    with pytest.raises(Forbidden):
        await service.label_by_id(outcome.id, 2, token="guess")
    assert await service.label_by_id(outcome.id, 2, token=token) is True


async def test_a_label_with_a_wrong_token_queued_while_down_is_dropped(service: PredictionService) -> None:
    store = fake(service)
    outcome = await service.predict(digit_png("one"))
    assert outcome.id is not None
    store.down = True
    assert await service.label_by_id(outcome.id, 5, token="a guess") is False  # durably kept: 202
    assert await service.label_by_id(outcome.id + 1, 5, operator=True) is False  # an id nobody has
    assert service.waiting == 2
    store.down = False
    assert await service.flush() == 0 and service.waiting == 0  # checked when stored: dropped
    assert store.rows[outcome.id][1] is None


async def test_delete_needs_the_token_and_removes_the_row(service: PredictionService) -> None:
    store = fake(service)
    mine = await service.predict(digit_png("one"))
    theirs = await service.predict(digit_png("zero"))
    assert mine.id is not None and theirs.id is not None
    for token in (None, "wrong", theirs.label_token):
        with pytest.raises(Forbidden):
            await service.delete(mine.id, token=token)
    version = service.version
    await service.delete(mine.id, token=mine.label_token)
    assert mine.id not in store.rows and service.version == version + 1
    with pytest.raises(PredictionNotFound):  # deleted: not found, also with its token
        await service.delete(mine.id, token=mine.label_token)
    with pytest.raises(PredictionNotFound):
        await service.label_by_id(mine.id, 1, token=mine.label_token)
    with pytest.raises(PredictionNotFound):
        await service.image_png(mine.id)
    await service.delete(theirs.id, operator=True)
    assert (await service.stats()).total == 0 and await service.recent(10) == []


async def test_delete_while_the_database_is_down_is_refused_and_drops_a_waiting_label(
    service: PredictionService,
) -> None:
    store = fake(service)
    outcome = await service.predict(digit_png("one"))
    assert outcome.id is not None
    store.down = True
    with pytest.raises(DatabaseUnavailable):
        await service.delete(outcome.id, token=outcome.label_token)  # nothing queued: try again
    assert await service.label(outcome, 7) is False and service.waiting == 1
    store.down = False
    await service.delete(outcome.id, token=outcome.label_token)
    assert service.waiting == 0 and outcome.id not in store.rows  # the label has nothing to go to


async def test_idempotency_key_retries_get_the_same_token(tmp_path: Path) -> None:
    store = FakeStore()
    first = make_service(store, tmp_path / "a")
    await first.start()
    stored = await first.predict(digit_png("one"), idempotency_key="stored")
    assert (await first.predict(digit_png("one"), idempotency_key="stored")).label_token == stored.label_token
    store.down = True
    queued = await first.predict(digit_png("one"), idempotency_key="queued")
    again = await first.predict(digit_png("one"), idempotency_key="queued")
    assert again.label_token == queued.label_token and not again.stored
    await first.stop()  # still down: the queued prediction stays in the outbox, with its token

    restarted = make_service(store, tmp_path / "a")
    await restarted.start()
    after = await restarted.predict(digit_png("one"), idempotency_key="queued")
    assert after.label_token == queued.label_token  # from the outbox, after a restart
    store.down = False
    await restarted.flush()
    assert after.id is not None and await restarted.label_by_id(after.id, 1, token=queued.label_token)
    await restarted.stop()

    # Elsewhere (nothing remembered, found by key in the store): the stored hash is of a token this
    # process never saw, so the retry gets a new one, which replaces it.
    other = make_service(store, tmp_path / "b")
    await other.start()
    retry = await other.predict(digit_png("one"), idempotency_key="stored")
    assert retry.id == stored.id and retry.label_token != stored.label_token
    assert stored.id is not None and await other.label_by_id(stored.id, 1, token=retry.label_token)
    with pytest.raises(Forbidden):
        await other.label_by_id(stored.id, 1, token=stored.label_token)
    await other.stop()


async def test_the_500_row_relabel_attack_now_fails(service: PredictionService) -> None:
    """The issue's attack: relabel every row by its sequential id. Without the tokens, nothing changes
    (500 rows on PostgreSQL through the API: tests/ui/test_api.py)."""
    store = fake(service)
    outcomes = [await service.predict(digit_png("one")) for _ in range(50)]
    for outcome in outcomes:
        await service.label(outcome, 1)
    for prediction_id in range(1, 51):
        with pytest.raises(Forbidden):
            await service.label_by_id(prediction_id, 7, token=f"guess-{prediction_id}")
        with pytest.raises(Forbidden):
            await service.label_by_id(prediction_id, 7)
    assert all(label == 1 for _, label, _ in store.rows.values())
    assert (await service.stats()).accuracy == 1.0


def test_make_run_makes_the_operator_token_once_and_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stack.use_admin_token` (make run): made when ADMIN_TOKEN is unset, 0600, reused, never printed."""
    import stack
    from settings import Settings

    settings = Settings(data_dir=tmp_path / "data", run_dir=tmp_path / "run", admin_token=None)
    first = stack.use_admin_token(settings).admin_token
    path = tmp_path / "data" / "admin_token"
    assert first and len(first) >= 43 and path.read_text().strip() == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert stack.use_admin_token(settings).admin_token == first  # the next run reuses it
    path.chmod(0o644)
    assert stack.use_admin_token(settings).admin_token == first and path.stat().st_mode & 0o777 == 0o600
    out = capsys.readouterr().out
    assert str(path) in out and first not in out
    given = settings.model_copy(update={"admin_token": "set-by-the-operator"})
    assert stack.use_admin_token(given).admin_token == "set-by-the-operator"
    path.write_text("")  # an empty leftover: a new one is made
    assert stack.use_admin_token(settings).admin_token not in (None, "", first)


async def test_a_retry_answered_while_down_gets_a_token_that_works(tmp_path: Path) -> None:
    """The first answer is stored, but this process does not know it (another replica, a restart)
    and the database is down: the retry is answered anew and queued. When it is flushed, the
    first row is found by its key, and the retry's token becomes the one that works."""
    store = FakeStore()
    first = make_service(store, tmp_path / "a")
    await first.start()
    stored = await first.predict(digit_png("one"), idempotency_key="k")
    await first.stop()
    second = make_service(store, tmp_path / "b")
    await second.start()
    store.down = True
    retry = await second.predict(digit_png("one"), idempotency_key="k")
    assert not retry.stored and retry.label_token != stored.label_token
    store.down = False
    await second.flush()
    assert retry.id == stored.id and len(store.rows) == 1
    assert stored.id is not None and await second.label_by_id(stored.id, 1, token=retry.label_token)
    await second.stop()
