"""The IDX format, the MNIST reader, the checksum check and the downloader (against a local HTTP server)."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from training import data, idx
from training.data import FILES, ChecksumMismatchWarning, IdxFile, MnistDataError

SMALL_IMAGES = IdxFile("imgs.gz", "0" * 64, 0x0803, (3, 28, 28))
SMALL_LABELS = IdxFile("labels.gz", "0" * 64, 0x0801, (3,))


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw))
    return path


# --- the IDX format (training.idx) --------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(5 * 28 * 28, dtype=np.uint32).reshape(5, 28, 28).astype(np.uint8) % 251,
        np.array([7, 2, 1, 0, 4], dtype=np.uint8),
        np.zeros((0, 28, 28), dtype=np.uint8),
        np.arange(-6, 6, dtype=np.int16).reshape(3, 4),
        np.linspace(-1, 1, 7, dtype=np.float32),
        np.arange(2 * 3 * 4 * 5, dtype=np.int32).reshape(2, 3, 4, 5),
        np.array([1.5, -2.25]),  # float64
    ],
)
def test_idx_round_trip_of_any_shape_and_length(array: np.ndarray) -> None:
    raw = idx.encode(array)
    assert raw[:2] == b"\0\0" and raw[3] == array.ndim
    out = idx.decode(raw, "x.idx")
    assert out.shape == array.shape and out.dtype.kind == array.dtype.kind
    np.testing.assert_array_equal(out, array)


def test_idx_matches_the_mnist_layout_byte_for_byte() -> None:
    labels = np.array([7, 2, 1], dtype=np.uint8)
    assert idx.encode(labels) == bytes.fromhex("00000801 00000003") + bytes([7, 2, 1])
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    assert idx.encode(images)[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c")
    assert idx.magic_for(np.dtype(np.uint8), 3) == idx.UBYTE_IMAGES


def test_idx_shape_with_any_length() -> None:
    raw = idx.encode(np.ones((4, 28, 28), dtype=np.uint8))
    assert idx.decode(raw, "n.idx", magic=idx.UBYTE_IMAGES, shape=(None, 28, 28)).shape == (4, 28, 28)
    with pytest.raises(idx.IdxError, match=r"n\.idx: dimensions \(4, 28, 28\), expected \(any, 28, 27\)"):
        idx.decode(raw, "n.idx", shape=(None, 28, 27))
    with pytest.raises(idx.IdxError, match="dimensions"):
        idx.decode(raw, "n.idx", shape=(None, 784))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\1\0\x08\x01" + bytes(4), "not an IDX file"),
        (b"\0\0\x0a\x01" + bytes(4), "not an IDX file"),  # no element type 0x0a
        (b"\0\0\x08\x03" + bytes(5), "truncated header"),
        (idx.encode(np.zeros(3, dtype=np.int32))[:-1], "truncated or padded"),
    ],
)
def test_idx_errors_name_the_file(raw: bytes, message: str) -> None:
    with pytest.raises(idx.IdxError, match=f"some.idx: .*{message}"):
        idx.decode(raw, "some.idx")


def test_idx_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        idx.encode(np.array(["a"]))
    with pytest.raises(ValueError, match="1 to 255 dimensions"):
        idx.encode(np.array(3, dtype=np.uint8))


# --- the reader -------------------------------------------------------------------------------


def test_reads_a_good_file(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    path = write_gz(tmp_path / "imgs.gz", idx_bytes(images, 0x0803))
    out = data.read_idx(path, SMALL_IMAGES)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_reads_the_official_test_files(mnist_dir: Path) -> None:
    labels = data.read_idx(mnist_dir / FILES["test_labels"].name, FILES["test_labels"])
    images = data.read_idx(mnist_dir / FILES["test_images"].name, FILES["test_images"])
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test labels
    assert np.bincount(labels).tolist()[:2] == [980, 1135]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (idx_bytes(np.zeros((3, 28, 28)), 0x0903), "bad magic number"),
        (idx_bytes(np.zeros((4, 28, 28)), 0x0803), "dimensions"),
        (idx_bytes(np.zeros((3, 28, 28)), 0x0803)[:-10], "truncated or padded"),
        (idx_bytes(np.zeros((3, 28, 28)), 0x0803) + b"\0", "truncated or padded"),
        (b"\0\0\x08", "truncated header"),
    ],
)
def test_corrupt_content_is_a_clear_error_naming_the_file(tmp_path: Path, raw: bytes, message: str) -> None:
    path = write_gz(tmp_path / "imgs.gz", raw)
    with pytest.raises(MnistDataError, match=message) as err:
        data.read_idx(path, SMALL_IMAGES)
    assert str(path) in str(err.value)


def test_truncated_gzip_and_not_gzip_are_clear_errors(tmp_path: Path) -> None:
    good = gzip.compress(idx_bytes(np.zeros((3, 28, 28)), 0x0803))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "plain.gz").write_bytes(b"this is not gzip")
    for name in ("cut.gz", "plain.gz"):
        with pytest.raises(MnistDataError, match=f"{name}: not a valid gzip file"):
            data.read_idx(tmp_path / name, SMALL_IMAGES)


def test_missing_file_and_bad_label_are_errors(tmp_path: Path) -> None:
    with pytest.raises(MnistDataError, match="file not found"):
        data.read_idx(tmp_path / "none.gz", SMALL_LABELS)
    path = write_gz(tmp_path / "labels.gz", idx_bytes(np.array([1, 12, 3]), 0x0801))
    with pytest.raises(MnistDataError, match="label 12 out of range"):
        data.read_idx(path, SMALL_LABELS)


# --- checksums ------------------------------------------------------------------------------


def test_local_copy_with_a_different_hash_warns_and_is_used(mnist_dir: Path) -> None:
    # The offline copy's training images are a rebuilt file: not the official hash.
    with pytest.warns(ChecksumMismatchWarning, match="train-images-idx3-ubyte.gz") as record:
        hashes = data.ensure_files(mnist_dir, mirrors=[])
    assert len(record) == 1  # the three byte-identical files pass silently
    assert hashes[FILES["test_labels"].name] == FILES["test_labels"].sha256
    assert hashes[FILES["train_images"].name] == data.sha256_of(mnist_dir / FILES["train_images"].name)


# --- downloads from a real local HTTP server ----------------------------------------------------


class Routes(dict[str, tuple[int, bytes, int]]):
    """path -> (status, body, declared Content-Length); requests are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []


