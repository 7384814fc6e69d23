"""Export the labelled drawings as a zip that retraining can use directly.

The zip holds:
- `labels.csv`: one row per labelled prediction (id, file, true_label, predicted, confidence,
  model_name, model_version, created_at, labelled_at), ordered by id;
- `png/<true_label>/<id>.png`: the drawings as people made them;
- `images-idx3-ubyte.gz` and `labels-idx1-ubyte.gz`: what the model saw (28x28 uint8, MNIST-style)
  with the true labels, in the gzip-compressed IDX format of the MNIST files, in the CSV's order
  (`training.idx.decode` reads them back).

Drawings the person said are not a digit are left out of all three (they have no true label):
they are never used as a digit for training. The rows come from `Store.labelled()`; building
the zip is pure. `python -m db export out.zip`
writes it from `DATABASE_URL` (or the embedded server).
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import zipfile
from collections.abc import AsyncIterable, Iterable

import numpy as np

from db.records import INPUT_PIXELS, LabelledRow
from training import idx

CSV_HEADER = (
    "id",
    "file",
    "true_label",
    "predicted",
    "confidence",
    "model_name",
    "model_version",
    "created_at",
    "labelled_at",
)
IMAGES_IDX = "images-idx3-ubyte.gz"
LABELS_IDX = "labels-idx1-ubyte.gz"
SIDE = 28

ExportRow = LabelledRow  # the former name of the record


def png_path(row: LabelledRow) -> str:
    return f"png/{row.true_label}/{row.id}.png"


class ExportWriter:
    """The zip built one row at a time: each drawing goes into the zip as it comes, so only the zip
    itself and the small per-row data (28x28 pixels, a CSV line) are held, never the rows."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._zip = zipfile.ZipFile(self._buffer, "w")
        self._csv = io.StringIO()
        self._writer = csv.writer(self._csv, lineterminator="\n")
        self._writer.writerow(CSV_HEADER)
        self._pixels = bytearray()
        self._labels = bytearray()
        self.count = 0

    def add(self, row: LabelledRow) -> None:
        if len(row.input_pixels) != INPUT_PIXELS:
            raise ValueError(f"prediction {row.id}: input_pixels has {len(row.input_pixels)} bytes")
        self._zip.writestr(png_path(row), row.image_png, compress_type=zipfile.ZIP_STORED)
        self._writer.writerow(
            (
                row.id,
                png_path(row),
                row.true_label,
                row.digit,
                f"{row.confidence:.6f}",
                row.model_name,
                row.model_version,
                row.created_at.isoformat(),
                row.labelled_at.isoformat(),
            )
        )
        self._pixels += row.input_pixels
        self._labels.append(row.true_label)
        self.count += 1

    def finish(self) -> bytes:
        """The zip's bytes (CPU-bound: compresses the CSV and the IDX files)."""
        images = np.frombuffer(bytes(self._pixels), dtype=np.uint8).reshape(-1, SIDE, SIDE)
        labels = np.frombuffer(bytes(self._labels), dtype=np.uint8)
        self._zip.writestr("labels.csv", self._csv.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
        self._zip.writestr(IMAGES_IDX, gzip.compress(idx.encode(images), mtime=0))
        self._zip.writestr(LABELS_IDX, gzip.compress(idx.encode(labels), mtime=0))
        self._zip.close()
        return self._buffer.getvalue()


def build_export(rows: Iterable[LabelledRow]) -> bytes:
    """The zip described in the module docstring, as bytes (rows in id order, read once)."""
    writer = ExportWriter()
    for row in rows:
        writer.add(row)
    return writer.finish()


async def export_zip(rows: AsyncIterable[LabelledRow]) -> bytes:
    """`build_export` over `Store.labelled()`: rows are added as they arrive, and the compression
    runs in a thread so that the event loop keeps serving meanwhile."""
    writer = ExportWriter()
    async for row in rows:
        writer.add(row)
    return await asyncio.to_thread(writer.finish)


if __name__ == "__main__":  # the former command, `python -m db.export OUT.zip [--url URL]`
    import sys

    from db.__main__ import main

    sys.exit(main(["export", *sys.argv[1:]]))
