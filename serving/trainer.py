"""`python -m serving.trainer`: the trainer worker, the one process that retrains the model.

A procrastinate worker (`db.queue`) on the app's PostgreSQL: it runs the task `RETRAIN_TASK` of
the queue `QUEUE`, one job at a time (concurrency 1, and every retrain job carries `LOCK`, so one
run at a time across workers). The admin API creates a run and defers its job (ui/learning.py).

A run (`retrain(run_id)`), its progress written to `training_runs` as it goes:
1. the labelled feedback (`Registry.feedback`, up to the highest id counted now), split by
   `training.feedback.is_holdout`: about a fifth is never trained on, only evaluated on;
2. fine-tuned from the live version's weights (read back from its archive) on MNIST plus the
   training part (`training.retrain`, options from the run override `RetrainConfig`);
3. exported as a new version ("2.0", "3.0", ...: the next integer major) into the archive folder,
   TorchServe's model store, with the same handler, and a model card `mnist-<version>.json`;
4. registered with TorchServe as a candidate (`serving.registry`), then candidate AND live
   version evaluated through `/predictions/mnist/<version>` on the held-out feedback and the MNIST
   test set (`mnist_eval_limit` images spread over it);
5. the gate (`serving.gate.decide`): promoted at once when it says so (and `auto_promote`, the
   default), else it stays a candidate with the gate's reason; the run ends with that reason.
A run that fails leaves its version 'failed' (unregistered) and the run failed with the error.

At start, a killed worker's leftovers are cleared: its jobs still 'doing' are failed
(`db.queue.fail_stalled_jobs`, which also frees the lock), every run still 'running' is failed
("the trainer stopped during this run", `Registry.fail_running`), and their half-made versions
too. Every `restore_interval_s` the trainer also checks that TorchServe serves the registry's
live version (`ModelRegistry.restore_live`): a TorchServe container or replica that restarted
alone comes back on the promoted version, not the shipped one.

SIGTERM: the run in progress is failed at once ("the trainer stopped during this run"), its
training thread ends at its next progress report. `--keep-live-only`: no worker, only the
live-version check (a sidecar per TorchServe replica, see serving/README.md). `--health`: the
container's healthcheck (the heartbeat file written by that check's loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.queue import QUEUE, RETRAIN_TASK, fail_stalled_jobs, make_app
from db.records import ModelVersion
from db.registry import Registry
from serving import gate
from serving.evaluate import evaluate, mnist_examples
from serving.keys import headers, key_file_of
from serving.management import ManagementError
from serving.ports import local_url
from serving.registry import ModelRegistry, next_version, sha256_of
from settings import Settings, get_settings

if TYPE_CHECKING:
    import numpy as np
    import procrastinate

log = logging.getLogger("serving.trainer")

STOPPED_MESSAGE = "the trainer stopped during this run"
# Options of a run that are not RetrainConfig fields.
RUN_OPTIONS = ("mnist_eval_limit", "auto_promote")
HEARTBEAT_GRACE_S = 30.0
SHUTDOWN_GRACE_S = 2.0
# Shares of the run's progress bar: training, then export + registration, then evaluation.
TRAIN_SHARE, EXPORT_SHARE = 0.8, 0.85


@dataclass(frozen=True)
class RunOptions:
    """A run's options: RetrainConfig overrides, how many MNIST test images to evaluate on, and
    whether the gate may promote by itself."""

    retrain: dict[str, Any]
    mnist_eval_limit: int | None
    auto_promote: bool

    @classmethod
    def parse(cls, options: Mapping[str, Any], default_limit: int | None) -> RunOptions:
        """From the run's JSON options; ValueError names what is wrong (checked before any work)."""
        from training.retrain import RetrainConfig

        if not isinstance(options, Mapping):
            raise ValueError("options must be a JSON object")
        limit = options.get("mnist_eval_limit", default_limit)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"mnist_eval_limit must be a positive integer, not {limit!r}")
        auto = options.get("auto_promote", True)
        if not isinstance(auto, bool):
            raise ValueError(f"auto_promote must be true or false, not {auto!r}")
        retrain = {k: v for k, v in options.items() if k not in RUN_OPTIONS}
        RetrainConfig.from_options(retrain)  # ValueError for unknown names and wrong types
        return cls(retrain, limit, auto)


