"""Stopping TorchServe is quick: every process gone within 5 s of `stop`, however it is asked.

`make stop` after `make serve` and the container's SIGTERM are timed in test_torchserve.py (the
CLI tests); here the function itself, the supervisor that `make run` stops on Ctrl-C, and
`make stop` of a TorchServe whose launcher's parent still runs, on a real TorchServe.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from serving.supervisor import Supervisor
from serving.torchserve import STOP_GRACE_S, ServeConfig, busy_ports, read_pid, start, stop
from tests.fixtures.torchserve import cli_env, session_config

ROOT = Path(__file__).resolve().parents[2]

STOPPED_WITHIN_S = 5.0


def family(config: ServeConfig) -> list[psutil.Process]:
    """TorchServe's launcher, Java frontend and workers."""
    pid = read_pid(config)
    assert pid is not None, "TorchServe is not running"
    leader = psutil.Process(pid)
    return [leader, *leader.children(recursive=True)]


def gone_after(procs: list[psutil.Process], started: float) -> float:
    """Seconds from `started` until every process of `procs` has exited (at most 60)."""
    _, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    return time.monotonic() - started


def assert_all_gone(config: ServeConfig) -> None:
    assert read_pid(config) is None and busy_ports(config) == []
    assert not config.key_file.exists()  # the keys go with TorchServe


def test_the_grace_before_sigkill_leaves_room_within_5_s() -> None:
    assert STOP_GRACE_S + 1.0 <= STOPPED_WITHIN_S


@pytest.mark.slow
def test_stop_ends_every_process_within_5_s(tmp_path: Path) -> None:
    config = session_config(tmp_path)
    start(config)
    procs = family(config)
    assert config.key_file.is_file()
    assert any("model_service_worker" in " ".join(p.cmdline()) for p in procs)
    started = time.monotonic()
    assert stop(config)
    took = gone_after(procs, started)
    print(f"stop(): every TorchServe process gone {took:.1f} s after the call")
    assert took < STOPPED_WITHIN_S
    assert_all_gone(config)


@pytest.mark.slow
def test_make_runs_supervisor_stops_torchserve_within_5_s(tmp_path: Path) -> None:
    """What Ctrl-C of `make run` does to TorchServe (`stack.py`: `Supervisor.stop`), watchdog included."""
    config = session_config(tmp_path)
    supervisor = Supervisor(config)
    supervisor.start()
    supervisor.run_in_background()
    procs = family(config)
    started = time.monotonic()
    supervisor.stop()
    took = gone_after(procs, started)
    print(f"Supervisor.stop(): every TorchServe process gone {took:.1f} s after the call")
    assert took < STOPPED_WITHIN_S
    assert_all_gone(config)


@pytest.mark.slow
def test_make_stop_of_a_torchserve_whose_parent_still_runs_within_5_s(tmp_path: Path) -> None:
    """The launcher exits with the frontend, but its parent (here: this test) has not reaped it yet.

    The zombie it leaves is gone for `stop`; waiting for it to disappear took 35 s before.
    """
    config = dataclasses.replace(session_config(tmp_path), run_dir=tmp_path / "run" / "torchserve")
    start(config)  # this process is the launcher's parent and does not wait for it
    procs = family(config)
    env = cli_env(config)
    command = [sys.executable, "-m", "serving"]
    started = time.monotonic()
    assert subprocess.run([*command, "--help"], cwd=ROOT, env=env, capture_output=True).returncode == 0
    python = time.monotonic() - started  # Python's start and imports, before `stop` is called
    started = time.monotonic()
    stopped = subprocess.run([*command, "stop"], cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.monotonic() - started
    assert stopped.returncode == 0 and "TorchServe stopped." in stopped.stdout, stopped.stderr
    print(f"make stop, launcher's parent alive: {took:.1f} s from the command ({python:.1f} s Python)")
    assert took - python < STOPPED_WITHIN_S
    gone_after(procs, started)  # every process exited (the launcher a zombie until reaped here)
    assert_all_gone(config)
