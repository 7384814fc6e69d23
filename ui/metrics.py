"""Prometheus metrics of the UI process (the default registry, served by `GET /metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PREDICTIONS = Counter(
    "digit_ui_predictions_total", "Predictions answered, by whether they were stored at once", ["stored"]
)
FEEDBACK = Counter(
    "digit_ui_feedback_total", "True labels given, by whether the model was right", ["correct"]
)
ERRORS = Counter("digit_ui_errors_total", "Failures, by kind", ["kind"])
LATENCY = Histogram(
    "digit_ui_prediction_latency_seconds",
    "Time to answer one prediction: model server round trip plus storing",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PENDING_SAVED = Counter(
    "digit_ui_pending_saved_total", "Predictions or labels stored late, after the database came back"
)
