"""The IDX format of the MNIST files: encode and decode arrays of any shape and length (numpy only).

A file is a 4-byte magic number (0x00, 0x00, the element type, the number of dimensions), one
big-endian uint32 per dimension, then the elements, row-major and big-endian. The export of
labelled drawings (`db/export.py`) writes it and the training data loader (`training/data.py`)
reads it, so both use this module; it imports no torch, so the UI image can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Element type codes of the format.
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
UBYTE_IMAGES = 0x0803  # n x rows x columns uint8, like MNIST's images
UBYTE_LABELS = 0x0801  # n uint8, like MNIST's labels


class IdxError(ValueError):
    """Bytes that are not a valid IDX file of the expected kind; the message starts with the file's name."""


def magic_for(dtype: np.dtype, ndim: int) -> int:
    """The magic number of an array of this element type and number of dimensions."""
    for code, candidate in DTYPES.items():
        if candidate.kind == dtype.kind and candidate.itemsize == dtype.itemsize:
            if not 1 <= ndim <= 255:
                raise ValueError(f"IDX holds 1 to 255 dimensions, not {ndim}")
            return code << 8 | ndim
    raise ValueError(f"IDX cannot hold elements of type {dtype}")


def encode(array: np.ndarray) -> bytes:
    """The IDX bytes of `array` (uint8, int8, int16, int32, float32 or float64; any shape, even empty)."""
    array = np.asarray(array)
    magic = magic_for(array.dtype, array.ndim)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=DTYPES[magic >> 8]).tobytes()


def decode(
    raw: bytes,
    name: str = "<bytes>",
    *,
    magic: int | None = None,
    shape: Sequence[int | None] | None = None,
) -> np.ndarray:
    """Decode IDX bytes (uncompressed) into a read-only array, checking everything the header claims.

    `magic`: the expected magic number (else any valid one). `shape`: the expected dimensions,
    where None accepts any length (`(None, 28, 28)`: any number of 28x28 images). Any mismatch,
    a truncated header or a data size that differs from the dimensions is an `IdxError` naming `name`.
    """
    if len(raw) < 4:
        raise IdxError(f"{name}: truncated header ({len(raw)} bytes)")
    found_magic = int.from_bytes(raw[:4], "big")
    if magic is not None and found_magic != magic:
        raise IdxError(f"{name}: bad magic number 0x{found_magic:08x}, expected 0x{magic:08x}")
    dtype = DTYPES.get(found_magic >> 8) if found_magic >> 16 == 0 else None
    if dtype is None:
        raise IdxError(f"{name}: bad magic number 0x{found_magic:08x} (not an IDX file)")
    ndim = found_magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{name}: truncated header ({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if shape is not None and not _matches(dims, shape):
        expected = "(" + ", ".join("any" if d is None else str(d) for d in shape) + ")"
        raise IdxError(f"{name}: dimensions {dims}, expected {expected}")
    size = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != size:
        raise IdxError(f"{name}: {len(raw) - header} data bytes, expected {size} (truncated or padded)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _matches(dims: tuple[int, ...], shape: Sequence[int | None]) -> bool:
    return len(dims) == len(shape) and all(
        want is None or want == got for want, got in zip(shape, dims, strict=True)
    )
