"""The model card: `mnist.json` (the record) and `MODEL_CARD.md` (the same, for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training import card_sections

CARD_JSON = "mnist.json"
CARD_MD = "MODEL_CARD.md"


def read(out_dir: Path) -> dict[str, Any] | None:
    """The card in out_dir, or None when there is none."""
    path = out_dir / CARD_JSON
    return json.loads(path.read_text()) if path.exists() else None


def write(out_dir: Path, card: dict[str, Any]) -> None:
    """Write both files (JSON is the source; Markdown is rendered from it)."""
    (out_dir / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / CARD_MD).write_text(render(card))


def render(card: dict[str, Any]) -> str:
    """A short Markdown model card."""
    t = card["training"]
    test = card["test"]
    archive = card.get("archive") or {}
    lines = [
        f"# Model card: `{card['model']}`",
        "",
        f"**Architecture.** {card['architecture']} — {card['parameters']:,} parameters.",
        "",
        "| | |",
        "| --- | --- |",
        f"| test accuracy (official MNIST test set) | **{test['accuracy'] * 100:.2f}%** "
        f"({test['errors']} errors in {test['images']:,} images) |",
        *card_sections.handwritten_rows(card),
        f"| training images | {t['train_images']:,} |",
        f"| epochs, batch size | {t['epochs']}, {t['batch_size']} |",
        f"| optimiser | SGD Nesterov, {t['schedule']} schedule, peak lr {t['max_lr']}, "
        f"weight decay {t['weight_decay']}, label smoothing {t['label_smoothing']} |",
        f"| seed, threads | {t['seed']}, {t['threads']} |",
        f"| training wall time | {t['wall_seconds']:.0f} s (per epoch: "
        f"{', '.join(f'{s:.0f}' for s in t['epoch_seconds'])} s) |",
        f"| trained at | {card['trained_at']} |",
        f"| torch / python | {card['environment']['torch']} / {card['environment']['python']} |",
        f"| weights `{card['weights_file']}` sha256 | `{card['weights_sha256']}` |",
    ]
    if archive:
        lines += [
            f"| archive `{archive['file']}` sha256 | `{archive['sha256']}` |",
            f"| archive size, version | {archive['bytes']:,} bytes, {archive['version']} |",
        ]
    lines += ["", "**Data files** (sha256; official = matches the published hash):", ""]
    for name, d in card["data"].items():
        lines.append(f"- `{name}` `{d['sha256']}`{'' if d['official'] else ' (not the official file)'}")
    lines += [
        "",
        f"**Augmentation.** {t['augment']} — {t['augment_config']}",
        "",
    ]
    lines += card_sections.handwritten_lines(card)
    lines += card_sections.calibration_lines(card) + card_sections.digitness_lines(card)
    lines += [
        "Plots: `confusion_matrix.png`, `worst_classified.png`, `reliability.png`; "
        "figures: `evaluation.json`.",
        "",
    ]
    return "\n".join(lines)
