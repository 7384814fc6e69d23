"""Model versions: the PostgreSQL registry (`db.registry`) and TorchServe kept in step.

The registry is the source of truth for which version is live; TorchServe forgets every
registration when it restarts. Everything that changes versions goes through `ModelRegistry`:
the admin API (ui/learning.py), the trainer (serving/trainer.py) and `make run` (stack.py).

    models = ModelRegistry(registry, management, settings.archives, workers=2, batch_size=4,
                           max_batch_delay_ms=0)
    await models.restore_live()          # after TorchServe (re)starts: the registry's live version
    await models.register("2.0")         # a candidate, beside the live version (1 worker)
    await models.promote("2.0")          # scaled to the live pool, set-default, registry set_live
    await models.promote("1.0", "rolled back by the operator")
    await models.retire("2.0")           # unregistered (never the live one: ValueError)

Archives are file names in the archive folder, which is TorchServe's model store (no URL:
`allowed_urls` admits none). Before registering, the file's sha256 must be the registry's: an
archive replaced on disk is refused. Promotion never interrupts predictions: the new version's
workers are started and READY (synchronous scaling) before the default moves to it, and the
version it replaces keeps its workers for `drain_s` before it is scaled down to
`candidate_workers` (requests already routed to it finish there).

No torch here (the UI imports this module).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from db.records import ModelVersion, VersionNotFound
from db.registry import Registry
from serving.keys import KeyFileAuth, key_file_of
from serving.management import AsyncManagementClient, Description, ManagementError, manifest_version
from serving.ports import local_url
from settings import Settings

log = logging.getLogger(__name__)

SHIPPED_REASON = "the shipped model"
DRAIN_S = 2.0
# restore_live acts on a difference only if it is still there after this: another process (the UI
# promoting) switches TorchServe's default a few milliseconds before it updates the registry.
SETTLE_S = 1.0


class ArchiveMismatch(RuntimeError):
    """The archive on disk is missing or is not the one the registry recorded (sha256)."""


@dataclass(frozen=True)
class ModelInfo:
    """One version as the operator sees it: the registry's record and TorchServe's workers."""

    version: str
    live: bool
    state: str
    registered: bool  # known to TorchServe right now
    default: bool  # the version TorchServe answers `POST /predictions/<model>` with
    workers: int
    worker_states: list[str]
    metrics: dict[str, Any]  # the evaluation JSON (mnist / feedback accuracies, per digit)
    reason: str
    created_at: datetime
    parent_version: str | None
    feedback_count: int
    archive_file: str
    promoted_at: datetime | None
    run_id: int | None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def next_version(existing: list[str]) -> str:
    """The next integer major version after every existing one: "2.0", "3.0", ... (pure)."""
    majors = []
    for version in existing:
        head = version.split(".", 1)[0]
        if head.isdigit():
            majors.append(int(head))
    return f"{max(majors, default=0) + 1}.0"


def worker_counts(descriptions: list[Description]) -> dict[str, list[str]]:
    """Version -> its worker states, from `GET /models/<name>/all`."""
    return {
        str(d.get("modelVersion")): [str(w.get("status")) for w in d.get("workers") or []]
        for d in descriptions
    }


class ModelRegistry:
    """The registry and TorchServe's management API, changed together (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        management: AsyncManagementClient,
        archive_dir: Path,
        *,
        workers: int,
        batch_size: int,
        max_batch_delay_ms: int,
        candidate_workers: int = 1,
        response_timeout_s: int = 30,
        drain_s: float = DRAIN_S,
        settle_s: float = SETTLE_S,
        shipped_file: str | None = None,
    ) -> None:
        self.registry = registry
        self.management = management
        self.archive_dir = Path(archive_dir)
        self.workers = workers
        self.batch_size = batch_size
        self.max_batch_delay_ms = max_batch_delay_ms
        self.candidate_workers = candidate_workers
        self.response_timeout_s = response_timeout_s
        self.drain_s = drain_s
        self.settle_s = settle_s
        self.shipped_file = shipped_file or f"{management.model_name}.mar"
        self._lock = asyncio.Lock()  # one change at a time from this process
        self._background: set[asyncio.Task[None]] = set()  # scale-downs after a drain

    @classmethod
    def from_settings(cls, settings: Settings, registry: Registry) -> ModelRegistry:
        """The app's: TorchServe at `MANAGEMENT_URL` with its key file, the archive folder, the
        workers and batching of settings.py. Close `.management` when done (`close()`)."""
        management = AsyncManagementClient(
            local_url(settings.management_url),
            settings.model_name,
            auth=KeyFileAuth(key_file_of(settings), "management"),
        )
        return cls(
            registry,
            management,
            settings.archives,
            workers=settings.model_workers,
            batch_size=settings.model_batch_size,
            max_batch_delay_ms=settings.model_batch_delay_ms,
        )

    async def close(self) -> None:
        """Finish pending scale-downs, close the management client (the registry is the caller's)."""
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.management.close()

    # -- reading ---------------------------------------------------------------------------------
    async def _version(self, version: str) -> ModelVersion:
        found = await self.registry.get_version(version)
        if found is None:
            raise VersionNotFound(f"no model version {version!r}")
        return found

    async def _served(self) -> dict[str, list[str]]:
        return worker_counts(await self.management.versions())

    async def default_version(self) -> str | None:
        """The version TorchServe answers unversioned predictions with (None: none registered)."""
        try:
            described = await self.management.describe()
        except ManagementError as exc:
            if exc.not_found:
                return None
            raise
        return str(described[0].get("modelVersion")) if described else None

    async def models(self) -> list[ModelInfo]:
        """Every version of the registry, newest first, with its workers in TorchServe."""
        versions = await self.registry.versions()
        served = await self._served()
        default = await self.default_version() if served else None
        return [
            ModelInfo(
                version=v.version,
                live=v.live,
                state=v.state,
                registered=v.version in served,
                default=v.version == default,
                workers=len(served.get(v.version, [])),
                worker_states=served.get(v.version, []),
                metrics=v.evaluation,
                reason=v.reason,
                created_at=v.created_at,
                parent_version=v.parent_version,
                feedback_count=v.feedback_count,
                archive_file=v.archive_file,
                promoted_at=v.promoted_at,
                run_id=v.run_id,
            )
            for v in versions
        ]

    # -- changes ---------------------------------------------------------------------------------
    async def seed(self) -> ModelVersion | None:
        """On first start (an empty registry), record the shipped archive as the live version."""
        if await self.registry.versions():
            return None
        mar = self.archive_dir / self.shipped_file
        if not mar.is_file():
            raise ArchiveMismatch(f"{mar} not found: the shipped archive is copied there at start")
        version = manifest_version(mar)
        log.info("registry: recording the shipped %s (version %s) as live", mar.name, version)
        return await self.registry.add_version(
            version, mar.name, sha256_of(mar), state="live", reason=SHIPPED_REASON
        )

    async def register(self, version: str, workers: int | None = None) -> bool:
        """Register `version`'s archive with TorchServe if it is not; True when registered now.

        `workers`: how many (default `candidate_workers`); the batching is the live pool's.
        """
        record = await self._version(version)
        if version in await self._served():
            return False
        mar = self.archive_dir / record.archive_file
        if not mar.is_file():
            raise ArchiveMismatch(f"version {version}: archive {mar} not found")
        if (digest := await asyncio.to_thread(sha256_of, mar)) != record.archive_sha256:
            raise ArchiveMismatch(
                f"version {version}: {mar.name} has sha256 {digest}, the registry recorded "
                f"{record.archive_sha256}: not registered"
            )
        await self.management.register(
            record.archive_file,
            version=version,
            workers=workers or self.candidate_workers,
            batch_size=self.batch_size,
            max_batch_delay_ms=self.max_batch_delay_ms,
            response_timeout_s=self.response_timeout_s,
        )
        return True

    async def _serve_fully(self, version: str) -> None:
        """Registered, with the live pool's workers all started (synchronous), before traffic moves."""
        await self.register(version, self.workers)
        states = (await self._served()).get(version, [])
        if len(states) < self.workers:
            await self.management.scale(version, self.workers)

    async def _switch(self, version: str) -> str | None:
        """Make `version` TorchServe's default; return the previous default (None if none)."""
        previous = await self.default_version()
        if previous != version:
            await self.management.set_default(version)
        return previous if previous != version else None

    def _scale_down_later(self, version: str | None) -> None:
        """In the background: the replaced version runs `candidate_workers` workers once the
        requests already routed to it are done (`drain_s`); `close()` waits for it."""
        if version is None or self.candidate_workers >= self.workers:
            return
        task = asyncio.create_task(self._scale_down(version))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _scale_down(self, version: str) -> None:
        await asyncio.sleep(self.drain_s)
        try:
            async with self._lock:
                served = (await self._served()).get(version, [])
                if len(served) > self.candidate_workers and version != await self.default_version():
                    await self.management.scale(version, self.candidate_workers)
        except ManagementError as exc:  # the promotion itself succeeded; this only saves memory
            log.warning("registry: could not scale %s down: %s", version, exc)

    async def promote(self, version: str, reason: str = "promoted by the operator") -> ModelVersion:
        """Make `version` live: fully served, TorchServe's default, the registry's live version.

        TorchServe first, then the registry: if the registry update fails, `restore_live` puts
        TorchServe back on the registry's live version. A failed version is refused (ValueError).
        """
        async with self._lock:
            record = await self._version(version)
            if record.state == "failed":
                raise ValueError(f"version {version} failed ({record.reason}): it cannot be promoted")
            await self._serve_fully(version)
            previous = await self._switch(version)
            promoted = await self.registry.set_live(version, reason)
            self._scale_down_later(previous)
            return promoted

    async def drop_leftovers(self) -> list[str]:
        """Unregister what this TorchServe still serves of versions the registry says are retired or
        failed (never the default): a replica that served them (a Kubernetes pod, whose sidecar
        follows the registry) would otherwise keep a worker, about 250 MB, for each. Returns them."""
        async with self._lock:
            served, default = await self._served(), await self.default_version()
            states = {v.version: v.state for v in await self.registry.versions()}
            dropped = [
                version
                for version in served
                if version != default and states.get(version) in ("retired", "failed")
            ]
            for version in dropped:
                log.info(
                    "registry: unregistering %s version %s from this TorchServe", states[version], version
                )
                await self.management.unregister(version)
        return dropped

    async def retire(self, version: str, reason: str = "retired by the operator") -> ModelVersion:
        """Unregister a version that is not live and mark it retired (ValueError for the live one)."""
        async with self._lock:
            record = await self._version(version)
            if record.live:
                raise ValueError(f"version {version} is live: promote another version first")
            if version in await self._served():
                if version == await self.default_version():  # TorchServe drifted: put it back first
                    live = await self.registry.live_version()
                    if live is None:
                        raise ValueError(f"version {version} is TorchServe's default and none is live")
                    await self._serve_fully(live.version)
                    await self._switch(live.version)
                await self.management.unregister(version)
            return await self.registry.set_state(version, "retired", reason)

    async def scale(self, version: str, count: int) -> None:
        """Run exactly `count` workers for `version` (registered first if needed); at least 1 for
        the live version (0 would take predictions down), 0..16 otherwise."""
        record = await self._version(version)
        low = 1 if record.live else 0
        if not low <= count <= 16:
            raise ValueError(f"workers for version {version} must be from {low} to 16, got {count!r}")
        async with self._lock:
            if record.state == "failed":
                raise ValueError(f"version {version} failed ({record.reason}): it cannot be served")
            if not await self.register(version, max(count, 1)):
                await self.management.scale(version, count)
            elif count == 0:
                await self.management.scale(version, 0)

    async def restore_live(self) -> str | None:
        """The registry's live version registered with TorchServe (if missing) and made its default.

        Called by `make run` after TorchServe (re)starts, by the trainer at start and every
        `restore_interval_s` (Compose: the TorchServe container restarts alone; Kubernetes: a new
        replica), so the version that was live before is live again, not the shipped 1.0. On
        first start (empty registry) the shipped archive is recorded as live. Returns the live
        version, or None when the registry has none or TorchServe serves nothing yet.

        A TorchServe with no version registered is starting: its own start registers the shipped
        archive first (registering beside it meanwhile would confuse that start), so nothing is
        done until it has; the next call (after the start, or the trainer's next round) restores.
        """
        async with self._lock:
            await self.seed()
            live = await self.registry.live_version()
            if live is None:
                return None
            default = await self.default_version()
            if default == live.version:
                return live.version
            if default is None:
                log.debug("registry: TorchServe serves no version yet; live version %s later", live.version)
                return None
            await asyncio.sleep(self.settle_s)  # a promotion in another process may be half-way
            live = await self.registry.live_version()
            if live is None or await self.default_version() == live.version:
                return None if live is None else live.version
            log.info("registry: restoring live version %s in TorchServe", live.version)
            await self._serve_fully(live.version)
            previous = await self._switch(live.version)
            self._scale_down_later(previous)
        return live.version
