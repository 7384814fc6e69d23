"""`python -m stack` (= `make run`): the development stack, started and stopped together.

1. One at a time: an exclusive lock on `run_dir/ui.lock` (released by the OS if the process dies);
   a second run says who holds it and exits with status 1. A busy UI port also exits with 1.
2. The database and its migrations: `db.runtime.start_database` (`DATABASE_URL`, else the
   embedded PostgreSQL under `data_dir/postgres`, started here and stopped at the end).
3. TorchServe, never taken over silently (`plan_torchserve`):
   - nothing there and `INFERENCE_URL` on this machine: started and supervised
     (`serving.supervisor`: restarted with backoff when it dies, stopped by a watchdog if this
     process is killed), stopped at the end;
   - a leftover of an earlier run in `run_dir/torchserve` that no live process supervises: stopped,
     and a fresh one started as above (with `--no-torchserve`: left as it is, and said so);
   - one supervised by another live process (`python -m serving run`), or a model READY at
     `MANAGEMENT_URL` that no run of ours started: used, and said to be not ours (neither restarted
     nor stopped here);
   - another host (Compose) or `--no-torchserve`: nothing started; the page shows a banner until
     the model answers.
   TorchServe's keys (token authorization) come from its key file: the one of the TorchServe
   started here, else `TORCHSERVE_KEY_FILE` (`serving.keys`); a model that refuses the key is not
   READY for this run.
   After every start and restart of a TorchServe started here, the registry's live model version
   is registered and made the default again (`serving.registry.ModelRegistry.restore_live`): a
   promoted version survives a restart; the shipped 1.0 is recorded as live on the first run.
   The trainer worker (`python -m serving.trainer`, the learning loop's retraining runs) is
   started beside a TorchServe on this machine, restarted when it exits, stopped at the end
   (`--no-trainer`: not started); its log is `run_dir/trainer/trainer.log`.
4. The operator token: `ADMIN_TOKEN`, else the one in `data_dir/admin_token` (made there, mode
   0600, on the first run; its path is printed, never its value).
5. The UI (`ui.app.serve`) until Ctrl-C or SIGTERM; then what this run started, in reverse order.
A part that cannot start ends the run with its message and status 1, after stopping what was
already started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import fcntl
import ipaddress
import os
import secrets
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlsplit

import psycopg

from serving.keys import KeyFileAuth, key_file_of
from serving.management import ManagementClient
from serving.ports import local_url, port_free
from settings import Settings, get_settings

EXIT_ALREADY_RUNNING = 1
EXIT_FAILED = 1


class AlreadyRunning(RuntimeError):
    """Another `make run` holds the lock; the message says which and where."""


def say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def single_instance(lock_path: Path, url: str) -> Iterator[None]:
    """Hold an exclusive lock for the duration; `AlreadyRunning` when another process holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = open(lock_path, "a+")  # noqa: SIM115 - held open for the lifetime of the run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise AlreadyRunning(f"already running ({holder}); stop it first (Ctrl-C there)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, {url}")
        handle.flush()
        yield
    finally:
        handle.close()


def is_local(url: str) -> bool:
    """Whether a URL's host is this machine (loopback)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_ready(settings: Settings) -> bool:
    """The readiness rule (`serving.management.is_ready`) at `MANAGEMENT_URL`, with the key of
    `TORCHSERVE_KEY_FILE` (a TorchServe that refuses it is not one this run can use)."""
    url, auth = local_url(settings.management_url), KeyFileAuth(key_file_of(settings), "management")
    with ManagementClient(url, settings.model_name, timeout=2.0, auth=auth) as client:
        return client.ready()


class TorchServePlan(enum.Enum):
    """What `make run` does about TorchServe."""

    START = "start a supervised TorchServe"
    RESTART_LEFTOVER = "stop the TorchServe an earlier run left behind, start a supervised one"
    KEEP_LEFTOVER = "leave the earlier run's TorchServe as it is (--no-torchserve)"
    USE_SUPERVISED_ELSEWHERE = "use the TorchServe another live process supervises"
    USE_FOREIGN = "use the TorchServe already serving the model; not ours"
    EXPECT = "start nothing; expect the model at INFERENCE_URL"


def plan_torchserve(
    *, leftover_pid: int | None, leftover_owner: int | None, foreign_ready: bool, local: bool, allowed: bool
) -> TorchServePlan:
    """The rule: a TorchServe is started and stopped only by the run that supervises it.

    `leftover_pid`: the TorchServe recorded in our run folder, if it runs; `leftover_owner`: the
    live process supervising it, if any; `foreign_ready`: a model is READY at MANAGEMENT_URL
    without a TorchServe in our run folder; `local`: INFERENCE_URL is on this machine;
    `allowed`: not `--no-torchserve`.
    """
    if leftover_pid is not None:
        if leftover_owner is not None:
            return TorchServePlan.USE_SUPERVISED_ELSEWHERE
        return TorchServePlan.RESTART_LEFTOVER if allowed else TorchServePlan.KEEP_LEFTOVER
    if foreign_ready:
        return TorchServePlan.USE_FOREIGN
    if allowed and local:
        return TorchServePlan.START
    return TorchServePlan.EXPECT


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def use_database(settings: Settings, cleanup: contextlib.ExitStack) -> str:
    """`db.runtime.start_database` (migrations applied); the embedded server is stopped at the end."""
    from db.runtime import start_database

    if settings.database_url:
        say("database: DATABASE_URL")
    else:
        say(f"database: starting the embedded PostgreSQL in {settings.data_dir / 'postgres'} ...")
    database = start_database(settings=settings)
    if database.embedded:
        cleanup.callback(_step("embedded PostgreSQL", database.stop))
    say("database: migrations applied")
    return database.url


def restore_live_version(settings: Settings, database_url: str) -> str | None:
    """The registry's live version served by TorchServe again (`ModelRegistry.restore_live`)."""
    from db.registry import Registry
    from serving.registry import ModelRegistry

    async def restore() -> str | None:
        registry = await Registry.open(database_url, max_size=1, application_name="make-run")
        models = ModelRegistry.from_settings(settings, registry)
        try:
            return await models.restore_live()
        finally:
            await models.close()
            await registry.close()

    return asyncio.run(restore())


