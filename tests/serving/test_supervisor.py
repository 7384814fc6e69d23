"""Supervised TorchServe: restarts with backoff, the owner's watchdog, and both on a real TorchServe.

The restart loop is first checked on a fake TorchServe (fast); then, for real, `python -m serving
run` (the container's command, the same supervisor `make run` runs in a thread) gets its Java
frontend killed with SIGKILL and must answer again within 30 s, and a SIGKILL of the supervising
process itself must leave no TorchServe process behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from serving.keys import headers
from serving.supervisor import Backoff, Supervisor
from serving.torchserve import ServeConfig, ServeError, read_pid, stop
from serving.watchdog import claim, live_owner, recorded_owner, release, watch
from tests.fixtures.torchserve import cli_env, session_config
from tests.handlers.renditions import png, read_mnist_test
from ui.inference import InferenceClient, InferenceError, InvalidInput

ROOT = Path(__file__).resolve().parents[2]
BACK_WITHIN_S = 30.0  # the target: TorchServe answers again this soon after its Java process is killed
GONE_WITHIN_S = 15.0  # after a SIGKILL of the owner: the watchdog polls every 0.5 s, then stops the group


# --- backoff: a pure rule ---------------------------------------------------------------------


def test_backoff_doubles_from_one_second_up_to_thirty() -> None:
    backoff = Backoff()
    assert [backoff.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.delay(10_000) == 30  # no overflow after a long outage


def test_backoff_starts_again_after_a_healthy_minute() -> None:
    backoff = Backoff()
    assert backoff.failures_after_death(5, uptime_s=59.0) == 6  # died soon again: wait longer
    assert backoff.failures_after_death(5, uptime_s=60.0) == 1  # a healthy minute: back to 1 s
    assert backoff.failures_after_death(0, uptime_s=0.5) == 1


# --- the restart loop on a fake TorchServe -------------------------------------------------------


@dataclasses.dataclass
class FakeServer:
    pid: int
    dead: bool = False

    def alive(self) -> bool:
        return not self.dead


class FakeTorchServe:
    """Stands in for `serving.torchserve.start`/`stop`: a server that dies on demand, starts that fail."""

    def __init__(self) -> None:
        self.servers: list[FakeServer] = []
        self.failing_starts = 0
        self.stops = 0
        self.started = threading.Event()

    def start(self, config: ServeConfig, **kwargs: object) -> FakeServer:
        if self.failing_starts:
            self.failing_starts -= 1
            raise ServeError("port already in use: management 127.0.0.1:1\nlog tail")
        self.servers.append(FakeServer(1000 + len(self.servers)))
        self.started.set()
        return self.servers[-1]

    def stop(self, config: ServeConfig, timeout: float = 30.0) -> bool:
        self.stops += 1
        return True


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_dead_torchserve_is_restarted_with_growing_delays(tmp_path: Path, monkeypatch) -> None:
    fake = FakeTorchServe()
    monkeypatch.setattr("serving.supervisor.start", fake.start)
    monkeypatch.setattr("serving.supervisor.stop", fake.stop)
    reports: list[str] = []
    config = ServeConfig(run_dir=tmp_path / "torchserve")
    supervisor = Supervisor(
        config, backoff=Backoff(first_s=0.01, cap_s=0.04), report=reports.append, watchdog=False, poll_s=0.005
    )
    supervisor.start()
    assert recorded_owner(config) == os.getpid()  # this process owns it now
    supervisor.run_in_background()

    fake.failing_starts = 3  # the first death is followed by three failed starts, then success
    fake.servers[-1].dead = True
    wait_for(lambda: any(r.startswith("TorchServe is back") for r in reports))
    assert supervisor.restarts == 1
    assert (supervisor.server.pid if supervisor.server else None) == 1001  # the new one is watched
    assert reports[0] == "TorchServe exited (pid 1000, up 0 s); restart 1 in 0 s"
    failed = [r for r in reports if r.startswith("TorchServe restart failed")]
    assert len(failed) == 3 and "(port already in use: management 127.0.0.1:1)" in failed[0]
    assert reports[-1].startswith("TorchServe is back (pid 1001, restart 1, ")

    fake.servers[-1].dead = True  # dies again: restarted again
    wait_for(lambda: supervisor.restarts == 2)
    assert len(fake.servers) == 3

    supervisor.stop()
    assert supervisor.server is None and recorded_owner(config) is None
    stops = fake.stops
    fake.servers[-1].dead = True
    time.sleep(0.05)
    assert len(fake.servers) == 3 and fake.stops == stops  # stopped: nothing restarts it


def test_stop_during_a_restart_wait_ends_the_loop(tmp_path: Path, monkeypatch) -> None:
    fake = FakeTorchServe()
    monkeypatch.setattr("serving.supervisor.start", fake.start)
    monkeypatch.setattr("serving.supervisor.stop", fake.stop)
    config = ServeConfig(run_dir=tmp_path / "torchserve")
    reports: list[str] = []
    supervisor = Supervisor(
        config, backoff=Backoff(first_s=60, cap_s=60), report=reports.append, watchdog=False, poll_s=0.005
    )
    supervisor.start()
    thread = supervisor.run_in_background()
    fake.servers[-1].dead = True
    wait_for(lambda: reports == ["TorchServe exited (pid 1000, up 0 s); restart 1 in 60 s"])
    began = time.monotonic()
    supervisor.stop()  # ... but stopping does not wait for it
    assert time.monotonic() - began < 2 and not thread.is_alive()
    assert len(fake.servers) == 1


def test_ownership_is_recorded_and_released_only_by_its_owner(tmp_path: Path) -> None:
    config = ServeConfig(run_dir=tmp_path / "torchserve")
    assert live_owner(config) is None
    claim(config)
    assert live_owner(config) == os.getpid()
    release(config, pid=os.getpid() + 1)  # not the owner: nothing happens
    assert recorded_owner(config) == os.getpid()
    release(config)
    assert recorded_owner(config) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim(config, dead.pid)
    assert recorded_owner(config) == dead.pid and live_owner(config) is None  # a killed run's leftover


def test_the_watchdog_leaves_a_torchserve_alone_once_its_owner_released_it(tmp_path: Path) -> None:
    config = ServeConfig(run_dir=tmp_path / "torchserve")
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    claim(config, owner.pid + 1)  # another process took over before the owner died
    owner.wait()
    assert watch(owner.pid, config.run_dir, poll_s=0.01) is False


STOP = [sys.executable, "-m", "serving", "stop"]


def test_make_stop_refuses_a_torchserve_that_a_live_process_supervises(tmp_path: Path) -> None:
    """`python -m serving stop` would only make the supervisor start it again: it says whom to stop."""
    config = ServeConfig(run_dir=tmp_path / "run" / "torchserve")
    claim(config)  # this test process plays the supervisor
    stopped = subprocess.run(STOP, cwd=ROOT, env=cli_env(config), capture_output=True, text=True)
    assert stopped.returncode == 1
    assert f"TorchServe is supervised by process {os.getpid()}" in stopped.stderr
    release(config)
    stopped = subprocess.run(STOP, cwd=ROOT, env=cli_env(config), capture_output=True, text=True)
    assert stopped.returncode == 0 and "TorchServe was not running." in stopped.stdout


# --- on a real TorchServe ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit(mnist_dir):
    images, labels = read_mnist_test(mnist_dir, 1)
    return png(Image.fromarray(images[0])), int(labels[0])


def java_frontend(config: ServeConfig) -> psutil.Process:
    pid = read_pid(config)
    assert pid is not None, "TorchServe is not running"
    for proc in psutil.Process(pid).children(recursive=True):
        if "org.pytorch.serve.ModelServer" in " ".join(proc.cmdline()):
            return proc
    raise AssertionError("no Java frontend under TorchServe's launcher")


def torchserve_processes(config: ServeConfig, tmp: Path) -> list[psutil.Process]:
    """TorchServe's process group, and every process whose command line names the test's folder."""
    found = []
    pid = read_pid(config)
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            in_group = pid is not None and os.getpgid(proc.pid) == pid
            if in_group or str(tmp) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


async def predict_until_answered(config: ServeConfig, image: bytes, timeout: float) -> tuple[int, list[str]]:
    """Ask through the UI's client until the model answers; its digit and the failures meanwhile."""
    urls = (config.inference_url, config.model_name, config.management_url)
    client = InferenceClient(*urls, timeout_s=2.0, key_file=config.key_file)
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                return (await client.predict(image)).digit, failures
            except InvalidInput as exc:  # a 4xx while the model is away: the model server's 404 leaked
                raise AssertionError(f"a client error while TorchServe restarts: {exc}") from exc
            except InferenceError as exc:
                failures.append(str(exc))
            await asyncio.sleep(0.25)
    finally:
        await client.close()
    raise AssertionError(f"no answer within {timeout} s; failures: {failures[-5:]}")


