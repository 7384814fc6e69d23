"""What the store takes and gives back, and the pure rules a prediction must follow.

The rules are the same as the schema's CHECK constraints (`db/migrations/`): checking them here
first gives a clear message before any round trip, and the database still refuses SQL that skips them.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeGuard

from db.errors import InvalidLabel, InvalidPrediction, PredictionNotFound

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 2_000_000  # also a CHECK constraint in the schema
INPUT_PIXELS = 28 * 28
MAX_TEXT = 200  # model name and version (CHECK constraints)
MAX_KEY = 200  # a request key (CHECK constraint of migration 0004)
TOKEN_HASH = re.compile(r"[0-9a-f]{64}")  # sha256 hex of a label token (CHECK constraint of migration 0005)

# The history's filters (`Store.recent(only=...)`): wrong = labelled with another digit than
# predicted; unlabelled = no choice yet; not_a_digit = the person said it is not a digit.
Only = Literal["all", "wrong", "unlabelled", "not_a_digit"]
ONLY: tuple[Only, ...] = ("all", "wrong", "unlabelled", "not_a_digit")


@dataclass(frozen=True)
class NewPrediction:
    """A prediction to record. `input_pixels` is the model's 28x28 uint8 input, row-major (784 bytes).

    `created_at`: when the person made the prediction (timezone-aware), kept as the row's time even
    when the row is written later (from the outbox); None = now. `key`: a unique request key (an
    outbox entry, an Idempotency-Key): a second prediction with the same key is not stored again.
    `label_token_hash`: `token_hash` of the secret that lets its owner label or delete it (None:
    only the operator can).
    """

    digit: int
    confidence: float
    probabilities: Sequence[float]
    model_name: str
    model_version: str
    latency_ms: float
    image_png: bytes
    input_pixels: bytes
    created_at: datetime | None = None
    key: str | None = None
    label_token_hash: str | None = None


@dataclass(frozen=True)
class PredictionRow:
    """A stored prediction without its blobs (`Store.image_png` fetches the drawing)."""

    id: int
    created_at: datetime
    digit: int
    confidence: float
    probabilities: list[float]
    model_name: str
    model_version: str
    latency_ms: float
    true_label: int | None
    labelled_at: datetime | None  # when the person chose (a digit or "not a digit")
    not_a_digit: bool = False  # the person said the drawing is not a digit (then true_label is None)

    @property
    def correct(self) -> bool | None:
        """Whether the prediction matches the true label; None while unlabelled or not a digit."""
        return None if self.true_label is None else self.true_label == self.digit


@dataclass(frozen=True)
class LabelledRow:
    """One labelled prediction with its blobs: what the export of labelled drawings needs."""

    id: int
    true_label: int
    digit: int
    confidence: float
    model_name: str
    model_version: str
    created_at: datetime
    labelled_at: datetime
    image_png: bytes
    input_pixels: bytes


@dataclass(frozen=True)
class PoolHealth:
    """The connection pool now: open connections, idle ones, callers waiting for one, and for how long
    (seconds) callers have been waiting with no connection becoming available (0 when fine)."""

    size: int
    idle: int
    waiting: int
    exhausted_for_s: float


def validate_prediction(p: NewPrediction) -> None:
    """Raise InvalidPrediction with a clear message if `p` breaks a rule of the schema."""

    def fail(message: str) -> None:
        raise InvalidPrediction(message)

    if not _is_digit(p.digit):
        fail(f"digit must be an integer 0-9, got {p.digit!r}")
    if not _is_probability(p.confidence):
        fail(f"confidence must be a number from 0 to 1, got {p.confidence!r}")
    if len(p.probabilities) != 10:
        fail(f"probabilities must have 10 values, got {len(p.probabilities)}")
    if not all(_is_probability(x) for x in p.probabilities):
        fail("probabilities must be numbers from 0 to 1")
    for name in ("model_name", "model_version"):
        if not _is_text(getattr(p, name), MAX_TEXT):
            fail(f"{name} must be a text of 1-{MAX_TEXT} characters without NUL")
    if not _is_number(p.latency_ms) or p.latency_ms < 0:
        fail(f"latency_ms must be a number >= 0, got {p.latency_ms!r}")
    if not _is_blob(p.image_png) or bytes(p.image_png[:8]) != PNG_SIGNATURE:
        fail("image_png must be PNG bytes")
    if len(p.image_png) > MAX_PNG_BYTES:
        fail(f"image_png is {len(p.image_png):,} bytes; at most {MAX_PNG_BYTES:,} are stored")
    if not _is_blob(p.input_pixels) or len(p.input_pixels) != INPUT_PIXELS:
        fail(f"input_pixels must be {INPUT_PIXELS} bytes (28x28 uint8)")
    if p.created_at is not None and not _is_aware(p.created_at):
        fail(f"created_at must be a timezone-aware datetime, got {p.created_at!r}")
    if p.key is not None:
        validate_key(p.key)
    if p.label_token_hash is not None:
        validate_token_hash(p.label_token_hash)


def validate_key(key: object) -> str:
    """A request key as stored (1-200 characters, no NUL), or InvalidPrediction."""
    if not _is_text(key, MAX_KEY):
        raise InvalidPrediction(f"a key is a text of 1-{MAX_KEY} characters without NUL, got {key!r:.60}")
    return key


def validate_label(label: object) -> int:
    """The label as an int, or InvalidLabel."""
    if not _is_digit(label):
        raise InvalidLabel(f"a label is a digit 0-9, got {label!r}")
    return label


def validate_choice(label: object, not_a_digit: object = False) -> int | None:
    """A person's choice: a digit (returned) or "not a digit" (`label` None, `not_a_digit` True).

    InvalidLabel for anything else: no choice at all, both at once, a label that is not 0-9.
    """
    if not isinstance(not_a_digit, bool):
        raise InvalidLabel(f"not_a_digit is true or false, got {not_a_digit!r}")
    if not_a_digit:
        if label is not None:
            raise InvalidLabel(f"with not_a_digit true the label is null (not a digit), got {label!r}")
        return None
    if label is None:
        raise InvalidLabel("a label is a digit 0-9, or null with not_a_digit true")
    return validate_label(label)


def token_hash(token: str) -> str:
    """What is stored of a label token: its sha256, hex. The token itself is a random secret of
    192 bits, so a plain hash suffices (no salt, no slow hash: nothing to guess from it)."""
    return hashlib.sha256(token.encode()).hexdigest()


def validate_token_hash(value: object) -> str:
    """A stored token hash (64 lowercase hex digits), or InvalidPrediction."""
    if not isinstance(value, str) or not TOKEN_HASH.fullmatch(value):
        raise InvalidPrediction(f"a label token hash is 64 hex digits, got {value!r:.80}")
    return value


def validate_only(only: object) -> Only:
    """A history filter, or ValueError."""
    for name in ONLY:
        if only == name:
            return name
    raise ValueError(f"only must be one of {', '.join(ONLY)}; got {only!r}")


def is_count(x: object, low: int, high: int | None = None) -> TypeGuard[int]:
    """An int (not a bool) from `low` to `high` (no limit when None): page sizes, batch sizes."""
    return isinstance(x, int) and not isinstance(x, bool) and low <= x and (high is None or x <= high)


def validate_id(prediction_id: object) -> int:
    """An id as an int; anything that cannot be a stored id is PredictionNotFound."""
    if not is_count(prediction_id, 1, 2**63 - 1):
        raise PredictionNotFound(f"no prediction with id {prediction_id!r}")
    return prediction_id


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_probability(x: object) -> bool:
    return isinstance(x, int | float) and _is_number(x) and 0 <= x <= 1


def _is_digit(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 9


def _is_text(x: object, longest: int) -> TypeGuard[str]:
    return isinstance(x, str) and 1 <= len(x) <= longest and "\x00" not in x


def _is_blob(x: object) -> TypeGuard[bytes | bytearray | memoryview]:
    return isinstance(x, bytes | bytearray | memoryview)


def _is_aware(x: object) -> bool:
    return isinstance(x, datetime) and x.utcoffset() is not None
