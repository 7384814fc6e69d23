"""History and statistics pushed to every open page: one query of each per change, for all tabs.

With a query per tab per change, 200 open tabs cut the API from 80 to 10.5 requests/s. Here one
`Feed` per service listens to the service's changes and, at most every `interval_s`, loads the
statistics once and the history rows of every subscribed page at once (each page shows only the
drawings its browser made: it subscribes with their ids, and one query fetches the newest `limit`
of each page's ids together), then hands the same `Snapshot` to every subscribed page, which
re-renders its own rows from it without a query. Nothing is loaded while no page is subscribed; a
load that fails (database down) is retried every `retry_s` while pages wait for it. Pages subscribe
when their browser connects and unsubscribe when it goes, so the feed holds only open tabs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from db.errors import StoreError
from db.records import PredictionRow
from db.stats import Stats

log = logging.getLogger(__name__)

T = TypeVar("T")
Subscriber = Callable[["Snapshot"], None]
OwnIds = Callable[[], Collection[int]]  # the ids of the drawings a page's browser made
MAX_PAGE = 500  # the store's largest page: ids asked for per query
# At most this share of the time goes to pushing (hundreds of tabs: each costs a few ms per push):
# the pause between pushes grows with what the last one cost, so the API keeps the rest.
PUSH_SHARE = 0.2
MAX_IDS = 20_000  # ids asked for in one load, whatever the number of tabs (the newest kept)


class FeedSource(Protocol):
    """What the feed needs of `PredictionService`."""

    @property
    def version(self) -> int: ...

    async def recent(
        self, limit: int, before_id: int | None = None, *, ids: Collection[int] | None = None
    ) -> list[PredictionRow]: ...

    async def stats(self) -> Stats: ...

    def add_listener(self, fn: Callable[[], None]) -> Callable[[], None]: ...


@dataclass(frozen=True)
class Snapshot:
    """The data every page shows, as loaded once for all of them."""

    seq: int  # loads are numbered: a page never replaces a newer snapshot with an older one
    version: int  # the service's version when the load began
    recent: tuple[PredictionRow, ...] | None  # the pages' rows, newest first; None: unreachable
    stats: Stats | None  # None: unreachable
    asked: frozenset[int] = frozenset()  # the ids the rows were loaded for

    @property
    def complete(self) -> bool:
        return self.recent is not None and self.stats is not None

    def covers(self, ids: Collection[int], limit: int) -> bool:
        """Whether the rows were loaded for (at least) the newest `limit` of `ids`."""
        return self.asked.issuperset(newest(ids, limit))

    def rows_for(self, ids: Collection[int], limit: int) -> list[PredictionRow]:
        """One page's first history page: its own rows, newest first."""
        own = ids if isinstance(ids, set | frozenset) else set(ids)
        return [row for row in self.recent or () if row.id in own][:limit]


def newest(ids: Collection[int], limit: int) -> list[int]:
    return sorted(ids, reverse=True)[:limit]


