"""Export the labelled drawings as a zip that retraining can use directly.

The zip holds:
- `labels.csv`: one row per labelled prediction (id, file, true_label, predicted, confidence,
  model_name, model_version, created_at, labelled_at), ordered by id;
- `drawings.tar`: the drawings as people made them, as `png/<true_label>/<id>.png` (a tar inside the
  zip: a zip keeps a directory record of every member in memory until it is
  closed, about 0.5 KB each; a tar streams, so the export's memory is the same for 10 or a million
  drawings; `tar -xf drawings.tar` gives the folder tree);
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
import tarfile
import tempfile
import time
import zipfile
from collections.abc import AsyncIterable, Iterable
from typing import IO, BinaryIO

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
DRAWINGS_TAR = "drawings.tar"
IMAGES_IDX = "images-idx3-ubyte.gz"
LABELS_IDX = "labels-idx1-ubyte.gz"
SIDE = 28

ExportRow = LabelledRow  # the former name of the record


def png_path(row: LabelledRow) -> str:
    return f"png/{row.true_label}/{row.id}.png"


CHUNK = 1 << 20  # bytes copied at a time from the scratch files into the zip


class ExportWriter:
    """The zip written one row at a time into `out` (a file, or a BytesIO for small exports).

    Each drawing goes into the zip as it comes; the CSV lines, the 28x28 pixels and the labels go
    to scratch files on disk, copied into the zip at the end. So memory stays the same whatever the
    number of rows (two concurrent 100k-row exports must not take the UI to gigabytes): only disk
    grows, by about the size of the zip.
    """

    def __init__(self, out: BinaryIO) -> None:
        # Deflated at level 1: the PNGs are compressed already, the tar's headers and padding are not.
        self._zip = zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1)
        # The drawings' tar is the zip's first member, written as the rows come.
        self._tar = self._zip.open(DRAWINGS_TAR, "w", force_zip64=True)
        # The scratch files live as long as the writer: `discard` closes (and so removes) them.
        self._csv = tempfile.TemporaryFile("w+", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.writer(self._csv, lineterminator="\n")
        self._writer.writerow(CSV_HEADER)
        self._pixels = tempfile.TemporaryFile()  # noqa: SIM115
        self._labels = tempfile.TemporaryFile()  # noqa: SIM115
        self.count = 0

    def add(self, row: LabelledRow) -> None:
        if len(row.input_pixels) != INPUT_PIXELS:
            raise ValueError(f"prediction {row.id}: input_pixels has {len(row.input_pixels)} bytes")
        self._tar.write(tar_member(png_path(row), row.image_png, row.created_at.timestamp()))
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
        self._pixels.write(row.input_pixels)
        self._labels.write(bytes((row.true_label,)))
        self.count += 1

    def finish(self) -> None:
        """Copy the CSV and the IDX files into the zip and close it (CPU-bound: compression)."""
        try:
            self._tar.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # the tar's end
            self._tar.close()
            self._csv.seek(0)
            with self._zip.open(_entry("labels.csv", zipfile.ZIP_DEFLATED), "w") as entry:
                while text := self._csv.read(CHUNK):
                    entry.write(text.encode("utf-8"))
            self._idx(IMAGES_IDX, self._pixels, idx.UBYTE_IMAGES, (self.count, SIDE, SIDE))
            self._idx(LABELS_IDX, self._labels, idx.UBYTE_LABELS, (self.count,))
            self._zip.close()
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the scratch files (also when the export fails half-way)."""
        for scratch in (self._csv, self._pixels, self._labels):
            scratch.close()
        if not self._tar.closed:
            self._tar.close()

    def _idx(self, name: str, data: IO[bytes], magic: int, dims: tuple[int, ...]) -> None:
        """A gzip-compressed IDX file streamed from `data` (the header is `training.idx.encode`'s)."""
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
        data.seek(0)
        with (
            self._zip.open(_entry(name, zipfile.ZIP_STORED), "w") as entry,
            gzip.GzipFile(filename="", mode="wb", fileobj=entry, mtime=0) as gz,
        ):
            gz.write(header)
            while chunk := data.read(CHUNK):
                gz.write(chunk)


def drawing_files(archive: zipfile.ZipFile) -> list[str]:
    """The paths of the drawings in an export (`png/<label>/<id>.png`), read from its tar."""
    with archive.open(DRAWINGS_TAR) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        return [member.name for member in tar if member.isfile()]


def tar_member(name: str, data: bytes, mtime: float) -> bytes:
    """One tar member (the standard library's header, the data, padding to a whole block)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    padding = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + data + tarfile.NUL * padding


def _entry(name: str, compression: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
    info.compress_type = compression
    info.external_attr = 0o600 << 16
    return info


def build_export(rows: Iterable[LabelledRow]) -> bytes:
    """The zip described in the module docstring, as bytes (rows in id order, read once)."""
    buffer = io.BytesIO()
    writer = ExportWriter(buffer)
    try:
        for row in rows:
            writer.add(row)
    except BaseException:
        writer.discard()
        raise
    writer.finish()
    return buffer.getvalue()


async def write_export(rows: AsyncIterable[LabelledRow], out: BinaryIO) -> int:
    """The zip of `rows` (e.g. `Store.labelled()`, a server-side cursor) written into `out`; the
    number of drawings. Rows are added as they arrive; the final compression runs in a thread so
    that the event loop keeps serving meanwhile."""
    writer = ExportWriter(out)
    try:
        async for row in rows:
            writer.add(row)
    except BaseException:
        writer.discard()
        raise
    await asyncio.to_thread(writer.finish)
    return writer.count


async def export_zip(rows: AsyncIterable[LabelledRow]) -> bytes:
    """`write_export` into memory: for small exports and the command line."""
    buffer = io.BytesIO()
    await write_export(rows, buffer)
    return buffer.getvalue()


if __name__ == "__main__":  # the former command, `python -m db.export OUT.zip [--url URL]`
    import sys

    from db.__main__ import main

    sys.exit(main(["export", *sys.argv[1:]]))