class Trainer:
    """What a run needs: the registry, TorchServe (through `ModelRegistry`) and the settings."""

    def __init__(self, settings: Settings, registry: Registry, models: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.models = models
        self._mnist: tuple[np.ndarray, np.ndarray] | None = None
        self._stop = threading.Event()

    # -- inputs ------------------------------------------------------------------------------------
    def mnist_train(self) -> tuple[np.ndarray, np.ndarray]:
        """The MNIST training set (read once per process; downloaded into MNIST_DIR when missing)."""
        if self._mnist is None:
            from training.data import load_mnist

            data = load_mnist(self.settings.mnist_files)
            self._mnist = (data.train_images, data.train_labels)
        return self._mnist

    def inference_headers(self) -> dict[str, str]:
        """TorchServe's current inference key (re-read: a restarted TorchServe has new keys)."""
        return headers(key_file_of(self.settings), "inference")

    async def progress(
        self, run_id: int, fraction: float, message: str, entry: dict[str, Any] | None
    ) -> None:
        await self.registry.update_run(run_id, min(max(fraction, 0.0), 1.0), message, entry)

    # -- the run -----------------------------------------------------------------------------------
    async def run(self, run_id: int, job_id: int | None = None) -> None:
        """One retraining run, start to finish (see the module docstring). Never raises for a run
        that fails: the run records why."""
        run = await self.registry.get_run(run_id)
        if run is None:
            log.warning("run %s does not exist: job %s skipped", run_id, job_id)
            return
        if run.finished:
            log.info("run %s is %s already: job %s skipped", run_id, run.status, job_id)
            return
        await self.registry.start_run(run_id, job_id)
        log.info("run %s (job %s) started: options %s", run_id, job_id, run.options)
        try:
            options = RunOptions.parse(run.options, self.settings.mnist_eval_limit)
            version, promoted, message = await self._run(run_id, options)
        except asyncio.CancelledError:  # the worker stops (SIGTERM): say so now, not at the next start
            self._stop.set()  # the training thread ends at its next progress report
            with contextlib.suppress(Exception):
                await asyncio.shield(self.registry.finish_run(run_id, "failed", STOPPED_MESSAGE))
            raise
        except Exception as exc:  # the run records why; the worker goes on with the next job
            message = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:1000]
            log.exception("run %s failed", run_id)
            with contextlib.suppress(Exception):
                await self.registry.finish_run(run_id, "failed", message)
            return
        await self.registry.finish_run(run_id, "succeeded", message, version=version, promoted=promoted)
        log.info("run %s succeeded: version %s, %s", run_id, version, message)

    async def _run(self, run_id: int, options: RunOptions) -> tuple[str, bool, str]:
        from training import feedback as fb
        from training.retrain import RetrainConfig

        cfg = RetrainConfig.from_options(options.retrain)
        await self.models.restore_live()
        live = await self.registry.live_version()
        if live is None:
            raise RuntimeError("no live version to start from")
        _, max_id = await self.registry.feedback_stats()  # the rows counted now, not those added meanwhile
        rows = [row async for row in self.registry.feedback(max_id=max_id)]
        train_rows, holdout_rows = fb.split(rows)
        examples, skipped = await asyncio.to_thread(fb.to_examples, train_rows)
        await self.progress(
            run_id,
            0.01,
            f"{len(examples)} drawings to train on, {len(holdout_rows)} held out"
            + (f", {len(skipped)} unreadable skipped" if skipped else "")
            + f"; fine-tuning version {live.version}",
            None,
        )
        images, labels = await asyncio.to_thread(self.mnist_train)
        base = await asyncio.to_thread(self._weights, live)
        loop = asyncio.get_running_loop()

        def report(fraction: float, info: dict[str, Any]) -> None:
            if self._stop.is_set():
                raise RuntimeError(STOPPED_MESSAGE)
            entry = {k: v for k, v in info.items() if k != "event"} if info.get("event") == "epoch" else None
            message = _progress_message(info)
            future = asyncio.run_coroutine_threadsafe(
                self.progress(run_id, TRAIN_SHARE * fraction, message, entry), loop
            )
            if entry is not None:  # epochs are history: wait until stored; steps are best effort
                future.result()

        from training.retrain import retrain

        result = await asyncio.to_thread(retrain, base, images, labels, examples, cfg, report)
        trained = f"trained in {result.seconds:.0f} s; building the archive"
        await self.progress(run_id, TRAIN_SHARE, trained, None)

        version = next_version([v.version for v in await self.registry.versions()])
        file_name = f"{self.settings.model_name}-{version}.mar"
        mar = await asyncio.to_thread(self._export, result.state_dict, version, file_name, live)
        training_info = {
            "config": dataclasses.asdict(cfg),
            "history": result.history,
            "seconds": round(result.seconds, 1),
            "feedback_trained": len(examples),
            "feedback_held_out": len(holdout_rows),
            "feedback_skipped": len(skipped),
        }
        await self.registry.add_version(
            version,
            file_name,
            await asyncio.to_thread(sha256_of, mar),
            parent_version=live.version,
            feedback_count=len(examples),
            feedback_max_id=max_id,
            evaluation={"training": training_info},
            state="candidate",
            reason="being evaluated",
            run_id=run_id,
        )
        try:
            await self.models.register(version)
            await self.progress(run_id, EXPORT_SHARE, f"version {version} registered; evaluating", None)
            holdout = [(row.png, int(row.label)) for row in holdout_rows]
            limit = options.mnist_eval_limit
            mnist = await asyncio.to_thread(mnist_examples, self.settings.mnist_files, limit)
            evaluations = {}
            for i, name in enumerate((version, live.version)):
                evaluations[name] = await self._evaluate(name, holdout, mnist)
                await self.progress(run_id, EXPORT_SHARE + 0.07 * (i + 1), f"evaluated version {name}", None)
            decision = gate.decide(evaluations[version], evaluations[live.version])
            baseline = {"version": live.version, **evaluations[live.version]}
            compared = {**evaluations[version], "compared_with": baseline}
            stored = {**compared, "training": training_info, "gate": decision.reason}
            await self.registry.set_evaluation(version, stored)
            await self.registry.set_evaluation(live.version, {**live.evaluation, **evaluations[live.version]})
            _write_card(mar, version, live.version, training_info, compared, decision)
        except Exception as exc:
            await self._fail_version(version, f"evaluation failed: {type(exc).__name__}: {exc}")
            raise
        if decision.promote and options.auto_promote:
            await self.models.promote(version, decision.reason)
            return version, True, decision.reason
        reason = decision.reason if options.auto_promote else f"auto_promote off; gate: {decision.reason}"
        await self.registry.set_state(version, "candidate", reason)
        return version, False, reason

    async def _evaluate(
        self, version: str, holdout: Sequence[tuple[bytes, int]], mnist: Sequence[tuple[bytes, int]]
    ) -> dict[str, Any]:
        url, name = local_url(self.settings.inference_url), self.settings.model_name
        keys = self.inference_headers()
        return {
            "feedback": await evaluate(url, name, version, holdout, keys),
            "mnist": await evaluate(url, name, version, mnist, keys),
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _weights(self, live: ModelVersion) -> dict[str, Any]:
        from training.export import weights_from_archive

        return weights_from_archive(self.models.archive_dir / live.archive_file)

    def _export(self, state: Mapping[str, Any], version: str, file_name: str, parent: ModelVersion) -> Path:
        """The new archive, built like the shipped one (same handler), with the parent's calibration."""
        import torch

        from training.export import build

        calibration = _calibration(self.models.archive_dir / parent.archive_file)
        with tempfile.TemporaryDirectory(prefix="retrain-") as work:
            weights = Path(work) / "mnist.pt"
            torch.save(dict(state), weights)
            return build(
                weights,
                self.models.archive_dir,
                version=version,
                file_name=file_name,
                calibration=calibration,
                update_card=False,
            )

    async def _fail_version(self, version: str, message: str) -> None:
        """A version whose run failed: 'failed', and out of TorchServe (never the live one)."""
        with contextlib.suppress(Exception):
            record = await self.registry.get_version(version)
            if record is None or record.live:
                return
            await self.registry.set_state(version, "failed", message[:1000])
            with contextlib.suppress(ManagementError):
                await self.models.management.unregister(version)

    # -- the worker's start ------------------------------------------------------------------------
    async def clear_leftovers(self, app: procrastinate.App) -> list[int]:
        """A killed worker's jobs, runs and half-made versions marked failed; the failed run ids."""
        jobs = await fail_stalled_jobs(app, seconds=0)
        failed = await self.registry.fail_running(STOPPED_MESSAGE)
        if jobs or failed:
            log.warning("cleared after a stopped trainer: jobs %s, runs %s", jobs, failed)
        for version in await self.registry.versions():
            if version.run_id in failed and not version.live:
                await self._fail_version(version.version, f"{STOPPED_MESSAGE} (run {version.run_id})")
        return failed

    async def keep_live(self, interval_s: float) -> None:
        """Forever: TorchServe serves the registry's live version (after TorchServe restarts); the
        heartbeat file says this loop (hence the worker's event loop) is alive."""
        beat = heartbeat_file(self.settings)
        beat.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                if await self.models.restore_live() is not None:
                    synced_file(self.settings).touch()  # this TorchServe serves the live version
                await self.models.drop_leftovers()
            except Exception as exc:  # TorchServe restarting, database down: next time
                log.debug("restore_live: %s", exc)
            beat.write_text(f"{time.time():.0f}\n")
            await asyncio.sleep(interval_s)


def _progress_message(info: Mapping[str, Any]) -> str:
    epoch = info.get("epoch")
    loss, accuracy = info.get("loss"), info.get("accuracy")
    parts = [f"epoch {epoch}" if epoch is not None else "training"]
    if info.get("event") == "step" and info.get("steps"):
        parts.append(f"step {info.get('step')}/{info.get('steps')}")
    if isinstance(loss, int | float):
        parts.append(f"loss {loss:.4f}")
    if isinstance(accuracy, int | float):
        parts.append(f"accuracy {100 * accuracy:.2f}%")
    return ", ".join(parts)


def _calibration(mar: Path) -> dict[str, Any] | None:
    """The archive's calibration.json ({"temperature": T}), if it has one."""
    try:
        with zipfile.ZipFile(mar) as z:
            names = [n for n in z.namelist() if n.endswith("calibration.json")]
            return json.loads(z.read(names[0])) if names else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _write_card(
    mar: Path,
    version: str,
    parent: str,
    training: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    decision: gate.Decision,
) -> None:
    """`<archive>.json` beside the archive: what trained it and how it compared."""
    card = {
        "version": version,
        "parent_version": parent,
        "archive": {"file": mar.name, "sha256": sha256_of(mar), "bytes": mar.stat().st_size},
        "training": dict(training),
        "evaluation": dict(evaluation),
        "gate": {"promote": decision.promote, "reason": decision.reason},
    }
    mar.with_suffix(".json").write_text(json.dumps(card, indent=2, default=str) + "\n")


# -- the process ----------------------------------------------------------------------------------


def heartbeat_file(settings: Settings) -> Path:
    return Path(settings.run_dir) / "trainer" / "heartbeat"


def healthy(settings: Settings, now: float | None = None) -> tuple[bool, str]:
    """The container's healthcheck: the worker's loop wrote its heartbeat recently (never raises)."""
    path = heartbeat_file(settings)
    limit = 3 * settings.restore_interval_s + HEARTBEAT_GRACE_S
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False, f"no heartbeat yet ({path})"
    return age <= limit, f"heartbeat {age:.0f} s ago (limit {limit:.0f} s)"


def synced_file(settings: Settings) -> Path:
    return Path(settings.run_dir) / "trainer" / "synced"


def ready(settings: Settings, now: float | None = None) -> tuple[bool, str]:
    """The keep-live sidecar's readiness: healthy, and its TorchServe served the registry's live
    version at least once. A new replica (its pod not ready until then) so never answers the
    public with the shipped 1.0 after another version was promoted. Once synced it stays ready
    while the database is away: predictions must not stop with it."""
    ok, detail = healthy(settings, now)
    if not ok:
        return ok, detail
    if not synced_file(settings).exists():
        return False, f"{detail}; TorchServe does not serve the live version yet"
    return True, f"{detail}; TorchServe serves the live version"


async def _exit_with_parent(parent: int) -> None:
    """Stop the worker when the process that started it is gone (`make run` killed)."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("parent process %s is gone: stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)


async def keep_live_only(settings: Settings) -> None:
    """No worker: only `restore_live` every `restore_interval_s`, until SIGTERM. A sidecar beside
    each TorchServe replica (MANAGEMENT_URL on the pod's loopback): every replica converges on the
    registry's live version, a new one included (the archives on a shared read-only volume)."""
    if not settings.database_url:
        raise SystemExit("serving.trainer: DATABASE_URL is not set")
    registry = await Registry.open(settings.database_url, max_size=1, application_name="keep-live")
    models = ModelRegistry.from_settings(settings, registry)
    trainer = Trainer(settings, registry, models)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(trainer.keep_live(settings.restore_interval_s))
    print(f"keep-live: following the registry's live version at {settings.management_url}", flush=True)
    try:
        await stop.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await models.close()
        await registry.close()


async def serve(settings: Settings, *, exit_with_parent: bool = False) -> None:
    """The worker until SIGTERM/SIGINT: the job in progress gets 2 s, then its run is failed
    ("the trainer stopped during this run") and the process ends."""
    if not settings.database_url:
        raise SystemExit("serving.trainer: DATABASE_URL is not set")
    settings.archives.mkdir(parents=True, exist_ok=True)
    app = make_app(settings.database_url)
    registry = await Registry.open(settings.database_url, application_name="trainer")
    models = ModelRegistry.from_settings(settings, registry)
    trainer = Trainer(settings, registry, models)

    @app.task(name=RETRAIN_TASK, queue=QUEUE, pass_context=True)
    async def retrain(context: procrastinate.JobContext, run_id: int) -> None:
        await trainer.run(run_id, context.job.id)

    background: list[asyncio.Task[None]] = []
    try:
        async with app.open_async():
            await trainer.clear_leftovers(app)
            background.append(asyncio.create_task(trainer.keep_live(settings.restore_interval_s)))
            if exit_with_parent:
                background.append(asyncio.create_task(_exit_with_parent(os.getppid())))
            print(f"trainer: ready (queue {QUEUE!r}, archives in {settings.archives})", flush=True)
            await app.run_worker_async(
                queues=[QUEUE],
                concurrency=1,
                name="trainer",
                install_signal_handlers=True,
                shutdown_graceful_timeout=SHUTDOWN_GRACE_S,
            )
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await models.close()
        await registry.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process dies")
    parser.add_argument("--health", action="store_true", help="exit 0 when a worker runs here, else 1")
    parser.add_argument(
        "--ready", action="store_true", help="--health, and TorchServe served the live version at least once"
    )
    parser.add_argument(
        "--keep-live-only", action="store_true", help="no worker: keep TorchServe on the live version"
    )
    args = parser.parse_args(argv)
    if args.health or args.ready:
        ok, detail = (ready if args.ready else healthy)(get_settings())
        print(f"{'healthy' if ok else 'unhealthy'}: {detail}")
        return 0 if ok else 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("procrastinate", "httpx"):  # every job poll, every management call
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.keep_live_only:
        asyncio.run(keep_live_only(get_settings()))
    else:
        asyncio.run(serve(get_settings(), exit_with_parent=args.exit_with_parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
