"""The pure preprocessing: payload decoding, image checks, and canvas drawings -> MNIST-style 28x28."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from handlers import preprocess as pp
from tests.handlers.renditions import RENDITIONS, png, read_mnist_test, render


@pytest.fixture(scope="module")
def digits(mnist_dir):
    return read_mnist_test(mnist_dir, 40)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two 28x28 images."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- decode_payload -----------------------------------------------------------------------------


def test_raw_image_bytes_pass_through():
    data = png(Image.new("L", (10, 10)))
    assert pp.decode_payload(data, "image/png") == data
    assert pp.decode_payload(data, None) == data


@pytest.mark.parametrize("wrap", ["plain", "data_url"])
@pytest.mark.parametrize("form", ["bytes", "str", "dict"])
def test_json_base64_and_data_url(wrap, form):
    data = png(Image.new("L", (10, 10)))
    text = base64.b64encode(data).decode()
    if wrap == "data_url":
        text = "data:image/png;base64," + text
    body = {"data": text}
    payload = {"bytes": json.dumps(body).encode(), "str": json.dumps(body), "dict": body}[form]
    assert pp.decode_payload(payload, "application/json") == data


@pytest.mark.parametrize(
    ("body", "content_type", "fragment"),
    [
        (b"", None, "empty body"),
        (b"", "application/json", "empty body"),
        (None, None, "empty body"),
        (b"{not json", "application/json", "invalid JSON"),
        (b"\xff\xfe{", "application/json", "invalid JSON"),
        (b'{"image": "abc"}', "application/json", "expected an object"),
        (b"[1, 2]", "application/json", "expected an object"),
        ({"data": 5}, "application/json", "expected an object"),
        ({"data": "!!not base64!!"}, "application/json", "invalid base64"),
        ({"data": "data:image/png,abc"}, "application/json", "invalid data: URL"),
        ({"data": ""}, "application/json", "empty image data"),
    ],
)
def test_bad_payloads_are_400(body, content_type, fragment):
    with pytest.raises(pp.BadPayloadError, match=fragment) as err:
        pp.decode_payload(body, content_type)
    assert err.value.status == 400


def test_body_over_the_limit_is_413():
    with pytest.raises(pp.PayloadTooLargeError) as err:
        pp.decode_payload(b"\x89PNG" + bytes(2000), "image/png", max_bytes=1000)
    assert err.value.status == 413
    encoded = base64.b64encode(bytes(3000)).decode()
    with pytest.raises(pp.PayloadTooLargeError):
        pp.decode_payload({"data": encoded}, "application/json", max_bytes=1000)


# --- load_image ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"hello, not an image", b"\x89PNG\r\n\x1a\n" + bytes(40), b"GIF89a"])
def test_non_images_are_415(data):
    with pytest.raises(pp.NotAnImageError) as err:
        pp.load_image(data)
    assert err.value.status == 415


def test_truncated_image_is_415():
    data = png(Image.effect_noise((200, 200), 60))
    with pytest.raises(pp.NotAnImageError):
        pp.load_image(data[: len(data) // 2])


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "I", "F", "PA", "La", "RGBa", "LAB", "HSV"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFFs
@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP", "JPEG", "GIF", "BMP"])
def test_any_mode_and_format_whole_cut_or_garbled_gives_a_digit_or_a_preprocess_error(fmt):
    rng = np.random.default_rng(0)
    for mode in MODES:
        for size in ((3, 50), (120, 90)):
            buf = io.BytesIO()
            try:
                img = Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).convert(mode)
                img.save(buf, format=fmt)
            except (OSError, ValueError, KeyError):
                continue  # Pillow cannot make this mode, or write it in this format
            data = buf.getvalue()
            garbled = rng.integers(0, 255, len(data), dtype=np.uint8).tobytes()
            for variant in (data, data[: len(data) // 2], data[:20], garbled):
                try:
                    out = pp.preprocess(variant)
                except pp.PreprocessError as exc:
                    assert 400 <= exc.status < 500
                else:
                    assert out.shape == (28, 28) and out.dtype == np.uint8


def test_decompression_bomb_is_413_before_decoding():
    bomb = io.BytesIO()
    Image.new("1", (5000, 5000)).save(bomb, format="PNG")  # 25 Mpx in a few kB
    assert len(bomb.getvalue()) < 50_000
    with pytest.raises(pp.ImageTooLargeError) as err:
        pp.load_image(bomb.getvalue())
    assert err.value.status == 413
    assert pp.load_image(bomb.getvalue(), max_pixels=30_000_000).size == (5000, 5000)


# --- preprocess ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_blank_drawings_are_422(mode):
    for colour in ("black", "white"):
        with pytest.raises(pp.BlankImageError) as err:
            pp.preprocess(png(Image.new(mode, (280, 280), colour)))
        assert err.value.status == 422
    with pytest.raises(pp.BlankImageError):  # a fully transparent canvas
        pp.preprocess(png(Image.new("RGBA", (280, 280), (0, 0, 0, 0))))


def test_mnist_digits_come_out_as_they_went_in(digits):
    """Already MNIST-shaped: unchanged but for rounding (or thinning, for the fattest strokes)."""
    images, _ = digits
    scores = [similarity(pp.preprocess(Image.fromarray(image)), image) for image in images]
    assert np.median(scores) > 0.98 and min(scores) > 0.8


@pytest.mark.parametrize("name", ["thick", "thin"])
def test_unusual_stroke_widths_are_brought_towards_mnist(digits, name):
    images, _ = digits
    mnist = np.median([pp.stroke_width(image / 255.0) for image in images])
    before = np.median(
        [
            pp.stroke_width(np.asarray(Image.open(io.BytesIO(render(image, name))).resize((28, 28))) / 255.0)
            for image in images
        ]
    )
    after = np.median([pp.stroke_width(pp.preprocess(render(image, name)) / 255.0) for image in images])
    assert abs(after - mnist) < abs(before - mnist)
    assert pp.STROKE_RANGE[0] <= after <= pp.STROKE_RANGE[1]


@pytest.mark.parametrize("name", sorted(RENDITIONS))
def test_canvas_renditions_look_like_mnist(digits, name):
    """Every rendition gives the MNIST layout: 28x28 uint8, ink box within 20x20, centred mass."""
    images, _ = digits
    scores = []
    for image in images:
        out = pp.preprocess(render(image, name))
        assert out.shape == (28, 28)
        assert out.dtype == np.uint8
        assert out.max() == 255
        rows, cols = np.nonzero(out > 0.2 * 255)
        assert np.ptp(rows) < 21 and np.ptp(cols) < 21
        com = pp.center_of_mass(out.astype(np.float64))
        assert abs(com[0] - 14) < 1.5 and abs(com[1] - 14) < 1.5
        scores.append(similarity(out, image))
    assert np.median(scores) > 0.8, f"{name}: median similarity to the MNIST original {np.median(scores):.3f}"


@pytest.mark.parametrize(
    "variant", ["rgba_white_ink", "rgba_black_ink", "dark_on_light", "small", "large", "off_centre", "webp"]
)
def test_polarity_transparency_size_and_position_do_not_matter(digits, variant):
    images, _ = digits
    for image in images[:10]:
        reference = pp.preprocess(render(image, "canvas"))
        assert similarity(pp.preprocess(render(image, variant)), reference) > 0.9


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_big_photos_are_reduced_first_and_give_the_same_digit(digits, fmt):
    images, _ = digits
    canvas = Image.open(io.BytesIO(render(images[0], "dark_on_light"))).convert("L")
    big = canvas.resize((3600, 3600), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format=fmt)
    assert similarity(pp.preprocess(buf.getvalue()), pp.preprocess(png(canvas))) > 0.95
    assert pp.shrink(big).size == (900, 900)


def test_rgba_opaque_canvas_is_composited():
    """Black ink on an opaque white RGBA canvas: the colour counts, not the (uniform) alpha."""
    img = Image.new("RGBA", (100, 100), (255, 255, 255, 255))
    img.paste((0, 0, 0, 255), (45, 20, 55, 80))
    out = pp.preprocess(png(img))
    assert out[14, 14] > 200 and out[0, 0] == 0


def test_normalize_uses_the_training_statistics():
    out = pp.normalize(np.array([[0, 255]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(
        out, [[-pp.MNIST_MEAN / pp.MNIST_STD, (1 - pp.MNIST_MEAN) / pp.MNIST_STD]], rtol=1e-6
    )
