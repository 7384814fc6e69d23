"""What every case of the fault matrix checks at its end, and the load each case sends: shared by
test_matrix.py (faults the running app survives) and test_killed_run.py (SIGKILL of the whole run)."""

from __future__ import annotations

from collections.abc import Sequence

from tests.faults.harness import (
    Answer,
    Stack,
    StackDirs,
    Tally,
    last_row_id,
    left_running,
    reconcile,
    retry_some,
    stored_rows,
    wait_drained,
    wait_ready,
)

BASE_REQUESTS = 200  # answers per cycle: 1/4 before the fault, 1/2 during, 1/4 after
LIMIT = 10 * BASE_REQUESTS  # requests per cycle at most: 40 s of load, whatever happens
PHASE_TIMEOUT_S = 120.0
RETRIES = 20  # accepted requests posted again with the same key (202s first)
READY_AGAIN_S = 120.0  # the shared run must be ready at the start of each case (after the last fault)


def settle(
    stack: Stack, digits: Sequence[bytes], answers: list[Answer], case: str, after_id: int = 0
) -> Tally:
    """Wait until everything accepted is stored, retry some keys, reconcile the rows stored since
    `after_id` (the case's own), and note the figures."""
    drain_s = wait_drained(stack, answers)
    before = stored_rows(stack.dirs, after_id)
    retried = retry_some(stack.url, digits, answers, RETRIES)
    after = stored_rows(stack.dirs, after_id)
    assert after == before, f"{case}: a retry with the same Idempotency-Key stored a row"
    again = reconcile(f"{case} retries", retried, after)
    assert not again.lost and not again.wrong_id, again.problems()
    tally = reconcile(case, answers, after)
    tally.figures["outbox drained in"] = f"{drain_s:.1f} s"
    tally.figures["retries"] = f"{len(retried)} (201: {sum(a.status == 201 for a in retried)})"
    return tally


def assert_kept_every_promise(tally: Tally, no_answer_allowed: int = 0) -> None:
    assert not tally.problems(), f"{tally.summary()}\n" + "\n".join(tally.problems())
    assert tally.no_answer <= no_answer_allowed, tally.summary()
    assert tally.created + tally.accepted >= BASE_REQUESTS // 2, tally.summary()


def assert_nothing_left(dirs: StackDirs) -> None:
    left = left_running(dirs)
    assert not left, "left running:\n" + "\n".join(left)


def ready_for_a_case(stack: Stack) -> int:
    """The shared run ready again (model, database, pool) after the case before; the last row id
    (the case reconciles the rows after it)."""
    wait_ready(stack, READY_AGAIN_S)
    stack.dirs.track()
    return last_row_id(stack.dirs)
