"""Turn whatever a canvas or an upload gives into an MNIST-style 28x28 input.

One pure module, used by the TorchServe handler, the training evaluation and the tests. It has no
imports from this project, so it can be shipped inside the model archive as it is.

MNIST digits are white ink on black, the ink's bounding box scaled to fit 20x20 keeping the
aspect ratio, then placed in 28x28 so that the centre of mass sits at the centre. `preprocess`
does the same to any picture: it finds the ink (alpha channel, or dark-on-light by inverting),
crops, brings unusually thick or thin strokes towards MNIST's widths, scales, centres and
stretches the contrast.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from http import HTTPStatus

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

# The statistics the model was trained with (MNIST training set, pixels scaled to [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

SIZE = 28  # output side
BOX = 20  # the ink's bounding box is scaled to fit BOX x BOX
INK_THRESHOLD = 0.2  # ink level (0..1) that counts as a stroke when cropping
MIN_INK_PIXELS = 4  # fewer stroke pixels than this is a blank drawing
WORK = 4 * BOX  # stroke widths are measured and corrected at 4x the output scale
# MNIST's stroke widths, in pixels at the 20x20 scale: about the 5th and 95th percentiles of the
# test set. Strokes outside this range (a fat brush on a small drawing, a hairline pen) are
# thinned or thickened to the target, nearer the usual widths; the rest are left alone.
STROKE_RANGE = (1.2, 2.9)
STROKE_TARGET = (1.5, 2.3)
MAX_SIDE = 1024  # larger pictures are reduced to this before looking for the ink
DEFAULT_MAX_PIXELS = 16_000_000  # decoded size limit (4000x4000), against decompression bombs
DEFAULT_MAX_BYTES = 2_000_000  # request body limit (the app's MAX_UPLOAD_BYTES)
MAX_JSON_DEPTH = 32  # JSON nesting; deeper is refused before parsing (it would be a RecursionError)
# The only formats Pillow is allowed to parse: each format plugin is code run on a stranger's bytes.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Formats recognised by their first bytes only to say which one was refused (never parsed).
REFUSED_SIGNATURES = {
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO",
    b"<svg": "SVG",
    b"<?xml": "SVG",
    b"8BPS": "PSD",
}
NOT_JSON = 'invalid JSON: the body is not valid JSON; expected {"data": "<base64 image>"}'


class PreprocessError(ValueError):
    """The input cannot be turned into a digit; the message says why, for the person who sent it.

    `status` is the HTTP status a server answers with.
    """

    status: int = HTTPStatus.BAD_REQUEST


class BadPayloadError(PreprocessError):
    """The body is empty, or not the JSON / base64 we accept."""


class PayloadTooLargeError(PreprocessError):
    """The body is over the size limit."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NotAnImageError(PreprocessError):
    """The bytes are not an image in a format we read."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class UnsupportedFormatError(NotAnImageError):
    """An image, but not in a format we accept (GIF, BMP, TIFF, SVG, ...)."""


class ImageTooLargeError(PreprocessError):
    """The image has more pixels than allowed."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class BlankImageError(PreprocessError):
    """The image has no ink: an empty canvas."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY


def decode_payload(
    body: object, content_type: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """A request body -> the image bytes it carries.

    Accepts raw image bytes, or JSON `{"data": "<base64 or data: URL>"}` (as bytes, text, or the
    dict a server already decoded). Raises `BadPayloadError` / `PayloadTooLargeError`. The UI's
    JSON API decodes its bodies with this too: one rule for both servers.
    """
    if isinstance(body, bytes | bytearray):
        body = bytes(body)
        _check_size(len(body), max_bytes)
        if not body.strip():
            raise BadPayloadError("empty body: send a PNG, JPEG or WebP image")
        if "json" not in (content_type or "").lower() and body.lstrip()[:1] != b"{":
            return body
        _check_depth(body)
        try:
            body = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadPayloadError(f"{NOT_JSON} ({exc})") from exc
    elif isinstance(body, str):
        _check_size(len(body), max_bytes)
        text = body.strip()
        if not text.startswith("{"):
            return _decode_base64(text, max_bytes)
        _check_depth(text.encode())
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise BadPayloadError(f"{NOT_JSON} ({exc})") from exc
    elif body is None:
        raise BadPayloadError("empty body: send a PNG, JPEG or WebP image")
    if not isinstance(body, dict) or not isinstance(body.get("data"), str):
        raise BadPayloadError('invalid JSON: expected an object {"data": "<base64 image or data: URL>"}')
    return _decode_base64(body["data"], max_bytes)


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")


def json_too_deep(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True when a JSON text nests arrays/objects deeper than `max_depth` (or has more unpaired brackets).

    Checked before `json.loads`, which recurses once per level: 100,000 nested arrays are a
    RecursionError (a 500), not a ValueError. Linear in C: strings removed, the brackets kept,
    innermost pairs removed once per level.
    """
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    for _ in range(max_depth):
        if not brackets:
            return False
        shorter = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) == len(brackets):  # unpaired brackets left: not JSON (json.loads says so) ...
            return len(brackets) > max_depth  # ... but more of them than levels would recurse first
        brackets = shorter
    return bool(brackets)


