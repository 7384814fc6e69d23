"""Canvas-like renditions of MNIST digits, as people draw them in the browser or upload them.

A 28x28 MNIST digit is scaled up into a 280x280 canvas and turned into solid strokes with soft
edges (like the page's canvas), then varied: drawn small, large or off-centre, with thick or thin
strokes, on a transparent RGBA canvas in white or black ink, dark on light, or saved as JPEG.
Used by the tests and by bench/serve.py.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

CANVAS = 280


def read_mnist_test(mnist_dir: Path, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The official test set: (N, 28, 28) uint8 images and (N,) labels (the first `count`)."""
    with gzip.open(mnist_dir / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(mnist_dir / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return images[:count].copy(), labels[:count].copy()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(img: Image.Image, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def webp(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def strokes(digit: np.ndarray, size: int, stroke: int = 0) -> Image.Image:
    """The digit's ink scaled to fit `size` x `size` pixels as solid strokes with soft edges (L).

    `stroke` > 0 thickens the strokes by that many pixels, < 0 thins them.
    """
    ink = Image.fromarray(digit).crop(Image.fromarray(digit).getbbox())
    scale = size / max(ink.size)
    resized = ink.resize((round(ink.width * scale), round(ink.height * scale)), Image.Resampling.BICUBIC)
    solid = np.clip((np.asarray(resized, dtype=np.float32) / 255.0 - 0.35) / 0.3, 0.0, 1.0)
    img = Image.fromarray((solid * 255).astype(np.uint8))  # canvas strokes: full ink, a soft edge
    if stroke:
        size = 2 * abs(stroke) + 1
        img = img.filter(ImageFilter.MaxFilter(size) if stroke > 0 else ImageFilter.MinFilter(size))
    return img


def on_canvas(ink: Image.Image, centre: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """White ink on a black 280x280 canvas, the ink's box centred at `centre` (fractions)."""
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    left = int(np.clip(centre[0] * CANVAS - ink.width / 2, 0, CANVAS - ink.width))
    top = int(np.clip(centre[1] * CANVAS - ink.height / 2, 0, CANVAS - ink.height))
    canvas.paste(ink, (left, top))
    return canvas


def transparent(canvas: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """The strokes of a white-on-black canvas as `colour` ink on a transparent RGBA canvas."""
    rgba = Image.new("RGBA", canvas.size, (*colour, 0))
    rgba.putalpha(canvas)
    return rgba


def dark_on_light(canvas: Image.Image) -> Image.Image:
    return Image.eval(canvas, lambda v: 255 - v)


RENDITIONS: dict[str, Callable[[np.ndarray], bytes]] = {
    "canvas": lambda d: png(on_canvas(strokes(d, 200))),
    "small": lambda d: png(on_canvas(strokes(d, 56))),
    "large": lambda d: png(on_canvas(strokes(d, 264))),
    "off_centre": lambda d: png(on_canvas(strokes(d, 120), centre=(0.22, 0.75))),
    "thick": lambda d: png(on_canvas(strokes(d, 200, stroke=6))),
    "thin": lambda d: png(on_canvas(strokes(d, 200, stroke=-3))),
    "rgba_white_ink": lambda d: png(transparent(on_canvas(strokes(d, 200)), (255, 255, 255))),
    "rgba_black_ink": lambda d: png(transparent(on_canvas(strokes(d, 200)), (0, 0, 0))),
    "dark_on_light": lambda d: png(dark_on_light(on_canvas(strokes(d, 200)))),
    "jpeg_dark_on_light": lambda d: jpeg(dark_on_light(on_canvas(strokes(d, 160)))),
    "webp": lambda d: webp(on_canvas(strokes(d, 180))),
}


def render(digit: np.ndarray, name: str) -> bytes:
    """One rendition of a 28x28 MNIST digit, as encoded image bytes."""
    return RENDITIONS[name](digit)
