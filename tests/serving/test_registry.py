"""serving/registry.py: the PostgreSQL registry and a real TorchServe kept in step.

A TorchServe of this module's own (its versions and default change, and it is restarted), one
worker per version, with a real PostgreSQL database per test. Version 2.0 is the shipped archive
with another version in its manifest: the registry does not care what the weights are.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from db.records import VersionNotFound
from db.registry import Registry
from serving.evaluate import mnist_examples
from serving.management import AsyncManagementClient, manifest_version
from serving.registry import (
    SHIPPED_REASON,
    ArchiveMismatch,
    ModelRegistry,
    next_version,
    sha256_of,
    worker_counts,
)
from serving.torchserve import ServeConfig, start, stop
from tests.fixtures.torchserve import own_torchserve

MODEL_START_S = 300.0


# --- pure parts --------------------------------------------------------------------------------


def test_next_version_is_the_next_integer_major():
    assert next_version([]) == "1.0"
    assert next_version(["1.0"]) == "2.0"
    assert next_version(["1.0", "3.0", "2.0", "2.0-test", "x"]) == "4.0"
    assert next_version(["10.0", "9.0"]) == "11.0"


def test_worker_counts_by_version():
    described: list[dict[str, Any]] = [
        {"modelVersion": "1.0", "workers": [{"status": "READY"}, {"status": "READY"}]},
        {"modelVersion": "2.0", "workers": [{"status": "LOADING"}]},
        {"modelVersion": "3.0", "workers": []},
    ]
    assert worker_counts(described) == {"1.0": ["READY", "READY"], "2.0": ["LOADING"], "3.0": []}


# --- with TorchServe and PostgreSQL ----------------------------------------------------------------


@pytest.fixture(scope="module")
def digit(mnist_dir: Path) -> tuple[bytes, int]:
    return mnist_examples(mnist_dir, 1)[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeConfig]:
    """A TorchServe of this module's own, one worker, with versions 2.0 and 3.0 in its store."""
    with own_torchserve(
        tmp_path_factory.mktemp("registry"), MODEL_START_S, versions=("2.0", "3.0")
    ) as config:
        yield config


@pytest.fixture
async def models(served: ServeConfig, db_url: str) -> AsyncIterator[ModelRegistry]:
    """A ModelRegistry on a fresh database; TorchServe is put back to 1.0 only afterwards."""
    registry = await Registry.open(db_url)
    client = AsyncManagementClient(served.management_url, served.model_name, auth=served.auth("management"))
    models = ModelRegistry(
        registry,
        client,
        served.model_store,
        workers=1,
        batch_size=served.batch_size,
        max_batch_delay_ms=served.max_batch_delay_ms,
        drain_s=0.0,
    )
    try:
        yield models
    finally:
        await models.close()  # its scale-downs done, its client closed
        await registry.close()
        async with AsyncManagementClient(
            served.management_url, served.model_name, auth=served.auth("management")
        ) as reset:
            if await reset.alive():
                await reset.set_default("1.0")
                for version in await reset.versions():
                    if version["modelVersion"] != "1.0":
                        await reset.unregister(version["modelVersion"])


async def add(models: ModelRegistry, version: str) -> None:
    name = f"mnist-{version}.mar"
    await models.registry.add_version(
        version, name, sha256_of(models.archive_dir / name), parent_version="1.0", feedback_count=12
    )


def answered_by(config: ServeConfig, png: bytes, version: str | None = None) -> str:
    url = f"{config.inference_url}/predictions/{config.model_name}" + (f"/{version}" if version else "")
    answer = httpx.post(url, content=png, auth=config.auth("inference"), timeout=30)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["model_version"])


async def test_the_shipped_archive_is_seeded_as_live_once(models: ModelRegistry, served: ServeConfig):
    assert await models.restore_live() == "1.0"
    (shipped,) = await models.registry.versions()
    assert (shipped.version, shipped.state, shipped.reason) == ("1.0", "live", SHIPPED_REASON)
    assert shipped.archive_file == "mnist.mar"
    assert shipped.archive_sha256 == sha256_of(served.model_store / "mnist.mar")
    assert await models.seed() is None  # not twice
    assert await models.restore_live() == "1.0" and len(await models.registry.versions()) == 1


