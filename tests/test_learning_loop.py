"""The learning loop end to end, with the real parts: PostgreSQL, TorchServe, the trainer worker.

Feedback in styles the shipped model often gets wrong (training.styles: 7s with a crossbar, 1s
with a flag) is stored as people's labelled predictions; a short retrain runs as a queued job in
the real worker process (`python -m serving.trainer`); its candidate is registered, evaluated
through `/predictions/mnist/<version>` beside the live version, promoted by the gate; public
predictions then come from it and are better on the held-out part of that style; a rollback
serves the old version again; TorchServe restarted knows only the shipped archive, and the
worker puts the promoted version back. A worker SIGKILLed mid-run leaves the run failed and the
next run works; a candidate trained on poisoned labels (MNIST 1s labelled 7), better on its
own held-out feedback but worse on MNIST, stays a candidate with the gate's reason.

Short configurations keep each run well under a minute of training on the shared cores; the
MNIST comparison uses 2,000 test images spread over the set (0.05-point steps, finer than the
gate's 0.1-point tolerance).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from db.queue import defer_retrain, make_app
from db.records import NewPrediction, TrainingRun
from db.registry import Registry
from db.store import Store
from serving.evaluate import mnist_examples, summarise
from serving.management import AsyncManagementClient
from serving.registry import ModelRegistry
from serving.torchserve import ServeConfig, start, stop
from serving.trainer import STOPPED_MESSAGE
from tests.fixtures.postgres import TEMPLATE, PostgresServer
from tests.fixtures.torchserve import own_torchserve
from training import styles
from training.feedback import is_holdout

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
START_S = 300.0
RUN_TIMEOUT_S = 480.0
MNIST_EVAL = 2000
# Measured in-process on this set (styles.make_set(400, seed=16), ids 1..400): held-out 92.5% ->
# 97.5%, MNIST (these 2,000) 99.65% -> 99.65%, about a minute of training on the shared cores. A
# larger learning rate or feedback share learns the flagged 1s fully but costs MNIST 7s (the
# shapes conflict: the gate then holds the candidate back, as it should).
SHORT = {
    "epochs": 1,
    "mnist_samples": 3000,
    "lr": 0.001,
    "feedback_weight": 0.1,
    "threads": 2,
    "mnist_eval_limit": MNIST_EVAL,
}
LONG = {"epochs": 8, "mnist_samples": 60000, "threads": 1, "mnist_eval_limit": MNIST_EVAL}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeConfig]:
    """This module's own TorchServe (one worker per version): its versions change and it restarts."""
    with own_torchserve(tmp_path_factory.mktemp("loop"), START_S) as config:
        yield config


@pytest.fixture
async def loop_db(served: ServeConfig, postgres: PostgresServer) -> AsyncIterator[str]:
    """A fresh migrated database (with the queue's schema) and a TorchServe back at the shipped 1.0."""
    async with AsyncManagementClient(
        served.management_url, served.model_name, auth=served.auth("management")
    ) as client:
        await client.set_default("1.0")
        for version in await client.versions():
            if version["modelVersion"] != "1.0":
                await client.unregister(version["modelVersion"])
    for leftover in served.model_store.glob("mnist-*"):
        leftover.unlink()
    url = postgres.create_database(template=TEMPLATE)
    try:
        yield url
    finally:
        postgres.drop_database(str(psycopg.conninfo.conninfo_to_dict(url)["dbname"]))


class Worker:
    """`python -m serving.trainer` on this module's TorchServe and a test database."""

    def __init__(self, served: ServeConfig, url: str, mnist_dir: Path, log: Path) -> None:
        self.log = log
        self.env = {
            **os.environ,
            "DATABASE_URL": url,
            "INFERENCE_URL": served.inference_url,
            "MANAGEMENT_URL": served.management_url,
            "TORCHSERVE_KEY_FILE": str(served.key_file),
            "ARCHIVE_DIR": str(served.model_store),
            "MNIST_DIR": str(mnist_dir),
            "MODEL_WORKERS": "1",
            "RESTORE_INTERVAL_S": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "serving.trainer"], cwd=ROOT, env=self.env, stdout=out, stderr=out
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def worker(served: ServeConfig, loop_db: str, mnist_dir: Path, tmp_path: Path) -> Iterator[Worker]:
    started = Worker(served, loop_db, mnist_dir, tmp_path / "trainer.log")
    started.start()
    try:
        yield started
    finally:
        started.stop()


