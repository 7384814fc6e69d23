"""The reconciliation rule itself (pure, fast): it must catch every broken promise it is meant to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.faults.harness import Answer, StoredRow, reconcile
from ui.service import stored_key

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def answer(key: str, status: int | None, body: object = None, error: str = "") -> Answer:
    return Answer(
        key=key,
        image=0,
        phase="during",
        sent_at=T0,
        answered_at=None if status is None else T0 + timedelta(seconds=1),
        status=status,
        body=body,
        error=error,
    )


def row(id_: int, key: str | None, at: datetime = T0) -> StoredRow:
    return StoredRow(id_, None if key is None else stored_key(key), at)


def test_every_kept_promise_passes_and_is_counted() -> None:
    answers = [
        answer("a", 201, {"id": 1}),
        answer("b", 202, {"id": None}),
        answer("c", 503, {"detail": "the model server is not ready"}),
        answer("d", None, error="ConnectError"),  # in flight at a SIGKILL: stored, never answered
        answer("e", None, error="ConnectError"),  # ... or not stored at all
    ]
    tally = reconcile("ok", answers, [row(1, "a"), row(2, "b"), row(3, "d")])
    assert tally.problems() == []
    assert (tally.requests, tally.created, tally.accepted) == (5, 1, 1)
    assert tally.others == {"503": 1, "no answer: ConnectError": 2}
    assert tally.no_answer == 2 and tally.stored_unanswered == 1
    assert "lost 0, duplicated 0" in tally.summary()


def test_a_202_without_its_row_is_lost() -> None:
    tally = reconcile("lost", [answer("a", 201, {"id": 1}), answer("b", 202, {"id": None})], [row(1, "a")])
    assert tally.lost == ["b"] and tally.problems() == ["lost: 1 (first: ['b'])"]


def test_a_row_of_no_request_or_without_its_key_is_a_duplicate() -> None:
    answers = [answer("a", 202, {"id": None})]
    assert reconcile("keyless", answers, [row(1, "a"), row(2, None)]).duplicated == 1
    assert reconcile("foreign", answers, [row(1, "a"), row(2, "zzz")]).duplicated == 1


def test_a_201_must_answer_its_own_row_s_id() -> None:
    tally = reconcile("id", [answer("a", 201, {"id": 7})], [row(1, "a")])
    assert tally.wrong_id == ["a: answered 7, stored 1"]


def test_errors_must_be_503s_with_a_json_body_and_store_nothing() -> None:
    answers = [
        answer("a", 404, {"detail": "Model not found"}),  # the model server's 404 leaked
        answer("b", 503, None, error="text/html"),  # not JSON
        answer("c", 503, {"detail": "the model server failed"}),
    ]
    tally = reconcile("errors", answers, [row(1, "c")])
    assert [bad.split(":")[0] for bad in tally.bad_errors] == ["a", "b"]
    assert tally.stored_despite_error == ["c"]


def test_a_row_keeps_the_time_the_prediction_was_made() -> None:
    late = T0 + timedelta(minutes=5)  # dated when it was flushed, not when it was made
    tally = reconcile("time", [answer("a", 202, {"id": None})], [row(1, "a", late)])
    assert len(tally.made_later) == 1 and tally.problems()
