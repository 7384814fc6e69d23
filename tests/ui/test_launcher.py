"""`python -m ui` (= `make run`): one at a time, starts what it needs, stops all of it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.ui.live import ROOT, app_env, free_port, run_app
from ui.launcher import AlreadyRunning, is_local, port_free, single_instance


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
    data_dir = Path(tempfile.mkdtemp(prefix="ui-launcher-"))
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
            [sys.executable, "-m", "ui"], cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT
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

        second = subprocess.run(
            [sys.executable, "-m", "ui"],
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
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.slow
def test_sigterm_stops_the_ui_and_a_busy_port_is_refused(tmp_path: Path, postgres) -> None:
    url = postgres.create_database()
    env = {"DATABASE_URL": url, "INFERENCE_URL": f"http://127.0.0.1:{free_port()}"}
    with run_app(tmp_path / "a", "--no-torchserve", **env) as app:
        port = app.url.rsplit(":", 1)[1]
        busy = subprocess.run(
            [sys.executable, "-m", "ui", "--no-torchserve"],
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
        [sys.executable, "-m", "ui", "--no-torchserve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "make run: could not start:" in result.stderr and "Traceback" not in result.stderr