@pytest.fixture
def server() -> Iterator[tuple[str, Routes]]:
    routes = Routes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            routes.requests.append(self.path)
            status, body, length = routes.get(self.path, (404, b"not found", 9))
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)  # shorter than Content-Length when a route simulates a cut
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def serve(routes: Routes, path: str, body: bytes, declared: int | None = None, status: int = 200) -> None:
    routes[path] = (status, body, len(body) if declared is None else declared)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_verifies_and_writes_atomically(server: tuple[str, Routes], tmp_path: Path) -> None:
    base, routes = server
    body = b"some bytes" * 1000
    serve(routes, "/m/file.gz", body)
    dest = tmp_path / "out" / "file.gz"
    data.download([f"{base}/m/file.gz"], dest, hashlib.sha256(body).hexdigest(), backoff=0)
    assert dest.read_bytes() == body
    assert leftovers(dest.parent) == ["file.gz"]


def test_falls_back_to_the_next_mirror_after_retries(server: tuple[str, Routes], tmp_path: Path) -> None:
    base, routes = server
    body = b"payload"
    serve(routes, "/b/file.gz", body)
    dest = tmp_path / "file.gz"
    data.download(
        [f"{base}/a/file.gz", f"{base}/b/file.gz"], dest, hashlib.sha256(body).hexdigest(), backoff=0
    )
    assert dest.read_bytes() == body
    assert routes.requests == ["/a/file.gz"] * 3 + ["/b/file.gz"]


@pytest.mark.parametrize("failure", ["truncated", "wrong-bytes", "http-500"])
def test_failed_download_leaves_nothing_behind(
    server: tuple[str, Routes], tmp_path: Path, failure: str
) -> None:
    base, routes = server
    body = b"x" * 50_000
    if failure == "truncated":
        serve(routes, "/m/file.gz", body[:20_000], declared=len(body))
    elif failure == "wrong-bytes":
        serve(routes, "/m/file.gz", b"y" * len(body))
    else:
        serve(routes, "/m/file.gz", b"oops", status=500)
    dest = tmp_path / "file.gz"
    with pytest.raises(MnistDataError, match=r"file\.gz: download failed from every mirror"):
        data.download([f"{base}/m/file.gz"], dest, hashlib.sha256(body).hexdigest(), retries=2, backoff=0)
    assert leftovers(tmp_path) == []
    assert len(routes.requests) == 2


def test_missing_files_are_downloaded_then_read(
    server: tuple[str, Routes], tmp_path: Path, mnist_dir: Path
) -> None:
    base, routes = server
    for spec in FILES.values():
        if spec.sha256 == data.sha256_of(mnist_dir / spec.name):  # the three official files
            serve(routes, f"/mnist/{spec.name}", (mnist_dir / spec.name).read_bytes())
    # The training images are not official here: the user supplies them locally.
    shutil.copy(mnist_dir / FILES["train_images"].name, tmp_path)
    with pytest.warns(ChecksumMismatchWarning):
        mnist = data.load_mnist(tmp_path, mirrors=[f"{base}/mnist/"])
    assert sorted(routes.requests) == sorted(f"/mnist/{FILES[k].name}" for k in FILES if k != "train_images")
    assert mnist.train_images.shape == (60000, 28, 28)
    assert mnist.test_labels.shape == (10000,)
    assert leftovers(tmp_path) == sorted(spec.name for spec in FILES.values())
