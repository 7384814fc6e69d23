"""The promotion gate: whether a candidate version may replace the live one without a person.

Both versions are evaluated the same way (`serving.evaluate`, through TorchServe) on the same
data: the MNIST test set (`"mnist"`) and the held-out feedback (`"feedback"`, the drawings
`training.feedback.is_holdout` kept out of training). An evaluation is
`{"mnist": {"accuracy", "n", "per_digit"}, "feedback": {"accuracy", "n", "per_digit"}}`, with
`per_digit` `{"0": {"accuracy", "n"}, ...}`.

The rule (issue 16): promote only when the candidate keeps MNIST (at most `mnist_tolerance`, 0.1
point, below the live version) AND is strictly better on the held-out feedback. A retrain that
learned a new style by forgetting MNIST shapes is held back, and the reason names the digits
that paid for it, so the operator can decide (a manual promotion ignores the gate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MNIST_TOLERANCE = 0.001  # 0.1 point of accuracy
TRADE_OFF_MIN = 0.002  # per-digit changes smaller than this are noise, not worth naming


@dataclass(frozen=True)
class Decision:
    """The gate's answer: promote or not, and why in numbers (shown to the operator)."""

    promote: bool
    reason: str


def _accuracy(evaluation: Mapping[str, Any], part: str) -> tuple[float, int] | None:
    """(accuracy, n) of one part of an evaluation, or None when it is missing or empty."""
    section = evaluation.get(part)
    if not isinstance(section, Mapping) or not section.get("n"):
        return None
    return float(section["accuracy"]), int(section["n"])


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def trade_off(candidate: Mapping[str, Any], live: Mapping[str, Any], part: str = "mnist") -> str:
    """The digits whose accuracy moved by at least 0.2 point, worst loss first ("" when none did)."""
    cand = (candidate.get(part) or {}).get("per_digit") or {}
    base = (live.get(part) or {}).get("per_digit") or {}
    changes = []
    for digit in sorted(set(cand) & set(base), key=str):
        delta = float(cand[digit]["accuracy"]) - float(base[digit]["accuracy"])
        if abs(delta) >= TRADE_OFF_MIN:
            changes.append((delta, str(digit)))
    changes.sort()
    return ", ".join(f"{digit} {100 * delta:+.1f}" for delta, digit in changes)


def decide(
    candidate: Mapping[str, Any], live: Mapping[str, Any], mnist_tolerance: float = MNIST_TOLERANCE
) -> Decision:
    """Promote when MNIST accuracy >= live - tolerance and held-out feedback accuracy > live's."""
    cand_mnist, live_mnist = _accuracy(candidate, "mnist"), _accuracy(live, "mnist")
    cand_fb, live_fb = _accuracy(candidate, "feedback"), _accuracy(live, "feedback")
    if cand_mnist is None or live_mnist is None:
        return Decision(False, "not promoted: no MNIST test evaluation of both versions")
    if cand_fb is None or live_fb is None:
        return Decision(False, "not promoted: no held-out feedback to compare the versions on")
    mnist = f"MNIST test {_pct(cand_mnist[0])} vs {_pct(live_mnist[0])} (n={cand_mnist[1]})"
    feedback = f"held-out feedback {_pct(cand_fb[0])} vs {_pct(live_fb[0])} (n={cand_fb[1]})"
    numbers = f"{mnist}, {feedback}"
    per_digit = trade_off(candidate, live)
    if per_digit:
        numbers += f"; MNIST per digit (points): {per_digit}"
    # Rounded so that an accuracy equal to the bound on paper is not refused by a float's last bit.
    keeps_mnist = round(cand_mnist[0] - (live_mnist[0] - mnist_tolerance), 9) >= 0
    if not keeps_mnist:
        below = f"MNIST test more than {100 * mnist_tolerance:.1f} point below live"
        return Decision(False, f"not promoted: {below}; {numbers}")
    if cand_fb[0] <= live_fb[0]:
        return Decision(False, f"not promoted: not better on the held-out feedback; {numbers}")
    return Decision(True, f"promoted by the gate: {numbers}")