async def test_register_promote_roll_back_retire_and_restore_after_a_restart(
    models: ModelRegistry, served: ServeConfig, digit: tuple[bytes, int]
):
    png, _ = digit
    await models.restore_live()
    await add(models, "2.0")
    assert await models.register("2.0") is True
    assert await models.register("2.0") is False  # already there
    assert answered_by(served, png, "2.0") == "2.0"
    assert answered_by(served, png) == "1.0"  # a candidate takes no public traffic
    listed = {m.version: m for m in await models.models()}
    assert listed["2.0"].registered and not listed["2.0"].live and listed["2.0"].state == "candidate"
    assert listed["1.0"].live and listed["1.0"].default and listed["1.0"].workers == 1
    assert listed["2.0"].feedback_count == 12 and listed["2.0"].parent_version == "1.0"

    promoted = await models.promote("2.0", "promoted by the gate: better")
    assert (promoted.state, promoted.reason) == ("live", "promoted by the gate: better")
    assert answered_by(served, png) == "2.0"
    old = await models.registry.get_version("1.0")
    assert old is not None and (old.state, old.reason) == ("candidate", "replaced by 2.0")

    await models.promote("1.0", "rolled back by the operator")  # a rollback is a promotion
    assert answered_by(served, png) == "1.0"
    live = await models.registry.live_version()
    assert live is not None and live.version == "1.0"

    with pytest.raises(ValueError, match="is live"):
        await models.retire("1.0")
    retired = await models.retire("2.0")
    assert retired.state == "retired"
    assert "2.0" not in {m["modelVersion"] for m in await models.management.versions()}
    await models.promote("2.0")  # a retired version comes back from its archive
    assert answered_by(served, png) == "2.0"

    # TorchServe restarts knowing nothing but the shipped 1.0 (what `start` registers).
    stop(served)
    start(served, timeout=MODEL_START_S)
    assert answered_by(served, png) == "1.0"
    assert await models.restore_live() == "2.0"
    assert answered_by(served, png) == "2.0"
    assert await models.restore_live() == "2.0"  # nothing to do the second time


async def test_scale_a_version(models: ModelRegistry, served: ServeConfig):
    await models.restore_live()
    await add(models, "3.0")
    await models.scale("3.0", 2)
    assert {m.version: m.workers for m in await models.models()}["3.0"] == 2
    await models.scale("3.0", 1)
    assert {m.version: m.workers for m in await models.models()}["3.0"] == 1
    for bad in (0, 17, -1):
        with pytest.raises(ValueError, match=r"workers for version 1\.0 must be from 1 to 16"):
            await models.scale("1.0", bad)
    with pytest.raises(VersionNotFound):
        await models.scale("9.0", 1)


async def test_an_archive_changed_on_disk_is_not_registered(models: ModelRegistry, served: ServeConfig):
    await models.restore_live()
    await add(models, "3.0")
    original = served.model_store / "mnist-3.0.mar"
    saved = served.model_store.parent / "saved.mar"
    shutil.copy2(original, saved)
    try:
        with zipfile.ZipFile(original, "a") as z:
            z.writestr("extra.txt", "changed")
        assert manifest_version(original) == "3.0"
        with pytest.raises(ArchiveMismatch, match="the registry recorded"):
            await models.register("3.0")
        original.unlink()
        with pytest.raises(ArchiveMismatch, match="not found"):
            await models.promote("3.0")
    finally:
        shutil.copy2(saved, original)
    assert "3.0" not in {m["modelVersion"] for m in await models.management.versions()}
    live = await models.registry.live_version()
    assert live is not None and live.version == "1.0"


async def test_a_failed_version_is_never_served(models: ModelRegistry):
    await models.restore_live()
    await add(models, "3.0")
    await models.registry.set_state("3.0", "failed", "evaluation failed")
    with pytest.raises(ValueError, match="failed"):
        await models.promote("3.0")
    with pytest.raises(VersionNotFound):
        await models.promote("4.0")


async def test_a_replica_drops_the_versions_retired_elsewhere(models: ModelRegistry, served: ServeConfig):
    """Another process retired 3.0 (the registry says so) while this TorchServe still serves it."""
    await models.restore_live()
    await add(models, "3.0")
    await models.register("3.0")
    assert await models.drop_leftovers() == []  # a candidate stays
    await models.registry.set_state("3.0", "retired", "retired by the operator")
    assert await models.drop_leftovers() == ["3.0"]
    assert "3.0" not in {m["modelVersion"] for m in await models.management.versions()}
    assert await models.drop_leftovers() == []
    assert await models.default_version() == "1.0"  # the live one is never dropped