def _check_depth(body: bytes) -> None:
    if json_too_deep(body):
        raise BadPayloadError(f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels")


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise PayloadTooLargeError(f"body too large: {size:,} bytes, at most {max_bytes:,} are accepted")


def _decode_base64(text: str, max_bytes: int) -> bytes:
    """Base64 or a `data:image/...;base64,` URL -> bytes (limit checked before decoding)."""
    text = text.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise BadPayloadError("invalid data: URL: expected data:image/...;base64,<data>")
    text = "".join(text.split())
    if not text:
        raise BadPayloadError("empty image data: send a base64-encoded PNG, JPEG or WebP image")
    _check_size(len(text) * 3 // 4, max_bytes)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadPayloadError(f"invalid base64 image data ({exc})") from exc


def refused_format(data: bytes) -> str | None:
    """The name of a format we recognise but do not accept, from the first bytes (nothing parsed)."""
    head = bytes(data[:16]).lstrip()
    return next((name for sig, name in REFUSED_SIGNATURES.items() if head.startswith(sig)), None)


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes (no other Pillow plugin sees them), checking the pixel count first."""
    if not data:
        raise NotAnImageError("empty body: send a PNG, JPEG or WebP image")
    refused = refused_format(data)
    if refused is not None:
        raise UnsupportedFormatError(f"{refused} images are not accepted: send a PNG, JPEG or WebP image")
    try:
        img: Image.Image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise NotAnImageError("not an image: send a PNG, JPEG or WebP image") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image too large: {width}x{height} pixels, at most {max_pixels:,} pixels are accepted"
        )
    try:
        if img.format == "JPEG":
            img.draft(img.mode, (MAX_SIDE, MAX_SIDE))  # decode big photos at a reduced scale
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise NotAnImageError(f"cannot decode the image: {exc}") from exc
    return img


def as_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """An accepted image -> the PNG to store: a PNG that decodes whole is kept as sent, a JPEG or
    WebP is re-encoded from its decoded pixels (at most MAX_SIDE on its longer side, like the model
    sees it). What is stored is always a PNG that decodes."""
    img = load_image(data, max_pixels)  # raises on anything else, truncated or too large
    if bytes(data[:8]) == PNG_SIGNATURE:
        return bytes(data)
    img = shrink(img)
    if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")  # CMYK, YCbCr, ...
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def ink_map(img: Image.Image) -> np.ndarray:
    """Ink level in [0, 1] per pixel (1 = full stroke), whatever the mode and polarity (see `_ink`)."""
    try:
        return _ink(img)
    except (ValueError, OSError, TypeError) as exc:  # a mode Pillow cannot convert (e.g. LAB)
        raise NotAnImageError(
            f"unsupported kind of image ({img.mode}): send a PNG, JPEG or WebP image"
        ) from exc


def _ink(img: Image.Image) -> np.ndarray:
    """Ink level in [0, 1] per pixel (1 = full stroke).

    - Transparency: on a transparent canvas (transparent border) the strokes are the opaque
      pixels, whatever their colour (white or black ink); otherwise it is composited over white.
    - Polarity: the background is the level of the border; dark-on-light is inverted.
    """
    if img.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode in ("1", "I;16"):
        img = img.convert("L" if img.mode == "1" else "I")
    img = shrink(img)
    if img.mode == "RGBA":
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        if _border_level(alpha) < 0.5:  # a transparent canvas: the strokes are what is opaque
            return alpha
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        span = float(arr.max() - arr.min()) or 1.0
        grey = (arr - arr.min()) / span
    else:
        grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    background = _border_level(grey)
    if background > 0.5:
        ink = background - grey
        scale = background
    else:
        ink = grey - background
        scale = 1.0 - background
    levels: np.ndarray = np.clip(ink / max(scale, 1e-6), 0.0, 1.0)
    return levels


def shrink(img: Image.Image) -> Image.Image:
    """A big picture averaged down to at most MAX_SIDE on its longer side (the digit ends up 20 px)."""
    factor = -(-max(img.size) // MAX_SIDE)
    return img.reduce(factor) if factor > 1 else img


def _border_level(arr: np.ndarray) -> float:
    """Median of the outermost rows and columns: the background level of a drawing."""
    border = np.concatenate([arr[0, :], arr[-1, :], arr[:, 0], arr[:, -1]])
    return float(np.median(border))


def center_of_mass(arr: np.ndarray) -> tuple[float, float]:
    """(row, column) of the intensity-weighted centre of a 2-D array."""
    total = float(arr.sum())
    rows, cols = np.indices(arr.shape)
    return float((rows * arr).sum() / total), float((cols * arr).sum() / total)


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels: ink area over half its outline length (at level 0.5)."""
    solid = ink >= 0.5
    edges = (
        np.count_nonzero(solid[:, 1:] != solid[:, :-1])
        + np.count_nonzero(solid[1:, :] != solid[:-1, :])
        + np.count_nonzero(solid[:, [0, -1]])
        + np.count_nonzero(solid[[0, -1], :])
    )
    return float(np.count_nonzero(solid)) / max(edges / 2.0, 1.0)


def normalise_stroke(patch: Image.Image) -> Image.Image:
    """Thin strokes far thicker than MNIST's, thicken far thinner ones (`patch`: L, WORK scale).

    One 3x3 grey-level erosion or dilation changes the width by about half a pixel at the output
    scale; steps stop at the target, or before the ink would vanish.
    """
    to_box = BOX / WORK
    width = stroke_width(np.asarray(patch, dtype=np.float32) / 255.0) * to_box
    low, high = STROKE_RANGE
    if low <= width <= high:
        return patch
    grow = width < low
    target = STROKE_TARGET[0] if grow else STROKE_TARGET[1]
    step = ImageFilter.MaxFilter(3) if grow else ImageFilter.MinFilter(3)
    for _ in range(12):
        if (grow and width >= target - 0.25) or (not grow and width <= target + 0.25):
            break
        candidate = patch.filter(step)
        ink = np.asarray(candidate, dtype=np.float32) / 255.0
        if np.count_nonzero(ink >= 0.5) < MIN_INK_PIXELS * 4:
            break
        patch, width = candidate, stroke_width(ink) * to_box
    return patch


def fit(img: Image.Image, box: int) -> Image.Image:
    """Scale to fit box x box keeping the aspect ratio."""
    scale = box / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def mnist_from_ink(ink: np.ndarray) -> np.ndarray:
    """Crop, even out the stroke width, scale to fit 20x20, centre by centre of mass in 28x28.

    Returns uint8, white ink on black.
    """
    strokes = ink >= INK_THRESHOLD
    if int(strokes.sum()) < MIN_INK_PIXELS:
        raise BlankImageError("the drawing is empty: draw a digit first")
    rows = np.flatnonzero(strokes.any(axis=1))
    cols = np.flatnonzero(strokes.any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    source = Image.fromarray(np.rint(crop * 255.0).astype(np.uint8), mode="L")
    work = fit(source, WORK)
    evened = normalise_stroke(work)
    patch = np.asarray(fit(source if evened is work else evened, BOX), dtype=np.float32)
    peak = float(patch.max())
    if peak <= 0.0:
        raise BlankImageError("the drawing is empty: draw a digit first")
    patch *= 255.0 / peak  # thin or faint strokes get MNIST's full contrast

    new_h, new_w = patch.shape
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
