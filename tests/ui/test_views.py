"""Pure display helpers, and what the page's parts make of rows, outcomes and statistics."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime

import numpy as np
from PIL import Image

from db.records import PredictionRow
from db.stats import NOT_A_DIGIT as NOT_A_DIGIT_GROUP
from db.stats import compute_stats
from tests.ui.fakes import digit_png
from ui import views
from ui.canvas import decode_data_url
from ui.history import (
    PAGE_SIZE,
    Edit,
    OwnDrawings,
    apply_edits,
    history_items,
    label_text,
    mark_own,
    older_cursor,
    stored_item,
)
from ui.inference import Prediction
from ui.result import NOT_A_DIGIT, Choice, choice_of, label_message, status_text, waits_for_database
from ui.service import Outcome
from ui.statistics import per_digit_accuracy, shown_stats, version_options, version_rows


def URL(prediction_id: int) -> str:
    return f"/img/{prediction_id}"


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


def row(
    prediction_id: int, digit: int = 1, label: int | None = None, not_a_digit: bool = False
) -> PredictionRow:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    labelled_at = at if label is not None or not_a_digit else None
    return PredictionRow(
        prediction_id, at, digit, 0.9, [0.1] * 10, "mnist", "1.0", 3.0, label, labelled_at, not_a_digit
    )


def outcome(digit: int = 0, prediction_id: int | None = None, label: int | None = None) -> Outcome:
    prediction = Prediction(digit, 0.8, [0.1] * 10, [0] * 784, "1.0")
    return Outcome(image_png=digit_png("zero"), prediction=prediction, id=prediction_id, label=label)


def test_history_items_waiting_first_then_rows() -> None:
    first, second = outcome(digit=3), outcome(digit=4)  # the service lists waiting ones oldest first
    items = history_items([first, second], [row(2), row(1)], URL)
    assert [(i.id, i.digit, i.stored) for i in items] == [
        (None, 4, False),
        (None, 3, False),
        (2, 1, True),
        (1, 1, True),
    ]
    assert items[0].thumbnail.startswith("data:image/png;base64,")
    assert items[2].thumbnail == "/img/2"  # the URL the page gives (signed: `ui.signing`)


def test_history_items_show_at_most_a_page_of_waiting_predictions() -> None:
    waiting = [outcome(digit=d % 10) for d in range(PAGE_SIZE + 25)]
    items = history_items(waiting, [], URL)
    assert len(items) == PAGE_SIZE and items[0].digit == waiting[-1].prediction.digit


def test_history_items_lay_the_tabs_own_prediction_over_the_rows() -> None:
    rows = [row(i) for i in range(PAGE_SIZE, 0, -1)]  # a full page, newest first
    labelled = history_items([], rows, URL, outcome(digit=1, prediction_id=7, label=5))
    assert labelled[PAGE_SIZE - 7].id == 7 and labelled[PAGE_SIZE - 7].label == 5
    newer = history_items([], rows, URL, outcome(digit=0, prediction_id=PAGE_SIZE + 1))
    assert [i.id for i in newer] == list(range(PAGE_SIZE + 1, 1, -1))  # on top, the page stays full
    assert older_cursor(newer, full_page=True) == 2  # "Older" goes on below what is shown
    waiting = history_items([], rows, URL, outcome(digit=0))  # not stored: the service lists it as waiting
    assert [i.id for i in waiting] == [r.id for r in rows]
    assert older_cursor(history_items([], rows[:3], URL), full_page=False) is None


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
        {"version": "1.0", "total": 3, "labelled": 3, "not_a_digit": 0, "accuracy": "66.7 %"},
        {"version": "2.0", "total": 3, "labelled": 0, "not_a_digit": 0, "accuracy": "–"},
    ]


def test_statistics_count_not_a_digit_apart() -> None:
    stats = compute_stats([("1.0", 1, 1, 2), ("1.0", NOT_A_DIGIT_GROUP, 0, 3), ("1.0", None, 4, 1)])
    assert stats.total == 6 and stats.labelled == 2 and stats.not_a_digit == 3 and stats.accuracy == 1.0
    assert version_rows(stats) == [
        {"version": "1.0", "total": 6, "labelled": 2, "not_a_digit": 3, "accuracy": "100.0 %"}
    ]


# ---------------------------------------------------------------- top guesses, times, contrast


def test_top_guesses_as_text() -> None:
    probabilities = [0.0] * 10
    probabilities[1], probabilities[7], probabilities[9], probabilities[4] = 0.61, 0.32, 0.03, 0.02
    assert views.top_guesses(probabilities) == "1 61% · 7 32% · 9 3%"
    assert views.top_guesses([0.1] * 10, n=2) == "0 10% · 1 10%"  # ties: the smaller digit first
    assert views.ranked([0.2, 0.5, 0.3] + [0.0] * 7)[:3] == [1, 2, 0]


def test_short_time() -> None:
    now = datetime(2026, 1, 2, 12, 0, 0, tzinfo=UTC)
    earlier_today = now.replace(hour=11, minute=4, second=5)
    local = earlier_today.astimezone()
    if local.date() == now.astimezone().date():
        assert views.short_time(earlier_today, now) == local.strftime("%H:%M:%S")
    last_year = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert views.short_time(last_year, now) == last_year.astimezone().strftime("%Y-%m-%d %H:%M")


def test_contrast_ratio_follows_wcag() -> None:
    assert round(views.contrast_ratio("#000000", "#ffffff"), 2) == 21.0
    assert views.contrast_ratio("#777777", "#777777") == 1.0
    assert views.contrast_ratio("#ffffff", "#000000") == views.contrast_ratio("#000000", "#ffffff")
    assert round(views.contrast_ratio("#767676", "#ffffff"), 2) == 4.54  # the well-known AA grey on white
    try:
        views.relative_luminance("#fff")
    except ValueError:
        pass
    else:
        raise AssertionError("a short colour must be refused")


def test_not_sure_hint_meets_wcag_aa() -> None:
    assert views.contrast_ratio(views.HINT_TEXT, views.HINT_BACKGROUND) >= 4.5
    # the old hint (Quasar's warning yellow as text on white) did not
    assert views.contrast_ratio("#f2c037", "#ffffff") < 3


def test_confusion_counts_readable_on_their_cells() -> None:
    assert views.cell_text(10, 10) == "#ffffff" and views.cell_text(1, 10) == "#1a1a1a"
    confusion = [[0] * 10 for _ in range(10)]
    confusion[3][3], confusion[3][5] = 8, 1
    cells = {
        tuple(c["value"]): c["label"]["color"] for c in views.confusion_chart(confusion)["series"][0]["data"]
    }
    assert cells[(3, 3, 8)] == "#ffffff" and cells[(5, 3, 1)] == "#1a1a1a"


# ---------------------------------------------------------------- labels and own drawings (pure)


def test_choices_and_their_messages() -> None:
    assert NOT_A_DIGIT.not_a_digit and not Choice(0).not_a_digit
    assert label_message(Choice(6), 0, stored=True) == "Saved: it was a 6 (the model was wrong)."
    assert label_message(Choice(0), 0, stored=True) == "Saved: it was a 0 (the model was right)."
    assert label_message(NOT_A_DIGIT, 0, stored=True) == "Saved: not a digit."
    assert label_message(Choice(7), 1, stored=False) == "Label 7 kept; it is saved when the database is back."
    assert (
        label_message(NOT_A_DIGIT, 1, stored=False)
        == "'Not a digit' kept; it is saved when the database is back."
    )
    kept = outcome()
    assert choice_of(kept) is None
    kept.label = 4
    assert choice_of(kept) == Choice(4)
    kept.label, kept.not_a_digit = None, True
    assert choice_of(kept) == NOT_A_DIGIT


def test_status_text_not_a_digit() -> None:
    kept = outcome(prediction_id=3)
    kept.not_a_digit = True
    assert status_text(
        kept, saving=False
    ) == "saved as #3, not a digit (not saved yet)" and waits_for_database(kept)
    kept.label_stored = True
    assert status_text(kept, saving=False) == "saved as #3, not a digit" and not waits_for_database(kept)


def test_history_items_not_a_digit_top_guesses_and_own_label() -> None:
    items = history_items([], [row(2, not_a_digit=True), row(1, label=1)], URL)
    assert [label_text(i) for i in items] == ["not a digit", "true 1"]
    assert items[0].labelled and items[0].top == "0 10% · 1 10% · 2 10%"
    assert label_text(stored_item(row(5), URL)) == "–"
    mine = outcome(digit=1, prediction_id=1)
    mine.not_a_digit = True
    laid = history_items([], [row(1, label=None)], URL, mine)
    assert laid[0].not_a_digit and laid[0].label is None


def test_edits_are_laid_over_the_history() -> None:
    items = history_items([], [row(3), row(2), row(1)], URL)
    edits = {2: Edit(version=5, label=None, not_a_digit=True), 1: Edit(version=5, deleted=True)}
    shown = apply_edits(items, edits)
    assert [(i.id, i.not_a_digit) for i in shown] == [(3, False), (2, True)]


def test_mark_own_by_id_and_by_waiting_key() -> None:
    waiting = outcome(digit=2)
    items = mark_own(history_items([waiting], [row(2), row(1)], URL), ids={1}, keys={waiting.key})
    assert [(i.id, i.own) for i in items] == [(None, True), (2, False), (1, True)]


def test_own_drawings_keep_tokens_by_id_and_by_key_until_stored() -> None:
    storage: dict[str, object] = {}
    own = OwnDrawings(storage, limit=3)
    stored, waiting = outcome(prediction_id=1), outcome()
    own.remember(stored)
    own.remember(waiting)
    assert own.ids == {1} and own.token(1) == stored.label_token and own.token(2) is None
    assert own.waiting_keys == {waiting.key}
    waiting.id = 2  # stored by the retry loop
    own.settle([waiting])
    assert own.ids == {1, 2} and own.token(2) == waiting.label_token and own.waiting_keys == set()
    for i in (3, 4):
        own.remember(outcome(prediction_id=i))
    assert own.ids == {2, 3, 4}  # at most `limit`, the newest
    own.forget(3)
    assert own.ids == {2, 4}
    own.remember(gone := outcome())
    own.drop_keys({gone.key})
    assert own.waiting_keys == set()
    assert OwnDrawings({"drawings": "garbled"}).ids == set()  # a bad value in the storage: nothing owned
