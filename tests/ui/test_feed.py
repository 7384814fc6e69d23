"""The history and statistics feed on its own: throttled loads, shared by every subscriber, retried."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from db.errors import DatabaseUnavailable
from db.records import PredictionRow
from db.stats import Stats, compute_stats
from ui.feed import PUSH_SHARE, Feed, Snapshot


@dataclass(eq=False)
class Source:
    """The service as the feed sees it: a version, two reads (counted, slow enough to overlap), listeners."""

    version: int = 0
    down: bool = False
    reads: Counter[str] = field(default_factory=Counter)
    listeners: list[Callable[[], None]] = field(default_factory=list)
    asked: list[set[int]] = field(default_factory=list)  # the ids of each history query

    async def recent(
        self, limit: int, before_id: int | None = None, *, ids: Collection[int] | None = None
    ) -> list[PredictionRow]:
        self.reads["recent"] += 1
        self.asked.append(set(ids or ()))
        await asyncio.sleep(0.01)
        if self.down:
            raise DatabaseUnavailable("database unavailable: connection refused")
        return [row(i) for i in sorted(ids or (), reverse=True)[:limit]]

    async def stats(self) -> Stats:
        self.reads["stats"] += 1
        await asyncio.sleep(0.01)
        if self.down:
            raise DatabaseUnavailable("database unavailable: connection refused")
        return compute_stats([("1.0", None, 1, self.version)] if self.version else [])

    def add_listener(self, fn: Callable[[], None]) -> Callable[[], None]:
        self.listeners.append(fn)
        return lambda: self.listeners.remove(fn)

    def change(self) -> None:
        self.version += 1
        for fn in self.listeners:
            fn()


def row(prediction_id: int) -> PredictionRow:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return PredictionRow(prediction_id, at, 1, 0.9, [0.1] * 10, "mnist", "1.0", 3.0, None, None, False)


def mine() -> set[int]:
    """The drawings of the subscribing page's browser."""
    return {1, 2}


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


@pytest.fixture
async def source() -> Source:
    return Source()


async def test_a_burst_of_changes_makes_one_load_for_every_subscriber(source: Source) -> None:
    feed = Feed(source, limit=10, interval_s=0.3)
    got: list[list[Snapshot]] = [[] for _ in range(5)]
    for inbox in got:
        feed.subscribe(inbox.append, mine)
    for _ in range(20):
        source.change()
    await eventually(lambda: all(inbox and inbox[-1].stats is not None for inbox in got))
    await eventually(lambda: all(inbox[-1].version == 20 for inbox in got))
    await asyncio.sleep(0.5)
    assert source.reads == {"recent": 1, "stats": 1}
    assert all(inbox[-1].stats.total == 20 for inbox in got if inbox[-1].stats)
    assert len({id(inbox[-1]) for inbox in got}) == 1  # the same snapshot object for all
    await feed.close()


async def test_changes_a_second_apart_each_load_once(source: Source) -> None:
    feed = Feed(source, limit=10, interval_s=0.2)
    seen: list[Snapshot] = []
    feed.subscribe(seen.append, mine)
    source.change()
    await eventually(lambda: bool(seen))
    source.change()
    source.change()  # within the interval: one more load, after it
    await eventually(lambda: seen[-1].version == 3)
    await asyncio.sleep(0.3)
    assert source.reads == {"recent": 2, "stats": 2}
    assert [s.seq for s in seen] == sorted({s.seq for s in seen})
    await feed.close()


async def test_nothing_is_loaded_without_subscribers(source: Source) -> None:
    feed = Feed(source, limit=10, interval_s=0.05)
    for _ in range(5):
        source.change()
    await asyncio.sleep(0.2)
    assert source.reads == {}
    unsubscribe = feed.subscribe(lambda _: None)
    assert feed.subscribers == 1
    unsubscribe()
    unsubscribe()  # idempotent
    assert feed.subscribers == 0
    source.change()
    await asyncio.sleep(0.2)
    assert source.reads == {}
    snapshot = await feed.current()  # the next page to open loads what changed meanwhile
    assert snapshot.version == 6 and snapshot.stats is not None and snapshot.stats.total == 6


