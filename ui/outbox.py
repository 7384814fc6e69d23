"""What the database could not take yet, kept on local disk so that a 202 survives any crash.

`Journal` is the file: JSON lines appended under `data_dir/outbox`, each fsync'd before the
caller goes on (the API answers 202 only after that), bounded in bytes (`QueueFull` beyond),
removed by tombstones once PostgreSQL committed them and compacted later. A torn last line (a
crash in the middle of a write, never acknowledged) is skipped with a warning and cut off.

`Outbox` is what the service sees: the predictions and labels waiting, in memory and in the
journal, replayed at start. A replay after a crash between the commit and the tombstone stores
nothing twice: each prediction carries its unique key into the row (see `NewPrediction.key`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.records import validate_choice, validate_token_hash

from .outcome import Outcome, outcome_from_json, outcome_to_json

log = logging.getLogger(__name__)

FILE_NAME = "outbox.jsonl"
COMPACT_MIN_DEAD_BYTES = 1_000_000  # below this, rewriting the file costs more than it frees


Choice = int | None  # a waiting label: a digit 0-9, or None for "not a digit"


class QueueFull(Exception):
    """The outbox has reached its size limit: nothing more can be promised until the database is back."""


@dataclass(frozen=True)
class Span:
    offset: int
    length: int


class Journal:
    """An append-only file of JSON records, each with an id (`rid`); thread-safe, blocking I/O.

    Lines are `{"rid": n, ...}` (a record) or `{"done": [n, ...]}` (a tombstone). `size` is the
    file's length, the quantity bounded by `max_bytes`; the space of removed records is reclaimed
    by `compact` (at once when nothing is left, else when it is at least half the file).
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._live: dict[int, Span] = {}
        self._next_rid = 1
        self.size = 0
        self.dead_bytes = 0

    # -- open / close -------------------------------------------------------------------------------
    def open(self) -> list[tuple[int, dict[str, Any]]]:
        """Open (creating it if needed) and return the live records, oldest first."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            if created:
                _fsync_dir(self.path.parent)
            return self._replay()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _replay(self) -> list[tuple[int, dict[str, Any]]]:
        data = self.path.read_bytes()
        records: dict[int, tuple[Span, dict[str, Any]]] = {}
        done: set[int] = set()
        offset = 0
        end_of_good = 0
        while offset < len(data):
            newline = data.find(b"\n", offset)
            line = data[offset:] if newline < 0 else data[offset : newline + 1]
            item = _parse(line)
            if item is None and newline < 0:
                log.warning("outbox: torn last record (%d bytes) skipped: a write was cut short", len(line))
                break
            if newline < 0:  # a whole record whose newline was not written: end its line
                os.write(self._require_open(), b"\n")
                os.fsync(self._require_open())
                line += b"\n"
            if item is None:
                log.warning("outbox: unreadable record at byte %d skipped", offset)
                self.dead_bytes += len(line)
            elif "done" in item:
                done.update(item["done"])
                self.dead_bytes += len(line)
            else:
                rid = item.pop("rid")
                records[rid] = (Span(offset, len(line)), item)
                self._next_rid = max(self._next_rid, rid + 1)
            offset = end_of_good = offset + len(line)
        if end_of_good < len(data):
            os.ftruncate(self._require_open(), end_of_good)
            os.fsync(self._require_open())
        self.size = end_of_good
        live = []
        for rid, (span, item) in sorted(records.items(), key=lambda kv: kv[1][0].offset):
            if rid in done:
                self.dead_bytes += span.length
            else:
                self._live[rid] = span
                live.append((rid, item))
        return live

    # -- writes ---------------------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> int:
        """Write one record and fsync it; its rid. `QueueFull` if it would pass `max_bytes`."""
        with self._lock:
            fd = self._require_open()
            rid = self._next_rid
            line = _encode({"rid": rid, **record})
            if self.size + len(line) > self.max_bytes and self.dead_bytes:
                self._compact()
            if self.size + len(line) > self.max_bytes:
                raise QueueFull(
                    f"the outbox is full ({self.size:,} of {self.max_bytes:,} bytes) while the database "
                    "is unreachable; try again later"
                )
            self._write(fd, line)
            self._live[rid] = Span(self.size - len(line), len(line))
            self._next_rid += 1
            return rid

    def remove(self, rids: Iterable[int]) -> None:
        """Tombstone records (one write, fsync'd); compact when that frees enough."""
        with self._lock:
            fd = self._require_open()
            gone = [rid for rid in rids if rid in self._live]
            if not gone:
                return
            line = _encode({"done": gone})
            self._write(fd, line)  # never refused: it is what frees the space
            self.dead_bytes += len(line) + sum(self._live.pop(rid).length for rid in gone)
            if not self._live or self.dead_bytes >= max(COMPACT_MIN_DEAD_BYTES, self.size // 2):
                self._compact()

    def compact(self) -> None:
        """Rewrite the file with only its live records (atomically: a crash keeps the old or the new)."""
        with self._lock:
            self._require_open()
            self._compact()

    @property
    def live(self) -> int:
        return len(self._live)

    def _require_open(self) -> int:
        if self._fd is None:
            raise RuntimeError("the outbox is not open")
        return self._fd

    def _write(self, fd: int, line: bytes) -> None:
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
        os.fsync(fd)
        self.size += len(line)

    def _compact(self) -> None:
        fd = self._require_open()
        if not self._live:
            os.ftruncate(fd, 0)
            os.fsync(fd)
            self.size = self.dead_bytes = 0
            return
        tmp = self.path.with_suffix(".tmp")
        spans: dict[int, Span] = {}
        with open(tmp, "wb") as out:
            offset = 0
            for rid, span in self._live.items():
                chunk = os.pread(fd, span.length, span.offset)
                out.write(chunk)
                spans[rid] = Span(offset, span.length)
                offset += span.length
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        os.close(fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self._live = spans
        self.size, self.dead_bytes = offset, 0


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _parse(line: bytes) -> dict[str, Any] | None:
    """A record or tombstone line as data; None when it is not one (torn, garbled)."""
    try:
        item = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(item, dict):
        return None
    if "done" in item:
        ok = isinstance(item["done"], list) and all(isinstance(r, int) for r in item["done"])
        return item if ok else None
    return item if isinstance(item.get("rid"), int) else None


def _fsync_dir(path: Path) -> None:
    """Make a file's creation or rename durable (its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """The predictions and labels waiting for the database: in memory, and durably in a `Journal`.

    A label is waiting either by prediction id (the prediction is stored) or by the prediction's
    key (it was not stored when the label came). A label is a `Choice`: a digit, or None for "not
    a digit". A label by id keeps the hash of the label token it came with (None: the operator's),
    checked when it is stored. Use from the event loop only: the journal's blocking I/O runs in a
    worker thread, the in-memory state changes on the loop.
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.journal = Journal(folder / FILE_NAME, max_bytes)
        self._outcomes: OrderedDict[str, tuple[Outcome, int]] = OrderedDict()  # key -> (outcome, rid)
        self._key_labels: dict[str, tuple[Choice, int]] = {}  # prediction key -> (label, rid)
        self._id_labels: dict[int, tuple[Choice, int]] = {}  # prediction id -> (label, rid)
        self._id_tokens: dict[int, str | None] = {}  # prediction id -> token hash of its waiting label

    async def open(self) -> int:
        """Open the journal and load what waits; returns how many predictions and labels."""
        stale: list[int] = []
        for rid, item in await asyncio.to_thread(self.journal.open):
            try:
                stale += self._load(rid, item)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("outbox: record %d unreadable, dropped: %r", rid, exc)
                stale.append(rid)
        for key, (label, _) in self._key_labels.items():
            if key in self._outcomes:
                outcome = self._outcomes[key][0]
                outcome.label, outcome.not_a_digit = label, label is None
        if stale:
            await asyncio.to_thread(self.journal.remove, stale)
        return len(self)

    def _load(self, rid: int, item: dict[str, Any]) -> list[int]:
        """Take one replayed record into memory; the rids it replaces (to tombstone)."""
        op = item.get("op")
        if op == "prediction":
            outcome = outcome_from_json(item)
            self._outcomes[outcome.key] = (outcome, rid)
            return []
        if op == "label" and isinstance(item.get("key"), str):
            old = self._key_labels.get(item["key"])
            self._key_labels[item["key"]] = (_label(item), rid)
            return [old[1]] if old else []
        if op == "label":
            prediction_id = item["id"]
            if not isinstance(prediction_id, int):
                raise TypeError(f"prediction id {prediction_id!r}")
            old_id = self._id_labels.get(prediction_id)
            needed = item.get("token_hash")  # absent in records written before label tokens
            self._id_tokens[prediction_id] = None if needed is None else validate_token_hash(needed)
            self._id_labels[prediction_id] = (_label(item), rid)
            return [old_id[1]] if old_id else []
        raise ValueError(f"unknown record {op!r}")

    def close(self) -> None:
        self.journal.close()

    def __len__(self) -> int:
        return len(self._outcomes) + len(self._key_labels) + len(self._id_labels)

    @property
    def size_bytes(self) -> int:
        return self.journal.size

    # -- adding ---------------------------------------------------------------------------------------
    async def add(self, outcome: Outcome) -> None:
        """Keep a prediction until it is stored (durable when this returns); `QueueFull`."""
        rid = await asyncio.to_thread(self.journal.append, {"op": "prediction", **outcome_to_json(outcome)})
        self._outcomes[outcome.key] = (outcome, rid)
        if outcome.labelled and outcome.key not in self._key_labels:
            await self.add_label_by_key(outcome.key, outcome.label)

    async def add_label_by_key(self, key: str, label: Choice) -> None:
        """Keep a label for the prediction with this key (durable when this returns); `QueueFull`."""
        rid = await asyncio.to_thread(self.journal.append, {"op": "label", "key": key, **_choice(label)})
        old = self._key_labels.get(key)
        self._key_labels[key] = (label, rid)
        if old:
            await asyncio.to_thread(self.journal.remove, [old[1]])

    async def add_label_by_id(
        self, prediction_id: int, label: Choice, *, token_hash: str | None = None
    ) -> None:
        """Keep a label for a stored prediction (durable when this returns); `QueueFull`.

        `token_hash`: the hash of the label token it came with, checked when it is stored (None:
        the operator's, for any row).
        """
        record: dict[str, Any] = {"op": "label", "id": prediction_id, **_choice(label)}
        if token_hash is not None:
            record["token_hash"] = token_hash
        rid = await asyncio.to_thread(self.journal.append, record)
        old = self._id_labels.get(prediction_id)
        self._id_labels[prediction_id] = (label, rid)
        self._id_tokens[prediction_id] = token_hash
        if old:
            await asyncio.to_thread(self.journal.remove, [old[1]])

    # -- reading --------------------------------------------------------------------------------------
    def outcomes(self) -> list[Outcome]:
        """Predictions not stored yet, oldest first."""
        return [outcome for outcome, _ in self._outcomes.values()]

    def has_outcome(self, key: str) -> bool:
        return key in self._outcomes

    def key_labels(self) -> dict[str, Choice]:
        return {key: label for key, (label, _) in self._key_labels.items()}

    def id_labels(self) -> dict[int, Choice]:
        return {prediction_id: label for prediction_id, (label, _) in self._id_labels.items()}

    def id_label_token(self, prediction_id: int) -> str | None:
        """The token hash the waiting label for this id came with (None: the operator's)."""
        return self._id_tokens.get(prediction_id)

    # -- removing (after PostgreSQL committed) -------------------------------------------------------
    async def remove(
        self,
        *,
        predictions: Iterable[str] = (),
        key_labels: Iterable[tuple[str, Choice]] = (),
        id_labels: Iterable[tuple[int, Choice]] = (),
    ) -> None:
        """Forget what was stored (one tombstone write): predictions by key, labels by key or by id.

        A label is given with its value and forgotten only if it is still the one waiting: a newer
        label given while the older was being stored keeps waiting.
        """
        rids = [self._outcomes.pop(key)[1] for key in predictions if key in self._outcomes]
        for key, label in key_labels:
            if key in self._key_labels and self._key_labels[key][0] == label:
                rids.append(self._key_labels.pop(key)[1])
        for prediction_id, label in id_labels:
            if prediction_id in self._id_labels and self._id_labels[prediction_id][0] == label:
                rids.append(self._id_labels.pop(prediction_id)[1])
                self._id_tokens.pop(prediction_id, None)
        if rids:
            await asyncio.to_thread(self.journal.remove, rids)


def _choice(label: Choice) -> dict[str, Any]:
    """The fields of a label record (`not_a_digit` written only when true: older readers see a digit)."""
    return {"label": label, "not_a_digit": True} if label is None else {"label": label}


def _label(item: dict[str, Any]) -> Choice:
    return validate_choice(item["label"], item.get("not_a_digit", False))
