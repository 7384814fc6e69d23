"""Open browser tabs without browsers: page clients that load `GET /` and keep NiceGUI's websocket.

`python bench/support/page_clients.py URL --tabs 200` (run by bench/soak.py in its own process, so
that decoding the pushes does not take the load generator's interpreter lock; not a benchmark itself:
`make bench` runs only the files directly in bench/).

A page client is what a tab is to the server: it loads the page (the server builds a `DigitPage`
for it), then connects the socket.io websocket at `/_nicegui_ws/socket.io` with the query the
page's script sends (`client_id`, `next_message_id` and `implicit_handshake` from the page, plus a
`document_id` and a `tab_id` of its own), receives every `update` the server pushes, and
acknowledges them every 3 s as NiceGUI's script does (so the server prunes its message history).

Driven by lines on stdin, answered by one JSON line each on stdout:
`mark` (count updates from now on), `count` (connected tabs, tabs updated since the mark, updates
and bytes received), `close` (disconnect every tab and exit). End of stdin closes too, so the
process never outlives the benchmark.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import logging
import re
import sys
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import socketio  # type: ignore[import-untyped]  # python-socketio ships no type information

SOCKET_PATH = "/_nicegui_ws/socket.io"
# Why a socket ended, on stderr: the engine.io client says it at INFO ("... aborting") or WARNING.
ENDINGS = ("aborting", "failed", "closed")
ACK_INTERVAL_S = 3.0  # nicegui.js: setInterval(() => ack(), 3000)
# The page's own socket.io query, a Python dict literal in the HTML: `query: {'client_id': ...},`
QUERY = re.compile(r"^\s*query: (\{.*\}),\s*$", re.MULTILINE)


def socket_query(html: str) -> dict[str, str]:
    """What nicegui.js sends when it connects: the page's query plus a new document and tab id."""
    match = QUERY.search(html)
    if match is None:
        raise ValueError("no socket.io query in the page (not a NiceGUI page?)")
    query: dict[str, Any] = ast.literal_eval(match.group(1))
    query.update(document_id=str(uuid.uuid4()), tab_id=str(uuid.uuid4()))
    # socket.io-client encodes the values as JavaScript prints them: true, not True.
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in query.items()}


@dataclass
class Tab:
    """One page client: its socket, what it received since the last mark, the next message id."""

    client_id: str
    sio: socketio.AsyncClient
    next_message_id: int = 0
    updates: int = 0
    bytes: int = 0
    events: Counter[str] = field(default_factory=Counter)


class Endings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(("Received packet", "Sending packet")):
            return False
        return record.levelno >= logging.WARNING or any(word in message for word in ENDINGS)


def socket_log() -> logging.Logger:
    log = logging.getLogger("page_clients.engineio")
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Endings())
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    return log


class Fleet:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.tabs: list[Tab] = []
        self.page_statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self.disconnects = 0
        self.disconnect_reasons: Counter[str] = Counter()
        self.log = socket_log()

    async def open_tab(self, http: aiohttp.ClientSession) -> None:
        try:
            async with http.get(f"{self.url}/") as response:
                self.page_statuses[response.status] += 1
                html = await response.text()
                response.raise_for_status()
            query = socket_query(html)
            sio = socketio.AsyncClient(reconnection=False, http_session=http, engineio_logger=self.log)
            tab = Tab(query["client_id"], sio)
            self.watch(tab)
            await sio.connect(
                f"{self.url}/?{urllib.parse.urlencode(query)}",
                socketio_path=SOCKET_PATH,
                transports=["websocket"],
                wait_timeout=30,
            )
            self.tabs.append(tab)
        except Exception as exc:  # reported, never raised: one failed tab must not stop the others
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def watch(self, tab: Tab) -> None:
        @tab.sio.on("*")
        async def on_event(event: str, data: Any = None) -> None:
            tab.events[event] += 1
            if isinstance(data, dict) and isinstance(data.get("_id"), int):
                tab.next_message_id = max(tab.next_message_id, data["_id"] + 1)
            if event == "update":
                tab.updates += 1
                tab.bytes += len(json.dumps(data))

        @tab.sio.on("disconnect")
        async def on_disconnect(*reason: Any) -> None:
            self.disconnects += 1
            self.disconnect_reasons[str(reason[0]) if reason else "?"] += 1

    async def acknowledge(self) -> None:
        """Every 3 s, as the page's script does: the server may drop the messages we have."""
        while True:
            await asyncio.sleep(ACK_INTERVAL_S)
            for tab in self.tabs:
                if tab.sio.connected:
                    with contextlib.suppress(Exception):
                        await tab.sio.emit(
                            "ack", {"client_id": tab.client_id, "next_message_id": tab.next_message_id}
                        )

    def mark(self) -> dict[str, Any]:
        for tab in self.tabs:
            tab.updates = tab.bytes = 0
        return {"event": "mark"}

    def count(self) -> dict[str, Any]:
        return {
            "event": "count",
            "tabs": len(self.tabs),
            "connected": sum(tab.sio.connected for tab in self.tabs),
            "tabs_updated": sum(tab.updates > 0 for tab in self.tabs),
            "updates": sum(tab.updates for tab in self.tabs),
            "bytes": sum(tab.bytes for tab in self.tabs),
            "disconnects": self.disconnects,
            "disconnect_reasons": dict(self.disconnect_reasons),
        }

    async def close(self) -> dict[str, Any]:
        connected = sum(tab.sio.connected for tab in self.tabs)
        await asyncio.gather(*(tab.sio.disconnect() for tab in self.tabs), return_exceptions=True)
        return {"event": "closed", "closed": connected}


def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def run(url: str, tabs: int, concurrency: int) -> None:
    fleet = Fleet(url)
    connector = aiohttp.TCPConnector(limit=0)  # one websocket per tab: no pool limit
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.perf_counter()
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                await fleet.open_tab(http)

        await asyncio.gather(*(one() for _ in range(tabs)))
        say(
            {
                **fleet.count(),
                "event": "open",
                "seconds": time.perf_counter() - started,
                "page_statuses": {str(k): v for k, v in sorted(fleet.page_statuses.items())},
                "failed": tabs - len(fleet.tabs),
                "errors": fleet.errors[:5],
            }
        )
        acks = asyncio.create_task(fleet.acknowledge())
        loop = asyncio.get_running_loop()
        try:
            while True:
                raw = await loop.run_in_executor(None, sys.stdin.readline)
                line = raw.strip()
                if not raw or line == "close":  # end of stdin: the benchmark is gone
                    break
                if line == "mark":
                    say(fleet.mark())
                elif line == "count":
                    say(fleet.count())
        finally:
            acks.cancel()
            say(await fleet.close())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the app, e.g. http://127.0.0.1:8500")
    parser.add_argument("--tabs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10, help="page loads at a time while opening")
    args = parser.parse_args()
    asyncio.run(run(args.url, args.tabs, args.concurrency))


if __name__ == "__main__":
    main()
