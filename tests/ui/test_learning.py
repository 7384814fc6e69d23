"""ui/learning.py: the pure helpers, the loop's slot, and `LearningService` on the real parts: a fresh
PostgreSQL database (the registry, procrastinate's queue) and the session's real TorchServe (versions
registered, promoted, rolled back, retired, scaled through its management API). Then the admin API
on the app `create_app` builds with the loop it opens itself on that database."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from db.queue import defer_retrain, make_app
from db.registry import Registry
from db.stats import compute_stats
from db.store import Store
from serving.management import AsyncManagementClient
from serving.registry import ModelRegistry, sha256_of
from tests.db.samples import prediction
from tests.fixtures.torchserve import TorchServeInstance, copy_as_version
from tests.ui.learning_fakes import TOKEN, simulate_admin
from ui.admin_views import accuracy_chart, promote_label
from ui.learning import (
    LearningService,
    LearningSlot,
    LiveVersion,
    LoopUnavailable,
    Refused,
    UnavailableLearning,
    UnknownPrediction,
    UnknownRun,
    UnknownVersion,
    VersionView,
    accuracy,
    with_labelled,
)

ROOT = Path(__file__).resolve().parents[2]
V2_EVALUATION = {
    "mnist": {"accuracy": 0.9951, "n": 10000},
    "feedback": {"accuracy": 0.93, "n": 200, "per_digit": {}},
}


# ------------------------------------------------------------------------ pure parts


def view(version: str, metrics: dict[str, Any], live: bool = False) -> VersionView:
    return VersionView(version, live, "live" if live else "candidate", 1, metrics, "")


def test_accuracy_reads_the_evaluation_and_tolerates_its_absence() -> None:
    assert accuracy({"mnist": {"accuracy": 0.99}}, "mnist") == 0.99
    assert accuracy({"feedback": {"accuracy": 1}}, "feedback") == 1.0
    assert accuracy({}, "feedback") is None
    assert accuracy({"mnist": {"accuracy": True}}, "mnist") is None  # not a number
    assert accuracy({"mnist": "high"}, "mnist") is None


def test_with_labelled_adds_each_versions_accuracy_on_peoples_labels() -> None:
    stats = compute_stats([("1.0", 3, 3, 3), ("1.0", 5, 3, 1), ("2.0", None, 1, 4)])
    out = with_labelled([view("1.0", {"mnist": {"accuracy": 0.99}}), view("2.0", {})], stats)
    assert out[0].metrics == {"mnist": {"accuracy": 0.99}, "labelled": {"accuracy": 0.75, "n": 4}}
    assert out[1].metrics == {}  # nothing labelled for 2.0
    assert with_labelled(out, None) == out


def test_only_the_learning_service_knows_the_loops_parts() -> None:
    """ui/ reaches the registry, the queue and the served versions through ui/learning.py only (and
    ui/app.py, which opens it): the page and the API see the `Learning` protocol."""
    parts = {"db.registry", "db.queue", "serving.registry", "serving.trainer", "procrastinate"}
    importers = set()
    for path in (ROOT / "ui").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == part or name.startswith(part + ".") for name in names for part in parts):
                importers.add(path.name)
    assert importers <= {"learning.py", "app.py"} and "learning.py" in importers, importers


async def test_a_slot_that_cannot_open_says_why_and_tries_again() -> None:
    calls = []

    async def opener() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("connection refused")
        return UnavailableLearning("second"), _closed

    slot = LearningSlot(UnavailableLearning("starting"), opener=opener, retry_s=0.0)
    first = await slot.get()
    with pytest.raises(LoopUnavailable, match="could not be opened: connection refused"):
        await first.models()
    second = await slot.get()
    with pytest.raises(LoopUnavailable, match="second"):
        await second.models()
    assert await slot.get() is second and len(calls) == 2  # opened: not again
    await slot.close()


async def _closed() -> None:
    return None


# ------------------------------------------------------------------------ the real parts


@dataclass
class Loop:
    service: LearningService
    registry: Registry
    management: AsyncManagementClient
    url: str


async def reset_torchserve(client: AsyncManagementClient) -> None:
    """TorchServe as the session started it: 1.0 the default, nothing else registered."""
    await client.set_default("1.0")
    for described in await client.versions():
        if described["modelVersion"] != "1.0":
            await client.unregister(described["modelVersion"])


async def add_candidate(registry: Registry, store: Path, version: str = "2.0") -> None:
    name = copy_as_version(store, version, prefix="mnist-admin")
    await registry.add_version(
        version,
        name,
        sha256_of(store / name),
        parent_version="1.0",
        feedback_count=120,
        evaluation=V2_EVALUATION,
        reason="held back: held-out feedback 93.0 % vs 95.0 %",
    )


# TorchServe registers a second version in several tests below: a few seconds each.
slow = pytest.mark.slow


@pytest.fixture
async def loop(db_url: str, torchserve: TorchServeInstance) -> AsyncIterator[Loop]:
    registry = await Registry.open(db_url)
    client = AsyncManagementClient(
        torchserve.management_url, torchserve.model_name, auth=torchserve.config.auth("management")
    )
    models = ModelRegistry(
        registry, client, torchserve.model_store, workers=1, batch_size=1, max_batch_delay_ms=0, drain_s=0.0
    )
    await models.seed()  # the shipped 1.0, live
    await add_candidate(registry, torchserve.model_store)
    service = LearningService(registry, models, make_app(db_url), defer_retrain)
    try:
        yield Loop(service, registry, client, db_url)
    finally:
        await service.close()
        await reset_torchserve(client)
        await client.close()
        await registry.close()


async def default_version(client: AsyncManagementClient) -> str:
    return str((await client.describe())[0]["modelVersion"])


@slow
async def test_models_are_the_registry_with_torchserves_workers(loop: Loop) -> None:
    versions = {v.version: v for v in await loop.service.models()}
    assert set(versions) == {"1.0", "2.0"}
    assert (versions["1.0"].live, versions["1.0"].state) == (True, "live")
    assert versions["1.0"].workers >= 1  # served by the session's TorchServe
    assert (versions["2.0"].live, versions["2.0"].state, versions["2.0"].workers) == (False, "candidate", 0)
    assert versions["2.0"].metrics == V2_EVALUATION and versions["2.0"].parent_version == "1.0"
    assert versions["2.0"].feedback_count == 120


@slow
async def test_retrain_queues_a_job_linked_to_its_run(loop: Loop) -> None:
    first = await loop.service.retrain({"epochs": 1})
    second = await loop.service.retrain({})
    assert (first.status, first.progress, first.options) == ("queued", 0.0, {"epochs": 1})
    assert second.id == first.id + 1
    with psycopg.connect(loop.url) as conn:
        runs = conn.execute("SELECT id, job_id FROM training_runs ORDER BY id").fetchall()
        jobs = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT id, queue_name, task_name, lock, args, status FROM procrastinate_jobs"
            ).fetchall()
        }
    assert [r[0] for r in runs] == [first.id, second.id]
    for run_id, job_id in runs:
        assert job_id is not None, "the run is linked to its job"
        assert jobs[job_id] == ("training", "retrain", "retrain", {"run_id": run_id}, "todo")
    assert [r.id for r in await loop.service.runs()] == [second.id, first.id]


@slow
async def test_a_run_moves_as_the_worker_writes_it(loop: Loop) -> None:
    run = await loop.service.retrain({})
    await loop.registry.start_run(run.id)
    await loop.registry.update_run(run.id, 0.5, "epoch 1 of 2", {"epoch": 1, "loss": 0.2, "accuracy": 0.97})
    moving = await loop.service.job(run.id)
    assert (moving.status, moving.progress, moving.message) == ("running", 0.5, "epoch 1 of 2")
    assert moving.history == [{"epoch": 1, "loss": 0.2, "accuracy": 0.97}] and moving.active
    await loop.registry.finish_run(run.id, "succeeded", "held back", version="2.0")
    done = await loop.service.job(run.id)
    assert (done.status, done.progress, done.version, done.promoted, done.active) == (
        "succeeded",
        1.0,
        "2.0",
        False,
        False,
    )
    with pytest.raises(UnknownRun):
        await loop.service.job(run.id + 100)


@slow
async def test_promote_roll_back_retire_through_torchserve(loop: Loop) -> None:
    promoted = await loop.service.promote("2.0")
    assert promoted.live and promoted.workers >= 1
    assert await default_version(loop.management) == "2.0"  # public predictions go to 2.0
    versions = {v.version: v for v in await loop.service.models()}
    assert (versions["1.0"].live, versions["1.0"].reason) == (False, "replaced by 2.0")
    with pytest.raises(LiveVersion):
        await loop.service.retire("2.0")
    back = await loop.service.promote("1.0")  # the rollback
    assert back.live and await default_version(loop.management) == "1.0"
    retired = await loop.service.retire("2.0")
    assert (retired.state, retired.workers) == ("retired", 0)
    assert "2.0" not in {d["modelVersion"] for d in await loop.management.versions()}
    with pytest.raises(UnknownVersion):
        await loop.service.promote("9.0")
    with pytest.raises(UnknownVersion):
        await loop.service.retire("9.0")


@slow
async def test_scale_a_candidate_through_torchserve(loop: Loop) -> None:
    scaled = await loop.service.scale("2.0", 1)  # registered with its one worker
    assert scaled.workers == 1 and not scaled.live
    assert "2.0" in {d["modelVersion"] for d in await loop.management.versions()}
    assert (await loop.service.scale("2.0", 0)).workers == 0
    with pytest.raises(Refused, match="from 1 to 16"):
        await loop.service.scale("1.0", 0)  # the live version keeps answering
    with pytest.raises(UnknownVersion):
        await loop.service.scale("9.0", 1)


@slow
async def test_review_lists_disagreements_and_exclude_keeps_them_out_of_training(
    loop: Loop, store: Store
) -> None:
    wrong = await store.record_prediction(prediction(digit=1, seed=1))
    right = await store.record_prediction(prediction(digit=3, seed=2))
    await store.set_label(wrong, 7)
    await store.set_label(right, 3)
    items = await loop.service.review()
    assert [(i.id, i.label, i.digit, i.excluded) for i in items] == [(wrong, 7, 1, False)]
    await loop.service.exclude(wrong, True)
    assert (await loop.service.review())[0].excluded
    assert [row.id async for row in loop.registry.feedback()] == [right]
    await loop.service.exclude(wrong, False)
    assert sorted([row.id async for row in loop.registry.feedback()]) == sorted([wrong, right])
    with pytest.raises(UnknownPrediction):
        await loop.service.exclude(wrong + 1000, True)


@slow
async def test_an_unreachable_management_api_or_database_is_loop_unavailable(
    loop: Loop, torchserve: TorchServeInstance
) -> None:
    dead = AsyncManagementClient("http://127.0.0.1:9", "mnist", timeout=1.0)
    models = ModelRegistry(
        loop.registry, dead, torchserve.model_store, workers=1, batch_size=1, max_batch_delay_ms=0
    )
    service = LearningService(loop.registry, models, make_app(loop.url), defer_retrain)
    with pytest.raises(LoopUnavailable, match="management API"):
        await service.models()
    with pytest.raises(LoopUnavailable, match="management API"):
        await service.promote("2.0")
    await dead.close()
    gone = await Registry.open("postgresql://nobody@127.0.0.1:9/none", timeout=1.0)
    try:
        service = LearningService(gone, models, make_app(loop.url), defer_retrain)
        with pytest.raises(LoopUnavailable, match="database is unreachable"):
            await service.runs()
        with pytest.raises(LoopUnavailable, match="database is unreachable"):
            await service.retrain({})
    finally:
        await gone.close()


@slow
async def test_a_run_that_cannot_be_queued_is_failed_not_left_queued(loop: Loop) -> None:
    dead_queue = make_app("postgresql://nobody@127.0.0.1:9/none")
    service = LearningService(loop.registry, loop.service.model_registry, dead_queue, defer_retrain)
    with pytest.raises(LoopUnavailable, match="job queue"):
        await service.retrain({})
    (run,) = await loop.service.runs()
    assert run.status == "failed" and "could not be queued" in run.message
    await service.close()


# ------------------------------------------------------------------------ the admin API, all real


@slow
async def test_the_admin_api_on_the_loop_the_app_opens(
    db_url: str, store: Store, torchserve: TorchServeInstance, tmp_path: Path
) -> None:
    """create_app opens the loop on the database (registry, queue, TorchServe's management API): the
    operator's calls go through to PostgreSQL and TorchServe; others get 401."""
    registry = await Registry.open(db_url)
    client = AsyncManagementClient(
        torchserve.management_url, torchserve.model_name, auth=torchserve.config.auth("management")
    )
    try:
        models = ModelRegistry(
            registry, client, torchserve.model_store, workers=1, batch_size=1, max_batch_delay_ms=0
        )
        await models.seed()
        await add_candidate(registry, torchserve.model_store, "3.0")
        async with simulate_admin(
            tmp_path,
            store=store,
            database_url=db_url,
            management_url=torchserve.management_url,
            archive_dir=torchserve.model_store,
            model_workers=1,
        ) as sim:
            op = {"Authorization": f"Bearer {TOKEN}"}
            api = sim.client
            assert (await api.get("/api/admin/models")).status_code == 401
            listed = (await api.get("/api/admin/models", headers=op)).json()
            assert [(m["version"], m["live"], m["state"]) for m in listed] == [
                ("3.0", False, "candidate"),
                ("1.0", True, "live"),
            ]
            accepted = await api.post(
                "/api/admin/retrain", json={"epochs": 1, "auto_promote": False}, headers=op
            )
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["job_id"]
            job = (await api.get(f"/api/admin/jobs/{job_id}", headers=op)).json()
            assert (job["status"], job["options"]) == ("queued", {"epochs": 1, "auto_promote": False})
            await registry.start_run(job_id)
            await registry.update_run(job_id, 0.25, "epoch 1", {"epoch": 1, "loss": 0.3, "accuracy": 0.96})
            job = (await api.get(f"/api/admin/jobs/{job_id}", headers=op)).json()
            assert (job["status"], job["progress"], job["history"][0]["epoch"]) == ("running", 0.25, 1)
            await registry.finish_run(job_id, "succeeded", "held back", version="3.0")
            job = (await api.get(f"/api/admin/jobs/{job_id}", headers=op)).json()
            assert (job["status"], job["version"], job["promoted"]) == ("succeeded", "3.0", False)

            promoted = await api.post("/api/admin/models/3.0/promote", headers=op)
            assert (promoted.status_code, promoted.json()["live"]) == (200, True), promoted.text
            assert await default_version(client) == "3.0"
            refused = await api.post("/api/admin/models/3.0/retire", headers=op)
            assert refused.status_code == 409 and "live" in refused.json()["detail"]
            assert (await api.post("/api/admin/models/1.0/promote", headers=op)).json()["live"] is True
            assert await default_version(client) == "1.0"
            retired = await api.post("/api/admin/models/3.0/retire", headers=op)
            assert (retired.status_code, retired.json()["state"]) == (200, "retired")
            assert (await api.get("/api/admin/jobs/999999", headers=op)).status_code == 404

            wrong = await store.record_prediction(prediction(digit=1, seed=3))
            await store.set_label(wrong, 4)
            review = (await api.get("/api/admin/review", headers=op)).json()
            assert [(r["id"], r["label"], r["digit"]) for r in review] == [(wrong, 4, 1)]
            image = await api.get(review[0]["image_url"])  # signed: loads without a header
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
            excluded = await api.put(
                f"/api/admin/predictions/{wrong}/excluded", json={"excluded": True}, headers=op
            )
            assert excluded.json() == {"id": wrong, "excluded": True}
            with psycopg.connect(db_url) as conn:
                row = conn.execute("SELECT excluded FROM predictions WHERE id = %s", (wrong,)).fetchone()
            assert row == (True,)
            missing = await api.put(
                "/api/admin/predictions/999999/excluded", json={"excluded": True}, headers=op
            )
            assert missing.status_code == 404
    finally:
        await reset_torchserve(client)
        await client.close()
        await registry.close()


@slow
async def test_the_admin_api_says_503_when_the_database_is_down(
    postgres: Any, db_url: str, store: Store, tmp_path: Path, torchserve: TorchServeInstance
) -> None:
    async with simulate_admin(
        tmp_path, store=store, database_url=db_url, management_url=torchserve.management_url
    ) as sim:
        op = {"Authorization": f"Bearer {TOKEN}"}
        assert (await sim.client.get("/api/admin/jobs", headers=op)).status_code == 200
        postgres.stop()
        try:
            response = await sim.client.get("/api/admin/jobs", headers=op)
            assert response.status_code == 503, response.text
            assert "database is unreachable" in response.json()["detail"]
            accepted = await sim.client.post("/api/admin/retrain", headers=op)
            assert accepted.status_code == 503
        finally:
            postgres.start()
        assert (await sim.client.get("/api/admin/jobs", headers=op)).status_code == 200


def test_promote_or_roll_back_by_version_order() -> None:
    live = view("2.0", {}, live=True)
    assert promote_label(live, live) is None
    assert promote_label(view("1.0", {}), live) == "Roll back"
    assert promote_label(view("3.0", {}), live) == "Promote"
    assert promote_label(VersionView("4.0", False, "failed", 0, {}, "evaluation failed"), live) is None


def test_accuracy_chart_has_a_bar_per_kind_and_version_oldest_first() -> None:
    chart = accuracy_chart(
        [
            view("2.0", {"mnist": {"accuracy": 0.995}, "feedback": {"accuracy": 0.9}}),
            view("1.0", {}, live=True),
        ]
    )
    assert chart["xAxis"]["data"] == ["1.0 (live)", "2.0"]
    assert [s["data"] for s in chart["series"]] == [[None, 99.5], [None, 90.0], [None, None]]
    assert chart["yAxis"]["min"] == 88  # starts near the lowest figure: tenths of a point stay visible
