"""Pure display helpers, and what the page's parts make of rows, outcomes and statistics."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime

import numpy as np
from PIL import Image

from db.records import PredictionRow
from db.stats import compute_stats
from tests.ui.fakes import digit_png
from ui import views
from ui.canvas import decode_data_url
from ui.history import PAGE_SIZE, history_items, older_cursor
from ui.inference import Prediction
from ui.result import status_text, waits_for_database
from ui.service import Outcome
from ui.statistics import per_digit_accuracy, shown_stats, version_options, version_rows


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


# ---------------------------------------------------------------- what the page's parts show (pure)


def row(prediction_id: int, digit: int = 1, label: int | None = None) -> PredictionRow:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return PredictionRow(prediction_id, at, digit, 0.9, [0.1] * 10, "mnist", "1.0", 3.0, label, None)


def outcome(digit: int = 0, prediction_id: int | None = None, label: int | None = None) -> Outcome:
    prediction = Prediction(digit, 0.8, [0.1] * 10, [0] * 784, "1.0")
    return Outcome(image_png=digit_png("zero"), prediction=prediction, id=prediction_id, label=label)


def test_history_items_waiting_first_then_rows() -> None:
    first, second = outcome(digit=3), outcome(digit=4)  # the service lists waiting ones oldest first
    items = history_items([first, second], [row(2), row(1)])
    assert [(i.id, i.digit, i.stored) for i in items] == [
        (None, 4, False),
        (None, 3, False),
        (2, 1, True),
        (1, 1, True),
    ]
    assert items[0].thumbnail.startswith("data:image/png;base64,")
    assert items[2].thumbnail == "/api/predictions/2/image.png"


def test_history_items_show_at_most_a_page_of_waiting_predictions() -> None:
    waiting = [outcome(digit=d % 10) for d in range(PAGE_SIZE + 25)]
    items = history_items(waiting, [])
    assert len(items) == PAGE_SIZE and items[0].digit == waiting[-1].prediction.digit


def test_history_items_lay_the_tabs_own_prediction_over_the_rows() -> None:
    rows = [row(i) for i in range(PAGE_SIZE, 0, -1)]  # a full page, newest first
    labelled = history_items([], rows, outcome(digit=1, prediction_id=7, label=5))
    assert labelled[PAGE_SIZE - 7].id == 7 and labelled[PAGE_SIZE - 7].label == 5
    newer = history_items([], rows, outcome(digit=0, prediction_id=PAGE_SIZE + 1))
    assert [i.id for i in newer] == list(range(PAGE_SIZE + 1, 1, -1))  # on top, the page stays full
    assert older_cursor(newer, full_page=True) == 2  # "Older" goes on below what is shown
    waiting = history_items([], rows, outcome(digit=0))  # not stored: the service lists it as waiting
    assert [i.id for i in waiting] == [r.id for r in rows]
    assert older_cursor(history_items([], rows[:3]), full_page=False) is None


def test_status_text() -> None:
    kept = outcome()
    assert status_text(kept, saving=True) == "saving ..."
    assert status_text(kept, saving=False) == "not saved yet" and waits_for_database(kept)
    kept.id = 12
    assert status_text(kept, saving=False) == "saved as #12" and not waits_for_database(kept)
    kept.label = 3
    assert status_text(kept, saving=False) == "saved as #12, true label 3 (not saved yet)"
    assert waits_for_database(kept)
    kept.label_stored = True
    assert status_text(kept, saving=False) == "saved as #12, true label 3"


def test_statistics_figures() -> None:
    stats = compute_stats([("1.0", 1, 1, 2), ("1.0", 8, 0, 1), ("2.0", None, 1, 3)])
    assert per_digit_accuracy(stats)[1] == 1.0 and per_digit_accuracy(stats)[8] == 0.0
    assert per_digit_accuracy(stats)[5] is None
    assert shown_stats(stats, None) is stats and shown_stats(stats, "2.0").total == 3
    assert shown_stats(stats, "gone") is stats
    assert version_options(stats) == {
        "": "all model versions",
        "1.0": "model version 1.0",
        "2.0": "model version 2.0",
    }
    assert version_rows(stats) == [
        {"version": "1.0", "total": 3, "labelled": 3, "accuracy": "66.7 %"},
        {"version": "2.0", "total": 3, "labelled": 0, "accuracy": "–"},
    ]
