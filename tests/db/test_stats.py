"""Statistics from grouped counts, checked against hand-computed figures."""

from __future__ import annotations

import pytest

from db.stats import compute_stats


def test_compute_stats_by_hand() -> None:
    groups = [
        ("1.0", None, 3, 5),  # 5 unlabelled 3s
        ("1.0", 3, 3, 2),  # 2 correct 3s
        ("1.0", 8, 3, 1),  # an 8 taken for a 3
        ("2.0", 8, 8, 4),  # 4 correct 8s
        ("2.0", 1, 7, 2),  # two 1s taken for 7s
    ]
    stats = compute_stats(groups)
    assert (stats.total, stats.labelled, stats.correct) == (14, 9, 6)
    assert stats.accuracy == pytest.approx(6 / 9)
    assert stats.confusion[8][3] == 1 and stats.confusion[8][8] == 4 and stats.confusion[1][7] == 2
    assert sum(map(sum, stats.confusion)) == 9
    eight = stats.per_digit[8]
    assert (eight.predicted, eight.labelled, eight.correct) == (4, 5, 4)
    assert eight.accuracy == pytest.approx(0.8)
    assert stats.per_digit[3].predicted == 8 and stats.per_digit[3].accuracy == 1.0
    assert stats.per_digit[0].accuracy is None
    assert sorted(stats.by_version) == ["1.0", "2.0"]
    v1, v2 = stats.by_version["1.0"], stats.by_version["2.0"]
    assert (v1.total, v1.labelled, v1.correct) == (8, 3, 2)
    assert (v2.total, v2.labelled, v2.correct) == (6, 6, 4)
    assert v2.by_version == {}
    assert stats.to_dict()["by_version"]["2.0"]["accuracy"] == pytest.approx(4 / 6)


def test_compute_stats_empty() -> None:
    stats = compute_stats([])
    assert (stats.total, stats.labelled, stats.accuracy, stats.by_version) == (0, 0, None, {})
    assert stats.confusion == [[0] * 10 for _ in range(10)]
