"""Export the labelled drawings as a zip that retraining can use directly.

The zip holds:
- `labels.csv`: one row per labelled prediction (id, file, true_label, predicted, confidence,
  model_name, model_version, created_at, labelled_at), ordered by id;
- `png/<true_label>/<id>.png`: the drawings as people made them;
- `images-idx3-ubyte.gz` and `labels-idx1-ubyte.gz`: what the model saw (28x28 uint8, MNIST-style)
  with the true labels, in the gzip-compressed IDX format of the MNIST files, in the CSV's order.

`python -m db.export out.zip` writes it from `DATABASE_URL` (or the embedded server).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import io
import struct
import sys
import zipfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

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


class ExportRow(NamedTuple):
    """One labelled prediction, blobs included."""

    id: int
    true_label: int
    digit: int
    confidence: float
    model_name: str
    model_version: str
    created_at: datetime
    labelled_at: datetime
    image_png: bytes
    input_pixels: bytes


def png_path(row: ExportRow) -> str:
    return f"png/{row.true_label}/{row.id}.png"


def idx_images(pixels: Sequence[bytes]) -> bytes:
    """IDX3 bytes (magic 0x803): n x 28 x 28 uint8."""
    return struct.pack(">IIII", 0x0803, len(pixels), SIDE, SIDE) + b"".join(pixels)


def idx_labels(labels: Sequence[int]) -> bytes:
    """IDX1 bytes (magic 0x801): n uint8 labels."""
    return struct.pack(">II", 0x0801, len(labels)) + bytes(labels)


def labels_csv(rows: Sequence[ExportRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in rows:
        writer.writerow(
            (
                r.id,
                png_path(r),
                r.true_label,
                r.digit,
                f"{r.confidence:.6f}",
                r.model_name,
                r.model_version,
                r.created_at.isoformat(),
                r.labelled_at.isoformat(),
            )
        )
    return out.getvalue()


def build_export(rows: Sequence[ExportRow]) -> bytes:
    """The zip described in the module docstring, as bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("labels.csv", labels_csv(rows), compress_type=zipfile.ZIP_DEFLATED)
        for r in rows:
            zf.writestr(png_path(r), r.image_png, compress_type=zipfile.ZIP_STORED)
        images = gzip.compress(idx_images([r.input_pixels for r in rows]), mtime=0)
        labels = gzip.compress(idx_labels([r.true_label for r in rows]), mtime=0)
        zf.writestr(IMAGES_IDX, images, compress_type=zipfile.ZIP_STORED)
        zf.writestr(LABELS_IDX, labels, compress_type=zipfile.ZIP_STORED)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m db.export", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the zip to write")
    parser.add_argument("--url", help="PostgreSQL URL (default: DATABASE_URL, else the embedded server)")
    args = parser.parse_args(argv)

    from db.runtime import database_url
    from db.store import Store, StoreError

    async def export(url: str) -> bytes:
        async with await Store.open(url) as store:
            return await store.export_labelled()

    try:
        with database_url(args.url) as url:
            data = asyncio.run(export(url))
    except StoreError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    args.out.write_bytes(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        count = sum(1 for name in zf.namelist() if name.endswith(".png"))
    print(f"wrote {args.out}: {count} labelled drawings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
