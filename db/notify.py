"""Learn that the predictions changed, whoever changed them: PostgreSQL `LISTEN` on a connection of its own.

Several UI replicas share one database; each keeps a page feed and a read cache that only its own
writes would refresh. Migration 0006 makes every statement on `predictions` notify the channel
`predictions_changed` at commit, with the writer's `application_name` as the payload, and
`ChangeListener` turns those notifications into calls of a callback:

- on a dedicated connection, never one of the pool's (a pooled connection goes back to others
  after each statement, and LISTEN belongs to the session);
- coalesced: the first notification calls at once, a burst makes at most one more call per
  `coalesce_s` (100 ms), and the last one is never dropped;
- reconnecting with backoff (0.5 s doubling to 10 s) while the server is down, and calling once
  after every (re)connection, since changes made while nobody listened sent nothing;
- skipping notifications whose payload is `ignore_payload`: the replica's own pool connections,
  which already told the replica of their writes. Every other payload counts as a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

log = logging.getLogger(__name__)

CHANNEL = "predictions_changed"  # the channel of migrations/0006_notify.sql
LISTENER_NAME = "digit-classifier listener"  # its connection's application_name (pg_stat_activity)
CONNECT_TIMEOUT_S = 3
CHECK_S = 30.0  # no notification for this long: check that the connection still answers
CHECK_TIMEOUT_S = 5.0
MAX_NAME = 63  # PostgreSQL keeps the first 63 bytes of an application_name


def replica_name(prefix: str = "digit-classifier") -> str:
    """An application_name unique to this process: the random part tells apart two processes on
    one host (tests, Compose) or pods whose long names would be cut at 63 bytes."""
    name = f"{prefix} {secrets.token_hex(4)} {socket.gethostname()}"
    return name.encode()[:MAX_NAME].decode(errors="ignore")


def backoff_delays(first_s: float, max_s: float) -> Iterator[float]:
    """first_s, doubling up to max_s, then max_s forever (each with up to 10% jitter, so that the
    replicas of a restarted server do not all reconnect in the same instant)."""
    delay = first_s
    while True:
        yield delay * (1 + random.random() / 10)
        delay = min(delay * 2, max_s)


class Coalescer:
    """Calls `fn` at the first `poke`, then at most once per `window_s` while pokes keep coming.

    A poke during the window is not lost: `fn` runs again at the window's end. Must be poked from
    the event loop's thread.
    """

    def __init__(self, fn: Callable[[], None], window_s: float) -> None:
        self.fn = fn
        self.window_s = window_s
        self.calls = 0
        self._timer: asyncio.TimerHandle | None = None
        self._dirty = False

    def poke(self) -> None:
        if self._timer is not None:
            self._dirty = True
            return
        self._call()

    def _call(self) -> None:
        self._dirty = False
        self._timer = asyncio.get_running_loop().call_later(self.window_s, self._window_end)
        self.calls += 1
        try:
            self.fn()
        except Exception:  # a failing callback must not stop the listening
            log.exception("change callback failed")

    def _window_end(self) -> None:
        self._timer = None
        if self._dirty:
            self._call()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._dirty = False


class ChangeListener:
    """Calls `on_change` (sync, cheap) when the predictions changed; see the module docstring.

    `await start()` returns at once, even while the server is down; `await stop()` ends it.
    """

    def __init__(
        self,
        url: str,
        on_change: Callable[[], None],
        *,
        ignore_payload: str | None = None,
        coalesce_s: float = 0.1,
        first_retry_s: float = 0.5,
        max_retry_s: float = 10.0,
        check_s: float = CHECK_S,
    ) -> None:
        self.url = url
        self.ignore_payload = ignore_payload
        self.first_retry_s = first_retry_s
        self.max_retry_s = max_retry_s
        self.check_s = check_s
        self.notifications = 0  # received and not ignored (before coalescing)
        self.connections = 0  # successful LISTENs so far
        self._coalescer = Coalescer(on_change, coalesce_s)
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def calls(self) -> int:
        """How many times `on_change` was called."""
        return self._coalescer.calls

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    async def wait_listening(self, timeout: float) -> bool:
        """Whether it listens within `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout)
        return self.listening

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="database change listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._coalescer.cancel()
        self._listening.clear()

    async def _run(self) -> None:
        delays = backoff_delays(self.first_retry_s, self.max_retry_s)
        down_since_logged = False
        while True:
            try:
                async with await self._connect() as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.connections += 1
                    self._listening.set()
                    if down_since_logged:
                        log.info("listening for database changes again")
                    down_since_logged = False
                    delays = backoff_delays(self.first_retry_s, self.max_retry_s)
                    self._coalescer.poke()  # whatever changed while nobody listened sent nothing
                    await self._receive(conn)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if not down_since_logged:
                    log.warning("not listening for database changes (retrying): %s", _first_line(exc))
                    down_since_logged = True
            except Exception:  # a bug here must not end the listening for good
                log.exception("database change listener failed (retrying)")
            finally:
                self._listening.clear()
            await asyncio.sleep(next(delays))

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name=LISTENER_NAME
        )

    async def _receive(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Until the connection fails: a server that goes away ends `notifies` with an error, a
        silent network is caught by the check after `check_s` without notifications."""
        while True:
            async for notification in conn.notifies(timeout=self.check_s):
                if self.ignore_payload is None or notification.payload != self.ignore_payload:
                    self.notifications += 1
                    self._coalescer.poke()
            await asyncio.wait_for(conn.execute("SELECT 1"), CHECK_TIMEOUT_S)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
