"""Model card sections for the calibration, the "not a digit" head and real handwriting (Markdown, no torch).

`training/card.py` renders the card; these are the parts about `card["calibration"]` (written by
training/calibrate.py), `card["digitness"]` (training/digitness.py) and `card["handwritten"]`
(training/handwritten.py), empty when absent.
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


STYLE_NAMES = {
    "seven_crossbar": "7 with a crossbar",
    "one_flag_base": "1 with a flag and a base",
    "one_flag": "1 with a long flag",
    "four_open": "open 4",
}


def handwritten_rows(card: dict[str, Any]) -> list[str]:
    """The table row beside the MNIST test accuracy: real handwritten digits that are not MNIST."""
    hw = card.get("handwritten")
    if not hw:
        return []
    o = hw["optdigits"]
    return [
        f"| real handwritten digits, not MNIST ({o['name']}, {o['images']:,}) | **{_pct(o['accuracy'])}** "
        f"({o['errors']} errors; {o['writers']} writers, never trained on) |"
    ]


def handwritten_lines(card: dict[str, Any]) -> list[str]:
    """Where the handwritten set comes from, how it is drawn, and the drawn styles' accuracy."""
    hw = card.get("handwritten")
    if not hw:
        return []
    o = hw["optdigits"]
    per_class = ", ".join(f"{d}: {_pct(a)}" for d, a in enumerate(o["per_class"]) if a is not None)
    lines = [
        f"**Real handwritten digits, not MNIST.** {o['name']} ({o['images']:,} digits by {o['writers']} "
        f"writers; {o['licence']}; `{o['source']}`, sha256 `{o['sha256'][:12]}…`), kept out of training: "
        f"{o['rendering']}. Accuracy **{_pct(o['accuracy'])}**, calibrated ECE {_pct(o['ece'])} "
        f"(T = {hw['temperature']:.4f}). Per digit: {per_class}.",
        "",
    ]
    if hw["styles"]:
        lines += [f"Drawn styles (`training/styles.py`, seed {hw['styles_seed']}, through the handler):", ""]
        lines += [
            f"- {STYLE_NAMES.get(name, name)} (`{name}`): {_pct(s['accuracy'])} of {s['images']:,}"
            for name, s in hw["styles"].items()
        ]
        lines.append("")
    return lines
