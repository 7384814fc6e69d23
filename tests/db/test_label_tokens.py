"""Label tokens, "not a digit", deletion and the history's filters: the Store against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import zipfile

import psycopg
import pytest

from db.errors import Forbidden, InvalidLabel, InvalidPrediction, PredictionNotFound
from db.export import build_export
from db.records import token_hash, validate_choice, validate_prediction
from db.stats import NOT_A_DIGIT, compute_stats
from db.store import Store
from tests.db.samples import prediction

TOKEN = "the-owner's-token"
OTHER = "somebody-else's-token"


# -- pure ------------------------------------------------------------------------------------------
def test_validate_choice() -> None:
    assert validate_choice(7) == 7 and validate_choice(0, False) == 0
    assert validate_choice(None, True) is None
    for label, not_a_digit in [(None, False), (3, True), (10, False), (6.0, False), (True, False), (None, 1)]:
        with pytest.raises(InvalidLabel):
            validate_choice(label, not_a_digit)


def test_token_hash_is_sha256_hex_and_validated() -> None:
    digest = token_hash(TOKEN)
    assert len(digest) == 64 and digest == token_hash(TOKEN) != token_hash(OTHER)
    validate_prediction(prediction(label_token_hash=digest))
    for bad in ("", digest.upper(), digest[:-1], 42):
        with pytest.raises(InvalidPrediction, match="hash"):
            validate_prediction(prediction(label_token_hash=bad))


def test_compute_stats_counts_not_a_digit_apart() -> None:
    stats = compute_stats(
        [
            ("1.0", 1, 1, 3),
            ("1.0", 2, 1, 1),
            ("1.0", NOT_A_DIGIT, 7, 4),
            ("1.0", None, 0, 2),
            ("2.0", NOT_A_DIGIT, 1, 1),
        ]
    )
    assert (stats.total, stats.labelled, stats.correct, stats.not_a_digit) == (11, 4, 3, 5)
    assert stats.accuracy == 0.75  # not-a-digit drawings are neither right nor wrong
    assert sum(map(sum, stats.confusion)) == 4 and stats.per_digit[7].labelled == 0
    assert stats.per_digit[7].predicted == 4  # the model did predict a 7 for them
    assert stats.by_version["1.0"].not_a_digit == 4 and stats.by_version["2.0"].not_a_digit == 1
    assert stats.to_dict()["not_a_digit"] == 5


# -- against the server ------------------------------------------------------------------------------
async def owned(store: Store, digit: int = 3, seed: int = 0, token: str = TOKEN) -> int:
    return await store.record_prediction(
        prediction(digit=digit, seed=seed, label_token_hash=token_hash(token))
    )


async def test_the_token_decides_who_may_label(store: Store) -> None:
    pid = await owned(store)
    other = await owned(store, seed=1, token=OTHER)
    with pytest.raises(Forbidden):
        await store.set_label(pid, 5, token_hash=token_hash(OTHER))  # another row's token
    with pytest.raises(Forbidden):
        await store.set_label(pid, 5, token_hash="not even a hash")
    assert (await store.get(pid)).true_label is None
    await store.set_label(pid, 5, token_hash=token_hash(TOKEN))
    await store.set_label(other, 1, token_hash=token_hash(OTHER))
    assert (await store.get(pid)).true_label == 5 and (await store.get(other)).true_label == 1
    await store.set_label(pid, 6)  # no token asked: the operator's way
    assert (await store.get(pid)).true_label == 6
    with pytest.raises(PredictionNotFound):  # unknown, whatever the token
        await store.set_label(pid + 100, 5, token_hash=token_hash(TOKEN))


async def test_a_row_without_a_token_is_the_operators_only(store: Store) -> None:
    pid = await store.record_prediction(prediction())  # as stored before label tokens
    with pytest.raises(Forbidden):
        await store.set_label(pid, 2, token_hash=token_hash(TOKEN))
    with pytest.raises(Forbidden):
        await store.delete(pid, token_hash=token_hash(TOKEN))
    await store.set_label(pid, 2)
    assert (await store.get(pid)).true_label == 2


async def test_not_a_digit_and_back(store: Store) -> None:
    pid = await owned(store, digit=4)
    await store.set_label(pid, 4, token_hash=token_hash(TOKEN))
    await store.set_label(pid, None, not_a_digit=True, token_hash=token_hash(TOKEN))
    row = await store.get(pid)
    assert row.not_a_digit and row.true_label is None and row.correct is None and row.labelled_at is not None
    stats = await store.stats()
    assert (stats.total, stats.labelled, stats.not_a_digit, stats.accuracy) == (1, 0, 1, None)
    await store.set_label(pid, 9, token_hash=token_hash(TOKEN))  # a digit after all
    row = await store.get(pid)
    assert not row.not_a_digit and row.true_label == 9
    assert (await store.stats()).not_a_digit == 0
    for label, not_a_digit in [(None, False), (3, True)]:
        with pytest.raises(InvalidLabel):
            await store.set_label(pid, label, not_a_digit=not_a_digit)


async def test_delete_removes_the_row_its_drawing_and_its_counts(store: Store, db_url: str) -> None:
    ids = [await owned(store, digit=d, seed=d) for d in (1, 2, 3, 4)]
    await store.set_label(ids[0], 1)
    await store.set_label(ids[1], None, not_a_digit=True)
    with pytest.raises(Forbidden):
        await store.delete(ids[0], token_hash=token_hash(OTHER))
    await store.delete(ids[0], token_hash=token_hash(TOKEN))
    await store.delete(ids[1])  # the operator
    with pytest.raises(PredictionNotFound):
        await store.get(ids[0])
    with pytest.raises(PredictionNotFound):
        await store.image_png(ids[0])
    for gone in ids[:2]:  # deleted: not found, with the right token too
        with pytest.raises(PredictionNotFound):
            await store.delete(gone, token_hash=token_hash(TOKEN))
        with pytest.raises(PredictionNotFound):
            await store.set_label(gone, 1, token_hash=token_hash(TOKEN))
    stats = await store.stats()
    assert (stats.total, stats.labelled, stats.not_a_digit) == (2, 0, 0)
    assert [r.id for r in await store.recent()] == [ids[3], ids[2]]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM prediction_images").fetchone() == (2,)


async def test_replace_label_token(store: Store) -> None:
    pid = await owned(store)
    await store.replace_label_token(pid, token_hash(OTHER))
    with pytest.raises(Forbidden):
        await store.set_label(pid, 1, token_hash=token_hash(TOKEN))
    await store.set_label(pid, 1, token_hash=token_hash(OTHER))
    with pytest.raises(PredictionNotFound):
        await store.replace_label_token(pid + 1, token_hash(OTHER))


async def test_recent_filters_page_by_id(store: Store) -> None:
    ids = [await owned(store, digit=i % 10, seed=i) for i in range(12)]
    for i, pid in enumerate(ids):
        if i % 4 == 0:
            await store.set_label(pid, i % 10)  # right
        elif i % 4 == 1:
            await store.set_label(pid, (i + 1) % 10)  # wrong
        elif i % 4 == 2:
            await store.set_label(pid, None, not_a_digit=True)
    expected = {
        "all": ids[::-1],
        "wrong": [pid for i, pid in enumerate(ids) if i % 4 == 1][::-1],
        "not_a_digit": [pid for i, pid in enumerate(ids) if i % 4 == 2][::-1],
        "unlabelled": [pid for i, pid in enumerate(ids) if i % 4 == 3][::-1],
    }
    for only, want in expected.items():
        pages: list[int] = []
        before: int | None = None
        while page := await store.recent(limit=2, before_id=before, only=only):  # type: ignore[arg-type]
            pages += [r.id for r in page]
            before = page[-1].id
        assert pages == want, only
    rows = await store.recent(only="not_a_digit")
    assert all(r.not_a_digit and r.true_label is None for r in rows)
    assert all(r.correct is False for r in await store.recent(only="wrong"))
    with pytest.raises(ValueError, match="only"):
        await store.recent(only="mine")  # type: ignore[arg-type]


async def test_not_a_digit_rows_are_never_exported_as_digits(store: Store) -> None:
    a, b, c = [await owned(store, digit=1, seed=i) for i in range(3)]
    await store.set_label(a, 1)
    await store.set_label(b, None, not_a_digit=True)
    rows = [row async for row in store.labelled()]
    assert [row.id for row in rows] == [a]
    archive = zipfile.ZipFile(io.BytesIO(build_export(rows)))
    csv = archive.read("labels.csv").decode()
    assert f"\n{a}," in csv and f"\n{b}," not in csv and f"\n{c}," not in csv
    assert csv.count("\n") == 2  # the header and the one digit


async def test_concurrent_labels_and_deletes_keep_the_counters_exact(store: Store) -> None:
    ids = [await owned(store, digit=i % 10, seed=i) for i in range(40)]
    work = []
    for i, pid in enumerate(ids):
        if i % 3 == 0:
            work.append(store.set_label(pid, None, not_a_digit=True, token_hash=token_hash(TOKEN)))
        elif i % 3 == 1:
            work.append(store.set_label(pid, i % 10, token_hash=token_hash(TOKEN)))
    await asyncio.gather(*work)
    await asyncio.gather(*(store.delete(pid, token_hash=token_hash(TOKEN)) for pid in ids[::2]))
    kept = ids[1::2]
    stats = await store.stats()
    assert stats.total == len(kept) == 20
    assert stats.not_a_digit == sum(1 for i in range(1, 40, 2) if i % 3 == 0)
    assert stats.labelled == sum(1 for i in range(1, 40, 2) if i % 3 == 1) == stats.correct