async def test_concurrent_page_opens_share_one_load(source: Source) -> None:
    feed = Feed(source, limit=10)
    for _ in range(50):
        feed.subscribe(lambda _: None, mine)
    snapshots = await asyncio.gather(*(feed.current(mine()) for _ in range(50)))
    assert source.reads == {"recent": 1, "stats": 1}
    assert len({id(s) for s in snapshots}) == 1
    assert await feed.current(mine()) is snapshots[0]  # nothing changed: no query at all
    assert source.reads == {"recent": 1, "stats": 1}


async def test_a_cancelled_page_build_does_not_cancel_the_shared_load(source: Source) -> None:
    feed = Feed(source, limit=10)
    feed.subscribe(lambda _: None, mine)
    first = asyncio.ensure_future(feed.current(mine()))
    second = asyncio.ensure_future(feed.current(mine()))
    await asyncio.sleep(0)
    first.cancel()
    snapshot = await second
    assert snapshot.complete and source.reads == {"recent": 1, "stats": 1}


async def test_a_failed_load_is_retried_while_pages_wait(source: Source, caplog) -> None:
    feed = Feed(source, limit=10, interval_s=0.05, retry_s=0.2)
    source.down = True
    seen: list[Snapshot] = []
    feed.subscribe(seen.append, mine)
    snapshot = await feed.current(mine())
    assert snapshot.recent is None and snapshot.stats is None and not snapshot.complete
    assert "history not loaded" in caplog.text
    source.down = False  # back, with no change of data: the retry alone brings the data
    await eventually(lambda: bool(seen) and seen[-1].complete)
    reads = source.reads.copy()
    await asyncio.sleep(0.5)
    assert source.reads == reads  # complete: no more retries
    await feed.close()


async def test_a_broken_subscriber_does_not_stop_the_others(source: Source, caplog) -> None:
    feed = Feed(source, limit=10, interval_s=0.05)

    def broken(_: Snapshot) -> None:
        raise RuntimeError("a page that cannot render")

    seen: list[Snapshot] = []
    feed.subscribe(broken)
    feed.subscribe(seen.append)
    source.change()
    await eventually(lambda: bool(seen))
    assert "failed to show" in caplog.text
    await feed.close()


async def test_each_page_gets_only_its_own_rows_from_one_query(source: Source) -> None:
    feed = Feed(source, limit=3, interval_s=0.05)
    pages = {"a": {1, 2, 3, 4, 5}, "b": {7}, "c": set()}  # three browsers' drawings
    inboxes: dict[str, list[Snapshot]] = {name: [] for name in pages}
    for name, own in pages.items():
        feed.subscribe(inboxes[name].append, functools.partial(frozenset, own))
    source.change()
    await eventually(lambda: all(inboxes.values()))
    assert source.reads["recent"] == 1
    assert source.asked == [{3, 4, 5, 7}]  # the newest `limit` of each page's, together
    latest = inboxes["a"][-1]
    assert [r.id for r in latest.rows_for(pages["a"], 3)] == [5, 4, 3]
    assert [r.id for r in latest.rows_for(pages["b"], 3)] == [7]
    assert latest.rows_for(pages["c"], 3) == []
    assert latest.covers(pages["a"], 3) and not latest.covers({9}, 3)
    before = source.reads["recent"]
    await feed.current({9})  # a page just opened with a drawing the snapshot lacks: loaded
    assert source.reads["recent"] == before + 1
    await feed.close()


async def test_no_history_query_when_no_page_has_drawings(source: Source) -> None:
    feed = Feed(source, limit=10, interval_s=0.05)
    seen: list[Snapshot] = []
    feed.subscribe(seen.append)
    source.change()
    await eventually(lambda: bool(seen))
    assert source.reads == {"stats": 1} and seen[-1].recent == ()
    await feed.close()


async def test_pushes_slow_down_when_they_cost_much(source: Source) -> None:
    """Hundreds of tabs: the pause between pushes grows with what the last push cost (PUSH_SHARE)."""
    feed = Feed(source, limit=10, interval_s=0.01)
    loads: list[float] = []

    def slow_page(snapshot: Snapshot) -> None:
        loads.append(time.monotonic())
        time.sleep(0.05)  # a page that takes 50 ms to render

    feed.subscribe(slow_page, mine)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # a change every 10 ms
        source.change()
        await asyncio.sleep(0.01)
    await feed.close()
    gaps = [b - a for a, b in itertools.pairwise(loads)]
    assert len(loads) >= 3 and min(gaps) >= 0.05 / PUSH_SHARE * 0.9, gaps
