"""The trainer's pure parts (options, progress messages) and `serving.child.SupervisedProcess`.

The worker itself, for real (PostgreSQL, TorchServe, a killed worker): tests/test_learning_loop.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from serving.child import SupervisedProcess
from serving.supervisor import Backoff
from serving.trainer import RunOptions, _progress_message, heartbeat_file, ready, synced_file
from settings import Settings


def test_run_options_split_retrain_fields_from_run_options():
    options = RunOptions.parse({"epochs": 1, "mnist_samples": 500, "mnist_eval_limit": 200}, None)
    assert options == RunOptions({"epochs": 1, "mnist_samples": 500}, 200, True)
    assert RunOptions.parse({}, 1000) == RunOptions({}, 1000, True)
    assert RunOptions.parse({"auto_promote": False}, None).auto_promote is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": "3"}, "retrain option epochs must be int"),
        ({"learning_rate": 0.1}, "unknown retrain option"),
        ({"mnist_eval_limit": 0}, "mnist_eval_limit must be a positive integer"),
        ({"mnist_eval_limit": True}, "mnist_eval_limit must be a positive integer"),
        ({"auto_promote": "yes"}, "auto_promote must be true or false"),
    ],
)
def test_bad_run_options_are_refused_with_the_reason(options, message):
    with pytest.raises(ValueError, match=message):
        RunOptions.parse(options, None)


def test_progress_messages_for_people():
    step = {"event": "step", "epoch": 1, "step": 20, "steps": 90, "loss": 0.12345, "accuracy": 0.9712}
    assert _progress_message(step) == "epoch 1, step 20/90, loss 0.1235, accuracy 97.12%"
    assert _progress_message({"event": "epoch", "epoch": 2, "loss": 0.1}) == "epoch 2, loss 0.1000"


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_supervised_child_is_restarted_when_it_dies_and_stopped_for_good(tmp_path: Path):
    log = tmp_path / "child.log"
    said: list[str] = []
    script = "import time; print('up', flush=True); time.sleep(60)"
    child = SupervisedProcess(
        "sleeper",
        [sys.executable, "-c", script],
        dict(os.environ),
        log,
        backoff=Backoff(first_s=0.1, cap_s=0.2),
        report=said.append,
    )
    child.start()
    try:
        first = child.pid
        assert first is not None
        wait_for(lambda: log.read_text().count("up") == 1)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: child.restarts == 1 and child.pid != first)
        wait_for(lambda: log.read_text().count("up") == 2)
        assert said and said[0].startswith(f"sleeper exited (status {-signal.SIGKILL}")
        second = child.pid
    finally:
        child.stop(timeout=5)
    assert (second is not None and not psutil.pid_exists(second)) or psutil.Process(
        second
    ).status() == "zombie"
    time.sleep(0.5)
    assert child.restarts == 1  # not restarted after stop()


def test_a_child_that_ignores_sigterm_is_killed(tmp_path: Path):
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    log = tmp_path / "child.log"
    child = SupervisedProcess("stubborn", [sys.executable, "-c", script], dict(os.environ), log, report=print)
    child.start()
    wait_for(lambda: "up" in log.read_text())
    started = time.monotonic()
    child.stop(timeout=1.0)
    assert time.monotonic() - started < 4.0
    assert child.process is not None and child.process.returncode == -signal.SIGKILL


def test_the_supervisor_runs_its_hook_after_every_start_and_survives_its_failure(tmp_path: Path, monkeypatch):
    """`make run` restores the registry's live version through this hook after each (re)start."""
    from serving.supervisor import Supervisor
    from serving.torchserve import ServeConfig
    from tests.serving.test_supervisor import FakeTorchServe

    fake = FakeTorchServe()
    monkeypatch.setattr("serving.supervisor.start", fake.start)
    monkeypatch.setattr("serving.supervisor.stop", fake.stop)
    seen: list[int] = []
    reports: list[str] = []

    def hook(server: object) -> None:
        seen.append(server.pid)  # type: ignore[attr-defined]
        if len(seen) == 2:
            raise RuntimeError("registry unreachable\nmore detail")

    supervisor = Supervisor(
        ServeConfig(run_dir=tmp_path / "torchserve"),
        backoff=Backoff(first_s=0.01, cap_s=0.02),
        report=reports.append,
        watchdog=False,
        poll_s=0.005,
        on_start=hook,
    )
    supervisor.start()
    assert seen == [1000]
    supervisor.run_in_background()
    try:
        for expected in (2, 3):
            fake.servers[-1].dead = True
            wait_for(lambda: len(seen) == expected)  # noqa: B023
        assert seen == [1000, 1001, 1002]
        assert "after the TorchServe start: registry unreachable" in reports
        assert supervisor.restarts == 2  # the failing hook did not count as a failed start
    finally:
        supervisor.stop()


def test_the_keep_live_sidecar_is_ready_once_its_torchserve_served_the_live_version(tmp_path: Path):
    settings = Settings(run_dir=tmp_path / "run", data_dir=tmp_path / "data")
    assert ready(settings) == (False, f"no heartbeat yet ({heartbeat_file(settings)})")
    heartbeat_file(settings).parent.mkdir(parents=True)
    heartbeat_file(settings).write_text("1\n")
    ok, detail = ready(settings)
    assert not ok and "does not serve the live version yet" in detail  # a new replica: no traffic yet
    synced_file(settings).touch()
    ok, detail = ready(settings)
    assert ok and "serves the live version" in detail
    stale = time.time() + 3 * settings.restore_interval_s + 60  # the loop stopped: not ready either
    assert not ready(settings, now=stale)[0]
