"""The Store against a real PostgreSQL: writes, keys, labels, history, statistics, outages."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest

from db import errors, records
from db.errors import DatabaseUnavailable, InvalidLabel, InvalidPrediction, PredictionNotFound, StoreError
from db.records import validate_key, validate_prediction
from db.store import Store
from tests.db.samples import drawing_png, prediction

INJECTION = "'); DROP TABLE predictions;--"


# -- pure validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"digit": 10}, "digit"),
        ({"digit": -1}, "digit"),
        ({"digit": True}, "digit"),
        ({"confidence": 1.5}, "confidence"),
        ({"confidence": math.nan}, "confidence"),
        ({"probabilities": [0.1] * 9}, "10 values"),
        ({"probabilities": [0.1] * 9 + [1.2]}, "probabilities"),
        ({"model_version": ""}, "model_version"),
        ({"model_name": "a\x00b"}, "model_name"),
        ({"latency_ms": -1.0}, "latency_ms"),
        ({"image_png": b"GIF89a..."}, "PNG"),
        ({"image_png": b"\x89PNG\r\n\x1a\n" + bytes(2_000_000)}, "at most"),
        ({"input_pixels": bytes(783)}, "784"),
        ({"created_at": datetime(2026, 1, 1)}, "timezone-aware"),  # naive: which zone?
        ({"created_at": "2026-01-01T00:00:00Z"}, "created_at"),
        ({"key": ""}, "key"),
        ({"key": "k" * 201}, "key"),
        ({"key": "a\x00b"}, "key"),
        ({"key": 7}, "key"),
    ],
)
def test_validate_prediction_rejects(changes: dict, message: str) -> None:
    with pytest.raises(InvalidPrediction, match=message):
        validate_prediction(prediction(**changes))


def test_validate_prediction_accepts_a_valid_one() -> None:
    validate_prediction(prediction())
    validate_prediction(prediction(key="k" * 200, created_at=datetime(2026, 1, 1, tzinfo=UTC)))
    assert validate_key("idem:abc") == "idem:abc"


def test_the_old_names_are_still_importable_from_db_store() -> None:
    from db import store

    for name in ("DatabaseUnavailable", "InvalidLabel", "InvalidPrediction", "PredictionNotFound"):
        assert getattr(store, name) is getattr(errors, name)
    assert store.StoreError is errors.StoreError
    for name in ("NewPrediction", "PredictionRow", "validate_prediction", "validate_label", "validate_id"):
        assert getattr(store, name) is getattr(records, name)


# -- against the server ------------------------------------------------------------------------------
async def test_record_and_read_back(store: Store) -> None:
    p = prediction(digit=7, seed=5, confidence=0.875, latency_ms=12.25)
    pid = await store.record_prediction(p)
    row = await store.get(pid)
    assert (row.id, row.digit, row.confidence, row.latency_ms) == (pid, 7, 0.875, 12.25)
    assert row.probabilities == pytest.approx(list(p.probabilities))
    assert (row.model_name, row.model_version) == ("mnist", "1.0")
    assert row.true_label is None and row.labelled_at is None and row.correct is None
    assert row.created_at.utcoffset() == timedelta(0)
    assert await store.image_png(pid) == drawing_png(5)


async def test_hostile_strings_stored_verbatim(store: Store, db_url: str) -> None:
    pid = await store.record_prediction(prediction(model_version=INJECTION, model_name="mnist'; --"))
    row = await store.get(pid)
    assert row.model_version == INJECTION and row.model_name == "mnist'; --"
    stats = await store.stats()
    assert INJECTION in stats.by_version
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM predictions").fetchone() == (1,)


async def test_set_and_replace_label(store: Store) -> None:
    pid = await store.record_prediction(prediction(digit=3))
    await store.set_label(pid, 8)
    first = await store.get(pid)
    assert first.true_label == 8 and first.correct is False and first.labelled_at is not None
    await store.set_label(pid, 3)
    second = await store.get(pid)
    assert second.true_label == 3 and second.correct is True
    assert second.labelled_at is not None
    assert second.labelled_at >= first.labelled_at


@pytest.mark.parametrize("label", [10, -1, "3", 3.0, None, True])
async def test_invalid_label_rejected(store: Store, label: object) -> None:
    pid = await store.record_prediction(prediction())
    with pytest.raises(InvalidLabel):
        await store.set_label(pid, label)  # type: ignore[arg-type]
    assert (await store.get(pid)).true_label is None


async def test_unknown_id_is_a_clear_error(store: Store) -> None:
    with pytest.raises(PredictionNotFound, match="12345"):
        await store.set_label(12345, 4)
    with pytest.raises(PredictionNotFound):
        await store.image_png(12345)
    with pytest.raises(PredictionNotFound):
        await store.get(12345)


@pytest.mark.parametrize("bad_id", [0, -3, 2**70, "7", True])
async def test_impossible_ids_are_not_found(store: Store, bad_id: object) -> None:
    with pytest.raises(PredictionNotFound):
        await store.get(bad_id)  # type: ignore[arg-type]
    with pytest.raises(PredictionNotFound):
        await store.set_label(bad_id, 1)  # type: ignore[arg-type]


async def test_missing_schema_is_a_store_error(empty_db_url: str) -> None:
    async with await Store.open(empty_db_url) as store:
        with pytest.raises(StoreError, match="does not exist"):
            await store.stats()
        assert await store.ping() is True


async def test_invalid_prediction_saves_nothing(store: Store) -> None:
    for changes in ({"digit": 10}, {"confidence": 1.5}, {"probabilities": [0.1] * 9}):
        with pytest.raises(InvalidPrediction):
            await store.record_prediction(prediction(**changes))
    assert await store.recent() == []
    assert await store.record_prediction(prediction()) > 0  # and the store keeps working


async def test_keyset_pagination(store: Store) -> None:
    ids = [await store.record_prediction(prediction(digit=i % 10, seed=i)) for i in range(25)]
    pages, before = [], None
    while page := await store.recent(limit=10, before_id=before):
        pages.append([r.id for r in page])
        before = page[-1].id
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [i for p in pages for i in p] == ids[::-1]
    # a row added meanwhile does not shift the later pages
    await store.record_prediction(prediction())
    assert [r.id for r in await store.recent(limit=10, before_id=pages[0][-1])] == pages[1]
    with pytest.raises(ValueError, match="limit"):
        await store.recent(limit=0)
    assert [r.id for r in await store.recent(limit=2, before_id=2**70)] == [ids[-1] + 1, ids[-1]]


async def test_stats_match_a_hand_computed_set(store: Store) -> None:
    # (model_version, predicted digit, true label or None)
    rows = [
        ("1.0", 3, 3),
        ("1.0", 3, 8),
        ("1.0", 5, None),
        ("1.0", 1, 1),
        ("2.0", 8, 8),
        ("2.0", 7, 1),
        ("2.0", 7, 7),
    ]
    for version, digit, label in rows:
        pid = await store.record_prediction(prediction(digit=digit, model_version=version))
        if label is not None:
            await store.set_label(pid, label)
    stats = await store.stats()
    assert (stats.total, stats.labelled, stats.correct) == (7, 6, 4)
    assert stats.accuracy == pytest.approx(4 / 6)
    expected = [[0] * 10 for _ in range(10)]
    for _, digit, label in rows:
        if label is not None:
            expected[label][digit] += 1
    assert stats.confusion == expected
    one = stats.per_digit[1]
    assert (one.predicted, one.labelled, one.correct, one.accuracy) == (1, 2, 1, 0.5)
    assert stats.per_digit[7].predicted == 2 and stats.per_digit[7].accuracy == 1.0
    assert stats.by_version["1.0"].accuracy == pytest.approx(2 / 3)
    assert stats.by_version["2.0"].accuracy == pytest.approx(2 / 3)
    assert stats.by_version["1.0"].total == 4 and stats.by_version["1.0"].labelled == 3


async def test_concurrent_writes(store: Store) -> None:
    ids = await asyncio.gather(*(store.record_prediction(prediction(seed=i)) for i in range(40)))
    assert len(set(ids)) == 40
    assert (await store.stats()).total == 40
    for i, pid in enumerate(ids):  # each caller got the id of its own row
        assert await store.image_png(pid) == drawing_png(i)


def _count(db_url: str, sql: str, *params: object) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


async def test_created_at_is_kept_as_given(store: Store) -> None:
    when = datetime(2026, 3, 4, 5, 6, 7, 890_000, tzinfo=UTC) - timedelta(days=400)
    pid = await store.record_prediction(prediction(created_at=when))
    assert (await store.get(pid)).created_at == when
    paris = datetime(2026, 3, 4, 12, 0, tzinfo=timezone(timedelta(hours=1)))
    assert (await store.get(await store.record_prediction(prediction(created_at=paris)))).created_at == paris
    now_row = await store.get(await store.record_prediction(prediction()))
    assert abs((now_row.created_at - datetime.now(UTC)).total_seconds()) < 60  # unset: now
    # Written together (one transaction, the outbox's case): each keeps its own time.
    times = [when + timedelta(minutes=i) for i in range(6)]
    ids = await asyncio.gather(
        *(store.record_prediction(prediction(seed=i, created_at=t)) for i, t in enumerate(times))
    )
    assert [(await store.get(pid)).created_at for pid in ids] == times


async def test_a_second_record_with_the_same_key_stores_nothing(store: Store, db_url: str) -> None:
    first = await store.record_prediction(prediction(digit=4, seed=1, key="outbox:1"))
    again = await store.record_prediction(prediction(digit=9, seed=2, key="outbox:1"))  # a replay
    assert again == first
    row = await store.get(first)
    assert row.digit == 4  # the first one, untouched
    assert await store.image_png(first) == drawing_png(1)
    assert _count(db_url, "SELECT count(*) FROM predictions") == 1
    assert _count(db_url, "SELECT count(*) FROM prediction_images") == 1
    # The counters of migration 0003 count it once.
    stats = await store.stats()
    assert (stats.total, stats.per_digit[4].predicted, stats.per_digit[9].predicted) == (1, 1, 0)
    other = await store.record_prediction(prediction(key="outbox:2"))
    assert other != first and (await store.stats()).total == 2
    # Rows without a key never conflict.
    assert len({await store.record_prediction(prediction()) for _ in range(3)}) == 3


async def test_find_by_key(store: Store) -> None:
    assert await store.find_by_key("idem:none") is None
    pid = await store.record_prediction(prediction(digit=2, key="idem:abc"))
    found = await store.find_by_key("idem:abc")
    assert found is not None and (found.id, found.digit) == (pid, 2)
    with pytest.raises(InvalidPrediction, match="key"):
        await store.find_by_key("k" * 201)


async def test_duplicate_keys_written_together_store_one_row_each(store: Store, db_url: str) -> None:
    # Concurrent calls are written in one transaction: twins inside one batch, too.
    items = [prediction(seed=i, key=f"k{i % 4}") for i in range(20)]
    ids = await asyncio.gather(*(store.record_prediction(p) for p in items))
    assert len(set(ids)) == 4
    assert all(ids[i] == ids[i % 4] for i in range(20))
    assert _count(db_url, "SELECT count(*) FROM predictions") == 4
    assert (await store.stats()).total == 4
    for i in range(4):  # each key's row is the first one written with it
        assert await store.image_png(ids[i]) == drawing_png(i)


async def test_a_twin_committed_while_the_insert_waits_is_found(store: Store, db_url: str) -> None:
    """The unique index makes the insert wait for another transaction holding the same key; once it
    commits, the insert stores nothing and must still answer that row's id (seen only by a new snapshot)."""
    async with await psycopg.AsyncConnection.connect(db_url) as other:
        cur = await other.execute(
            "WITH p AS (INSERT INTO predictions (digit, confidence, probabilities, model_name, "
            "model_version, latency_ms, key) VALUES (5, 0.5, %s, 'mnist', '1.0', 1, 'race') RETURNING id) "
            "INSERT INTO prediction_images SELECT id, %s, %s FROM p RETURNING prediction_id",
            ([0.1] * 10, drawing_png(), bytes(784)),
        )
        row = await cur.fetchone()
        assert row is not None
        twin = row[0]
        task = asyncio.create_task(store.record_prediction(prediction(digit=1, key="race")))
        deadline = time.monotonic() + 10
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = %s"
        while not _count(db_url, waiting, psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]):
            assert time.monotonic() < deadline and not task.done(), "the insert did not wait for the twin"
            await asyncio.sleep(0.02)
        await other.commit()
    assert await asyncio.wait_for(task, 10) == twin
    assert _count(db_url, "SELECT count(*) FROM predictions") == 1
    assert (await store.stats()).total == 1