async def store_feedback(url: str, examples: list[tuple[bytes, int]]) -> list[int]:
    """Each drawing as a labelled prediction, as people leave them; their ids."""
    store = await Store.open(url)
    try:
        ids = []
        for png, label in examples:
            probabilities = [0.1] * 10
            prediction = NewPrediction(
                digit=label,
                confidence=0.1,
                probabilities=probabilities,
                model_name="mnist",
                model_version="1.0",
                latency_ms=5.0,
                image_png=png,
                input_pixels=bytes(784),
            )
            ids.append(await store.record_prediction(prediction))
            await store.set_label(ids[-1], label)
        return ids
    finally:
        await store.close()


async def queue_run(url: str, registry: Registry, options: dict[str, Any]) -> TrainingRun:
    """What the admin API does: a run, its job on the queue, the job linked to the run."""
    run = await registry.create_run(options)
    app = make_app(url)
    async with app.open_async():
        job = await defer_retrain(app, run.id)
    return await registry.set_job(run.id, job)


async def wait_run(registry: Registry, run_id: int, worker: Worker, until: str = "finished") -> TrainingRun:
    deadline, run = time.monotonic() + RUN_TIMEOUT_S, None
    while time.monotonic() < deadline:
        run = await registry.get_run(run_id)
        assert run is not None
        training = run.status == "running" and run.message.startswith("epoch")  # a step was reported
        if run.finished or (until == "training" and training):
            return run
        assert worker.process is None or worker.process.poll() is None, worker.text()[-3000:]
        await asyncio.sleep(0.5)
    pytest.fail(f"run {run_id} not {until} after {RUN_TIMEOUT_S} s: {run}\n{worker.text()[-3000:]}")


def predict(
    served: ServeConfig, examples: list[tuple[bytes, int]], version: str | None = None
) -> tuple[float, set[str]]:
    """Accuracy and the versions that answered, through `/predictions/mnist[/<version>]`."""
    url = f"{served.inference_url}/predictions/{served.model_name}" + (f"/{version}" if version else "")
    digits, versions = [], set()
    with httpx.Client(auth=served.auth("inference"), timeout=30) as client:
        for png, _ in examples:
            answer = client.post(url, content=png, headers={"Content-Type": "image/png"})
            assert answer.status_code == 200, answer.text
            digits.append(answer.json()["digit"])
            versions.add(answer.json()["model_version"])
    return summarise([label for _, label in examples], digits)["accuracy"], versions


def public_version(served: ServeConfig, png: bytes) -> str:
    return predict(served, [(png, 0)])[1].pop()


