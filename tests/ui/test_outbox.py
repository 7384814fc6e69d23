"""The outbox file: fsync before acknowledging, torn tails, the bound in bytes, tombstones and compaction."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from tests.ui.fakes import digit_png
from ui import outbox as outbox_module
from ui.inference import Prediction
from ui.outbox import FILE_NAME, Journal, Outbox, QueueFull
from ui.outcome import Outcome, outcome_to_json


def journal(tmp_path: Path, max_bytes: int = 1_000_000) -> Journal:
    j = Journal(tmp_path / FILE_NAME, max_bytes)
    j.open()
    return j


def reopened(j: Journal) -> list[tuple[int, dict]]:
    j.close()
    again = Journal(j.path, j.max_bytes)
    records = again.open()
    again.close()
    return records


def test_each_record_is_fsynced_before_append_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = journal(tmp_path)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)  # what is on disk when the sync is asked for
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    j.append({"op": "a"})
    assert synced == [j.size]
    j.append({"op": "b"})
    assert synced[-1] == j.size and len(synced) == 2
    j.remove([1])
    assert len(synced) == 3  # the tombstone too
    j.close()


def test_records_and_tombstones_survive_reopening(tmp_path: Path) -> None:
    j = journal(tmp_path)
    first, second, third = (j.append({"op": "x", "n": n}) for n in range(3))
    assert (first, second, third) == (1, 2, 3)
    j.remove([second])
    assert reopened(j) == [(1, {"op": "x", "n": 0}), (3, {"op": "x", "n": 2})]
    again = Journal(j.path, j.max_bytes)
    again.open()
    assert again.append({"op": "y"}) == 4  # ids go on after the highest
    again.close()


def test_a_torn_last_line_is_skipped_with_a_warning_and_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j = journal(tmp_path)
    j.append({"op": "x", "n": 1})
    j.close()
    whole = j.path.stat().st_size
    with j.path.open("ab") as f:
        f.write(b'{"rid":2,"op":"x","n":')  # the process died in the middle of this write
    caplog.set_level(logging.WARNING, logger="ui.outbox")
    again = Journal(j.path, j.max_bytes)
    assert again.open() == [(1, {"op": "x", "n": 1})]
    assert "torn" in caplog.text
    assert j.path.stat().st_size == whole  # cut off: the next record starts on its own line
    again.append({"op": "x", "n": 3})
    assert [item["n"] for _, item in reopened(again)] == [1, 3]


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.append({"op": "x", "n": 1})
    j.close()
    with j.path.open("ab") as f:
        f.write(b'{"rid":2,"op":"x","n":2}')
    again = Journal(j.path, j.max_bytes)
    assert [rid for rid, _ in again.open()] == [1, 2]
    again.append({"op": "x", "n": 3})
    assert [item["n"] for _, item in reopened(again)] == [1, 2, 3]


def test_a_garbled_line_inside_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j = journal(tmp_path)
    j.append({"op": "x", "n": 1})
    j.close()
    with j.path.open("ab") as f:
        f.write(b"\x00\x00garbage\n")
    again = Journal(j.path, j.max_bytes)
    again.open()
    again.append({"op": "x", "n": 2})
    assert [item["n"] for _, item in reopened(again)] == [1, 2]
    assert "unreadable" in caplog.text


def test_bounded_in_bytes(tmp_path: Path) -> None:
    j = journal(tmp_path, max_bytes=1_000)
    record = {"op": "x", "data": "y" * 200}
    rids = []
    with pytest.raises(QueueFull, match="full"):
        for _ in range(10):
            rids.append(j.append(record))
    assert len(rids) == 4 and j.size <= 1_000 and j.path.stat().st_size == j.size
    j.remove(rids[:2])  # stored: the space comes back (compacted when the next record needs it)
    j.append(record)
    j.append(record)
    with pytest.raises(QueueFull):
        j.append(record)
    assert [rid for rid, _ in reopened(j)] == [rids[2], rids[3], 5, 6]


def test_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "COMPACT_MIN_DEAD_BYTES", 500)
    j = journal(tmp_path)
    rids = [j.append({"op": "x", "n": n, "pad": "p" * 100}) for n in range(10)]
    full = j.size
    j.remove(rids[:3])  # about a third is dead: not worth rewriting yet
    assert j.size > full and j.dead_bytes > 0
    j.remove(rids[3:6])  # more than half: rewritten with the live records only
    assert j.dead_bytes == 0 and j.size == j.path.stat().st_size < full / 2
    assert not j.path.with_suffix(".tmp").exists()
    j.remove(rids[6:])  # nothing left: the file is emptied
    assert j.size == 0 and j.path.stat().st_size == 0
    j.append({"op": "x", "n": 99})
    assert [item["n"] for _, item in reopened(j)] == [99]


def test_compaction_keeps_ids_and_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "COMPACT_MIN_DEAD_BYTES", 0)
    j = journal(tmp_path)
    rids = [j.append({"op": "x", "n": n}) for n in range(6)]
    j.remove([rids[0], rids[2], rids[4]])
    j.compact()
    assert reopened(j) == [(2, {"op": "x", "n": 1}), (4, {"op": "x", "n": 3}), (6, {"op": "x", "n": 5})]


def outcome(kind: str = "one") -> Outcome:
    prediction = Prediction(1, 0.9, [0.01] * 9 + [0.91], [0] * 784, "1.0")
    return Outcome(digit_png(kind), prediction, latency_ms=3.5)


async def test_outbox_keeps_predictions_and_labels_across_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10_000_000)
    assert await box.open() == 0
    a, b = outcome("one"), outcome("zero")
    await box.add(a)
    await box.add(b)
    await box.add_label_by_key(b.key, 3)
    await box.add_label_by_key(b.key, 4)  # replaces the first
    await box.add_label_by_id(17, 2)
    box.close()

    again = Outbox(tmp_path, 10_000_000)
    assert await again.open() == 4
    restored = again.outcomes()
    assert [o.key for o in restored] == [a.key, b.key]
    assert restored[1].image_png == b.image_png and restored[1].created_at == b.created_at
    assert restored[1].prediction == b.prediction and restored[1].latency_ms == 3.5
    assert restored[1].label == 4 and restored[0].label is None
    assert again.key_labels() == {b.key: 4} and again.id_labels() == {17: 2}
    await again.remove(predictions=[a.key, b.key], key_labels=[(b.key, 4)], id_labels=[(17, 2)])
    assert len(again) == 0 and again.size_bytes == 0
    again.close()
    last = Outbox(tmp_path, 10_000_000)
    assert await last.open() == 0
    last.close()


async def test_a_label_stored_while_a_newer_came_keeps_the_newer(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10_000_000)
    await box.open()
    await box.add_label_by_id(5, 1)
    await box.add_label_by_id(5, 2)  # given while label 1 was being stored
    await box.remove(id_labels=[(5, 1)])  # label 1 committed: label 2 still waits
    assert box.id_labels() == {5: 2}
    box.close()


async def test_outbox_full_raises(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 1_000)  # a record is about 2.5 KB
    await box.open()
    with pytest.raises(QueueFull):
        await box.add(outcome())
    assert len(box) == 0
    box.close()


async def test_tokens_and_not_a_digit_labels_survive_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10_000_000)
    await box.open()
    waiting = outcome("one")
    await box.add(waiting)
    await box.add_label_by_key(waiting.key, None)  # "not a digit" for the waiting prediction
    await box.add_label_by_id(8, None, token_hash="ab" * 32)
    await box.add_label_by_id(9, 4)  # the operator's: no token to check
    box.close()

    again = Outbox(tmp_path, 10_000_000)
    assert await again.open() == 4  # one prediction, three labels
    (restored,) = again.outcomes()
    assert restored.label_token == waiting.label_token  # a retry must get the same token back
    assert restored.label is None and restored.not_a_digit and restored.labelled
    assert again.key_labels() == {waiting.key: None} and again.id_labels() == {8: None, 9: 4}
    assert again.id_label_token(8) == "ab" * 32 and again.id_label_token(9) is None
    await again.remove(id_labels=[(8, 3)])  # not the label waiting: kept
    await again.remove(key_labels=[("another key", None)])  # nothing waits for that key: nothing removed
    assert len(again) == 4
    await again.remove(predictions=[waiting.key], key_labels=[(waiting.key, None)], id_labels=[(8, None)])
    assert again.id_labels() == {9: 4} and again.id_label_token(8) is None
    again.close()


async def test_records_written_before_label_tokens_still_load(tmp_path: Path) -> None:
    """An outbox left by the previous version: no label_token, no not_a_digit, no token_hash."""
    old = outcome("one")
    data = {"op": "prediction", **outcome_to_json(old)}
    del data["label_token"]
    lines = [
        {"rid": 1, **data},
        {"rid": 2, "op": "label", "key": old.key, "label": 5},
        {"rid": 3, "op": "label", "id": 4, "label": 6},
        {"rid": 4, "op": "label", "id": 5, "label": None},  # no choice at all: unreadable, dropped
    ]
    (tmp_path / FILE_NAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    box = Outbox(tmp_path, 10_000_000)
    assert await box.open() == 3
    (restored,) = box.outcomes()
    assert restored.key == old.key and restored.label == 5 and not restored.not_a_digit
    assert len(restored.label_token) == 32  # a fresh token nobody knows: the operator's row
    assert box.id_labels() == {4: 6} and box.id_label_token(4) is None
    box.close()
