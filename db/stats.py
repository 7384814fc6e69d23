"""Statistics of predictions: totals, accuracy on labelled rows, per digit, confusion matrix, per version.

Pure functions over grouped counts (model_version, true_label or None, predicted digit, count), as
`Store.stats` reads them from the database. A drawing the person said is not a digit comes with
the label `NOT_A_DIGIT` (the code migration 0005's counters keep): it counts in `total` and in
`not_a_digit`, never as labelled nor in any accuracy or confusion figure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

DIGITS = range(10)
NOT_A_DIGIT = -2  # the "true label" of a group of not-a-digit drawings


@dataclass(frozen=True)
class DigitStats:
    """One digit: how often it was predicted, and how often drawings labelled with it were recognised."""

    digit: int
    predicted: int  # predictions of this digit (all rows)
    labelled: int  # rows whose true label is this digit
    correct: int  # ... of which predicted as this digit
    accuracy: float | None  # correct / labelled (recall); None when nothing is labelled with it


@dataclass(frozen=True)
class Stats:
    """Totals, accuracy on labelled rows, per-digit figures and the confusion matrix [true][predicted].

    `by_version` maps each model version to the same figures for its rows only (their own
    `by_version` is empty).
    """

    total: int  # every stored prediction: labelled + not_a_digit + not labelled yet
    labelled: int  # labelled with a digit
    correct: int
    accuracy: float | None
    per_digit: list[DigitStats]
    confusion: list[list[int]]
    not_a_digit: int = 0  # drawings the person said are not a digit (apart: never in accuracy)
    by_version: dict[str, Stats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        data = asdict(self)
        data["by_version"] = {version: stats.to_dict() for version, stats in self.by_version.items()}
        return data


def compute_stats(groups: Iterable[tuple[str, int | None, int, int]]) -> Stats:
    """Stats from (model_version, true_label or None or NOT_A_DIGIT, predicted digit, count) groups."""
    groups = list(groups)
    versions = sorted({version for version, *_ in groups})
    overall = _stats_of(groups)
    by_version = {v: _stats_of(g for g in groups if g[0] == v) for v in versions}
    return replace(overall, by_version=by_version)


def _stats_of(groups: Iterable[tuple[str, int | None, int, int]]) -> Stats:
    confusion = [[0] * 10 for _ in DIGITS]
    predicted = [0] * 10
    total = not_a_digit = 0
    for _version, true_label, digit, count in groups:
        total += count
        predicted[digit] += count
        if true_label == NOT_A_DIGIT:
            not_a_digit += count
        elif true_label is not None:
            confusion[true_label][digit] += count
    labelled = sum(map(sum, confusion))
    correct = sum(confusion[d][d] for d in DIGITS)
    per_digit = [
        DigitStats(
            digit=d,
            predicted=predicted[d],
            labelled=sum(confusion[d]),
            correct=confusion[d][d],
            accuracy=confusion[d][d] / sum(confusion[d]) if sum(confusion[d]) else None,
        )
        for d in DIGITS
    ]
    return Stats(
        total=total,
        labelled=labelled,
        correct=correct,
        accuracy=correct / labelled if labelled else None,
        per_digit=per_digit,
        confusion=confusion,
        not_a_digit=not_a_digit,
    )
