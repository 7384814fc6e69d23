"""Turn whatever a canvas or an upload gives into an MNIST-style 28x28 input.

One pure module, used by the TorchServe handler, the training evaluation and the tests. It has no
imports from this project, so it can be shipped inside the model archive as it is.

MNIST digits are white ink on black, the ink's bounding box scaled to fit 20x20 keeping the
aspect ratio, then placed in 28x28 so that the centre of mass sits at the centre. `preprocess`
does the same to any picture: it finds the ink (alpha channel, or dark-on-light by inverting),
crops, scales, centres and stretches the contrast.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The statistics the model was trained with (MNIST training set, pixels scaled to [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

SIZE = 28  # output side
BOX = 20  # the ink's bounding box is scaled to fit BOX x BOX
INK_THRESHOLD = 0.2  # ink level (0..1) that counts as a stroke when cropping
MIN_INK_PIXELS = 4  # fewer stroke pixels than this is a blank drawing
DEFAULT_MAX_PIXELS = 20_000_000  # decoded size limit, against decompression bombs


class PreprocessError(ValueError):
    """The input cannot be turned into a digit; the message says why, for the person who sent it."""


class NotAnImageError(PreprocessError):
    """The bytes are not an image in a format we read."""


class ImageTooLargeError(PreprocessError):
    """The image has more pixels than allowed."""


class BlankImageError(PreprocessError):
    """The image has no ink: an empty canvas."""


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode PNG/JPEG/WebP/... bytes, checking the pixel count before decoding the pixels."""
    if not data:
        raise NotAnImageError("empty body: send a PNG, JPEG or WebP image")
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as exc:
        raise NotAnImageError("not an image: send a PNG, JPEG or WebP image") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image too large: {width}x{height} pixels, at most {max_pixels:,} pixels are accepted"
        )
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise NotAnImageError(f"cannot decode the image: {exc}") from exc
    return img


def ink_map(img: Image.Image) -> np.ndarray:
    """Ink level in [0, 1] per pixel (1 = full stroke), whatever the mode and polarity.

    - Transparency: on a mostly transparent canvas the strokes are the opaque pixels, whatever
      their colour (white or black ink); otherwise the image is composited over white.
    - Polarity: the background is the level of the border; dark-on-light is inverted.
    """
    if img.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        if alpha.min() < 0.98 and alpha.mean() < 0.5:
            return alpha
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    if img.mode in ("I", "I;16", "F"):
        arr = np.asarray(img, dtype=np.float32)
        span = float(arr.max() - arr.min()) or 1.0
        grey = (arr - arr.min()) / span
    else:
        grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    border = np.concatenate([grey[0, :], grey[-1, :], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    if background > 0.5:
        ink = background - grey
        scale = background
    else:
        ink = grey - background
        scale = 1.0 - background
    return np.clip(ink / max(scale, 1e-6), 0.0, 1.0)


def center_of_mass(arr: np.ndarray) -> tuple[float, float]:
    """(row, column) of the intensity-weighted centre of a 2-D array."""
    total = float(arr.sum())
    rows, cols = np.indices(arr.shape)
    return float((rows * arr).sum() / total), float((cols * arr).sum() / total)


def mnist_from_ink(ink: np.ndarray) -> np.ndarray:
    """Crop, scale to fit 20x20, centre by centre of mass in 28x28: uint8, white on black."""
    strokes = ink >= INK_THRESHOLD
    if int(strokes.sum()) < MIN_INK_PIXELS:
        raise BlankImageError("the drawing is empty: draw a digit first")
    rows = np.flatnonzero(strokes.any(axis=1))
    cols = np.flatnonzero(strokes.any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    height, width = crop.shape
    scale = BOX / max(height, width)
    new_h = max(1, round(height * scale))
    new_w = max(1, round(width * scale))
    patch = Image.fromarray((crop * 255.0).astype(np.uint8), mode="L")
    patch = np.asarray(patch.resize((new_w, new_h), Image.Resampling.LANCZOS), dtype=np.float32)
    patch = np.clip(patch, 0.0, 255.0)
    peak = float(patch.max())
    if peak <= 0.0:
        raise BlankImageError("the drawing is empty: draw a digit first")
    patch *= 255.0 / peak  # thin or faint strokes get MNIST's full contrast

    com_r, com_c = center_of_mass(patch)
    top = int(np.clip(round(SIZE / 2 - com_r), 0, SIZE - new_h))
    left = int(np.clip(round(SIZE / 2 - com_c), 0, SIZE - new_w))
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[top : top + new_h, left : left + new_w] = patch
    return np.rint(out).astype(np.uint8)


def preprocess(image: bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any image (bytes or PIL) -> the 28x28 uint8 digit the model sees (white ink on black)."""
    img = load_image(image, max_pixels) if isinstance(image, bytes | bytearray) else image
    return mnist_from_ink(ink_map(img))


def normalize(digits: np.ndarray) -> np.ndarray:
    """uint8 digits (..., 28, 28) -> float32 model input with the training normalisation."""
    return ((digits.astype(np.float32) / 255.0) - MNIST_MEAN) / MNIST_STD
