"""Promotion and rollback under load: how long until public predictions come from the new version,
and whether any public prediction fails meanwhile (target: zero non-2xx).

`python bench/promotion.py [--clients 8] [--rounds 3]` starts its own embedded PostgreSQL (the
model registry) and TorchServe (settings.py's workers and batching, free ports, a temporary
archive folder), and keeps `--clients` threads posting a 280x280 canvas PNG to
`POST /predictions/mnist` (no version: what the public API sends) for the whole run, while
`serving.registry.ModelRegistry` does what the operator and the trainer do:
- promote a candidate registered by the trainer (one worker): scaled to the live pool
  (synchronous), set-default, the registry's set_live; then roll back to the version it replaced
  (scaled down to one worker after the drain, so it is scaled up again first); `--rounds` times;
- promote a retired version (unregistered: registered again from its archive first), roll back.
For each: the `promote()` call's duration, the time from the call to the first public answer from
the new version, the time from set-default to that answer, and answers from the old version that
were sent after `promote()` returned. Version 2.0 is the shipped archive with another version in
its manifest (the weights do not change what promotion costs).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from db.embedded import EmbeddedPostgres  # noqa: E402
from db.migrate import migrate  # noqa: E402
from db.registry import Registry  # noqa: E402
from serving.keys import headers  # noqa: E402
from serving.management import AsyncManagementClient  # noqa: E402
from serving.ports import free_ports  # noqa: E402
from serving.registry import ModelRegistry, sha256_of  # noqa: E402
from serving.torchserve import ServeConfig, seed_store, shipped_archive, start, stop  # noqa: E402
from settings import Settings  # noqa: E402
from tests.fixtures.torchserve import copy_as_version  # noqa: E402
from training import styles  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Answer:
    sent: float  # monotonic time the request was sent
    received: float
    status: int
    version: str | None


class Load:
    """`clients` threads posting one PNG to the public endpoint until `stop()`; every answer kept."""

    def __init__(self, url: str, body: bytes, key_file: Path, clients: int) -> None:
        self.parts = urlsplit(url)
        self.body = body
        self.key_file = key_file
        self.answers: list[Answer] = []
        self.errors: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.parts.hostname or "127.0.0.1", self.parts.port, timeout=30)
        keys = {"Content-Type": "image/png", **headers(self.key_file, "inference")}
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                conn.request("POST", self.parts.path, body=self.body, headers=keys)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.errors[type(exc).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection(
                    self.parts.hostname or "127.0.0.1", self.parts.port, timeout=30
                )
                continue
            version = None
            if response.status == 200:
                version = json.loads(data).get("model_version")
            with self._lock:
                self.answers.append(Answer(sent, time.monotonic(), response.status, version))
        conn.close()


@dataclasses.dataclass
class Switch:
    kind: str
    target: str
    called: float
    set_default: float
    returned: float
    first_new: float | None = None
    late_old: int = 0


def settle(load: Load, switch: Switch, previous: str) -> None:
    """The first public answer from the new version (sent after the call), and old-version answers
    sent after `promote()` returned."""
    with load._lock:
        answers = list(load.answers)
    new = [a.received for a in answers if a.sent >= switch.called and a.version == switch.target]
    switch.first_new = min(new) if new else None
    switch.late_old = sum(1 for a in answers if a.sent > switch.returned and a.version == previous)


async def measure(config: ServeConfig, url: str, load: Load, rounds: int) -> list[Switch]:
    registry = await Registry.open(url)
    management = AsyncManagementClient(
        config.management_url, config.model_name, auth=config.auth("management")
    )
    models = ModelRegistry(
        registry,
        management,
        config.model_store,
        workers=config.workers,
        batch_size=config.batch_size,
        max_batch_delay_ms=config.max_batch_delay_ms,
    )
    marks: dict[str, float] = {}
    original = management.set_default

    async def timed_set_default(version: str) -> str:
        marks["set_default"] = time.monotonic()
        return await original(version)

    management.set_default = timed_set_default  # type: ignore[method-assign]
    switches: list[Switch] = []

    async def promote(kind: str, version: str, previous: str) -> None:
        await asyncio.sleep(models.drain_s + 2.0)  # the previous switch's scale-down is done
        called = time.monotonic()
        await models.promote(version, f"bench: {kind}")
        switch = Switch(kind, version, called, marks.get("set_default", called), time.monotonic())
        await asyncio.sleep(1.0)
        settle(load, switch, previous)
        switches.append(switch)

    try:
        await models.restore_live()
        name = copy_as_version(config.model_store, "2.0")
        await registry.add_version("2.0", name, sha256_of(config.model_store / name), parent_version="1.0")
        await models.register("2.0")  # as the trainer leaves a candidate: one worker
        for _ in range(rounds):
            await promote("promote a registered candidate", "2.0", "1.0")
            await promote("roll back (scaled-down version)", "1.0", "2.0")
        await models.retire("2.0")
        await promote("promote a retired version", "2.0", "1.0")
        await promote("roll back (scaled-down version)", "1.0", "2.0")
        await asyncio.sleep(models.drain_s + 1.0)
    finally:
        await models.close()
        await registry.close()
    return switches


def ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"median {1000 * statistics.median(values):.0f} ms, max {1000 * max(values):.0f} ms (n={len(values)})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = Settings()
    tmp = Path(tempfile.mkdtemp(prefix="bench-promotion-"))
    try:
        with EmbeddedPostgres(tmp / "postgres") as url:
            migrate(url)
            *ports, grpc_i, grpc_m = free_ports(5)
            inference, management, metrics = (f"http://127.0.0.1:{p}" for p in ports)
            config = dataclasses.replace(
                ServeConfig.from_settings(settings),
                model_store=tmp / "archives",
                run_dir=tmp / "run",
                inference_url=inference,
                management_url=management,
                metrics_url=metrics,
                grpc_inference_port=grpc_i,
                grpc_management_port=grpc_m,
            )
            seed_store(config, shipped_archive(settings))
            print(
                f"TorchServe: {config.workers} workers per live version, batch {config.batch_size}, "
                f"delay {config.max_batch_delay_ms} ms; candidates 1 worker; {args.clients} clients",
                flush=True,
            )
            start(config, timeout=300)
            try:
                body = styles.render(7, "seven_crossbar", np.random.default_rng(0))
                load = Load(
                    f"{inference}/predictions/{config.model_name}", body, config.key_file, args.clients
                )
                load.start()
                began = time.monotonic()
                try:
                    switches = asyncio.run(measure(config, url, load, args.rounds))
                finally:
                    load.stop()
                elapsed = time.monotonic() - began
            finally:
                stop(config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(switches, load, elapsed)
    return 0


def report(switches: list[Switch], load: Load, elapsed: float) -> None:
    statuses = Counter(a.status for a in load.answers)
    non_2xx = sum(n for status, n in statuses.items() if not 200 <= status < 300)
    print(f"\npublic predictions during {elapsed:.0f} s of promotions and rollbacks:")
    print(f"  {len(load.answers)} answers ({len(load.answers) / elapsed:.0f}/s), statuses {dict(statuses)}")
    print(f"  non-2xx: {non_2xx}; connection errors: {sum(load.errors.values())} {dict(load.errors)}")
    kinds: dict[str, list[Switch]] = {}
    for switch in switches:
        kinds.setdefault(switch.kind, []).append(switch)
    for kind, group in kinds.items():
        served = [(s, s.first_new) for s in group if s.first_new is not None]
        missing = len(group) - len(served)
        print(
            f"\n{kind} ({len(group)}x{f', {missing} never answered by the new version' if missing else ''}):"
        )
        print(f"  promote() call:                      {ms([s.returned - s.called for s in group])}")
        print(f"  call -> first public answer from it: {ms([first - s.called for s, first in served])}")
        print(f"  set-default -> first public answer:  {ms([first - s.set_default for s, first in served])}")
        print(f"  old-version answers sent after the call returned: {sum(s.late_old for s in group)}")
    if non_2xx or load.errors:
        print("\nFAILED: some public predictions did not succeed during promotion/rollback")


if __name__ == "__main__":
    sys.exit(main())
