"""Issue 11, item 1, at the page level: 1,000 page loads 50 at a time, given up quickly, while the
test loads the CPU, must leave the running app's connection pool whole (every connection back,
`/readyz` ready) and a POST must store its row.

The app is `make run` for real. Every other page that loads also opens its websocket as the
page's script does (the socket.io handshake of `bench/support/page_clients.py`), which makes the server
load history and statistics for it, and drops it a moment later: the database work a tab costs,
abandoned at random points. The rest are loads that never connect (the client gave up). It used
to break the pool for good, 3 runs out of 3, once two copies of the app loaded these 2 cores.
`FAULTS_SCALE` rounds in a row (10 for the issue's target) on the same app: the run test_matrix.py
broke and healed before (the `shared` fixture), or a fresh one when this file runs alone. What is
left running is checked when that run stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
import urllib.parse
import uuid
from collections import Counter

import aiohttp
import httpx
import psutil
import pytest
import socketio  # type: ignore[import-untyped]  # python-socketio ships no type information

from bench.support.page_clients import SOCKET_PATH, socket_query
from tests.db.test_pool import cpu_pressure
from tests.faults.checks import ready_for_a_case
from tests.faults.conftest import fault_scale
from tests.faults.harness import (
    Answer,
    Load,
    Stack,
    pool_whole,
    post,
    readiness,
    reconcile,
    stored_rows,
    wait_drained,
    wait_for,
)
from ui.service import stored_key

ROUNDS = min(fault_scale(), 10)  # the target: 10 rounds in a row
pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300 + 900 * ROUNDS)]

PAGE_LOADS = 1_000  # per round at FAULTS_SCALE >= 7; 150 in make test (the server builds every one)
CI_PAGE_LOADS = 150
AT_ONCE = 50
PAGE_TIMEOUT_S = 1.0  # most clients give up on the page after a random time up to this ...
PATIENT_S = 60.0  # ... one in ten waits this long: those get through the crowd, connect and load data
PATIENT_SHARE = 0.1
TAB_TIMEOUT_S = 5.0  # the websocket handshake is given up after this
TAB_OPEN_S = 0.3  # a connected tab is dropped after up to this long
PRESSURE_S = 600.0  # the CPU load stops by itself after this, whatever happens to the test
LOAD_LIMIT = 2_000  # tagged POSTs per round at most, alongside the page loads
# Every connection is back within this once the loads are over. The server first finishes building
# and sending the pages whose clients gave up (it builds every page it was asked for): on these 2
# busy cores, up to about a third of a second each.
SETTLE_S_PER_PAGE = 0.5
SEEDED = 30  # rows in the database before the loads, so that history has something to load
GAVE_UP = re.compile(r"not ready after|was cancelled|client was deleted")


async def one_page(http: aiohttp.ClientSession, url: str, connect: bool, rng: random.Random) -> str:
    """Load `GET /`, maybe open its websocket and drop it; what happened, in a word or three."""
    timeout = PATIENT_S if rng.random() < PATIENT_SHARE else PAGE_TIMEOUT_S * rng.random()
    try:
        async with asyncio.timeout(timeout), http.get(f"{url}/") as response:
            status, html = response.status, await response.text()
    except TimeoutError:
        return "page given up"
    except aiohttp.ClientError as exc:
        return f"page failed: {type(exc).__name__}"
    if status != 200:
        return f"page {status}"
    if not connect:
        return "page loaded, never connected"
    tab = socketio.AsyncClient(reconnection=False, http_session=http)
    try:
        async with asyncio.timeout(TAB_TIMEOUT_S):
            await tab.connect(
                f"{url}/?{urllib.parse.urlencode(socket_query(html))}",
                socketio_path=SOCKET_PATH,
                transports=["websocket"],
                wait_timeout=TAB_TIMEOUT_S,
            )
            await asyncio.sleep(rng.uniform(0, TAB_OPEN_S))
        return "tab connected, then closed"
    except (TimeoutError, socketio.exceptions.ConnectionError):
        return "tab given up"
    finally:
        with contextlib.suppress(TimeoutError, aiohttp.ClientError, socketio.exceptions.SocketIOError):
            await asyncio.wait_for(tab.disconnect(), 5)


async def page_loads(url: str, count: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(AT_ONCE)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one(i: int) -> str:
            async with gate:
                return await one_page(http, url, connect=i % 2 == 0, rng=rng)

        return Counter(await asyncio.gather(*(one(i) for i in range(count))))


def a_post_stores_its_row(stack: Stack, image: bytes) -> Answer:
    """One tagged POST: 201, and its row is there, found by its key."""
    key = f"after-page-loads-{uuid.uuid4().hex}"
    with httpx.Client() as client:
        answer = post(client, stack.url, image, key, 0, "after")
    assert answer.status == 201, f"{answer.status} {answer.body or answer.error}"
    rows = [r for r in stored_rows(stack.dirs) if r.key == stored_key(key)]
    assert [r.id for r in rows] == [answer.body["id"]], rows
    return answer


def test_page_loads_given_up_under_cpu_pressure_leave_the_pool_whole(shared: Stack, digits) -> None:
    stack, rounds, pages = shared, ROUNDS, min(PAGE_LOADS, CI_PAGE_LOADS * fault_scale())
    first = ready_for_a_case(stack)
    answers: list[Answer] = []  # every tagged POST of the test, reconciled after each round
    with httpx.Client() as client:
        for i in range(SEEDED):
            answers.append(post(client, stack.url, digits[i % len(digits)], f"seed-{i}", i, "before"))
            assert answers[-1].status == 201, answers[-1]
    for run in range(rounds):
        began = time.monotonic()
        # Predictions keep coming meanwhile: each changes the data, so connected tabs get pushed
        # fresh history and statistics (queries) while others are dropped.
        with cpu_pressure(PRESSURE_S), Load(stack.url, digits, f"pages{run}", LOAD_LIMIT) as load:
            load.phase = "during"
            outcomes = asyncio.run(asyncio.wait_for(page_loads(stack.url, pages, run), PRESSURE_S))
        took = time.monotonic() - began
        given_up = outcomes["page given up"] + outcomes["tab given up"]
        connected = outcomes["tab connected, then closed"]
        assert given_up >= pages // 10, f"the clients did not give up on pages: {dict(outcomes)}"
        assert connected >= 5, f"hardly any tab connected: {dict(outcomes)}"
        settle_s = wait_for(
            lambda: pool_whole(stack.url),
            max(60.0, SETTLE_S_PER_PAGE * pages),
            f"connections not back (or /readyz not answering) after {dict(outcomes)}",
        )
        ready = readiness(stack.url)
        assert ready["ready"] and ready["pool"]["ready"] and ready["database"]["ready"], ready
        answers += load.answers
        answers.append(a_post_stores_its_row(stack, digits[run % len(digits)]))
        wait_drained(stack, answers)
        # Overloaded by page builds, the app may answer a POST later than the client waits (a
        # client timeout, counted): what it answered 201/202 must still be there, once.
        rows = stored_rows(stack.dirs, first)
        tally = reconcile(f"POSTs during page loads, round {run + 1}", answers, rows)
        assert not tally.problems(), tally.summary()
        gave_up_server = len(GAVE_UP.findall(stack.output()))
        resident_mb = psutil.Process(stack.pid).memory_info().rss / 1e6  # `make run`: the UI is in it
        print(
            f"\nFAULTS page loads round {run + 1}/{rounds} ({took:.0f} s): {dict(outcomes)}; pool whole "
            f"{settle_s:.1f} s after ({ready['pool']['detail']}); NiceGUI gave up on {gave_up_server} "
            f"page builds so far; a POST after it stored row {answers[-1].body['id']}; the app's "
            f"resident memory {resident_mb:.0f} MB\n"
            f"FAULTS {tally.summary()}",
            flush=True,
        )
