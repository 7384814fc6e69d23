"""Run a coroutine so that cancelling the caller cannot interrupt it half-way; `Handover` uses it.

The store and the registry take and give back pool connections this way (`Handover`): a
cancellation landing inside psycopg_pool's `getconn()` or `putconn()` can lose the connection
(psycopg issues #1208, #1275, #1345; NiceGUI cancels page builds that time out). A task of
its own would do, but costs a task and two turns of the event loop on every call; most pool
operations finish without ever waiting (an idle connection, a free lock), so the first step runs
at once, in the caller, where no cancellation can land, and only a coroutine that really has to
wait continues in a task, as `asyncio.eager_task_factory` (Python 3.12) would start it.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

T = TypeVar("T")
log = logging.getLogger(__name__)


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


class Handover:
    """Takes connections from a pool and gives them back so that no cancellation loses one.

    `take()` may be given the coroutine that takes one (the store's, which also times the wait);
    by default the pool's `getconn()`. `settle()` waits for what is still under way (at close).
    """

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool
        self._background: set[asyncio.Future[Any]] = set()  # connections being taken or given back

    async def take(
        self, taking: Callable[[], Coroutine[Any, Any, AsyncConnection[Any]]] | None = None
    ) -> AsyncConnection[Any]:
        """A connection; if the caller is cancelled while the pool hands one over, it goes back once taken."""
        future = self._detach((taking or self.pool.getconn)())
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._give_back_taken)
            raise

    async def give_back(self, conn: AsyncConnection[Any]) -> None:
        """`putconn`: the connection is back in the pool even if the caller is cancelled meanwhile."""
        await asyncio.shield(self._detach(self.pool.putconn(conn)))

    async def settle(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)

    def _give_back_taken(self, taking: asyncio.Future[AsyncConnection[Any]]) -> None:
        if not taking.cancelled() and taking.exception() is None:
            self._detach(self.pool.putconn(taking.result()))

    def _detach(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        future = detach(coro)
        if not future.done():  # a task: the loop keeps only a weak reference to it
            self._background.add(future)
            future.add_done_callback(self._done_in_background)
        return future

    def _done_in_background(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        exc = None if future.cancelled() else future.exception()  # retrieved: no "never retrieved" noise
        if exc is not None and not isinstance(exc, psycopg.Error):  # database errors reach the caller
            log.warning("taking or giving back a connection failed: %r", exc)
