"""An in-memory learning loop (`ui.learning.Learning`) for the fast tests of the admin API and page."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from nicegui import core, ui
from nicegui.testing.user import User

from settings import Settings
from tests.ui.conftest import simulated_nicegui, wait_started
from tests.ui.fakes import FakeModel, FakeStore
from ui.app import UI_OPTIONS, create_app
from ui.inference import InferenceClient
from ui.learning import (
    Learning,
    LiveVersion,
    LoopUnavailable,
    ReviewItem,
    RunView,
    UnknownPrediction,
    UnknownRun,
    UnknownVersion,
    VersionView,
    check_count,
)
from ui.service import PredictionService


class FakeLearning:
    """`ui.learning.Learning` in memory: versions, runs that move when told (`advance`), a review list.

    `down` plays "the loop is unavailable" (every call raises `LoopUnavailable`); `retrained`
    records the options of each run asked for.
    """

    def __init__(self) -> None:
        now = datetime.now(UTC)
        self.down = False
        self.versions: dict[str, VersionView] = {
            "1.0": VersionView(
                "1.0", True, "live", 2, {"mnist": {"accuracy": 0.9942, "n": 10000}}, "shipped", now, None, 0
            )
        }
        self.runs_by_id: dict[int, Any] = {}
        self.retrained: list[dict[str, Any]] = []
        self.items: dict[int, ReviewItem] = {
            i: ReviewItem(i, now, 7, 1, 0.8, "1.0", False) for i in (1, 2, 3)
        }

    def _check(self) -> None:
        if self.down:
            raise LoopUnavailable("the learning loop is unavailable: the database is unreachable")

    def _version(self, version: str) -> Any:
        if version not in self.versions:
            raise UnknownVersion(f"no model version {version!r}")
        return self.versions[version]

    async def models(self) -> list[VersionView]:
        self._check()
        return sorted(self.versions.values(), key=lambda v: float(v.version), reverse=True)

    async def retrain(self, options: Mapping[str, Any]) -> Any:
        self._check()
        self.retrained.append(dict(options))
        run_id = len(self.runs_by_id) + 1
        run = RunView(run_id, "queued", 0.0, "waiting for the trainer", options=dict(options))
        self.runs_by_id[run_id] = run
        return run

    def advance(self, run_id: int, progress: float, *, version: str | None = None) -> None:
        """Move a run on: running at `progress`; at 1.0 it succeeds and its version is a candidate."""
        run = self.runs_by_id[run_id]
        epoch = {"epoch": len(run.history) + 1, "loss": 0.5 * (1 - progress), "accuracy": 0.9 + progress / 20}
        if progress < 1.0:
            self.runs_by_id[run_id] = replace(
                run, status="running", progress=progress, message="training", history=[*run.history, epoch]
            )
            return
        version = version or f"{len(self.versions) + 1}.0"
        self.versions[version] = VersionView(
            version,
            False,
            "candidate",
            1,
            {"mnist": {"accuracy": 0.9951, "n": 10000}, "feedback": {"accuracy": 0.97, "n": 200}},
            "held back: feedback accuracy not better",
            datetime.now(UTC),
            "1.0",
            1000,
        )
        self.runs_by_id[run_id] = replace(
            run,
            status="succeeded",
            progress=1.0,
            message="candidate kept",
            version=version,
            history=[*run.history, epoch],
        )

    async def job(self, run_id: int) -> Any:
        self._check()
        if run_id not in self.runs_by_id:
            raise UnknownRun(f"no training run {run_id}")
        return self.runs_by_id[run_id]

    async def runs(self, limit: int = 20) -> list[Any]:
        self._check()
        return sorted(self.runs_by_id.values(), key=lambda r: r.id, reverse=True)[:limit]

    async def promote(self, version: str) -> Any:
        self._check()
        self._version(version)
        for v, info in list(self.versions.items()):
            if info.live:
                self.versions[v] = replace(
                    info, live=False, state="candidate", reason=f"replaced by {version}"
                )
        self.versions[version] = replace(
            self.versions[version], live=True, state="live", reason="promoted by the operator"
        )
        return self.versions[version]

    async def retire(self, version: str) -> Any:
        self._check()
        if self._version(version).live:
            raise LiveVersion(f"{version} is live: promote another version first")
        self.versions[version] = replace(self.versions[version], state="retired", workers=0)
        return self.versions[version]

    async def scale(self, version: str, count: int) -> Any:
        self._check()
        check_count(count)
        self.versions[version] = replace(self._version(version), workers=count)
        return self.versions[version]

    async def review(self, limit: int = 50, offset: int = 0) -> list[Any]:
        self._check()
        return sorted(self.items.values(), key=lambda r: r.id, reverse=True)[offset : offset + limit]

    async def exclude(self, prediction_id: int, excluded: bool) -> None:
        self._check()
        if prediction_id not in self.items:
            raise UnknownPrediction(f"no prediction with id {prediction_id}")
        self.items[prediction_id] = replace(self.items[prediction_id], excluded=excluded)


_learning: Learning = FakeLearning()  # mypy checks the fake against the protocol


TOKEN = "operator-secret-token"


@dataclass
class AdminSim:
    """The app built by `create_app` on fakes (store, model, learning loop), with `ADMIN_TOKEN` set."""

    user: User
    client: httpx.AsyncClient
    service: PredictionService
    learning: Any  # FakeLearning, or whatever `simulate_admin` was given (None: the real loop)

    @property
    def operator(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def simulate_admin(
    run_dir: Path,
    learning: Learning | None = None,
    admin_token: str | None = TOKEN,
    *,
    store: Any = None,
    database_url: str | None = None,
    **settings: Any,
) -> AsyncIterator[AdminSim]:
    """Like tests/ui/conftest.py's `simulate`, with the operator token and a learning loop: `learning`,
    else with a `database_url` the real one `create_app` opens on it (TorchServe's management API
    from `settings`), else a `FakeLearning`. `store`: a real `db.store.Store` (default a `FakeStore`)."""
    model = FakeModel()
    loop: Learning | None = learning if learning is not None or database_url else FakeLearning()
    inference = InferenceClient(
        "http://model.test", management_url="http://model.test", transport=model.transport()
    )
    try:
        with simulated_nicegui():
            config = Settings(run_dir=run_dir, data_dir=run_dir / "data", admin_token=admin_token, **settings)
            service = create_app(
                config,
                store=store if store is not None else FakeStore(),
                inference=inference,
                database_url=database_url,
                learning=loop,
            )
            ui.run(storage_secret="simulated secret", **UI_OPTIONS)
            async with core.app.router.lifespan_context(core.app):
                await wait_started(service)
                transport = httpx.ASGITransport(core.app)
                async with (
                    httpx.AsyncClient(transport=transport, base_url="http://test") as user_client,
                    httpx.AsyncClient(transport=transport, base_url="http://test") as api_client,
                ):
                    yield AdminSim(User(user_client), api_client, service, loop)
    finally:
        await inference.close()
