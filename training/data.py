"""MNIST on disk: the four IDX gzip files, validated, downloaded when missing.

`load_mnist(data_dir)` returns the arrays. Files missing from `data_dir` are downloaded from the
public mirrors (verified against the official sha256, written atomically); a file that is present
but whose hash differs from the official one is used with a warning (a local copy the user chose).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from training import idx

log = logging.getLogger(__name__)

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


@dataclass(frozen=True)
class IdxFile:
    """One of the four MNIST files: its name, official hash and expected shape."""

    name: str
    sha256: str
    magic: int  # idx.UBYTE_LABELS (uint8, 1-D) or idx.UBYTE_IMAGES (uint8, 3-D)
    shape: tuple[int, ...]


FILES: dict[str, IdxFile] = {
    "train_images": IdxFile(
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        idx.UBYTE_IMAGES,
        (60000, 28, 28),
    ),
    "train_labels": IdxFile(
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        idx.UBYTE_LABELS,
        (60000,),
    ),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        idx.UBYTE_IMAGES,
        (10000, 28, 28),
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        idx.UBYTE_LABELS,
        (10000,),
    ),
}


class MnistDataError(RuntimeError):
    """A data file is missing, corrupt or could not be downloaded; the message names the file."""


class ChecksumMismatchWarning(UserWarning):
    """A local data file differs from the official one; it is used anyway."""


@dataclass(frozen=True)
class Mnist:
    """The four arrays (uint8 images N x 28 x 28, uint8 labels N) and the hashes of the files read."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    sha256: dict[str, str]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_idx(raw: bytes, magic: int, shape: Sequence[int | None], name: str) -> np.ndarray:
    """Decode uncompressed IDX bytes (`training.idx.decode`); a bad file is a MnistDataError naming it."""
    try:
        return idx.decode(raw, name, magic=magic, shape=shape)
    except idx.IdxError as exc:
        raise MnistDataError(str(exc)) from exc


def read_idx(path: Path, spec: IdxFile) -> np.ndarray:
    """Read and validate one gzip-compressed IDX file."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError as exc:
        raise MnistDataError(f"{path}: file not found") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise MnistDataError(f"{path}: not a valid gzip file ({exc})") from exc
    array = parse_idx(raw, spec.magic, spec.shape, str(path))
    if spec.magic == idx.UBYTE_LABELS and array.size and int(array.max()) > 9:
        raise MnistDataError(f"{path}: label {int(array.max())} out of range 0-9")
    return array


def download(
    urls: Sequence[str],
    dest: Path,
    sha256: str,
    retries: int = 3,
    timeout: float = 30.0,
    backoff: float = 1.0,
) -> Path:
    """Fetch the first URL that yields the expected bytes into `dest`, atomically.

    Each URL is tried `retries` times. The body goes to a temporary file beside `dest` that is
    renamed only after its sha256 matches; on any failure nothing is left behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for url in urls:
        for attempt in range(1, retries + 1):
            try:
                _fetch_verified(url, dest, sha256, timeout)
                return dest
            except (httpx.HTTPError, OSError, MnistDataError) as exc:
                errors.append(f"{url} (attempt {attempt}): {exc}")
                log.warning("download failed: %s", errors[-1])
                if attempt < retries:
                    time.sleep(backoff * attempt)
    raise MnistDataError(f"{dest.name}: download failed from every mirror:\n  " + "\n  ".join(errors))


def _fetch_verified(url: str, dest: Path, sha256: str, timeout: float) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response,
        ):
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                for chunk in response.iter_bytes(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            # httpx raises on a body shorter than Content-Length; the hash catches everything else.
        if digest.hexdigest() != sha256:
            raise MnistDataError(f"{url}: sha256 {digest.hexdigest()} differs from the official {sha256}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_files(data_dir: Path, mirrors: Sequence[str] = MIRRORS, retries: int = 3) -> dict[str, str]:
    """Make sure the four files are in `data_dir` (downloading the missing ones); return their sha256."""
    hashes: dict[str, str] = {}
    for spec in FILES.values():
        path = data_dir / spec.name
        if not path.exists():
            log.info("%s missing, downloading", path)
            download([m + spec.name for m in mirrors], path, spec.sha256, retries=retries)
        digest = sha256_of(path)
        if digest != spec.sha256:
            warnings.warn(
                f"{path}: sha256 {digest[:12]}… differs from the official {spec.sha256[:12]}…; "
                "using this local copy as it is",
                ChecksumMismatchWarning,
                stacklevel=2,
            )
        hashes[spec.name] = digest
    return hashes


def load_mnist(data_dir: Path, mirrors: Sequence[str] = MIRRORS) -> Mnist:
    """The four MNIST arrays from `data_dir`, downloading missing files first."""
    data_dir = Path(data_dir)
    hashes = ensure_files(data_dir, mirrors)
    arrays = {key: read_idx(data_dir / spec.name, spec) for key, spec in FILES.items()}
    return Mnist(**arrays, sha256=hashes)