async def test_a_row_the_database_rejects_fails_alone(store: Store, monkeypatch) -> None:
    monkeypatch.setattr("db.store.validate_prediction", lambda p: None)  # reach the CHECK constraints
    items = [prediction(seed=i) for i in range(6)]
    items[2] = prediction(digit=10)
    items[4] = prediction(confidence=1.5)
    results = await asyncio.gather(*(store.record_prediction(p) for p in items), return_exceptions=True)
    assert [type(r) for r in results] == [int, int, InvalidPrediction, int, InvalidPrediction, int]
    assert "predictions_digit_range" in str(results[2])
    assert [r.id for r in reversed(await store.recent())] == [results[i] for i in (0, 1, 3, 5)]


@pytest.mark.slow
async def test_rows_survive_a_server_restart(postgres, db_url: str) -> None:
    store = await Store.open(db_url)
    try:
        ids = [await store.record_prediction(prediction(seed=i)) for i in range(5)]
        await store.set_label(ids[0], 3)
        postgres.restart()
        rows = await store.recent(limit=10)  # stale connections are replaced transparently
        assert [r.id for r in rows] == ids[::-1]
        assert rows[-1].true_label == 3
        assert await store.image_png(ids[2]) == drawing_png(2)
    finally:
        await store.close()


@pytest.mark.slow
async def test_database_down_then_back(postgres, db_url: str) -> None:
    store = await Store.open(db_url, timeout=1.0)
    try:
        before = await store.record_prediction(prediction())
        postgres.stop()
        try:
            with pytest.raises(DatabaseUnavailable, match="database unavailable"):
                await store.record_prediction(prediction())
            with pytest.raises(DatabaseUnavailable):
                await store.stats()
            with pytest.raises(DatabaseUnavailable):
                await store.recent()
            results = await asyncio.gather(
                *(store.record_prediction(prediction(seed=i)) for i in range(5)), return_exceptions=True
            )
            assert all(isinstance(r, DatabaseUnavailable) for r in results)
            assert await store.ping() is False
        finally:
            postgres.start()
        after = await _eventually(store.record_prediction, prediction(seed=1))
        assert after > before
        assert await store.ping() is True
        assert [r.id for r in await store.recent()] == [after, before]
    finally:
        await store.close()


@pytest.mark.slow
async def test_open_while_down_then_works(postgres, db_url: str) -> None:
    postgres.stop()
    try:
        store = await Store.open(db_url, timeout=1.0)  # does not fail
        with pytest.raises(DatabaseUnavailable):
            await store.stats()
    finally:
        postgres.start()
    try:
        stats = await _eventually(store.stats)
        assert stats.total == 0
    finally:
        await store.close()


async def _eventually(fn, *args, seconds: float = 15.0):
    """Retry `fn` while it raises DatabaseUnavailable, like the UI does."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await fn(*args)
        except DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_connections_carry_the_application_name(db_url: str) -> None:
    async with await Store.open(db_url, application_name="digit-classifier replica-7") as named:
        assert await named.ping()
        with psycopg.connect(db_url) as conn:
            names = {row[0] for row in conn.execute("SELECT application_name FROM pg_stat_activity")}
        assert "digit-classifier replica-7" in names
