"""The export of labelled drawings: zip layout, CSV, IDX files for retraining; the rows the store gives."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import tarfile
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import numpy as np
import pytest

from db.export import DRAWINGS_TAR, IMAGES_IDX, LABELS_IDX, build_export, export_zip
from db.records import LabelledRow
from db.store import Store
from tests.db.samples import drawing_png, prediction
from training import idx
from training.data import parse_idx

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _row(id_: int, label: int, digit: int) -> LabelledRow:
    return LabelledRow(id_, label, digit, 0.5, "mnist", "v'1", NOW, NOW, drawing_png(id_), bytes([id_]) * 784)


def _read(data: bytes) -> tuple[list[dict[str, str]], dict[str, bytes]]:
    """The CSV rows, and every file: the zip's members and the drawings in its tar (by their path)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    with tarfile.open(fileobj=io.BytesIO(files[DRAWINGS_TAR])) as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            assert extracted is not None and member.isfile() and member.mode == 0o644
            files[member.name] = extracted.read()
    return list(csv.DictReader(io.StringIO(files["labels.csv"].decode()))), files


def test_build_export_layout() -> None:
    rows, files = _read(build_export([_row(4, 7, 1), _row(9, 2, 2)]))
    assert [(r["id"], r["file"], r["true_label"], r["predicted"]) for r in rows] == [
        ("4", "png/7/4.png", "7", "1"),
        ("9", "png/2/9.png", "2", "2"),
    ]
    assert rows[0]["model_version"] == "v'1" and rows[0]["created_at"] == NOW.isoformat()
    assert files["png/7/4.png"] == drawing_png(4)
    images = parse_idx(gzip.decompress(files[IMAGES_IDX]), 0x0803, (2, 28, 28), IMAGES_IDX)
    labels = parse_idx(gzip.decompress(files[LABELS_IDX]), 0x0801, (2,), LABELS_IDX)
    assert labels.tolist() == [7, 2]
    assert np.all(images[0] == 4) and np.all(images[1] == 9)


def test_build_export_empty() -> None:
    rows, files = _read(build_export([]))
    assert rows == []
    assert parse_idx(gzip.decompress(files[LABELS_IDX]), 0x0801, (0,), LABELS_IDX).size == 0
    images = idx.decode(gzip.decompress(files[IMAGES_IDX]), IMAGES_IDX, shape=(None, 28, 28))
    assert images.shape == (0, 28, 28)


def test_build_export_reads_its_rows_once_from_any_iterable() -> None:
    data = build_export(_row(i, i % 10, 3) for i in range(1, 6))  # a generator: one pass
    rows, files = _read(data)
    assert [int(r["id"]) for r in rows] == [1, 2, 3, 4, 5]
    images = idx.decode(gzip.decompress(files[IMAGES_IDX]), IMAGES_IDX, magic=idx.UBYTE_IMAGES)
    assert images.shape == (5, 28, 28) and [int(image[0, 0]) for image in images] == [1, 2, 3, 4, 5]


def test_a_row_without_28x28_pixels_is_refused() -> None:
    bad = LabelledRow(1, 1, 1, 0.5, "mnist", "1", NOW, NOW, drawing_png(), bytes(100))
    with pytest.raises(ValueError, match="prediction 1: input_pixels has 100 bytes"):
        build_export([bad])


async def test_export_zip_of_async_rows_is_the_same_zip() -> None:
    rows = [_row(3, 1, 1), _row(8, 0, 6)]

    async def stream() -> AsyncIterator[LabelledRow]:
        for row in rows:
            yield row

    assert await export_zip(stream()) == build_export(rows)


async def test_store_exports_only_labelled_rows(store: Store) -> None:
    ids = [await store.record_prediction(prediction(digit=i, seed=i)) for i in range(4)]
    await store.set_label(ids[1], 1)
    await store.set_label(ids[3], 5)
    rows, files = _read(await export_zip(store.labelled()))
    assert [(int(r["id"]), int(r["true_label"]), int(r["predicted"])) for r in rows] == [
        (ids[1], 1, 1),
        (ids[3], 5, 3),
    ]
    assert files[f"png/5/{ids[3]}.png"] == drawing_png(3)
    assert sum(name.endswith(".png") for name in files) == 2
    images = parse_idx(gzip.decompress(files[IMAGES_IDX]), 0x0803, (2, 28, 28), IMAGES_IDX)
    assert images[1].tobytes() == prediction(seed=3).input_pixels


async def test_labelled_rows_come_in_id_order_across_batches(store: Store) -> None:
    ids = [await store.record_prediction(prediction(digit=i % 10, seed=i)) for i in range(12)]
    for n, pid in enumerate(ids):
        if n % 3:
            await store.set_label(pid, (n * 7) % 10)
    rows = [row async for row in store.labelled(batch_size=2)]  # 8 rows, 4 round trips
    assert [r.id for r in rows] == [pid for n, pid in enumerate(ids) if n % 3]
    first = rows[0]
    assert (first.true_label, first.digit, first.model_name, first.model_version) == (7, 1, "mnist", "1.0")
    assert first.image_png == drawing_png(1) and first.input_pixels == prediction(seed=1).input_pixels
    assert first.created_at.utcoffset() is not None and first.labelled_at >= first.created_at
    with pytest.raises(ValueError, match="batch_size"):
        [row async for row in store.labelled(batch_size=0)]


async def test_stopping_early_gives_the_connection_back(store: Store) -> None:
    for i in range(3):
        await store.set_label(await store.record_prediction(prediction(seed=i)), 1)
    async with contextlib.aclosing(store.labelled(batch_size=1)) as rows:
        async for row in rows:
            assert row.true_label == 1
            break
    health = store.pool_health()
    assert health.idle == health.size >= 1
    assert (await store.stats()).labelled == 3  # and the store goes on working
