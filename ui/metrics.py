"""Prometheus metrics of the UI process (the default registry, served by `GET /metrics`).

Everything is counted or set when it happens, never computed at scrape time: a scrape costs the
same at 100 or 10 million stored rows (bench/metrics.py) and never touches the database. The
dashboard (docker/grafana/) and the alert rules (docker/prometheus/alerts.yml) are built on these
names; docs/observability.md lists them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Literal

from prometheus_client import Counter, Gauge, Histogram

from .outcome import Outcome

ErrorKind = Literal[
    "invalid_input",  # 4xx: the image or the request was refused
    "not_found",  # 404: a label or a deletion for an unknown prediction
    "forbidden",  # 401/403: a label or a deletion without the row's label token, or a wrong operator token
    "inference_unavailable",  # 503: the model server did not answer
    "outbox_full",  # 503: the database is down and the outbox full
    "invalid_prediction",  # 502: the database refused the model's answer
    "database_unavailable",  # no error for the client (kept in the outbox, 202), but worth a look
    "storage_full",  # 507: the storage quota is reached (STORAGE_MAX_ROWS, pruning off)
]
ERROR_KINDS: tuple[ErrorKind, ...] = (
    "invalid_input",
    "not_found",
    "forbidden",
    "inference_unavailable",
    "outbox_full",
    "invalid_prediction",
    "database_unavailable",
    "storage_full",
)
# The kinds the client sees as a 5xx (the "5xx rate" alert selects these).
SERVER_ERROR_KINDS: tuple[ErrorKind, ...] = (
    "inference_unavailable",
    "outbox_full",
    "invalid_prediction",
    "storage_full",
)
DEPENDENCIES = ("model_server", "database", "db_pool")
UNKNOWN = "unknown"  # model_version and correct of a label for a prediction this process does not know
NOT_A_DIGIT = "not_a_digit"  # correct of a "not a digit" label: neither right nor wrong, not in accuracy
# 5 ms to 5 s: a warm answer is tens of ms, a cold worker or a slow disk seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
REMEMBERED_PREDICTIONS = 10_000  # (digit, version) of recent stored predictions, for labels by id

PREDICTIONS = Counter(
    "digit_ui_predictions_total",
    "Predictions answered and stored at once (stored=true) or durably queued (stored=false), "
    "by model version",
    ["model_version", "stored"],
)
FEEDBACK = Counter(
    "digit_ui_feedback_total",
    "True labels given, by the labelled prediction's model version and whether the model was right "
    "(unknown: a label by id for a prediction this process did not store recently; not_a_digit: "
    "the person said the drawing is not a digit)",
    ["model_version", "correct"],
)
ERRORS = Counter("digit_ui_errors_total", "Failures, by kind", ["kind"])
PRUNED = Counter(
    "digit_ui_pruned_total", "Unlabelled drawings deleted to stay within the storage quota (STORAGE_PRUNE)"
)
LATENCY = Histogram(
    "digit_ui_prediction_latency_seconds",
    "Time from the request to the stored (or durably queued) answer: model server round trip plus storing",
    buckets=LATENCY_BUCKETS,
)
DELETED = Counter(
    "digit_ui_deleted_total", "Predictions deleted (with their drawing) by their owner or the operator"
)
PENDING_SAVED = Counter(
    "digit_ui_pending_saved_total", "Predictions or labels stored late, after the database came back"
)
WAITING = Gauge("digit_ui_waiting", "Predictions and labels in the outbox, waiting for the database")
OUTBOX_BYTES = Gauge("digit_ui_outbox_bytes", "Size of the outbox file (bounded by OUTBOX_MAX_BYTES)")
DEPENDENCY_UP = Gauge(
    "digit_ui_dependency_up",
    "1 when the part worked at its last use or readiness check (/readyz), 0 when it failed",
    ["dependency"],
)
MODEL_VERSION = Gauge(
    "digit_ui_model_version_info",
    "1 for the model version of the latest answer (the series of the previous version is removed)",
    ["model_version"],
)

RATE_LIMITED = Counter(
    "digit_ui_rate_limited_total",
    "Requests refused with 429 because their client address was over its rate limit, by route",
    ["route"],
)
RATE_LIMITED_ROUTES = ("predictions", "labels")  # ui/ratelimit.py's LIMITED_ROUTES

for _route in RATE_LIMITED_ROUTES:  # at 0 from the start, like the errors below
    RATE_LIMITED.labels(_route)
for _kind in ERROR_KINDS:  # present at 0 from the start: rates and ratios exist before the first error
    ERRORS.labels(_kind)


class RecentPredictions:
    """Digit and model version of the last stored predictions, so that a label by id can be judged.

    Bounded: a label for an older prediction (or one stored by another replica) counts as unknown.
    """

    def __init__(self, size: int = REMEMBERED_PREDICTIONS) -> None:
        self.size = size
        self._rows: OrderedDict[int, tuple[int, str]] = OrderedDict()

    def add(self, prediction_id: int, digit: int, model_version: str) -> None:
        self._rows[prediction_id] = (digit, model_version)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)

    def get(self, prediction_id: int) -> tuple[int, str] | None:
        return self._rows.get(prediction_id)


_recent = RecentPredictions()
_version: list[str] = []  # the model version whose info series is set (at most one)


def answer_seconds(outcome: Outcome, now: float) -> float:
    """Request to stored answer: the model's round trip, then from the answer (`created_at`) to `now`."""
    return outcome.latency_ms / 1000 + max(0.0, now - outcome.created_at.timestamp())