@pytest.mark.slow
def test_serving_run_restarts_a_killed_java_frontend_and_its_watchdog_outlives_a_sigkill(
    tmp_path: Path, digit
) -> None:
    config = dataclasses.replace(session_config(tmp_path), run_dir=tmp_path / "run" / "torchserve")
    log = tmp_path / "serving-run.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving", "run"],
            cwd=ROOT,
            env=cli_env(config),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # like `make run` in a terminal: its own group, killed as a whole below
        )
    try:
        deadline = time.monotonic() + 300
        while "TorchServe is ready" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.25)
        keys = headers(config.key_file, "inference")
        url = f"{config.inference_url}/predictions/mnist"
        first = httpx.post(url, content=digit[0], headers=keys, timeout=30)
        assert first.status_code == 200 and first.json()["digit"] == digit[1]
        assert live_owner(config) == process.pid

        # kill -9 of TorchServe's Java process: the model answers again, by itself, within 30 s
        java, launcher = java_frontend(config), read_pid(config)
        java.kill()
        killed_at = time.monotonic()
        answer, failures = asyncio.run(predict_until_answered(config, digit[0], BACK_WITHIN_S))
        back_s = time.monotonic() - killed_at
        print(f"answered again {back_s:.1f} s after kill -9 of the Java frontend; meanwhile: {set(failures)}")
        assert answer == digit[1] and back_s <= BACK_WITHIN_S
        assert read_pid(config) not in (None, launcher)  # a new TorchServe, not a surviving old one
        # the supervisor reports it back once every worker is READY (one READY worker answers already)
        while "TorchServe is back (pid " not in log.read_text() and time.monotonic() < killed_at + 120:
            time.sleep(0.25)
        text = log.read_text()
        assert f"TorchServe exited (pid {launcher}, " in text and "restart 1 in 1 s" in text, text
        assert "TorchServe is back (pid " in text, text

        # SIGKILL of the supervising process group: the watchdog stops every TorchServe process
        leftovers = torchserve_processes(config, tmp_path)
        assert any("model_service_worker" in " ".join(p.cmdline()) for p in leftovers)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed_at = time.monotonic()
        gone, alive = psutil.wait_procs(leftovers, timeout=GONE_WITHIN_S)
        print(f"{len(gone)} TorchServe processes gone {time.monotonic() - killed_at:.1f} s after the SIGKILL")
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
        assert read_pid(config) is None and recorded_owner(config) is None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        stop(config)