def use_torchserve(
    settings: Settings, cleanup: contextlib.ExitStack, allowed: bool, database_url: str | None = None
) -> Settings:
    """Follow `plan_torchserve`, saying what is done; a started TorchServe is stopped at the end.

    Returns the settings for the UI: with the key file of the TorchServe in this run folder when
    that is the one used (started here, a leftover, or supervised elsewhere). With `database_url`,
    a TorchServe started here serves the registry's live version after every (re)start.
    """
    from serving.supervisor import Supervisor
    from serving.torchserve import ServeConfig, read_pid, seed_store, shipped_archive, stop
    from serving.watchdog import live_owner

    config = ServeConfig.from_settings(settings)
    leftover = read_pid(config)
    owner = live_owner(config) if leftover is not None else None
    plan = plan_torchserve(
        leftover_pid=leftover,
        leftover_owner=owner,
        foreign_ready=leftover is None and model_ready(settings),
        local=is_local(settings.inference_url),
        allowed=allowed,
    )
    where = settings.inference_url
    ours = settings.model_copy(update={"torchserve_key_file": config.key_file})  # its keys
    if plan is TorchServePlan.USE_SUPERVISED_ELSEWHERE:
        say(f"model: using the TorchServe at {where} (pid {leftover}), supervised by process {owner}, not by")
        say("       this run: it is neither restarted nor stopped here")
        return ours
    if plan is TorchServePlan.KEEP_LEFTOVER:
        say(f"model: a TorchServe left by an earlier run is running (pid {leftover}, {config.run_dir});")
        say("       --no-torchserve: it is used as it is and not stopped here (`make stop` ends it)")
        return ours
    if plan is TorchServePlan.USE_FOREIGN:
        say(f"model: a model is already READY at {settings.management_url}, served by a TorchServe")
        say(f"       this run did not start (not ours): using it at {where}; not restarted or stopped here")
        return settings
    if plan is TorchServePlan.EXPECT:
        say(f"model: not started here; expecting it at {where}")
        return settings
    if plan is TorchServePlan.RESTART_LEFTOVER:
        say(f"model: stopping the TorchServe an earlier run left behind (pid {leftover}, {config.run_dir})")
        stop(config)
    if seed_store(config, shipped_archive(settings)):
        say(f"model: copied {shipped_archive(settings)} into the archive folder {config.model_store}")

    def restore(server: object) -> None:
        if database_url is not None:
            version = restore_live_version(ours, database_url)
            say(f"model: live version {version} (model registry)")

    supervisor = Supervisor(config, report=lambda message: say(f"model: {message}"), on_start=restore)
    say("model: starting TorchServe (takes a few seconds) ...")
    supervisor.start()
    cleanup.callback(_step("TorchServe", supervisor.stop))
    supervisor.run_in_background()
    say(f"model: TorchServe ready at {where} (restarted if it dies)")
    return ours


