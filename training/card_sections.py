"""Model card sections for the calibration and the "not a digit" head (Markdown lines, no torch).

`training/card.py` renders the card; these are the parts about `card["calibration"]` (written by
training/calibrate.py) and `card["digitness"]` (training/digitness.py), empty when absent.
"""

from __future__ import annotations

from typing import Any


def _pct(value: float) -> str:
    return f"{value * 100:.2f}%"


def calibration_lines(card: dict[str, Any]) -> list[str]:
    """The temperature, ECE before/after per data set, and the unsure rule."""
    cal = card.get("calibration")
    if not cal:
        return []
    if "ece" not in cal:  # a temperature alone (given to the export by hand): no figures to show
        return [f"**Calibration.** T = {cal['temperature']:.4f}, applied by the handler.", ""]
    lines = [
        f"**Calibration.** {cal['method']}, T = {cal['temperature']:.4f}, fitted on {cal['fitted_on']}; "
        "applied by the handler (`calibration.json` in the archive). "
        f"ECE ({cal['bins']} bins), before → after:",
        "",
        "| | ECE before | ECE after |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {_pct(e['before'])} | {_pct(e['after'])} |" for name, e in cal["ece"].items()]
    lines += ["", f"Unsure rule: {cal['unsure_rule']}. On the shipped model it marks:", ""]
    lines += [
        f"- {name}: {_pct(u['flagged'])} of answers, {_pct(u['wrong_flagged'])} of the wrong ones; "
        f"the answers it leaves are right {_pct(u['accuracy_unflagged'])} of the time"
        for name, u in cal["unsure"].items()
    ]
    return [*lines, "", "Reliability diagrams: `reliability.png`.", ""]


def digitness_lines(card: dict[str, Any]) -> list[str]:
    """How the "not a digit" head was made and what it refuses."""
    head = card.get("digitness")
    if not head or "figures" not in head:
        return []
    f = head["figures"]
    kinds = ", ".join(f"{kind} {_pct(share)}" for kind, share in f["held_out_rejected_by_kind"].items())
    return [
        f'**"Not a digit".** {head["method"]}. Answers carry `is_digit` (`digitness.json` in the archive).',
        "",
        f"- held-out non-digits answered `is_digit: false`: **{_pct(f['held_out_non_digits_rejected'])}** "
        f"of {f['held_out_non_digits']:,} ({kinds})",
        f"- MNIST test digits wrongly refused: **{_pct(f['mnist_test_digits_rejected'])}** of "
        f"{f['mnist_test_digits']:,}; canvas renditions of test digits: "
        f"{_pct(f['canvas_rendition_digits_rejected'])} of {f['canvas_rendition_digits']:,}",
        "",
    ]
