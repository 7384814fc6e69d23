"""Keep TorchServe running: restart it when it dies, with backoff, and never leave it orphaned.

    supervisor = Supervisor(ServeConfig.from_settings())
    supervisor.start()                 # the first start: ServeError when it cannot start at all
    supervisor.run_in_background()     # `make run` (or supervisor.watch() in the foreground: serving run)
    ...
    supervisor.stop()                  # TorchServe, the watch loop and the watchdog

`on_start(server)` runs after every start that succeeded, the first one and each restart: `make
run` puts the registry's live model version back there (TorchServe itself only knows the shipped
archive it registers at start). Its failure is reported, never fatal: TorchServe still serves.

TorchServe's launcher waits on its Java frontend, so the frontend's death (kill -9, out of memory)
ends the launcher, the leader of TorchServe's process group: the watch loop polls it and starts a
fresh TorchServe (after stopping what is left of the old group: workers outlive the frontend).
Restarts wait 1, 2, 4, ... seconds, at most 30, so a TorchServe that cannot start does not spin;
the count starts again after a run that stayed up for a minute. Each restart is reported.

The supervising process is TorchServe's owner (`serving.watchdog`): a watchdog process stops
TorchServe if the owner dies without stopping it (SIGKILL).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving.torchserve import (
    START_TIMEOUT_S,
    STOP_GRACE_S,
    ServeConfig,
    Server,
    refuse_if_running,
    start,
    stop,
)
from serving.watchdog import claim, release, start_watchdog, stop_watchdog

POLL_S = 0.5


@dataclass(frozen=True)
class Backoff:
    """How long to wait before restarting TorchServe: doubling from `first_s`, at most `cap_s`."""

    first_s: float = 1.0
    cap_s: float = 30.0
    healthy_s: float = 60.0  # a run that lasted this long was healthy: the count starts again

    def delay(self, failures: int) -> float:
        """The wait before the next start after `failures` deaths or failed starts in a row."""
        return min(self.first_s * 2.0 ** min(max(failures - 1, 0), 32), self.cap_s)

    def failures_after_death(self, failures: int, uptime_s: float) -> int:
        """The count once TorchServe died after running `uptime_s`: reset by a healthy run, else one more."""
        return 1 if uptime_s >= self.healthy_s else failures + 1


def _stderr(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Starts TorchServe, restarts it when it dies, stops it (and its watchdog) on `stop()`."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        backoff: Backoff = Backoff(),  # frozen: one shared default is safe
        timeout: float = START_TIMEOUT_S,
        console: bool = False,
        report: Callable[[str], None] = _stderr,
        watchdog: bool = True,
        poll_s: float = POLL_S,
        on_start: Callable[[Server], None] | None = None,
    ) -> None:
        self.config = config
        self.backoff = backoff
        self.timeout = timeout
        self.console = console
        self.report = report
        self.watchdog = watchdog
        self.poll_s = poll_s
        self.on_start = on_start
        self.server: Server | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        """The first start (`ServeError` when TorchServe cannot start); this process becomes its owner."""
        refuse_if_running(self.config)  # never take over another owner's TorchServe
        claim(self.config)
        if self.watchdog:  # before TorchServe exists: a SIGKILL during the start is covered too
            self._watchdog = start_watchdog(self.config)
        try:
            self.server = self._start()
        except BaseException:
            self._release()
            raise
        self._started(self.server)
        return self.server

    def _started(self, server: Server) -> None:
        if self.on_start is None:
            return
        try:
            self.on_start(server)
        except Exception as exc:  # TorchServe runs; what the hook adds is retried elsewhere
            reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
            self.report(f"after the TorchServe start: {reason}")

    def _start(self) -> Server:
        return start(self.config, timeout=self.timeout, console=self.console, cancel=self._stopping)

    def watch(self) -> None:
        """Until `stop()`: whenever TorchServe exits, start it again (blocks; call after `start`)."""
        failures = 0
        while self.server is not None and not self._stopping.is_set():
            server, up_since = self.server, time.monotonic()
            while server.alive():
                if self._stopping.wait(self.poll_s):
                    return
            died_at = time.monotonic()
            failures = self.backoff.failures_after_death(failures, died_at - up_since)
            delay = self.backoff.delay(failures)
            self.report(
                f"TorchServe exited (pid {server.pid}, up {died_at - up_since:.0f} s); "
                f"restart {self.restarts + 1} in {delay:.0f} s"
            )
            stop(self.config)  # what is left of its process group
            while not self._stopping.wait(delay):
                try:
                    self.server = self._start()
                except Exception as exc:  # whatever fails, the supervisor keeps trying (ServeError mostly)
                    if self._stopping.is_set():
                        return
                    failures += 1
                    delay = self.backoff.delay(failures)
                    reason = str(exc).splitlines()[0]
                    self.report(f"TorchServe restart failed ({reason}); next try in {delay:.0f} s")
                    continue
                self.restarts += 1
                self.report(
                    f"TorchServe is back (pid {self.server.pid}, restart {self.restarts}, "
                    f"{time.monotonic() - died_at:.1f} s after it exited)"
                )
                self._started(self.server)
                break

    def run_in_background(self) -> threading.Thread:
        """`watch()` in a daemon thread (the UI keeps the main thread)."""
        self._thread = threading.Thread(target=self.watch, name="torchserve-supervisor", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """Stop watching and stop TorchServe, even in the middle of a restart; then the watchdog.

        `timeout` is `stop`'s grace before SIGKILL (`make run`'s Ctrl-C ends TorchServe in < 5 s).
        """
        self._stopping.set()
        stop(self.config, timeout)  # also makes a start in progress fail at once
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        stop(self.config, timeout)  # in case a restart got as far as a new process meanwhile
        self.server = None
        self._release()

    def _release(self) -> None:
        release(self.config)
        stop_watchdog(self._watchdog)
        self._watchdog = None
