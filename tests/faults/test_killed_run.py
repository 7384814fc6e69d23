"""The fault matrix, SIGKILL of the whole `make run` process group (as a killed terminal does) while
PostgreSQL is down, then `make run` again: the durable outbox under DATA_DIR is replayed, and every
202 is stored exactly once, also when the kill fell between PostgreSQL's commit and the outbox's
removal. Each run is its own here (this file runs first: the shared run of test_matrix.py is not up yet);
the checks at the end are those of test_matrix.py.
"""

from __future__ import annotations

import pytest

from tests.faults.checks import (
    BASE_REQUESTS,
    LIMIT,
    PHASE_TIMEOUT_S,
    assert_kept_every_promise,
    assert_nothing_left,
    settle,
)
from tests.faults.conftest import fault_scale
from tests.faults.harness import (
    CONCURRENCY,
    GONE_WITHIN_S,
    Load,
    StackDirs,
    commits_waiting,
    hold_commits,
    left_running,
    make_run,
    postgres_processes,
    release_commits,
    start_postgres,
    stop_postgres,
    stored_rows,
    wait_for,
)
from ui.service import stored_key

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(600 + 150 * fault_scale())]


# --- 1. SIGKILL the whole make run while the database is down, then start everything again -------------


def test_sigkill_of_make_run_while_the_database_is_down_loses_nothing(
    stack_dirs: StackDirs, digits, scale: int
) -> None:
    n, answers, gone = BASE_REQUESTS, [], []
    for cycle in range(scale):
        with make_run(stack_dirs) as stack:
            with Load(stack.url, digits, f"sigkill{cycle}", LIMIT) as load:
                load.wait(n // 4, "before", PHASE_TIMEOUT_S, status=201)
                stop_postgres(stack_dirs, "fast")
                load.phase = "during"
                load.wait(n // 2, "during", PHASE_TIMEOUT_S, status=202)
                stack_dirs.track()
                stack.kill_group()  # requests in flight lose their answer: allowed, counted
            answers += load.answers
        # The watchdogs stop TorchServe (its own process group); PostgreSQL is down already.
        gone.append(
            wait_for(
                lambda: not left_running(stack_dirs, timeout=0),
                GONE_WITHIN_S,
                lambda: "left running after the SIGKILL:\n" + "\n".join(left_running(stack_dirs, 0)),
            )
        )
        assert not postgres_processes(stack_dirs)
    with make_run(stack_dirs) as stack:  # everything again: the outbox under DATA_DIR is replayed
        with Load(stack.url, digits, "sigkill-restarted", LIMIT) as load:
            load.phase = "after"
            load.wait(n // 4, "after", PHASE_TIMEOUT_S, status=201)
        answers += load.answers
        tally = settle(stack, digits, answers, "SIGKILL make run, database down")
        tally.figures["everything gone after the SIGKILL in"] = ", ".join(f"{s:.1f} s" for s in gone)
        print(f"\nFAULTS {tally.summary()}", flush=True)
    assert tally.accepted >= scale * n // 2, tally.summary()
    assert_kept_every_promise(tally, no_answer_allowed=2 * CONCURRENCY * scale)
    assert_nothing_left(stack_dirs)


# --- 2. SIGKILL after PostgreSQL committed the outbox's rows, before the outbox heard of it ---------------


def test_sigkill_between_the_commit_and_the_outbox_removal_stores_once(
    stack_dirs: StackDirs, digits, scale: int
) -> None:
    """The narrowest window of the outbox: rows committed, not yet removed from the outbox, and the
    process killed. Held open on purpose: commits wait for a standby that does not exist, so the
    replay's first transaction is committed but never acknowledged; then SIGKILL. The next run
    replays the whole outbox: every 202 must still be stored once."""
    n, answers, committed_first = BASE_REQUESTS, [], []
    for cycle in range(scale):
        with make_run(stack_dirs) as stack:
            with Load(stack.url, digits, f"window{cycle}", LIMIT) as load:
                load.wait(n // 4, "before", PHASE_TIMEOUT_S, status=201)
                stop_postgres(stack_dirs, "fast")
                load.phase = "during"
                load.wait(n // 2, "during", PHASE_TIMEOUT_S, status=202)
            answers += load.answers  # the load is over: only the outbox's replay writes now
            hold_commits(stack_dirs)
            start_postgres(stack_dirs)
            wait_for(lambda: commits_waiting(stack_dirs) > 0, 60, "the outbox's replay never committed")
            stack_dirs.track()
            stack.kill_group()
        # The PostgreSQL watchdog stops the server: the waiting commit is kept, as by any shutdown.
        wait_for(lambda: not left_running(stack_dirs, timeout=0), GONE_WITHIN_S, "not stopped after SIGKILL")
        release_commits(stack_dirs)
        start_postgres(stack_dirs)  # only to look: which rows the replay committed before the kill
        queued = {stored_key(a.key) for a in answers if a.status == 202}
        committed_first.append(len(queued & {r.key for r in stored_rows(stack_dirs)}))
        stop_postgres(stack_dirs, "fast")
        assert committed_first[-1] > 0, "no row was committed before the SIGKILL: the window was missed"
    with make_run(stack_dirs) as stack:  # replays the whole outbox, committed rows included
        with Load(stack.url, digits, "window-restarted", LIMIT) as load:
            load.phase = "after"
            load.wait(n // 4, "after", PHASE_TIMEOUT_S, status=201)
        answers += load.answers
        tally = settle(stack, digits, answers, "SIGKILL between commit and outbox removal")
        tally.figures["committed before the SIGKILL, replayed again"] = ", ".join(map(str, committed_first))
        print(f"\nFAULTS {tally.summary()}", flush=True)
    assert_kept_every_promise(tally)
    assert_nothing_left(stack_dirs)
