"""The export of labelled drawings: zip layout, CSV, IDX files a retraining can read."""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from datetime import UTC, datetime

import numpy as np

from db.export import IMAGES_IDX, LABELS_IDX, ExportRow, build_export
from db.store import Store
from tests.db.samples import drawing_png, prediction
from training.data import parse_idx

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _row(id_: int, label: int, digit: int) -> ExportRow:
    return ExportRow(id_, label, digit, 0.5, "mnist", "v'1", NOW, NOW, drawing_png(id_), bytes([id_]) * 784)


def _read(data: bytes) -> tuple[list[dict[str, str]], dict[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
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


async def test_store_exports_only_labelled_rows(store: Store) -> None:
    ids = [await store.record_prediction(prediction(digit=i, seed=i)) for i in range(4)]
    await store.set_label(ids[1], 1)
    await store.set_label(ids[3], 5)
    rows, files = _read(await store.export_labelled())
    assert [(int(r["id"]), int(r["true_label"]), int(r["predicted"])) for r in rows] == [
        (ids[1], 1, 1),
        (ids[3], 5, 3),
    ]
    assert files[f"png/5/{ids[3]}.png"] == drawing_png(3)
    assert sum(name.endswith(".png") for name in files) == 2
    images = parse_idx(gzip.decompress(files[IMAGES_IDX]), 0x0803, (2, 28, 28), IMAGES_IDX)
    assert images[1].tobytes() == prediction(seed=3).input_pixels
