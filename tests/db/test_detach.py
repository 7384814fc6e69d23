"""`db.detach`: coroutines the caller's cancellation cannot interrupt; no task when they never wait."""

from __future__ import annotations

import asyncio

import pytest

from db.detach import detach


async def test_a_coroutine_that_never_waits_runs_at_once_without_a_task() -> None:
    steps: list[str] = []

    async def quick() -> int:
        steps.append("ran")
        return 7

    tasks_before = len(asyncio.all_tasks())
    future = detach(quick())
    assert steps == ["ran"] and future.done() and future.result() == 7
    assert len(asyncio.all_tasks()) == tasks_before
    assert await asyncio.shield(future) == 7


async def test_a_failure_in_the_first_step_is_the_futures() -> None:
    async def broken() -> None:
        raise ValueError("nope")

    future = detach(broken())
    assert future.done()
    with pytest.raises(ValueError, match="nope"):
        await future


async def test_a_coroutine_that_waits_finishes_even_if_the_caller_is_cancelled() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def slow() -> str:
        steps.append("first")
        value = await gate  # values and results pass through unchanged
        await asyncio.sleep(0)  # a bare yield to the loop, too
        steps.append(f"got {value}")
        return value.upper()

    future = detach(slow())
    assert steps == ["first"] and not future.done()

    async def caller() -> str:
        return await asyncio.shield(future)

    waiting = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    gate.set_result("ok")
    assert await asyncio.wait_for(future, 5) == "OK"
    assert steps == ["first", "got ok"]


async def test_errors_after_waiting_and_cancelling_the_task_itself_reach_the_coroutine() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def fails_later() -> None:
        await gate
        raise KeyError("later")

    failing = detach(fails_later())
    gate.set_result(None)
    with pytest.raises(KeyError, match="later"):
        await failing

    cleaned: list[str] = []

    async def waits_forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("finally ran")

    task = detach(waits_forever())
    await asyncio.sleep(0)
    task.cancel()  # e.g. the loop shutting down: the coroutine gets the CancelledError
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally ran"]
