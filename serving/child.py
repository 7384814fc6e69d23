"""A child process kept running: restarted with backoff when it exits, stopped with its parent.

`make run` runs the trainer worker (`python -m serving.trainer`) with it, beside the supervised
TorchServe:

    child = SupervisedProcess("trainer", [sys.executable, "-m", "serving.trainer"], env, log_file)
    child.start()      # spawned, and watched in a daemon thread
    ...
    child.stop()       # SIGTERM, then SIGKILL after `timeout`

The child's output goes to `log_file` (appended). Restarts wait as TorchServe's do
(`serving.supervisor.Backoff`: 1, 2, 4, ... s, at most 30; reset after a minute of running).
If this process is killed, the child notices by itself (`--exit-with-parent` in the trainer).
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from serving.supervisor import Backoff

POLL_S = 0.5
STOP_TIMEOUT_S = 5.0
BACKOFF = Backoff()  # frozen: one shared default is safe


class SupervisedProcess:
    """One command, restarted when it exits until `stop()` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        log_file: Path,
        *,
        cwd: Path | None = None,
        backoff: Backoff = BACKOFF,
        report: Callable[[str], None] = print,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = dict(env)
        self.log_file = log_file
        self.cwd = cwd
        self.backoff = backoff
        self.report = report
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            return subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C of the terminal reaches it through stop(), in order
            )

    def start(self) -> None:
        """Spawn the command and watch it in a daemon thread."""
        with self._lock:
            self.process = self._spawn()
        self._thread = threading.Thread(target=self._watch, name=f"{self.name}-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            process, up_since = self.process, time.monotonic()
            assert process is not None
            while process.poll() is None:
                if self._stopping.wait(POLL_S):
                    return
            uptime = time.monotonic() - up_since
            failures = self.backoff.failures_after_death(failures, uptime)
            delay = self.backoff.delay(failures)
            self.report(
                f"{self.name} exited (status {process.returncode}, up {uptime:.0f} s); "
                f"restart in {delay:.0f} s (log: {self.log_file})"
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.process = self._spawn()
            self.restarts += 1

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, and SIGKILL if it is still running after `timeout`; no restart afterwards."""
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5.0)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
