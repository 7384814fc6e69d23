"""The stroke renderer: canvas-like PNGs, seeded, and the shapes its styles promise."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from handlers import preprocess as pp
from training import styles


def test_drawings_look_like_the_canvas_sends_them() -> None:
    for style, (digit, _) in styles.STYLES.items():
        data = styles.render(digit, style, np.random.default_rng(0))
        assert data.startswith(pp.PNG_SIGNATURE)
        img = Image.open(io.BytesIO(data))
        assert img.size == (styles.CANVAS, styles.CANVAS) and img.mode == "RGBA"
        rgba = np.asarray(img)
        assert (rgba[..., 3] == 255).all()  # opaque, as toDataURL exports the canvas
        grey = rgba[..., 0]
        assert (rgba[..., 1] == grey).all() and (rgba[..., 2] == grey).all()  # white on black
        assert grey[0].max() == 0 and grey[-1].max() == 0  # black border, the strokes inside
        assert grey.max() == 255 and np.count_nonzero((grey > 0) & (grey < 255)) > 0  # soft edges
        assert pp.preprocess(data).shape == (28, 28)  # the handler reads it


def test_the_same_seed_gives_the_same_bytes_and_another_seed_another_drawing() -> None:
    a = styles.make_set(6, seed=5)
    assert a == styles.make_set(6, seed=5)
    assert [png for png, _ in a] != [png for png, _ in styles.make_set(6, seed=6)]
    assert len({png for png, _ in a}) == 6  # jitter: no two drawings alike


def test_make_set_takes_the_styles_in_turn() -> None:
    labels = [label for _, label in styles.make_set(6, seed=0, styles=["seven_crossbar", "one_flag"])]
    assert labels == [7, 1, 7, 1, 7, 1]
    with pytest.raises(ValueError, match="no styles"):
        styles.make_set(3, seed=0, styles=[])


def test_unknown_style_or_wrong_digit_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown style"):
        styles.render(7, "gothic", np.random.default_rng(0))
    with pytest.raises(ValueError, match="draws the digit 1"):
        styles.render(7, "one_flag", np.random.default_rng(0))


def ink_rows(style: str, seed: int) -> np.ndarray:
    """Share of each row's width covered by ink, top to bottom, over the drawing's own box."""
    digit = styles.STYLES[style][0]
    grey = np.asarray(Image.open(io.BytesIO(styles.render(digit, style, np.random.default_rng(seed)))))[
        ..., 0
    ]
    ink = grey > 127
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    box = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    covered: np.ndarray = box.mean(axis=1)
    return covered


def test_a_seven_has_its_crossbar_and_a_one_its_base() -> None:
    for seed in range(5):
        seven = ink_rows("seven_crossbar", seed)
        n = len(seven)
        # the stem's middle half holds a row much wider than the stem: the crossbar
        assert seven[n // 4 : 3 * n // 4].max() > 2.5 * np.median(seven[n // 4 : 3 * n // 4])
        one = ink_rows("one_flag_base", seed)
        m = len(one)
        # the bottom quarter holds the base: rows far wider than the stem in the middle
        assert one[3 * m // 4 :].max() > 2.5 * np.median(one[m // 3 : 3 * m // 5])
