"""What the store and the registry take and give back, and the pure rules their rows must follow.

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
from typing import Any, Literal, TypeGuard

from db.errors import InvalidLabel, InvalidPrediction, PredictionNotFound, StoreError

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


# -- the model registry and training runs (migration 0007, `db.registry`) ---------------------------------

VersionState = Literal["candidate", "live", "retired", "failed"]
VERSION_STATES: tuple[VersionState, ...] = ("candidate", "live", "retired", "failed")
RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
RUN_STATUSES: tuple[RunStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_RUN_STATUSES: tuple[RunStatus, ...] = ("succeeded", "failed", "cancelled")
# A version is a path segment of TorchServe's URLs (`/predictions/mnist/<version>`) and part of an
# archive's file name: letters, digits, dot, dash, underscore (CHECK constraint of migration 0007).
VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,99}")
ARCHIVE_FILE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,199}")  # a file name in the archive folder, no path


class VersionNotFound(StoreError, LookupError):
    """No model version with this name in the registry."""


class VersionExists(StoreError, ValueError):
    """A model version with this name is registered already (versions are never reused)."""


class RunNotFound(StoreError, LookupError):
    """No training run with this id."""


class InvalidRegistryValue(StoreError, ValueError):
    """A version name, archive file, checksum, state, status, progress or option breaks a schema rule."""


@dataclass(frozen=True)
class ModelVersion:
    """One row of `model_versions`: an archive the registry knows, and what became of it.

    `feedback_count` / `feedback_max_id`: how many labelled drawings trained it and the highest
    prediction id among them (None: none, e.g. the shipped 1.0). `evaluation`: free JSON written by
    the trainer (accuracies on MNIST test and held-out feedback, per digit). `reason`: why it is
    in its state (the gate's verdict, "replaced by 3.0", ...).
    """

    version: str
    archive_file: str
    archive_sha256: str
    parent_version: str | None
    created_at: datetime
    feedback_count: int
    feedback_max_id: int | None
    evaluation: dict[str, Any]
    state: VersionState
    reason: str
    promoted_at: datetime | None
    run_id: int | None

    @property
    def live(self) -> bool:
        return self.state == "live"


@dataclass(frozen=True)
class TrainingRun:
    """One row of `training_runs`. `history`: one object per epoch/step (epoch, loss, accuracy, ...);
    `job_id`: the queue's (procrastinate) job id, None until the job is deferred; `version`: the
    version the run produced, if any."""

    id: int
    status: RunStatus
    progress: float
    message: str
    options: dict[str, Any]
    history: list[dict[str, Any]]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    version: str | None
    promoted: bool
    job_id: int | None

    @property
    def finished(self) -> bool:
        return self.status in FINAL_RUN_STATUSES


@dataclass(frozen=True)
class FeedbackRow:
    """A labelled drawing to train on: the prediction id, the PNG as the person drew it, the digit."""

    id: int
    png: bytes
    label: int


@dataclass(frozen=True)
class Disagreement:
    """A labelled prediction whose label is not the model's digit: what the operator reviews."""

    id: int
    created_at: datetime
    label: int
    digit: int
    confidence: float
    model_version: str
    excluded: bool


def validate_version(version: object) -> str:
    """A version name as TorchServe and the archive folder take it; InvalidRegistryValue otherwise."""
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise InvalidRegistryValue(
            f"a version is 1-100 letters, digits, '.', '-' or '_' (not starting with a sign), got {version!r}"
        )
    return version


def validate_archive_file(name: object) -> str:
    """A file name in the archive folder (no directory part)."""
    if not isinstance(name, str) or not ARCHIVE_FILE.fullmatch(name):
        raise InvalidRegistryValue(f"archive_file must be a plain file name, got {name!r}")
    return name


def validate_sha256(value: object) -> str:
    if not isinstance(value, str) or not TOKEN_HASH.fullmatch(value):
        raise InvalidRegistryValue(f"archive_sha256 must be 64 lowercase hex digits, got {value!r}")
    return value


def validate_state(state: object) -> VersionState:
    for name in VERSION_STATES:
        if state == name:
            return name
    raise InvalidRegistryValue(f"state must be one of {', '.join(VERSION_STATES)}; got {state!r}")


def validate_final_status(status: object) -> RunStatus:
    """The status a run ends with: succeeded, failed or cancelled."""
    for name in FINAL_RUN_STATUSES:
        if status == name:
            return name
    raise InvalidRegistryValue(f"a run ends as one of {', '.join(FINAL_RUN_STATUSES)}; got {status!r}")


def validate_progress(progress: object) -> float:
    if not (isinstance(progress, int | float) and _is_number(progress) and 0 <= progress <= 1):
        raise InvalidRegistryValue(f"progress must be a number from 0 to 1, got {progress!r}")
    return float(progress)


def validate_run_id(run_id: object) -> int:
    """A run id as an int; anything that cannot be a stored id is RunNotFound."""
    if not is_count(run_id, 1, 2**63 - 1):
        raise RunNotFound(f"no training run with id {run_id!r}")
    return run_id
