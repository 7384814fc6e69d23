"""Closed tabs give their memory back to the server: the real `python -m ui` on a real PostgreSQL.

Rounds of page clients (`bench/support/page_clients.py`: the page loaded, its websocket connected,
the pushes received) open and close; the UI's resident memory after the later rounds stays where
the first round left it, because what a closed tab held is freed and reused. Before the page let go
of its upload route (`ui/upload.py`) every round of 100 tabs kept about 70 MB more, for good.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from bench.capacity import ui_process
from bench.soak import PageClients

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TABS = 100
ROUNDS = 3
SETTLE_S = 8.0  # NiceGUI deletes a closed tab's client after its reconnect timeout (3 s), then prunes
GROWTH_LIMIT_MB = 25.0  # after the first round; a round kept about 70 MB when pages leaked


def rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / 1e6


def test_closed_tabs_leave_no_memory_behind(db_url: str, tmp_path: Path) -> None:
    after: list[float] = []
    with ui_process(tmp_path, db_url, None, ready="/healthz") as (url, process):
        for round_ in range(ROUNDS):
            tabs = PageClients(url, TABS, tmp_path / f"tabs{round_}.log")
            try:
                assert tabs.opened["connected"] >= TABS * 0.9, tabs.opened
            finally:
                tabs.close()
            time.sleep(SETTLE_S)
            after.append(rss_mb(process))
    growth = after[-1] - after[0]
    print(f"\nUI resident memory after each round of {TABS} tabs: {[round(m) for m in after]} MB")
    assert growth < GROWTH_LIMIT_MB, f"{growth:.0f} MB more after {ROUNDS - 1} more rounds: {after}"
