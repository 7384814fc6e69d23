"""`python -m stack` (= `make run`): one at a time, starts what it needs, stops all of it.

Also how it treats a TorchServe it finds: the rule (`plan_torchserve`) on every case; for real, the
session's TorchServe, which this run did not start (used, said so, not stopped), and the leftover
of a killed run (stopped, a fresh one supervised).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import httpx
import psutil
import pytest

from serving.ports import port_free
from serving.torchserve import ServeConfig, launch, read_pid, stop, wait_api
from settings import Settings
from stack import (
    AlreadyRunning,
    TorchServePlan,
    is_local,
    model_ready,
    plan_torchserve,
    single_instance,
    use_torchserve,
)
from tests.fixtures.torchserve import session_config
from tests.ui.live import ROOT, app_env, free_port, run_app


def test_single_instance_lock(tmp_path: Path) -> None:
    lock = tmp_path / "run" / "ui.lock"
    expected = r"already running \(pid \d+, http://127.0.0.1:1\)"
    with single_instance(lock, "http://127.0.0.1:1"), pytest.raises(AlreadyRunning, match=expected):  # noqa: SIM117
        with single_instance(lock, "http://127.0.0.1:2"):
            pass
    with single_instance(lock, "http://127.0.0.1:3"):  # released: the next run may start
        pass


def test_is_local_and_port_free() -> None:
    assert is_local("http://127.0.0.1:8080") and is_local("http://localhost:8080")
    assert not is_local("http://torchserve:8080") and not is_local("http://10.0.0.5:8080")
    port = free_port()
    assert port_free("127.0.0.1", port)


# --- which TorchServe a run uses, starts or stops -------------------------------------------------


@pytest.mark.parametrize(
    ("leftover_pid", "leftover_owner", "foreign_ready", "local", "allowed", "plan"),
    [
        (None, None, False, True, True, TorchServePlan.START),
        (None, None, False, False, True, TorchServePlan.EXPECT),  # Compose: another host
        (None, None, False, True, False, TorchServePlan.EXPECT),  # --no-torchserve
        (None, None, True, True, True, TorchServePlan.USE_FOREIGN),  # e.g. started by hand: not ours
        (None, None, True, True, False, TorchServePlan.USE_FOREIGN),
        (123, None, False, True, True, TorchServePlan.RESTART_LEFTOVER),  # a killed run's, no owner
        (123, None, True, True, True, TorchServePlan.RESTART_LEFTOVER),  # even while it answers
        (123, None, True, True, False, TorchServePlan.KEEP_LEFTOVER),
        (123, 456, True, True, True, TorchServePlan.USE_SUPERVISED_ELSEWHERE),  # python -m serving run
    ],
)
def test_a_torchserve_is_started_and_stopped_only_by_the_run_that_supervises_it(
    leftover_pid: int | None,
    leftover_owner: int | None,
    foreign_ready: bool,
    local: bool,
    allowed: bool,
    plan: TorchServePlan,
) -> None:
    decided = plan_torchserve(
        leftover_pid=leftover_pid,
        leftover_owner=leftover_owner,
        foreign_ready=foreign_ready,
        local=local,
        allowed=allowed,
    )
    assert decided is plan


def test_a_foreign_torchserve_is_used_said_not_ours_and_not_stopped(torchserve, tmp_path, capsys) -> None:
    """The session's TorchServe was not started by this run (no pid file in this run folder)."""
    settings = Settings(
        run_dir=tmp_path / "run",
        inference_url=torchserve.inference_url,
        management_url=torchserve.management_url,
        metrics_url=torchserve.metrics_url,
    )
    assert model_ready(settings)
    with contextlib.ExitStack() as cleanup:
        use_torchserve(settings, cleanup, allowed=True)
    said = capsys.readouterr().out
    assert f"a model is already READY at {torchserve.management_url}" in said and "(not ours)" in said
    assert "not restarted or stopped here" in said and "stopping TorchServe" not in said
    assert not (tmp_path / "run" / "torchserve").exists()  # nothing started here
    assert model_ready(settings)  # and nothing stopped


class RecordingSupervisor:
    """Stands in for `serving.supervisor.Supervisor` where only the decision to start one is tested."""

    made: ClassVar[list[RecordingSupervisor]] = []

    def __init__(self, config: ServeConfig, **kwargs: object) -> None:
        self.config = config
        self.calls: list[str] = []
        RecordingSupervisor.made.append(self)

    def start(self) -> None:
        self.calls.append("start")

    def run_in_background(self) -> None:
        self.calls.append("run_in_background")

    def stop(self) -> None:
        self.calls.append("stop")


@pytest.mark.slow
def test_a_leftover_of_a_killed_run_is_stopped_and_a_fresh_one_supervised(tmp_path, capsys, monkeypatch):
    """A TorchServe in our run folder that no live process owns (its run was killed): never adopted."""
    config = dataclasses.replace(session_config(tmp_path), run_dir=tmp_path / "run" / "torchserve")
    leftover = launch(config)  # the frontend alone is enough to be a leftover (no owner recorded)
    try:
        wait_api(config, timeout=120, pid=leftover)
        family = [psutil.Process(leftover), *psutil.Process(leftover).children(recursive=True)]
        settings = Settings(
            run_dir=tmp_path / "run",
            model_store=config.model_store,
            inference_url=config.inference_url,
            management_url=config.management_url,
            metrics_url=config.metrics_url,
        )
        monkeypatch.setattr("serving.supervisor.Supervisor", RecordingSupervisor)
        RecordingSupervisor.made.clear()
        with contextlib.ExitStack() as cleanup:
            use_torchserve(settings, cleanup, allowed=True)
            said = capsys.readouterr().out
            assert f"stopping the TorchServe an earlier run left behind (pid {leftover}, " in said
            assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            assert read_pid(config) is None
            (supervisor,) = RecordingSupervisor.made
            assert supervisor.config.run_dir == config.run_dir
            assert supervisor.calls == ["start", "run_in_background"]  # a fresh, supervised one
        assert supervisor.calls[-1] == "stop"  # and stopped with the run
    finally:
        stop(config)