class Feed:
    """Loads snapshots on changes (throttled) and pushes them to subscribers."""

    def __init__(
        self, source: FeedSource, *, limit: int, interval_s: float = 1.0, retry_s: float = 5.0
    ) -> None:
        # Weak: the service holds the feed (through its listener), not the other way round, so a
        # service and its feed go together (the registry below is keyed weakly by the service).
        self._source = weakref.ref(source)
        self.limit = limit
        self.interval_s = interval_s
        self.retry_s = retry_s
        self.latest: Snapshot | None = None
        self._subscribers: dict[int, tuple[Subscriber, OwnIds]] = {}
        self._ids = itertools.count()
        self._seq = itertools.count(1)
        self._dirty = False
        self._wake = asyncio.Event()
        self._last_load = -float("inf")
        self._publish_s = 0.0  # what the last push to every page cost
        self._loading: asyncio.Task[Snapshot] | None = None
        self._pump: asyncio.Task[None] | None = None
        source.add_listener(self.changed)

    @property
    def source(self) -> FeedSource:
        source = self._source()
        if source is None:
            raise RuntimeError("the service of this feed is gone")
        return source

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self, fn: Subscriber, own_ids: OwnIds = frozenset) -> Callable[[], None]:
        """Call `fn(snapshot)` after each new load, with the rows of `own_ids()` (read at each load) in
        it; returns the function that unsubscribes (idempotent)."""
        key = next(self._ids)
        self._subscribers[key] = (fn, own_ids)
        if self.latest is not None and not self.latest.complete:
            self._start_pump()  # a page waits for data the last load could not get: retry

        def unsubscribe() -> None:
            self._subscribers.pop(key, None)

        return unsubscribe

    async def current(self, own_ids: Collection[int] = ()) -> Snapshot:
        """The latest snapshot, loaded (once for all callers) if the data changed since, it failed, or
        it lacks the rows of `own_ids` (a page just subscribed with them)."""
        latest = self.latest
        if (
            latest is not None
            and latest.complete
            and latest.version == self.source.version
            and latest.covers(own_ids, self.limit)
        ):
            return latest
        # Shielded: a caller cancelled while waiting (a page build given up) must not cancel the shared
        # load in the middle of a query.
        return await asyncio.shield(self._load_shared())

    def changed(self) -> None:
        """The service's listener: the data changed (called synchronously, must be cheap)."""
        self._dirty = True
        self._wake.set()
        if self._subscribers:
            self._start_pump()

    def _start_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = spawn(self._run(), "history and statistics feed")

    async def _run(self) -> None:
        while self._subscribers:
            if not self._dirty:
                if self.latest is not None and self.latest.complete:
                    return
                self._wake.clear()  # the last load failed: again after retry_s, or at the next change
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.retry_s)
                if not self._subscribers:
                    return
            gap = max(self.interval_s, self._publish_s / PUSH_SHARE)
            delay = self._last_load + gap - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # throttled: a burst of changes makes one load
            self._dirty = False
            snapshot = await self._load_shared()
            if snapshot.version != self.source.version:
                self._dirty = True  # it began before the latest change (a load shared with `current`)
            began = time.monotonic()
            await self._publish(snapshot)
            self._publish_s = time.monotonic() - began

    def _load_shared(self) -> asyncio.Task[Snapshot]:
        if self._loading is None or self._loading.done():
            self._last_load = time.monotonic()
            self._loading = spawn(self._load(), "history and statistics load")
        return self._loading

    async def _load(self) -> Snapshot:
        source = self.source
        version, seq = source.version, next(self._seq)
        recent: tuple[PredictionRow, ...] | None = None
        stats: Stats | None = None
        asked = self.asked()
        try:
            recent = tuple(await self._rows(source, asked))
        except StoreError as exc:
            log.warning("history not loaded: %s", exc)
        try:
            stats = await source.stats()
        except StoreError as exc:
            log.warning("statistics not loaded: %s", exc)
        snapshot = Snapshot(seq, version, recent, stats, asked)
        if self.latest is None or snapshot.seq > self.latest.seq:
            self.latest = snapshot
        if not snapshot.complete and self._subscribers:
            self._start_pump()  # pages wait for what could not be loaded: retry
        return snapshot

    def asked(self) -> frozenset[int]:
        """The newest `limit` ids of every subscribed page, together (at most MAX_IDS)."""
        ids: set[int] = set()
        for _, own_ids in list(self._subscribers.values()):
            ids.update(newest(own_ids(), self.limit))
        return frozenset(newest(ids, MAX_IDS))

    async def _rows(self, source: FeedSource, asked: frozenset[int]) -> list[PredictionRow]:
        """The rows of `asked`: one query per MAX_PAGE ids (one for up to 25 tabs of 20)."""
        ordered, rows = newest(asked, len(asked)), []
        for start in range(0, len(ordered), MAX_PAGE):
            chunk = ordered[start : start + MAX_PAGE]
            rows += await source.recent(len(chunk), ids=chunk)
        return rows

    async def close(self) -> None:
        """Stop loading and pushing (the app's end; tests)."""
        self._subscribers.clear()
        for task in (self._pump, self._loading):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _publish(self, snapshot: Snapshot) -> None:
        for key, (fn, _) in list(self._subscribers.items()):
            if key not in self._subscribers:
                continue  # the tab closed meanwhile
            try:
                fn(snapshot)
            except Exception:  # one broken page must not keep the others from their data
                log.exception("a page failed to show the latest history and statistics")
            await asyncio.sleep(0)  # hundreds of tabs: let API requests in between


def spawn(coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """A task whose failure is logged (a bug here must not pass silently)."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())


_feeds: weakref.WeakKeyDictionary[FeedSource, Feed] = weakref.WeakKeyDictionary()


def feed_for(source: FeedSource, *, limit: int) -> Feed:
    """The one feed of a service (made on first use, by the first page that opens)."""
    feed = _feeds.get(source)
    if feed is None:
        feed = _feeds[source] = Feed(source, limit=limit)
    return feed
