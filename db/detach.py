"""Run a coroutine so that cancelling the caller cannot interrupt it half-way.

The store takes and gives back pool connections this way: a cancellation landing inside
psycopg_pool's `getconn()` or `putconn()` can lose the connection (see `db/store.py`). A task of
its own would do, but costs a task and two turns of the event loop on every call; most pool
operations finish without ever waiting (an idle connection, a free lock), so the first step runs
at once, in the caller, where no cancellation can land, and only a coroutine that really has to
wait continues in a task, as `asyncio.eager_task_factory` (Python 3.12) would start it.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def detach(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Start `coro` now; return a future of its result that the caller's cancellation does not reach.

    Await it through `asyncio.shield`. Already done when `coro` finished in its first step (no task
    created); otherwise the rest runs in a task, which the caller must keep a reference to.
    """
    loop = asyncio.get_running_loop()
    try:
        pending = coro.send(None)
    except StopIteration as stop:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except Exception as exc:
        failed: asyncio.Future[T] = loop.create_future()
        failed.set_exception(exc)
        return failed
    return loop.create_task(_finish(coro, pending))


async def _finish(coro: Coroutine[Any, Any, T], pending: Any) -> T:
    result: T = await _resume(coro, pending)
    return result


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], pending: Any) -> Generator[Any, Any, T]:
    """The rest of `coro`, which has yielded `pending` (a future to wait for, or None) to its first step:
    hand each yield up to the task running this, and what the task sends or throws back down."""
    while True:
        try:
            sent = yield pending
        except BaseException as exc:  # e.g. the task was cancelled: `coro` decides what happens
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                result: T = stop.value
                return result
        else:
            try:
                pending = coro.send(sent)
            except StopIteration as stop:
                value: T = stop.value
                return value
