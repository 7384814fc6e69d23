"""TorchServe's lifecycle (start, readiness, stop with nothing left behind) and its three APIs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from serving.keys import headers
from serving.management import ManagementClient
from serving.ports import free_port
from serving.torchserve import (
    ServeConfig,
    ServeError,
    busy_ports,
    environment,
    launch,
    read_pid,
    seed_store,
    start,
    stop,
    wait_api,
)
from settings import Settings
from tests.fixtures.torchserve import cli_env, manifest_version, session_config
from tests.handlers.renditions import png, read_mnist_test
from ui.inference import InferenceClient, InferenceUnavailable

ROOT = Path(__file__).resolve().parents[2]
STOPPED_WITHIN_S = 5.0  # make stop, SIGTERM/Ctrl-C: TorchServe gone within this (tests/serving/test_stop.py)


@pytest.fixture(scope="module")
def digit(mnist_dir):
    images, labels = read_mnist_test(mnist_dir, 1)
    return png(Image.fromarray(images[0])), int(labels[0])


def keyed(config: ServeConfig) -> dict[str, str]:
    """The inference key of the TorchServe run by `config`, as a header."""
    return headers(config.key_file, "inference")


def describe(torchserve, version: str | None = None) -> list[dict]:
    url = f"{torchserve.management_url}/models/{torchserve.model_name}" + (f"/{version}" if version else "")
    response = httpx.get(url, headers=torchserve.management_headers(), timeout=10)
    response.raise_for_status()
    return response.json()


# --- configuration ----------------------------------------------------------------------------


def test_config_properties_binds_loopback_with_prometheus_metrics():
    props = dict(
        line.split("=", 1)
        for line in (ROOT / "config.properties").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert props["inference_address"] == "http://127.0.0.1:8080"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["metrics_address"] == "http://127.0.0.1:8082"
    assert props["metrics_mode"] == "prometheus"
    assert "load_models" not in props and "models" not in props  # serving.start registers the model
    # locked down (serving/README.md, docs/security.md): keys on both APIs, for as long as TorchServe
    # runs; registration only of archives already in the model store
    assert "disable_token_authorization" not in props and float(props["token_expiration_min"]) >= 525_600
    assert props["allowed_urls"] == "(?!)" and props["enable_model_api"] == "true"


def test_serve_config_defaults_are_the_settings_defaults():
    """One place for defaults: ServeConfig() is what settings.py gives with an empty environment."""
    defaults = Settings.model_construct()  # the field defaults, no environment or .env read
    assert ServeConfig() == ServeConfig.from_settings(defaults)
    config = ServeConfig()
    assert (config.model_name, config.max_upload_bytes) == (defaults.model_name, defaults.max_upload_bytes)
    assert config.run_dir == defaults.run_dir / "torchserve"


def test_environment_sets_java_temp_logs_ports_and_threads(tmp_path):
    config = ServeConfig(
        model_store=tmp_path, run_dir=tmp_path / "run", inference_url="http://127.0.0.1:9999"
    )
    env = environment(config)
    assert Path(env["JAVA_HOME"], "bin", "java").exists()
    assert env["TEMP"] == env["TMPDIR"] == str(tmp_path / "run" / "tmp")
    assert env["LOG_LOCATION"] == str(tmp_path / "run" / "logs")
    assert env["TS_INFERENCE_ADDRESS"] == "http://127.0.0.1:9999"
    assert env["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", "1")


def test_environment_passes_no_inherited_ts_variable_and_sets_token_auth(tmp_path, monkeypatch):
    """TorchServe takes TS_* over config.properties: only the ones `environment` sets may reach it."""
    monkeypatch.setenv("TS_ALLOWED_URLS", "http(s)?://.*")
    monkeypatch.setenv("TS_DISABLE_TOKEN_AUTHORIZATION", "true")
    env = environment(ServeConfig(model_store=tmp_path, run_dir=tmp_path / "run"))
    assert "TS_ALLOWED_URLS" not in env and env["TS_DISABLE_TOKEN_AUTHORIZATION"] == "false"
    off = ServeConfig.from_settings(Settings(torchserve_token_auth=False))
    assert environment(off)["TS_DISABLE_TOKEN_AUTHORIZATION"] == "true"
    assert ServeConfig().token_auth and ServeConfig().key_file == ServeConfig().run_dir / "key_file.json"


# --- lifecycle --------------------------------------------------------------------------------


def test_start_fails_clearly_when_a_port_is_taken(tmp_path):
    config = session_config(tmp_path)
    host, port = config.addresses()["management"]
    with socket.socket() as sock:
        sock.bind((host, port))
        sock.listen()
        assert busy_ports(config) == [f"management {host}:{port}"]
        with pytest.raises(ServeError, match=f"port already in use: management {host}:{port}"):
            start(config, timeout=5)
    assert read_pid(config) is None


def test_start_fails_clearly_without_the_model_archive(tmp_path):
    config = ServeConfig(model_store=tmp_path, run_dir=tmp_path / "run")
    with pytest.raises(ServeError, match=r"mnist\.mar not found"):
        start(config, timeout=5)


@pytest.mark.slow
def test_start_fails_clearly_when_the_archive_cannot_be_registered(tmp_path):
    config = session_config(tmp_path)
    config.mar_file.write_bytes(b"not a model archive")
    with pytest.raises(ServeError, match=r"registering mnist\.mar failed: HTTP \d{3}"):
        start(config, timeout=120)
    assert read_pid(config) is None and busy_ports(config) == []


def run_cli(action: str, config: ServeConfig) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving", action],
        cwd=ROOT,
        env=cli_env(config),
        capture_output=True,
        text=True,
        timeout=400,
    )


def python_start_s(config: ServeConfig) -> float:
    """Seconds `python -m serving` takes to start and import what it runs (`--help` exits there)."""
    started = time.monotonic()
    assert run_cli("--help", config).returncode == 0
    return time.monotonic() - started


@pytest.mark.slow
def test_cli_start_status_stop_leaves_no_process_behind(tmp_path, digit):
    """`python -m serving start` (make serve) returns once predictions work; stop ends every process."""
    config = session_config(tmp_path)
    config = dataclasses.replace(config, run_dir=tmp_path / "run" / "torchserve")
    started = run_cli("start", config)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = read_pid(config)
    assert pid is not None
    family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    names = " ".join(" ".join(p.cmdline()) for p in family)
    assert "java" in names and "model_service_worker" in names
    try:
        response = httpx.post(
            f"{config.inference_url}/predictions/mnist", content=digit[0], headers=keyed(config), timeout=30
        )
        assert response.status_code == 200 and response.json()["digit"] == digit[1]
        status = run_cli("status", config)
        workers = json.loads(status.stdout)["models"][0]["workers"]
        assert status.returncode == 0 and workers == ["READY"] * config.workers
        again = run_cli("start", config)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        asked = time.monotonic()
        stopped = run_cli("stop", config)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    took = time.monotonic() - asked
    python = python_start_s(config)  # what the command needs before it calls stop (slow on a busy machine)
    print(f"make stop: every TorchServe process gone {took:.1f} s after the command ({python:.1f} s Python)")
    assert took - python < STOPPED_WITHIN_S
    assert busy_ports(config) == []
    assert run_cli("status", config).returncode == 3
    logs = config.run_dir / "logs"
    assert (logs / "ts_log.log").is_file() and (logs / "model_log.log").is_file()


@pytest.mark.slow
def test_cli_run_serves_in_the_foreground_until_sigterm(tmp_path, digit):
    """`python -m serving run` (the container's command): ready, serving, and SIGTERM stops it all."""
    config = dataclasses.replace(session_config(tmp_path), run_dir=tmp_path / "run" / "torchserve")
    process = subprocess.Popen(
        [sys.executable, "-m", "serving", "run"],
        cwd=ROOT,
        env=cli_env(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        assert process.stdout is not None
        for line in process.stdout:  # the console and our own lines, until ready (or exit)
            lines.append(line)
            if line.startswith("TorchServe is ready"):
                break
        assert process.poll() is None, "".join(lines)
        leader = psutil.Process(read_pid(config))
        family = [leader, *leader.children(recursive=True)]
        response = httpx.post(
            f"{config.inference_url}/predictions/mnist", content=digit[0], headers=keyed(config), timeout=30
        )
        assert response.status_code == 200 and response.json()["digit"] == digit[1]
        process.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(family, timeout=60)
        took = time.monotonic() - asked
    finally:
        if process.poll() is None:
            process.kill()
        stop(config)
    assert not alive and not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(f"serving run: every TorchServe process gone {took:.1f} s after SIGTERM")
    assert took < STOPPED_WITHIN_S
    assert busy_ports(config) == [] and read_pid(config) is None


@pytest.mark.slow
def test_stop_ends_the_frontend_and_workers_even_if_the_launcher_died(tmp_path):
    config = session_config(tmp_path)
    server = start(config)
    family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    os.kill(server.pid, signal.SIGKILL)
    psutil.wait_procs(family[:1], timeout=10)
    orphans = [p for p in family[1:] if p.is_running()]
    assert len(orphans) >= 2  # the Java frontend and at least one worker outlive the launcher
    assert read_pid(config) == server.pid
    assert stop(config)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert read_pid(config) is None and not stop(config)


@pytest.mark.slow
def test_a_frontend_without_the_model_is_model_loading_never_a_404(tmp_path):
    """TorchServe up but the model not registered yet (every start and restart): 503 "model loading"."""
    config = session_config(tmp_path)
    pid = launch(config)  # the frontend alone, as in the seconds before `start` registers the model
    try:
        wait_api(config, timeout=120, pid=pid)

        async def ask() -> tuple[tuple[bool, str], Exception]:
            client = InferenceClient(
                config.inference_url, config.model_name, config.management_url, key_file=config.key_file
            )
            try:
                readiness = await client.ready()
                with pytest.raises(InferenceUnavailable) as info:
                    await client.predict(b"any image")
                return readiness, info.value
            finally:
                await client.close()

        (ready, detail), error = asyncio.run(ask())
        assert not ready and detail == "model loading: 'mnist' is not registered yet"
        assert str(error).startswith("model loading: ") and "Model not found" in str(error)
        with config.management() as client:
            assert client.alive() and not client.ready() and client.versions() == []
    finally:
        stop(config)
    assert read_pid(config) is None


# --- management API -------------------------------------------------------------------------


def test_describe_shows_the_registered_workers_and_batching(torchserve):
    """`start` registers the archive's version with ServeConfig's workers and batching, delay 0 kept."""
    (model,) = describe(torchserve)
    config = torchserve.config
    assert (model["modelName"], model["modelVersion"]) == ("mnist", manifest_version(config.mar_file))
    assert (model["batchSize"], model["maxBatchDelay"]) == (config.batch_size, config.max_batch_delay_ms)
    assert (config.batch_size, config.max_batch_delay_ms) == (4, 0)  # the tuned defaults
    assert [w["status"] for w in model["workers"]] == ["READY"] * config.workers
    assert model["loadedAtStartup"] is False


def test_customized_describe_shows_the_handlers_contract(torchserve):
    url = f"{torchserve.management_url}/models/{torchserve.model_name}"
    headers = torchserve.management_headers()
    (model,) = httpx.get(url, params={"customized": "true"}, headers=headers, timeout=30).json()
    meta = model["customizedMetadata"]
    assert meta["model_version"] == model["modelVersion"]
    assert meta["output"] == ["confidence", "digit", "input", "is_digit", "model_version", "probabilities"]
    assert meta["max_upload_bytes"] == torchserve.config.max_upload_bytes


def test_health_command_exits_0_only_when_the_model_is_ready(torchserve):
    """`python -m serving health`: the container healthcheck, on the readiness rule."""

    def health(management_url: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "MANAGEMENT_URL": management_url, "MODEL_NAME": torchserve.model_name}
        return subprocess.run(
            [sys.executable, "-m", "serving", "health"], cwd=ROOT, env=env, capture_output=True, text=True
        )

    ready = health(torchserve.management_url)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert ready.stdout.strip() == "ready: workers: " + ", ".join(["READY"] * torchserve.config.workers)
    down = health(f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and down.stdout.startswith("not ready: ") and "not reachable" in down.stdout
    bind_all = health(torchserve.management_url.replace("127.0.0.1", "0.0.0.0"))  # as in the container
    assert bind_all.returncode == 0, bind_all.stdout + bind_all.stderr


def test_scale_workers_down_and_up(torchserve, digit):
    configured = torchserve.config.workers
    auth = torchserve.config.auth("management")
    with ManagementClient(torchserve.management_url, torchserve.model_name, auth=auth) as client:
        version = describe(torchserve)[0]["modelVersion"]
        try:
            for count in (1, 3):
                client.scale(version, count, timeout=120)
                workers = describe(torchserve)[0]["workers"]
                assert [w["status"] for w in workers] == ["READY"] * count
                assert client.ready()
                answers = [
                    httpx.post(
                        torchserve.predictions_url(),
                        content=digit[0],
                        headers=torchserve.inference_headers(),
                        timeout=30,
                    )
                    for _ in range(4)
                ]
                assert all(a.status_code == 200 and a.json()["digit"] == digit[1] for a in answers)
        finally:
            client.scale(None, configured, timeout=120)  # None: the default version
    assert len(describe(torchserve)[0]["workers"]) == configured


def build_version(torchserve, version: str) -> str:
    """A copy of mnist.mar with another version number, in the session's model store."""
    src = torchserve.model_store / "mnist.mar"
    name = f"mnist-v{version}.mar"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(torchserve.model_store / name, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = version
                data = json.dumps(manifest).encode()
            zout.writestr(info, data)
    return name


def test_register_a_second_version_and_call_it_by_version(torchserve, digit):
    """Through the management client: register, versions, set-default both ways, unregister."""
    mar = build_version(torchserve, "2.0-test")
    client = ManagementClient(
        torchserve.management_url, torchserve.model_name, auth=torchserve.config.auth("management")
    )
    keys = torchserve.inference_headers()
    default = describe(torchserve)[0]["modelVersion"]
    registered = client.register(
        mar, version="2.0-test", workers=1, batch_size=1, max_batch_delay_ms=0, timeout=180
    )
    assert registered == "2.0-test"
    try:
        versions = {m["modelVersion"] for m in describe(torchserve, "all")}
        assert versions == {default, "2.0-test"} == {m["modelVersion"] for m in client.versions()}
        by_version = httpx.post(
            torchserve.predictions_url("2.0-test"), content=digit[0], headers=keys, timeout=30
        )
        assert by_version.status_code == 200, by_version.text
        assert by_version.json()["model_version"] == "2.0-test" and by_version.json()["digit"] == digit[1]
        plain = httpx.post(torchserve.predictions_url(), content=digit[0], headers=keys, timeout=30)
        assert plain.json()["model_version"] == default  # the default version is unchanged
        client.set_default("2.0-test")
        try:
            assert client.describe()[0]["modelVersion"] == "2.0-test" and client.ready()
            plain = httpx.post(torchserve.predictions_url(), content=digit[0], headers=keys, timeout=30)
            assert plain.json()["model_version"] == "2.0-test"
        finally:
            client.set_default(default)
        assert client.describe()[0]["modelVersion"] == default
    finally:
        client.unregister("2.0-test", timeout=120)
        client.close()
    assert {m["modelVersion"] for m in describe(torchserve, "all")} == {default}


# --- metrics API ----------------------------------------------------------------------------


def inference_requests_total(torchserve) -> float:
    response = httpx.get(f"{torchserve.metrics_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = re.findall(
        r'^ts_inference_requests_total\{model_name="mnist",[^}]*\} ([0-9.eE+]+)$', response.text, re.MULTILINE
    )
    assert values, response.text[:2000]
    return sum(float(v) for v in values)


def test_metrics_are_prometheus_text_and_count_requests(torchserve, digit):
    text = httpx.get(f"{torchserve.metrics_url}/metrics", timeout=10).text
    assert "# TYPE ts_inference_requests_total counter" in text
    before = inference_requests_total(torchserve)
    for _ in range(3):
        answer = httpx.post(
            torchserve.predictions_url(), content=digit[0], headers=torchserve.inference_headers(), timeout=30
        )
        assert answer.status_code == 200
    assert inference_requests_total(torchserve) >= before + 3


def test_seeding_the_store_keeps_what_is_there_and_leaves_no_partial_file(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped.mar"
    shipped.write_bytes(b"the shipped archive")
    config = ServeConfig(model_store=tmp_path / "store", run_dir=tmp_path / "run")
    assert seed_store(config, shipped) is True
    assert config.mar_file.read_bytes() == b"the shipped archive"
    shipped.write_bytes(b"another")
    assert seed_store(config, shipped) is False  # what the registry recorded stays
    assert config.mar_file.read_bytes() == b"the shipped archive"
    assert sorted(p.name for p in config.model_store.iterdir()) == [config.mar_file.name]
