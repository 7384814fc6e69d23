"""The promotion gate (serving/gate.py): pure, on hand-made evaluations."""

from __future__ import annotations

from typing import Any

import pytest

from serving.gate import Decision, decide, trade_off


def part(accuracy: float, n: int = 1000, per_digit: dict[str, float] | None = None) -> dict[str, Any]:
    digits = {d: {"accuracy": a, "n": n // 10} for d, a in (per_digit or {}).items()}
    return {"accuracy": accuracy, "n": n, "per_digit": digits}


def evaluation(mnist: float, feedback: float, **per_digit: float) -> dict[str, Any]:
    digits = {k.removeprefix("d"): v for k, v in per_digit.items()}
    return {"mnist": part(mnist, 10_000, digits), "feedback": part(feedback, 200)}


LIVE = evaluation(0.9970, 0.70)


def test_better_on_feedback_and_as_good_on_mnist_is_promoted():
    decision = decide(evaluation(0.9972, 0.95), LIVE)
    assert decision == Decision(True, decision.reason)
    assert decision.reason.startswith("promoted by the gate: ")
    assert "MNIST test 99.72% vs 99.70% (n=10000)" in decision.reason
    assert "held-out feedback 95.00% vs 70.00% (n=200)" in decision.reason


def test_a_loss_within_a_tenth_of_a_point_on_mnist_is_tolerated():
    assert decide(evaluation(0.9960, 0.95), LIVE).promote  # exactly 0.1 point below
    assert decide(evaluation(0.9961, 0.71), LIVE).promote


def test_more_than_a_tenth_of_a_point_below_on_mnist_is_held_back_with_the_numbers():
    decision = decide(evaluation(0.9959, 0.99), LIVE)
    assert not decision.promote
    assert decision.reason.startswith("not promoted: MNIST test more than 0.1 point below live")
    assert "99.59% vs 99.70%" in decision.reason and "99.00% vs 70.00%" in decision.reason


def test_equal_or_worse_on_feedback_is_held_back():
    for feedback in (0.70, 0.60):
        decision = decide(evaluation(0.9980, feedback), LIVE)
        assert not decision.promote
        assert decision.reason.startswith("not promoted: not better on the held-out feedback")


def test_the_tolerance_is_a_parameter():
    assert decide(evaluation(0.9940, 0.95), LIVE, mnist_tolerance=0.005).promote
    assert not decide(evaluation(0.9969, 0.95), LIVE, mnist_tolerance=0.0).promote


@pytest.mark.parametrize(
    "candidate",
    [
        {"mnist": part(0.998, 10_000)},  # no feedback evaluation
        {"mnist": part(0.998, 10_000), "feedback": part(0.9, 0)},  # no held-out feedback at all
        {"feedback": part(0.99, 200)},  # no MNIST evaluation
        {},
    ],
)
def test_missing_or_empty_evaluations_never_promote(candidate):
    decision = decide(candidate, LIVE)
    assert not decision.promote and decision.reason.startswith("not promoted: no ")


def test_the_reason_names_the_per_digit_trade_off_worst_first():
    live = evaluation(0.9970, 0.70, d1=0.999, d7=0.995, d4=0.990)
    candidate = evaluation(0.9950, 0.95, d1=0.990, d7=0.985, d4=0.991)
    assert trade_off(candidate, live) == "7 -1.0, 1 -0.9"
    decision = decide(candidate, live)
    assert not decision.promote
    assert "MNIST per digit (points): 7 -1.0, 1 -0.9" in decision.reason  # 4 moved by 0.1: noise


def test_no_trade_off_when_nothing_moved():
    assert trade_off(LIVE, LIVE) == ""
    assert "per digit" not in decide(evaluation(0.9975, 0.9), LIVE).reason