def correctness(digit: int, label: int | None) -> str:
    """The `correct` value of a label: "true", "false", or "not_a_digit" (label None)."""
    if label is None:
        return NOT_A_DIGIT
    return "true" if digit == label else "false"


def _up(dependency: str, up: bool) -> None:
    DEPENDENCY_UP.labels(dependency).set(1 if up else 0)


# -- what the service records ---------------------------------------------------------------------------
def error(kind: ErrorKind) -> None:
    """One failure; the database or the model server failing also marks it down."""
    ERRORS.labels(kind).inc()
    if kind == "database_unavailable":
        _up("database", False)
    elif kind == "inference_unavailable":
        _up("model_server", False)


def pruned(count: int) -> None:
    PRUNED.inc(count)


def answered(model_version: str) -> None:
    """The model server answered: it is up, and this is the version it serves."""
    _up("model_server", True)
    if _version != [model_version]:
        for old in _version:
            MODEL_VERSION.remove(old)
        MODEL_VERSION.labels(model_version).set(1)
        _version[:] = [model_version]


def saved(outcome: Outcome) -> None:
    """An outcome was stored (or durably queued): count it and its latency."""
    version = outcome.prediction.model_version
    LATENCY.observe(answer_seconds(outcome, time.time()))
    PREDICTIONS.labels(version, str(outcome.stored).lower()).inc()
    if outcome.id is not None:
        _up("database", True)
        _recent.add(outcome.id, outcome.prediction.digit, version)


def labelled(outcome: Outcome, label: int | None) -> None:
    """A true label (None: "not a digit") for an outcome the service holds."""
    FEEDBACK.labels(outcome.prediction.model_version, correctness(outcome.prediction.digit, label)).inc()


def labelled_by_id(prediction_id: int, label: int | None) -> None:
    """A true label (None: "not a digit") by prediction id: judged when this process stored it recently."""
    known = _recent.get(prediction_id)
    if label is None:
        FEEDBACK.labels(known[1] if known else UNKNOWN, NOT_A_DIGIT).inc()
    elif known is None:
        FEEDBACK.labels(UNKNOWN, UNKNOWN).inc()
    else:
        digit, version = known
        FEEDBACK.labels(version, correctness(digit, label)).inc()


def deleted() -> None:
    """A prediction and its drawing were deleted."""
    DELETED.inc()


def stored_late(count: int) -> None:
    """Waiting predictions or labels reached the database."""
    PENDING_SAVED.inc(count)
    _up("database", True)


def waiting(count: int, outbox_bytes: int) -> None:
    WAITING.set(count)
    OUTBOX_BYTES.set(outbox_bytes)


def checked(*, model: bool, database: bool, pool: bool) -> None:
    """The outcome of a readiness check (`/readyz`, every few seconds under Compose or Kubernetes)."""
    _up("model_server", model)
    _up("database", database)
    _up("db_pool", pool)


def rate_limited(route: str) -> None:
    """A request refused with 429 (ui/ratelimit.py)."""
    RATE_LIMITED.labels(route).inc()
