"""Who owns a running TorchServe, and a watchdog that stops it when that owner dies.

The owner is the process that supervises TorchServe (`make run`, `python -m serving run`); its
pid is kept in `run_dir/torchserve.owner`. TorchServe runs in its own process group, so a SIGKILL
of its owner (or of the owner's whole group) does not reach it: without help it would live on as
an orphan that the next run finds on its ports. The watchdog is a tiny process in a session of
its own (so the kill that ends the owner's group spares it) that polls the owner and, once the
owner is gone, stops TorchServe's process group, unless another owner has taken over since. The
same idea as the embedded PostgreSQL's watchdog (`db/embedded.py`).

    python -m serving.watchdog OWNER_PID RUN_DIR
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from serving.torchserve import ROOT, ServeConfig, process_alive, stop

POLL_S = 0.5


def claim(config: ServeConfig, pid: int | None = None) -> None:
    """Record `pid` (default: this process) as the owner of the TorchServe in `config.run_dir`."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    config.owner_file.write_text(f"{pid or os.getpid()}\n")


def recorded_owner(config: ServeConfig) -> int | None:
    """The owner pid written in the owner file, alive or not."""
    try:
        return int(config.owner_file.read_text().strip())
    except (OSError, ValueError):
        return None


def live_owner(config: ServeConfig) -> int | None:
    """The owner's pid while that process is alive, else None (a killed run's leftover has none)."""
    pid = recorded_owner(config)
    return pid if pid is not None and process_alive(pid) else None


def release(config: ServeConfig, pid: int | None = None) -> None:
    """Forget the owner, if it is still `pid` (default: this process)."""
    if recorded_owner(config) == (pid or os.getpid()):
        config.owner_file.unlink(missing_ok=True)


def start_watchdog(config: ServeConfig) -> subprocess.Popen[bytes]:
    """The watchdog for this process as owner of the TorchServe in `config.run_dir`."""
    return subprocess.Popen(
        [sys.executable, "-m", "serving.watchdog", str(os.getpid()), str(config.run_dir)],
        start_new_session=True,  # survives a kill of our process group, then stops TorchServe
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )


def stop_watchdog(process: subprocess.Popen[bytes] | None) -> None:
    """End a watchdog (its owner is stopping TorchServe itself)."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def watch(owner_pid: int, run_dir: Path, poll_s: float = POLL_S) -> bool:
    """Wait for `owner_pid` to die, then stop its TorchServe; True if one was stopped."""
    signal.signal(signal.SIGTERM, _exit)
    config = ServeConfig(run_dir=run_dir)
    while process_alive(owner_pid):
        time.sleep(poll_s)
    if recorded_owner(config) != owner_pid:
        return False  # released cleanly, or another run owns it now
    stopped = stop(config)  # SIGKILL after STOP_GRACE_S, as for every stop
    release(config, owner_pid)
    return stopped


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        watch(int(sys.argv[1]), Path(sys.argv[2]))
