"""One answered prediction as the page and the API hold it, and its JSON form for the outbox."""

from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .inference import Prediction


@dataclass
class Outcome:
    """One answered prediction; `id` is set once it is stored.

    `created_at` is the moment the person made the prediction: the row keeps it even when it is
    stored later. `key` is unique per prediction and stored with the row, so storing the same
    outcome twice (a replay after a crash, a retried request) finds the first row instead.
    `label_token` is the secret that lets whoever made the drawing label or delete it: made when
    the outcome is answered (so a queued prediction has one too), only its hash is stored.
    `label` is the true digit; `not_a_digit` is the other choice (then `label` is None).
    """

    image_png: bytes
    prediction: Prediction
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    id: int | None = None
    latency_ms: float = 0.0  # the model server's round trip
    label: int | None = None
    label_stored: bool = False
    label_token: str = field(default_factory=lambda: new_label_token())
    not_a_digit: bool = False

    @property
    def labelled(self) -> bool:
        """Whether the person chose (a digit, or "not a digit")."""
        return self.label is not None or self.not_a_digit

    @property
    def stored(self) -> bool:
        return self.id is not None


def new_label_token() -> str:
    """A fresh label token: 24 random bytes, URL-safe (32 characters)."""
    return secrets.token_urlsafe(24)


def outcome_to_json(outcome: Outcome) -> dict[str, Any]:
    """JSON-ready data of an outcome not stored yet (the label travels in its own records).

    The label token itself is kept (the outbox file is the server's own, mode 0600): a retried
    request must get the same token back, and the row gets its hash when it is stored.
    """
    return {
        "key": outcome.key,
        "label_token": outcome.label_token,
        "created_at": outcome.created_at.isoformat(),
        "latency_ms": outcome.latency_ms,
        "image_png": base64.b64encode(outcome.image_png).decode(),
        "prediction": asdict(outcome.prediction),
    }


def outcome_from_json(data: dict[str, Any]) -> Outcome:
    """The inverse of `outcome_to_json`; `KeyError`, `TypeError` or `ValueError` when malformed."""
    created_at = datetime.fromisoformat(data["created_at"])
    if created_at.tzinfo is None:
        raise ValueError("created_at has no time zone")
    return Outcome(
        image_png=base64.b64decode(data["image_png"], validate=True),
        prediction=Prediction(**data["prediction"]),
        created_at=created_at,
        key=str(data["key"]),
        latency_ms=float(data["latency_ms"]),
        # A record written before tokens existed gets a fresh one nobody knows: only the operator
        # may change that row, as for every row stored before.
        label_token=str(data.get("label_token") or new_label_token()),
    )
