"""The model registry and training runs (`db.registry`, migration 0007) against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from db.errors import DatabaseUnavailable, PredictionNotFound
from db.migrate import MIGRATIONS_DIR, apply_all, migrate
from db.records import (
    InvalidRegistryValue,
    RunNotFound,
    VersionExists,
    VersionNotFound,
    validate_version,
)
from db.registry import Registry
from db.store import Store
from tests.db.samples import drawing_png, one, prediction

SHA = "ab" * 32
OTHER_SHA = "cd" * 32


@pytest.fixture
async def registry(db_url: str) -> AsyncIterator[Registry]:
    r = await Registry.open(db_url)
    try:
        yield r
    finally:
        await r.close()


# -- pure ------------------------------------------------------------------------------------------
def test_version_names_are_url_and_file_safe() -> None:
    for good in ("1.0", "2.0", "10.0", "v3", "2024-06-01_a"):
        assert validate_version(good) == good
    for bad in ("", ".hidden", "-1", "../x", "a/b", "a b", "2.0?x", "x" * 101, 2.0, None):
        with pytest.raises(InvalidRegistryValue):
            validate_version(bad)


# -- versions --------------------------------------------------------------------------------------
async def test_version_round_trip(registry: Registry) -> None:
    run = await registry.create_run({"epochs": 2})
    await registry.add_version("1.0", "mnist.mar", SHA, state="live", reason="shipped")
    added = await registry.add_version(
        "2.0",
        "mnist-2.0.mar",
        OTHER_SHA,
        parent_version="1.0",
        feedback_count=1200,
        feedback_max_id=5321,
        evaluation={"mnist": {"accuracy": 0.9962, "n": 10000}, "per_digit": [0.99] * 10},
        reason="held back: MNIST -0.2 point",
        run_id=run.id,
    )
    assert added == await registry.get_version("2.0")
    assert (added.version, added.archive_file, added.archive_sha256, added.parent_version) == (
        "2.0",
        "mnist-2.0.mar",
        OTHER_SHA,
        "1.0",
    )
    assert (added.feedback_count, added.feedback_max_id, added.run_id) == (1200, 5321, run.id)
    assert added.evaluation == {"mnist": {"accuracy": 0.9962, "n": 10000}, "per_digit": [0.99] * 10}
    assert (added.state, added.reason, added.promoted_at, added.live) == (
        "candidate",
        "held back: MNIST -0.2 point",
        None,
        False,
    )
    assert added.created_at.tzinfo is not None
    assert [v.version for v in await registry.versions()] == ["2.0", "1.0"]  # newest first
    assert await registry.get_version("9.0") is None


async def test_versions_are_never_reused_and_bad_values_are_refused(registry: Registry) -> None:
    await registry.add_version("1.0", "mnist.mar", SHA)
    with pytest.raises(VersionExists, match=r"1\.0"):
        await registry.add_version("1.0", "other.mar", OTHER_SHA)
    with pytest.raises(VersionNotFound, match="parent"):
        await registry.add_version("2.0", "b.mar", SHA, parent_version="0.9")
    bad_calls = [
        {"version": "../evil", "archive_file": "a.mar", "archive_sha256": SHA},
        {"version": "3.0", "archive_file": "../a.mar", "archive_sha256": SHA},
        {"version": "3.0", "archive_file": "a.mar", "archive_sha256": SHA.upper()},
        {"version": "3.0", "archive_file": "a.mar", "archive_sha256": SHA, "state": "gone"},
        {"version": "3.0", "archive_file": "a.mar", "archive_sha256": SHA, "feedback_count": -1},
        {"version": "3.0", "archive_file": "a.mar", "archive_sha256": SHA, "evaluation": {"x": math.nan}},
        {"version": "3.0", "archive_file": "a.mar", "archive_sha256": SHA, "evaluation": [1]},
    ]
    for kwargs in bad_calls:
        with pytest.raises(InvalidRegistryValue):
            await registry.add_version(**kwargs)  # type: ignore[arg-type]
    assert [v.version for v in await registry.versions()] == ["1.0"]


async def test_the_schema_refuses_what_the_code_refuses(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for version, file, sha, state, constraint in [
            ("a/b", "a.mar", SHA, "live", "model_versions_version_valid"),
            ("1.0", "x/a.mar", SHA, "live", "model_versions_archive_file_valid"),
            ("1.0", "a.mar", "nope", "live", "model_versions_archive_sha256_hex"),
            ("1.0", "a.mar", SHA, "promoted", "model_versions_state_valid"),
        ]:
            with pytest.raises(psycopg.errors.CheckViolation) as info:
                conn.execute(
                    "INSERT INTO model_versions (version, archive_file, archive_sha256, state) "
                    "VALUES (%s, %s, %s, %s)",
                    (version, file, sha, state),
                )
            assert info.value.diag.constraint_name == constraint
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO training_runs (progress) VALUES (1.5)")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO training_runs (status) VALUES ('succeeded')")  # no finished_at


async def test_at_most_one_live_version(registry: Registry, db_url: str) -> None:
    await registry.add_version("1.0", "mnist.mar", SHA, state="live", reason="shipped")
    await registry.add_version("2.0", "mnist-2.0.mar", OTHER_SHA, parent_version="1.0")
    assert (live := await registry.live_version()) is not None and live.version == "1.0"
    assert live.promoted_at is not None

    promoted = await registry.set_live("2.0", "the gate: feedback 91% > 62%")
    assert (promoted.state, promoted.reason, promoted.live) == ("live", "the gate: feedback 91% > 62%", True)
    assert promoted.promoted_at is not None
    old = await registry.get_version("1.0")
    assert old is not None and (old.state, old.reason) == ("candidate", "replaced by 2.0")
    assert await registry.live_version() == promoted

    back = await registry.set_live("1.0", "rolled back by the operator")  # a rollback is one set_live
    assert back.state == "live" and back.promoted_at is not None and back.promoted_at >= promoted.promoted_at
    newer = await registry.get_version("2.0")
    assert newer is not None and (newer.state, newer.reason) == ("candidate", "replaced by 1.0")
    assert (await registry.set_live("1.0", "again")).state == "live"  # already live: stays the only one

    with pytest.raises(VersionNotFound):
        await registry.set_live("7.0", "no such version")
    assert (await registry.live_version()) is not None

    # The schema holds the rule even for SQL that bypasses the registry.
    with psycopg.connect(db_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation) as info:
            conn.execute("UPDATE model_versions SET state = 'live' WHERE version = '2.0'")
        assert info.value.diag.constraint_name == "model_versions_one_live"


async def test_concurrent_promotions_leave_exactly_one_live(registry: Registry, db_url: str) -> None:
    names = [f"{n}.0" for n in range(1, 9)]
    for name in names:
        await registry.add_version(name, f"mnist-{name}.mar", SHA)
    others = [await Registry.open(db_url) for _ in range(3)]
    try:
        clients = [registry, *others]
        results = await asyncio.gather(
            *(clients[i % len(clients)].set_live(name, "race") for i, name in enumerate(names * 3))
        )
    finally:
        for other in others:
            await other.close()
    assert all(r.state == "live" for r in results)
    states = [v.state for v in await registry.versions()]
    assert states.count("live") == 1 and states.count("candidate") == len(names) - 1


async def test_set_state_and_evaluation(registry: Registry) -> None:
    await registry.add_version("1.0", "mnist.mar", SHA, state="live")
    await registry.add_version("2.0", "mnist-2.0.mar", OTHER_SHA)
    retired = await registry.set_state("2.0", "retired", "retired by the operator")
    assert (retired.state, retired.reason) == ("retired", "retired by the operator")
    failed = await registry.set_state("2.0", "failed", "TorchServe refused the archive")
    assert failed.state == "failed"
    with pytest.raises(InvalidRegistryValue, match="set_live"):
        await registry.set_state("2.0", "live", "not this way")
    with pytest.raises(VersionNotFound):
        await registry.set_state("3.0", "retired", "")
    evaluated = await registry.set_evaluation("2.0", {"feedback": {"accuracy": 0.9, "n": 40}})
    assert evaluated.evaluation == {"feedback": {"accuracy": 0.9, "n": 40}}
    assert (await registry.set_evaluation("2.0", {})).evaluation == {}  # replaced, not merged
    with pytest.raises(VersionNotFound):
        await registry.set_evaluation("3.0", {})
    with pytest.raises(InvalidRegistryValue):
        await registry.set_evaluation("2.0", {"accuracy": math.inf})
    live = await registry.live_version()
    assert live is not None and live.version == "1.0"


# -- runs ------------------------------------------------------------------------------------------
async def test_run_lifecycle(registry: Registry) -> None:
    run = await registry.create_run({"epochs": 3, "auto_promote": False})
    assert (run.status, run.progress, run.message, run.history, run.job_id) == ("queued", 0.0, "", [], None)
    assert run.options == {"epochs": 3, "auto_promote": False} and run.started_at is None and not run.finished
    assert (await registry.set_job(run.id, 41)).job_id == 41
    assert await registry.run_for_job(41) == await registry.get_run(run.id)

    started = await registry.start_run(run.id, 42)
    assert started.status == "running" and started.started_at is not None and started.job_id == 42
    await registry.update_run(run.id, 0.25, "epoch 1 of 3", {"epoch": 1, "loss": 0.31, "accuracy": 0.93})
    await registry.update_run(run.id, 0.3, "exporting")  # no history entry
    updated = await registry.update_run(
        run.id, 0.5, "epoch 2 of 3", {"epoch": 2, "loss": 0.2, "accuracy": 0.95}
    )
    assert updated.progress == pytest.approx(0.5) and updated.message == "epoch 2 of 3"
    assert updated.history == [
        {"epoch": 1, "loss": 0.31, "accuracy": 0.93},
        {"epoch": 2, "loss": 0.2, "accuracy": 0.95},
    ]
    await registry.add_version("2.0", "mnist-2.0.mar", SHA, run_id=run.id)
    done = await registry.finish_run(
        run.id, "succeeded", "promoted: feedback 90% > 60%", version="2.0", promoted=True
    )
    assert (done.status, done.progress, done.version, done.promoted, done.finished) == (
        "succeeded",
        1.0,
        "2.0",
        True,
        True,
    )
    assert done.finished_at is not None and done.message == "promoted: feedback 90% > 60%"
    assert done.history == updated.history
    with pytest.raises(InvalidRegistryValue, match="succeeded already"):
        await registry.start_run(run.id)


async def test_runs_are_listed_newest_first_and_checked(registry: Registry) -> None:
    ids = [(await registry.create_run()).id for _ in range(5)]
    assert [r.id for r in await registry.runs()] == ids[::-1]
    assert [r.id for r in await registry.runs(limit=2)] == ids[:-3:-1]
    assert await registry.get_run(10**9) is None and await registry.get_run(0) is None
    assert await registry.run_for_job(10**9) is None
    for call in (
        registry.update_run(10**9, 0.5, "x"),
        registry.finish_run(10**9, "failed", "x"),
        registry.start_run(10**9),
        registry.set_job(10**9, 1),
        registry.start_run(-1),
    ):
        with pytest.raises(RunNotFound):
            await call
    for bad in (-0.1, 1.01, math.nan, "0.5", True):
        with pytest.raises(InvalidRegistryValue, match="progress"):
            await registry.update_run(ids[0], bad, "x")  # type: ignore[arg-type]
    with pytest.raises(InvalidRegistryValue, match="ends as"):
        await registry.finish_run(ids[0], "running", "x")
    with pytest.raises(InvalidRegistryValue):
        await registry.update_run(ids[0], 0.5, "x", {"loss": math.nan})
    with pytest.raises(InvalidRegistryValue):
        await registry.create_run({"bad": object()})
    with pytest.raises(InvalidRegistryValue):
        await registry.runs(limit=0)
    cancelled = await registry.finish_run(ids[1], "cancelled", "cancelled by the operator")
    assert cancelled.status == "cancelled" and cancelled.progress == 0.0 and cancelled.finished_at is not None


async def test_fail_running_clears_what_a_killed_worker_left(registry: Registry, db_url: str) -> None:
    running = await registry.start_run((await registry.create_run()).id, 7)
    other_running = await registry.start_run((await registry.create_run()).id, 8)
    queued_with_job = await registry.set_job((await registry.create_run()).id, 9)
    queued_lost = await registry.create_run()  # created, but its defer never happened
    queued_now = await registry.create_run()  # being deferred right now
    finished = await registry.finish_run((await registry.create_run()).id, "succeeded", "ok")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE training_runs SET created_at = now() - interval '2 minutes' WHERE id = %s",
            (queued_lost.id,),
        )

    assert await registry.fail_running("the trainer stopped", job_ids=[8]) == [
        other_running.id,
        queued_lost.id,
    ]
    assert await registry.fail_running("the trainer stopped during this run") == [running.id]
    assert await registry.fail_running("again") == []
    failed = await registry.get_run(running.id)
    assert failed is not None and (failed.status, failed.message) == (
        "failed",
        "the trainer stopped during this run",
    )
    assert failed.finished_at is not None
    for run, status in [(queued_with_job, "queued"), (queued_now, "queued"), (finished, "succeeded")]:
        now = await registry.get_run(run.id)
        assert now is not None and now.status == status


# -- feedback --------------------------------------------------------------------------------------
async def test_feedback_is_labelled_digits_not_excluded_not_deleted(registry: Registry, store: Store) -> None:
    ids: dict[str, int] = {}
    for name, digit in [
        ("seven", 7),
        ("one", 1),
        ("excluded", 4),
        ("deleted", 2),
        ("unlabelled", 3),
        ("nad", 5),
    ]:
        ids[name] = await store.record_prediction(prediction(digit, seed=len(ids)))
    await store.set_label(ids["seven"], 7)
    await store.set_label(ids["one"], 7)  # the model said 1, the person 7: a disagreement, and feedback
    await store.set_label(ids["excluded"], 9)
    await store.set_label(ids["deleted"], 2)
    await store.set_label(ids["nad"], None, not_a_digit=True)
    await registry.set_excluded(ids["excluded"], True)
    await store.delete(ids["deleted"])

    rows = [row async for row in registry.feedback(batch_size=1)]  # one row per round trip: the cursor
    assert [(r.id, r.label) for r in rows] == [(ids["seven"], 7), (ids["one"], 7)]
    assert rows[0].png == drawing_png(0) and rows[1].png == drawing_png(1)
    assert await registry.feedback_stats() == (2, ids["one"])
    assert [r.id async for r in registry.feedback(max_id=ids["seven"])] == [ids["seven"]]

    await registry.set_excluded(ids["excluded"], False)  # included again
    assert [r.id async for r in registry.feedback()] == [ids["seven"], ids["one"], ids["excluded"]]
    assert await registry.feedback_stats() == (3, ids["excluded"])
    with pytest.raises(PredictionNotFound):
        await registry.set_excluded(ids["deleted"], True)
    with pytest.raises(PredictionNotFound):
        await registry.set_excluded(0, True)
    with pytest.raises(ValueError):
        _ = [r async for r in registry.feedback(batch_size=0)]


async def test_feedback_stats_of_no_feedback(registry: Registry) -> None:
    assert await registry.feedback_stats() == (0, None)
    assert [r async for r in registry.feedback()] == []


async def test_excluding_keeps_the_statistics(registry: Registry, store: Store) -> None:
    pid = await store.record_prediction(prediction(3))
    await store.set_label(pid, 8)
    before = (await store.stats()).to_dict()
    await registry.set_excluded(pid, True)
    assert (await store.stats()).to_dict() == before  # excluded from training, not from the history
    assert (await store.get(pid)).true_label == 8


async def test_disagreements_newest_first(registry: Registry, store: Store) -> None:
    ids = []
    for digit, label in [(1, 7), (3, 3), (4, 9), (2, None), (0, 6)]:
        pid = await store.record_prediction(prediction(digit, seed=digit))
        if label is not None:
            await store.set_label(pid, label)
        ids.append(pid)
    await registry.set_excluded(ids[2], True)
    found = await registry.disagreements()
    assert [(d.id, d.label, d.digit, d.excluded) for d in found] == [
        (ids[4], 6, 0, False),
        (ids[2], 9, 4, True),
        (ids[0], 7, 1, False),
    ]
    assert found[0].model_version == "1.0" and found[0].confidence == pytest.approx(0.91)
    assert found[0].created_at.tzinfo is not None
    assert [d.id for d in await registry.disagreements(limit=1, offset=1)] == [ids[2]]
    assert await registry.disagreements(offset=3) == []
    with pytest.raises(InvalidRegistryValue):
        await registry.disagreements(limit=0)


# -- connections and migrations --------------------------------------------------------------------
async def test_a_registry_on_a_shared_pool_leaves_the_pool_open(store: Store) -> None:
    shared = Registry(store._pool)
    assert await shared.feedback_stats() == (0, None)
    await shared.close()
    assert await store.ping()


async def test_unreachable_server_is_database_unavailable(tmp_path: Path) -> None:
    registry = await Registry.open(f"postgresql:///x?host={tmp_path}&port=1", timeout=0.5)
    try:
        with pytest.raises(DatabaseUnavailable):
            await registry.live_version()
    finally:
        await registry.close()


def test_a_database_of_0006_migrates_forward(empty_db_url: str, tmp_path: Path) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("000[1-6]_*.sql")):
        shutil.copy(path, before)
    assert len(migrate(empty_db_url, before)) == 6
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        (pid,) = one(
            conn.execute(
                "INSERT INTO predictions (digit, confidence, probabilities, model_name, model_version, "
                "latency_ms, true_label, labelled_at) "
                "VALUES (7, 0.5, %s, 'mnist', '1.0', 3, 7, now()) RETURNING id",
                ([0.1] * 10,),
            )
        )
        assert conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone() == (
            None,
        )  # not this folder

    applied = apply_all(empty_db_url)
    assert applied.files == ["0007_model_registry.sql"] and applied.queue_schema
    again = apply_all(empty_db_url)
    assert again.files == [] and not again.queue_schema
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT excluded FROM predictions WHERE id = %s", (pid,)).fetchone() == (False,)
        assert conn.execute("SELECT count(*) FROM model_versions").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone() == (True,)