# --- the whole stack, for real ------------------------------------------------------------------


def processes_under(path: Path) -> list[psutil.Process]:
    """Running processes whose command line mentions `path` (PostgreSQL, TorchServe and its workers)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and str(path) in " ".join(
                proc.info["cmdline"] or []
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_make_run_starts_everything_refuses_a_second_run_and_leaves_nothing(tmp_path: Path) -> None:
    """Embedded PostgreSQL + TorchServe + UI from nothing, as `make run` does; then Ctrl-C."""
    # PostgreSQL runs as another user, who must reach its data folder: not under pytest's 0700 folders.
    data_dir = Path(tempfile.mkdtemp(prefix="stack-"))
    ts_ports = [free_port() for _ in range(3)]
    env = {
        "DATA_DIR": str(data_dir),
        "INFERENCE_URL": f"http://127.0.0.1:{ts_ports[0]}",
        "MANAGEMENT_URL": f"http://127.0.0.1:{ts_ports[1]}",
        "METRICS_URL": f"http://127.0.0.1:{ts_ports[2]}",
        "GRPC_INFERENCE_PORT": str(free_port()),
        "GRPC_MANAGEMENT_PORT": str(free_port()),
    }
    port = free_port()
    environment = app_env(tmp_path, port, **env)
    environment.pop("DATABASE_URL", None)
    log = tmp_path / "run.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "stack"], cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert process.poll() is None, log.read_text()
        ready = httpx.get(f"{url}/readyz", timeout=5).json()
        assert ready["ready"] and ready["model"]["ready"] and ready["database"]["ready"], ready
        assert f"Digit classifier: {url}" in log.read_text()
        started = processes_under(tmp_path) + processes_under(data_dir)
        assert any("postgres" in " ".join(p.cmdline()) for p in started), "no embedded PostgreSQL found"
        assert any("model_server" in " ".join(p.cmdline()) for p in started), "no TorchServe found"
        # The learning loop: the shipped archive copied into the archive folder (TorchServe's model
        # store), recorded as the live version, and the trainer worker running beside TorchServe.
        assert (data_dir / "archives" / "mnist.mar").is_file()
        assert "model: live version 1.0 (model registry)" in log.read_text()
        children = psutil.Process(process.pid).children(recursive=True)
        trainers = [p for p in children if "serving.trainer" in p.cmdline()]
        assert len(trainers) == 1 and "trainer: started" in log.read_text(), log.read_text()
        started += trainers

        second = subprocess.run(
            [sys.executable, "-m", "stack"],
            cwd=ROOT,
            env=app_env(tmp_path, free_port(), **env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"already running (pid {process.pid}, {url})" in second.stderr

        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(90) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    psutil.wait_procs(started, timeout=30)
    left = processes_under(tmp_path) + processes_under(data_dir)
    assert not left, f"left running: {[p.cmdline() for p in left]}\n{log.read_text()}"
    assert "stopping TorchServe" in log.read_text() and "stopping embedded PostgreSQL" in log.read_text()
    assert "stopping the trainer" in log.read_text() and not any(p.is_running() for p in trainers)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.slow
def test_sigterm_stops_the_ui_and_a_busy_port_is_refused(tmp_path: Path, postgres) -> None:
    url = postgres.create_database()
    env = {"DATABASE_URL": url, "INFERENCE_URL": f"http://127.0.0.1:{free_port()}"}
    with run_app(tmp_path / "a", "--no-torchserve", module="stack", **env) as app:
        port = app.url.rsplit(":", 1)[1]
        busy = subprocess.run(
            [sys.executable, "-m", "stack", "--no-torchserve"],
            cwd=ROOT,
            env={**app_env(tmp_path / "b", int(port), **env)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert busy.returncode == 1 and "is in use" in busy.stderr
        ready = httpx.get(f"{app.url}/readyz", timeout=5)
        assert ready.status_code == 503 and not ready.json()["model"]["ready"]
        assert ready.json()["database"]["ready"]
        assert httpx.get(f"{app.url}/docs", timeout=5).status_code == 200
        paths = httpx.get(f"{app.url}/openapi.json", timeout=5).json()["paths"]
        assert {"/api/predictions", "/api/stats", "/readyz"} <= set(paths)
        assert "Digit classifier" in httpx.get(app.url, timeout=5).text  # the page, mounted beside the API
    # run_app sent SIGTERM and checked the exit status 0


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    env = app_env(tmp_path, free_port(), DATABASE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    result = subprocess.run(
        [sys.executable, "-m", "stack", "--no-torchserve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "make run: could not start:" in result.stderr and "Traceback" not in result.stderr
