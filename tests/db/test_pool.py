"""The connection pool under cancellation, against a real PostgreSQL.

NiceGUI cancels a page build that takes too long, so store calls get cancelled at any point:
waiting for a connection, in the query, while giving the connection back. Cancellations that land
inside psycopg_pool's getconn()/putconn() used to lose connections until the pool had none left.
This test makes it happen: hundreds of calls, each with a short random timeout, while the test
itself loads the CPU (a busy thread takes the GIL from the event loop at random moments, a busy
process takes a core), then checks that every connection is back and a write succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from db.errors import DatabaseUnavailable
from db.records import PoolHealth
from db.store import Store
from tests.db.samples import prediction

CALLS = 400  # concurrent store calls per run
RUNS = 10  # the target: 10 runs in a row
TIMEOUT_S = 0.4  # the longest of the random timeouts (most are far shorter)
PRESSURE_S = 15.0  # the CPU load stops by itself after this, whatever happens to the test
SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def cpu_pressure(seconds: float = PRESSURE_S) -> Iterator[None]:
    """A busy thread in this process and a busy process, for at most `seconds`."""
    stop = threading.Event()
    deadline = time.monotonic() + seconds

    def spin() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            sum(range(2_000))

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    spinner = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)])
    try:
        yield
    finally:
        stop.set()
        thread.join()
        spinner.kill()
        spinner.wait()


async def settled(store: Store, seconds: float = 10.0) -> PoolHealth:
    """The pool's health once every connection is idle again, or as it is after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        health = store.pool_health()
        if (health.idle == health.size and health.waiting == 0) or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.05)


async def _cancelled_calls(store: Store, ids: list[int], rng: random.Random) -> Counter[str]:
    async def export() -> None:
        async for _ in store.labelled(batch_size=1):
            pass

    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.recent(limit=20),
        store.stats,
        lambda: store.get(rng.choice(ids)),
        store.ping,
        lambda: store.image_png(rng.choice(ids)),
        lambda: store.find_by_key("k0"),
        lambda: store.set_label(rng.choice(ids), rng.randrange(10)),
        lambda: store.record_prediction(prediction(seed=rng.randrange(1000))),
        export,
    ]

    async def one() -> str:
        await asyncio.sleep(rng.uniform(0, 0.3))  # waves: some start while others give connections back
        call = rng.choice(calls)
        # Most calls get a short timeout, a few a long one: those must get through the crowd.
        timeout = TIMEOUT_S * rng.random() ** 2 if rng.random() < 0.9 else 10.0
        try:
            await asyncio.wait_for(call(), timeout)
        except TimeoutError:
            return "cancelled"
        except DatabaseUnavailable:
            return "no connection in time"
        return "done"

    return Counter(await asyncio.gather(*(one() for _ in range(CALLS))))


@pytest.mark.slow
@pytest.mark.parametrize("run", range(RUNS))
async def test_cancelled_callers_give_every_connection_back(db_url: str, run: int) -> None:
    rng = random.Random(run)
    store = await Store.open(db_url, max_size=4, timeout=1.0)
    try:
        ids = [await store.record_prediction(prediction(seed=i, key=f"k{i}")) for i in range(5)]
        await store.set_label(ids[0], 3)
        with cpu_pressure():
            outcomes = await _cancelled_calls(store, ids, rng)
        assert outcomes["cancelled"] >= CALLS // 4, outcomes  # the test did cancel calls mid-way
        assert outcomes["done"] >= 10, outcomes  # ... and others went through
        health = await settled(store)
        assert health.idle == health.size >= 1, f"connections lost: {health} after {dict(outcomes)}"
        assert health.waiting == 0 and health.exhausted_for_s == 0, health
        pid = await asyncio.wait_for(store.record_prediction(prediction(seed=999)), 10)
        assert (await asyncio.wait_for(store.get(pid), 10)).id == pid
    finally:
        await store.close()


async def test_pool_health_tells_how_long_the_pool_has_been_exhausted(db_url: str) -> None:
    store = await Store.open(db_url, max_size=2, timeout=0.5)
    try:
        for i in range(2):
            await store.set_label(await store.record_prediction(prediction(seed=i)), i)
        assert store.pool_health().exhausted_for_s == 0
        # Two exports stopped half-way hold both connections.
        holders = [store.labelled(batch_size=1) for _ in range(2)]
        for rows in holders:
            await anext(rows)
        health = store.pool_health()
        assert (health.size, health.idle, health.exhausted_for_s) == (2, 0, 0)  # busy, nobody waiting
        waiter = asyncio.create_task(store.stats())
        await asyncio.sleep(0.3)
        health = store.pool_health()
        assert health.waiting >= 1 and health.exhausted_for_s > 0.2, health
        with pytest.raises(DatabaseUnavailable):
            await waiter  # the pool timeout
        await asyncio.sleep(0.3)
        # Nobody waits now, but no connection came back since the caller gave up: still exhausted.
        assert store.pool_health().exhausted_for_s > 0.5
        for rows in holders:
            await rows.aclose()
        health = await settled(store)
        assert health.idle == health.size == 2 and health.exhausted_for_s == 0
        assert (await store.stats()).labelled == 2
        assert store.pool_health().exhausted_for_s == 0
    finally:
        await store.close()
