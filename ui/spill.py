"""Keep what the database could not take across a restart: JSON lines in the run folder.

At shutdown, predictions and labels still waiting for the database are written to a file; at
the next start they are read back (and the file removed) and stored once the database answers.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from .inference import Prediction
from .service import Outcome


def outcome_to_json(outcome: Outcome) -> dict[str, Any]:
    return {
        "kind": "prediction",
        "key": outcome.key,
        "created_at": outcome.created_at.isoformat(),
        "latency_ms": outcome.latency_ms,
        "label": outcome.label,
        "image_png": base64.b64encode(outcome.image_png).decode(),
        "prediction": asdict(outcome.prediction),
    }


def outcome_from_json(data: dict[str, Any]) -> Outcome:
    return Outcome(
        image_png=base64.b64decode(data["image_png"]),
        prediction=Prediction(**data["prediction"]),
        created_at=datetime.fromisoformat(data["created_at"]),
        key=data["key"],
        latency_ms=float(data["latency_ms"]),
        label=data["label"],
    )


def save(path: Path, outcomes: list[Outcome], labels: dict[int, int]) -> int:
    """Write what waits (atomically); returns how many records. Nothing to write removes the file."""
    lines = [json.dumps(outcome_to_json(o)) for o in outcomes]
    lines += [json.dumps({"kind": "label", "id": i, "label": label}) for i, label in labels.items()]
    if not lines:
        path.unlink(missing_ok=True)
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return len(lines)


def load(path: Path) -> tuple[list[Outcome], dict[int, int]]:
    """Read a spill file (missing: nothing); unreadable lines are skipped."""
    outcomes: list[Outcome] = []
    labels: dict[int, int] = {}
    if not path.exists():
        return outcomes, labels
    for line in path.read_text().splitlines():
        try:
            data = json.loads(line)
            if data["kind"] == "prediction":
                outcomes.append(outcome_from_json(data))
            elif data["kind"] == "label":
                labels[int(data["id"])] = int(data["label"])
        except (ValueError, KeyError, TypeError):
            continue
    return outcomes, labels
