"""People's labelled drawings as training examples: a fixed held-out split, and the model's input.

Pure: no database here (`training/` never imports `db/`). Rows are anything with `id`, `png` and
`label` (db.registry.FeedbackRow is one).

The split is by id, so a drawing stays on the same side in every run and a version is never
evaluated on drawings it was trained on: `is_holdout(id)` is a Fibonacci (multiplicative) hash of
the id, `id * 0x9E3779B97F4A7C15 mod 2**64`, whose top 32 bits mod 5 == 0 keep about a fifth out.
The hash spreads consecutive ids, so the drawings of one session land on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch

from handlers import preprocess as pp

GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd
MASK = (1 << 64) - 1
HOLDOUT_MODULUS = 5  # one id in five is held out


class Labelled(Protocol):
    """A labelled drawing, as the registry gives it."""

    @property
    def id(self) -> int: ...
    @property
    def png(self) -> bytes: ...
    @property
    def label(self) -> int: ...


RowT = TypeVar("RowT", bound=Labelled)
Example = tuple[torch.Tensor, int]


def is_holdout(prediction_id: int) -> bool:
    """True for the ids kept out of training for evaluation (about one in five, fixed per id)."""
    return (((prediction_id * GOLDEN) & MASK) >> 32) % HOLDOUT_MODULUS == 0


def split(rows: Iterable[RowT]) -> tuple[list[RowT], list[RowT]]:
    """(training rows, held-out rows), in their order, by `is_holdout`."""
    train: list[RowT] = []
    holdout: list[RowT] = []
    for row in rows:
        (holdout if is_holdout(row.id) else train).append(row)
    return train, holdout


def to_digit(png: bytes) -> np.ndarray:
    """Stored drawing -> the 28x28 uint8 digit the handler's preprocessing makes of it.

    Raises `handlers.preprocess.PreprocessError` for what the handler would reject.
    """
    image = pp.decode_payload(png, "image/png")
    return pp.preprocess(image)


def to_tensor(png: bytes) -> torch.Tensor:
    """Stored drawing -> the (1, 28, 28) float model input, exactly as the handler computes it."""
    return torch.from_numpy(pp.normalize(to_digit(png))).unsqueeze(0)


def to_examples(rows: Iterable[Labelled]) -> tuple[list[Example], list[int]]:
    """(input, label) per row, and the ids of rows the preprocessing rejects (skipped, not fatal:
    one unreadable drawing must not stop a run)."""
    examples: list[Example] = []
    skipped: list[int] = []
    for row in rows:
        try:
            examples.append((to_tensor(row.png), int(row.label)))
        except pp.PreprocessError:
            skipped.append(row.id)
    return examples, skipped


def stack(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples -> (N, 1, 28, 28) inputs and (N,) int64 labels."""
    if not examples:
        return torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.long)
    return torch.stack([x for x, _ in examples]), torch.tensor([y for _, y in examples], dtype=torch.long)