def use_trainer(settings: Settings, database_url: str, cleanup: contextlib.ExitStack, allowed: bool) -> None:
    """The trainer worker beside a TorchServe on this machine (it writes into its model store),
    restarted when it exits, stopped at the end."""
    from serving.child import SupervisedProcess

    if not allowed:
        say("trainer: not started (--no-trainer); retraining runs wait in the queue")
        return
    if not is_local(settings.inference_url):
        say(f"trainer: not started here (TorchServe at {settings.inference_url} has its own model store)")
        return
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ARCHIVE_DIR": str(settings.archives),
        "DATA_DIR": str(settings.data_dir),
        "RUN_DIR": str(settings.run_dir),
        "INFERENCE_URL": settings.inference_url,
        "MANAGEMENT_URL": settings.management_url,
    }
    if settings.torchserve_key_file is not None:
        env["TORCHSERVE_KEY_FILE"] = str(settings.torchserve_key_file)
    log_file = settings.run_dir / "trainer" / "trainer.log"
    trainer = SupervisedProcess(
        "trainer",
        [sys.executable, "-m", "serving.trainer", "--exit-with-parent"],
        env,
        log_file,
        report=lambda message: say(f"trainer: {message}"),
    )
    trainer.start()
    cleanup.callback(_step("the trainer", trainer.stop))
    say(f"trainer: started (pid {trainer.pid}; log {log_file})")


ADMIN_TOKEN_FILE = "admin_token"
STORAGE_SECRET_FILE = "storage_secret"


def use_admin_token(settings: Settings) -> Settings:
    """`ADMIN_TOKEN`, or one made for this machine and kept in `data_dir/admin_token`, so the
    operator's token survives a restart."""
    return _use_secret(settings, "admin_token", ADMIN_TOKEN_FILE, "operator token", "Authorization: Bearer")


def use_storage_secret(settings: Settings) -> Settings:
    """`STORAGE_SECRET`, or one kept in `data_dir/storage_secret`: a secret made per run would make
    every browser a stranger after a restart (its own drawings no longer editable from the page,
    its remembered choices gone)."""
    return _use_secret(settings, "storage_secret", STORAGE_SECRET_FILE, "browser-storage secret", None)


def _use_secret(settings: Settings, field: str, file_name: str, what: str, use: str | None) -> Settings:
    """The setting `field`, or a random secret kept in `data_dir/file_name` (mode 0600) and reused
    by the next runs. The path is printed, never the secret (terminal output ends up in logs and
    screenshots). Runs under the run lock: no other run writes the file meanwhile."""
    if getattr(settings, field):
        return settings
    path = settings.data_dir / file_name
    try:
        secret = path.read_text().strip() if path.exists() else ""
        if secret:
            path.chmod(0o600)  # in case it was loosened by hand
            say(f"{what}: in {path}")
        else:
            secret = secrets.token_urlsafe(32)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)  # an empty leftover
            # 0600 from its creation: there is no moment where others may read it.
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
                out.write(secret + "\n")
            hint = f" (send it as {use} <token>)" if use else ""
            say(f"{what}: made one in {path}{hint}")
    except OSError as exc:
        raise RuntimeError(f"{what}: cannot use {path}: {exc}") from exc
    return settings.model_copy(update={field: secret})


def serve_ui(settings: Settings, database_url: str, on_started: Callable[[], None]) -> None:
    """The page and the API until SIGINT/SIGTERM (`ui.app.serve`; it does not migrate)."""
    from ui.app import serve

    serve(settings, database_url=database_url, on_started=on_started)


def _step(name: str, stop: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        say(f"stopping {name} ...")
        try:
            stop()
        except Exception as exc:  # keep stopping the rest
            print(f"could not stop {name}: {exc}", file=sys.stderr, flush=True)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description="Run the digit classifier app.")
    parser.add_argument("--host", help="UI address (default: UI_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="UI port (default: UI_PORT, 8500)")
    parser.add_argument("--no-torchserve", action="store_true", help="never start TorchServe here")
    parser.add_argument("--no-trainer", action="store_true", help="do not start the trainer worker")
    args = parser.parse_args(argv)

    settings = get_settings()
    updates = {k: v for k, v in (("ui_host", args.host), ("ui_port", args.port)) if v is not None}
    if updates:
        settings = settings.model_copy(update=updates)
    url = f"http://{settings.ui_host}:{settings.ui_port}"

    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops everything like Ctrl-C does
    try:
        with single_instance(settings.run_dir / "ui.lock", url), contextlib.ExitStack() as cleanup:
            if not port_free(settings.ui_host, settings.ui_port):
                print(f"make run: {url} is in use; set UI_PORT", file=sys.stderr)
                return EXIT_ALREADY_RUNNING
            database_url = use_database(settings, cleanup)
            settings = use_torchserve(
                settings, cleanup, allowed=not args.no_torchserve, database_url=database_url
            )
            use_trainer(settings, database_url, cleanup, allowed=not args.no_trainer)
            settings = use_storage_secret(use_admin_token(settings))
            serve_ui(
                settings,
                database_url,
                lambda: say(f"\n  Digit classifier: {url}  (API: {url}/docs; Ctrl-C stops all)\n"),
            )
    except AlreadyRunning as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except (RuntimeError, psycopg.Error) as exc:  # database, migrations or TorchServe
        print(f"make run: could not start: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    say("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