async def test_feedback_retrains_a_better_version_promoted_rolled_back_and_kept_after_a_restart(
    served: ServeConfig, loop_db: str, worker: Worker
):
    examples = styles.make_set(400, seed=16)
    ids = await store_feedback(loop_db, examples)
    held_out = [example for i, example in zip(ids, examples, strict=True) if is_holdout(i)]
    assert 50 <= len(held_out) <= 110
    async with await Registry.open(loop_db) as registry:
        run = await queue_run(loop_db, registry, SHORT)
        assert run.status == "queued" and run.job_id is not None
        run = await wait_run(registry, run.id, worker)
        assert run.status == "succeeded", run.message
        assert (run.version, run.promoted, run.progress) == ("2.0", True, 1.0), run.message
        assert run.message.startswith("promoted by the gate: ") and run.message.count("%") >= 4
        assert [entry["epoch"] for entry in run.history] == [1]
        assert {"loss", "accuracy"} <= set(run.history[0])

        version = await registry.get_version("2.0")
        assert version is not None and version.state == "live" and version.parent_version == "1.0"
        assert version.feedback_count == len(ids) - len(held_out)
        assert version.feedback_max_id == max(ids) and version.run_id == run.id
        evaluation = version.evaluation
        assert evaluation["mnist"]["n"] == MNIST_EVAL and evaluation["feedback"]["n"] == len(held_out)
        assert evaluation["compared_with"]["version"] == "1.0"
        assert evaluation["feedback"]["accuracy"] > evaluation["compared_with"]["feedback"]["accuracy"]
        assert (served.model_store / "mnist-2.0.mar").is_file() and (
            served.model_store / "mnist-2.0.json"
        ).is_file()
        old = await registry.get_version("1.0")
        assert old is not None and (old.state, old.reason) == ("candidate", "replaced by 2.0")

        # Public predictions (no version in the URL) now come from 2.0, better on the held-out style.
        new_accuracy, answered = predict(served, held_out)
        assert answered == {"2.0"}
        old_accuracy, _ = predict(served, held_out, "1.0")
        assert new_accuracy > old_accuracy, (new_accuracy, old_accuracy)

        # Rollback and promotion again, as the operator does them (serving.registry).
        management = AsyncManagementClient(
            served.management_url, served.model_name, auth=served.auth("management")
        )
        models = ModelRegistry(
            registry, management, served.model_store, workers=1, batch_size=4, max_batch_delay_ms=0
        )
        try:
            await models.promote("1.0", "rolled back by the operator")
            assert public_version(served, held_out[0][0]) == "1.0"
            await models.promote("2.0", "promoted by the operator")
            assert public_version(served, held_out[0][0]) == "2.0"
        finally:
            await models.close()

    # TorchServe restarts knowing only the shipped archive; the worker serves the promoted one again.
    stop(served)
    start(served, timeout=START_S)
    deadline = time.monotonic() + 60
    while public_version(served, held_out[0][0]) != "2.0":
        assert time.monotonic() < deadline, worker.text()[-3000:]
        time.sleep(0.5)


async def test_a_killed_worker_fails_its_run_and_a_candidate_worse_on_mnist_is_held_back(
    served: ServeConfig, loop_db: str, worker: Worker, mnist_dir: Path
):
    # Poisoned labels: MNIST 1s labelled 7. Better on its own held-out part, worse on MNIST.
    ones = [(png, 7) for png, label in mnist_examples(mnist_dir, 3000) if label == 1][:300]
    await store_feedback(loop_db, ones)
    async with await Registry.open(loop_db) as registry:
        long = await queue_run(loop_db, registry, LONG)
        running = await wait_run(registry, long.id, worker, until="training")
        assert running.status == "running"
        worker.kill()
        killed = await registry.get_run(long.id)
        assert killed is not None and killed.status == "running"  # nobody is left to say otherwise

        second = await queue_run(loop_db, registry, {**SHORT, "feedback_weight": 0.5, "lr": 0.01})
        worker.start()  # a new worker: the killed one's run is failed, the queue moves on
        failed = await wait_run(registry, long.id, worker)
        assert (failed.status, failed.message) == ("failed", STOPPED_MESSAGE)
        assert failed.finished_at is not None

        run = await wait_run(registry, second.id, worker)
        assert run.status == "succeeded", run.message
        assert run.version == "2.0" and run.promoted is False
        assert run.message.startswith("not promoted: MNIST test more than 0.1 point below live"), run.message
        version = await registry.get_version("2.0")
        assert version is not None and (version.state, version.reason) == ("candidate", run.message)
        assert (
            version.evaluation["feedback"]["accuracy"]
            > version.evaluation["compared_with"]["feedback"]["accuracy"]
        )
        live = await registry.live_version()
        assert live is not None and live.version == "1.0"
        assert public_version(served, ones[0][0]) == "1.0"
