"""Pure display helpers."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from tests.ui.fakes import digit_png
from ui import views
from ui.canvas import decode_data_url


def test_pixels_data_url_round_trips() -> None:
    pixels = list(range(256)) * 3 + [7] * 16
    url = views.pixels_data_url(pixels)
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (28, 28) and np.asarray(img).reshape(-1).tolist() == pixels


def test_decode_data_url() -> None:
    png = digit_png("one")
    assert decode_data_url(views.png_data_url(png)) == png
    assert decode_data_url(None) is None
    for bad in ("data:image/jpeg;base64,AAAA", "data:image/png;base64,@@@"):
        try:
            decode_data_url(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_unsure_hint_and_percent() -> None:
    sure = [0.0] * 10
    sure[4] = 0.97
    assert views.unsure_hint(sure) is None
    close = [0.0] * 10
    close[4], close[9] = 0.5, 0.45
    assert views.unsure_hint(close) == "Not sure: it could also be a 9 (45.0 %)."
    assert views.percent(None) == "–" and views.percent(0.9345) == "93.5 %"


def test_charts() -> None:
    bars = views.probability_chart([0.1] * 10, 3)["series"][0]["data"]
    assert len(bars) == 10 and bars[3]["itemStyle"]["color"] != bars[2]["itemStyle"]["color"]
    confusion = [[0] * 10 for _ in range(10)]
    confusion[7][1] = 4
    heat = views.confusion_chart(confusion)
    cells = {tuple(c["value"]): c["label"]["show"] for c in heat["series"][0]["data"]}
    assert len(cells) == 100 and cells[(1, 7, 4)] is True and cells[(0, 0, 0)] is False
    assert heat["visualMap"]["max"] == 4
    assert views.per_digit_chart([None] * 9 + [0.5])["series"][0]["data"][9] == 0.5
