"""Feedback rows as training examples: the fixed held-out split and the handler's own input."""

from __future__ import annotations

import ast
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from handlers import preprocess as pp
from training import feedback, styles

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Row:
    id: int
    png: bytes
    label: int


def test_about_a_fifth_of_the_ids_is_held_out_spread_over_every_block() -> None:
    share = sum(feedback.is_holdout(i) for i in range(1, 100_001)) / 100_000
    assert 0.19 < share < 0.21
    blocks = [sum(feedback.is_holdout(i) for i in range(s, s + 100)) for s in range(1, 10_001, 100)]
    assert min(blocks) >= 10 and max(blocks) <= 30  # consecutive ids (one session) land on both sides


def test_the_split_rule_is_fixed() -> None:
    # The same id must stay on the same side in every run and every release: a changed rule would
    # evaluate new versions on drawings they were trained on.
    assert [i for i in range(1, 60) if feedback.is_holdout(i)] == [
        4,
        9,
        13,
        22,
        26,
        27,
        31,
        40,
        44,
        45,
        49,
        58,
    ]


def test_split_partitions_in_order() -> None:
    rows = [Row(i, b"", i % 10) for i in range(1, 200)]
    train, holdout = feedback.split(rows)
    assert sorted([*train, *holdout], key=lambda r: r.id) == rows
    assert train == [r for r in rows if not feedback.is_holdout(r.id)]
    assert holdout == [r for r in rows if feedback.is_holdout(r.id)]
    assert feedback.split([]) == ([], [])


def handler_input(png: bytes) -> torch.Tensor:
    """What MnistHandler makes of a request carrying these PNG bytes: its own `decode` (the digit),
    normalised as it normalises a batch for its network."""
    from handlers.mnist_handler import MnistHandler

    handler: Any = MnistHandler()
    handler.max_bytes, handler.max_pixels = pp.DEFAULT_MAX_BYTES, pp.DEFAULT_MAX_PIXELS
    digit = handler.decode({"body": png}, "image/png")
    return torch.from_numpy(pp.normalize(np.stack([digit]))[:, None][0])


def test_to_tensor_is_exactly_the_handlers_input() -> None:
    drawings = [png for png, _ in styles.make_set(4, seed=3)]
    first = Image.open(io.BytesIO(drawings[0])).convert("L")
    drawings.append(styles.png(Image.eval(first, lambda v: 255 - v)))  # dark on light: inverted first
    for png in drawings:
        tensor = feedback.to_tensor(png)
        assert tensor.shape == (1, 28, 28) and tensor.dtype == torch.float32
        assert torch.equal(tensor, handler_input(png))
        assert np.array_equal(feedback.to_digit(png), pp.preprocess(png))


def test_unreadable_rows_are_skipped_and_named() -> None:
    good = styles.make_set(2, seed=0)
    blank = styles.png(Image.new("L", (280, 280)))
    rows = [Row(1, good[0][0], good[0][1]), Row(2, blank, 3), Row(3, b"not a png", 4), Row(4, *good[1])]
    examples, skipped = feedback.to_examples(rows)
    assert skipped == [2, 3]
    assert [label for _, label in examples] == [good[0][1], good[1][1]]
    x, y = feedback.stack(examples)
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [good[0][1], good[1][1]]
    with pytest.raises(pp.BlankImageError):
        feedback.to_tensor(blank)


def test_stack_of_nothing_has_the_input_shape() -> None:
    x, y = feedback.stack([])
    assert x.shape == (0, 1, 28, 28) and y.shape == (0,) and y.dtype == torch.long


def test_training_never_imports_db() -> None:
    for path in (ROOT / "training").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "db" or n.startswith("db.") for n in names), f"{path.name} imports {names}"
