"""The fault matrix, the faults the running app survives: `make run` for real (embedded PostgreSQL,
a supervised TorchServe, the UI) under a bounded load of tagged requests while each fault is
injected; then every answer is reconciled with the database. Every 201 and 202 has exactly one
row, none twice; the errors a fault causes are 503s with a JSON body (never the model server's
404, never a hang); nothing is left running at the end.

Each case runs `FAULTS_SCALE` cycles (1 in `make test`) of `BASE_REQUESTS` answers: a quarter
before the fault, half during it, a quarter after it (stored again: 201), then reconciles. The
cases share one `make run`, in this order, each starting from a ready app and reconciling only
the rows stored since it began: starting the stack is most of a case's time on 2 shared cores.
The run is the `shared` fixture (conftest.py), which test_page_loads.py uses next; SIGKILL of the
whole run needs runs of its own: test_killed_run.py.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from serving.supervisor import Backoff
from serving.torchserve import read_pid
from tests.faults.checks import (
    BASE_REQUESTS,
    LIMIT,
    PHASE_TIMEOUT_S,
    assert_kept_every_promise,
    ready_for_a_case,
    settle,
)
from tests.faults.conftest import fault_scale
from tests.faults.harness import (
    Load,
    Stack,
    java_frontend,
    model_workers,
    python_workers,
    readiness,
    start_postgres,
    stop_postgres,
    wait_for,
    wait_ready,
)
from tests.serving.test_supervisor import BACK_WITHIN_S

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(600 + 150 * fault_scale())]

JAVA_KILLS_AT_MOST = 4  # each after a healthy minute (the backoff's reset), so 4 even at FAULTS_SCALE=10


# --- 1. kill -9 a TorchServe Python worker -----------------------------------------------------------


def test_kill_9_of_a_torchserve_worker_loses_nothing(shared: Stack, digits, scale: int) -> None:
    stack, n, answers, replaced = shared, BASE_REQUESTS, [], []
    first = ready_for_a_case(stack)
    for cycle in range(scale):
        with Load(stack.url, digits, f"worker{cycle}", LIMIT) as load:
            load.wait(n // 4, "before", PHASE_TIMEOUT_S, status=201)
            workers = python_workers(stack.dirs)
            victim = workers[cycle % len(workers)]
            load.phase = "during"
            victim.kill()
            load.wait(n // 2, "during", PHASE_TIMEOUT_S)

            def replaced_by_torchserve(gone: int = victim.pid, count: int = len(workers)) -> bool:
                pids = {p.pid for p in python_workers(stack.dirs)}
                detail = model_workers(stack.url)
                return len(pids) == count and gone not in pids and detail.count("READY") == count

            replaced.append(wait_for(replaced_by_torchserve, 90, lambda: model_workers(stack.url)))
            load.phase = "after"
            load.wait(n // 4, "after", PHASE_TIMEOUT_S, status=201)
        answers += load.answers
        stack.dirs.track()
    tally = settle(stack, digits, answers, "kill -9 worker", first)
    tally.figures["worker replaced in"] = ", ".join(f"{s:.1f} s" for s in replaced)
    print(f"\nFAULTS {tally.summary()}", flush=True)
    assert_kept_every_promise(tally)


# --- 2. kill -9 TorchServe's Java frontend: the supervisor brings it back -------------------------------


def test_kill_9_of_the_java_frontend_is_restarted_within_30_s(shared: Stack, digits, scale: int) -> None:
    stack, n, answers, back, ready_again = shared, BASE_REQUESTS, [], [], []
    first = ready_for_a_case(stack)
    up_since = time.monotonic()  # no TorchServe restart before this case: the first kill is a first death
    for cycle in range(min(scale, JAVA_KILLS_AT_MOST)):
        if cycle:  # a kill within a minute of the last restart is a second death: a longer backoff
            time.sleep(max(0.0, Backoff().healthy_s + 1 - (time.monotonic() - up_since)))
        with Load(stack.url, digits, f"java{cycle}", LIMIT) as load:
            load.wait(n // 4, "before", PHASE_TIMEOUT_S, status=201)
            java, launcher = java_frontend(stack.dirs), read_pid(stack.dirs.torchserve)
            load.phase = "during"
            killed_at = datetime.now(UTC)
            java.kill()
            back.append(load.wait_first_after(killed_at, BACK_WITHIN_S + 30))
            up_since = time.monotonic()
            wait_ready(stack, 60)  # /readyz (and the page's banner) clear by themselves
            ready_again.append((datetime.now(UTC) - killed_at).total_seconds())
            assert read_pid(stack.dirs.torchserve) not in (None, launcher), "not a new TorchServe"
            load.phase = "after"
            load.wait(n // 4, "after", PHASE_TIMEOUT_S, status=201)
        answers += load.answers
        stack.dirs.track()
    assert "TorchServe is back (pid " in stack.output(), stack.output()
    tally = settle(stack, digits, answers, "kill -9 Java frontend", first)
    tally.figures["answered again after"] = ", ".join(f"{s:.1f} s" for s in back)
    tally.figures["/readyz ready after"] = ", ".join(f"{s:.1f} s" for s in ready_again)
    print(f"\nFAULTS {tally.summary()}", flush=True)
    assert all(s <= BACK_WITHIN_S for s in back), f"TorchServe back after {back} s (target {BACK_WITHIN_S} s)"
    assert tally.others, f"the kill caused no error at all: was it a fault? {tally.summary()}"
    assert_kept_every_promise(tally)


# --- 3. stop PostgreSQL (fast, immediate), start it again -----------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_stopped_and_started_again_loses_nothing(
    shared: Stack, digits, scale: int, mode: str
) -> None:
    stack, n, answers, stored_again = shared, BASE_REQUESTS, [], []
    first = ready_for_a_case(stack)
    for cycle in range(scale):
        with Load(stack.url, digits, f"pg-{mode}{cycle}", LIMIT) as load:
            load.wait(n // 4, "before", PHASE_TIMEOUT_S, status=201)
            stop_postgres(stack.dirs, mode)
            load.phase = "during"
            load.wait(n // 2, "during", PHASE_TIMEOUT_S, status=202)  # durably queued meanwhile
            start_postgres(stack.dirs)
            restarted = datetime.now(UTC)
            load.phase = "after"
            load.wait(n // 4, "after", PHASE_TIMEOUT_S, status=201)
            stored_again.append(load.wait_first_after(restarted, 0, status=201))
        answers += load.answers
    tally = settle(stack, digits, answers, f"PostgreSQL stop -m {mode}", first)
    tally.figures["201 again after the restart in"] = ", ".join(f"{s:.1f} s" for s in stored_again)
    print(f"\nFAULTS {tally.summary()}", flush=True)
    assert readiness(stack.url)["ready"]
    assert tally.accepted >= scale * n // 2, tally.summary()
    assert_kept_every_promise(tally)
