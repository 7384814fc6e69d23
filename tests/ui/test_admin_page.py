"""The operator page /admin.

Fast: NiceGUI's simulated user on the app `create_app` builds, with an in-memory learning loop (log-in,
its rate limit, versions, a run's progress moving, actions, review, the loop unavailable).
Slow: Chromium (Playwright) against `python -m ui` and `python -m serving.trainer` on the session's
real PostgreSQL and TorchServe: log in, retrain, watch the progress bar move, promote, exclude,
roll back. `DOCS_SCREENSHOTS=1` writes docs/screenshot-admin.png.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from nicegui import ui
from playwright.sync_api import Browser, Page, expect

from db.migrate import migrate
from db.registry import Registry
from db.store import Store
from serving.management import AsyncManagementClient, ManagementClient
from serving.registry import ModelRegistry
from tests.db.samples import prediction
from tests.fixtures.torchserve import TorchServeInstance
from tests.ui import live
from tests.ui.learning_fakes import TOKEN, AdminSim, FakeLearning, simulate_admin
from tests.ui.live import RunningApp
from training.styles import make_set
from ui.admin_login import DEFAULT_LOGIN_LIMIT
from ui.learning import NO_DATABASE, UnavailableLearning


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[AdminSim]:
    async with simulate_admin(tmp_path) as sim:
        yield sim


def fake(sim: AdminSim) -> FakeLearning:
    assert isinstance(sim.learning, FakeLearning)
    return sim.learning


async def log_in(sim: AdminSim, token: str = TOKEN) -> None:
    await sim.user.open("/admin")
    await sim.user.should_see("Operator log-in")
    sim.user.find(marker="token").type(token)
    sim.user.find(marker="login").click()


async def logged_in(sim: AdminSim) -> None:
    await log_in(sim)
    await sim.user.open("/admin")  # the reload after a log-in
    await sim.user.should_see("Model versions")


async def test_the_page_needs_the_operator_token(admin: AdminSim) -> None:
    await admin.user.open("/admin")
    await admin.user.should_see("Operator log-in")
    await admin.user.should_not_see("Model versions")
    await admin.user.should_not_see("Version 1.0")
    admin.user.find(marker="token").type("wrong")
    admin.user.find(marker="login").click()
    await admin.user.should_see("That is not the operator token.")
    await admin.user.should_not_see("Model versions")


async def test_log_in_is_remembered_and_log_out_forgets(admin: AdminSim) -> None:
    await logged_in(admin)
    await admin.user.should_see("Version 1.0")
    await admin.user.open("/admin")  # another load: still logged in (the browser's storage)
    await admin.user.should_see("Model versions")
    admin.user.find(marker="logout").click()
    await admin.user.open("/admin")
    await admin.user.should_see("Operator log-in")


async def test_the_operator_downloads_the_export_through_a_signed_link(admin: AdminSim) -> None:
    await logged_in(admin)
    admin.user.find(marker="export").click()
    response = await admin.user.download.next()
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert (await admin.user.http_client.get("/api/export")).status_code == 401  # the link, not the session


async def test_log_in_attempts_are_rate_limited(admin: AdminSim) -> None:
    allowed = int(DEFAULT_LOGIN_LIMIT.split("/")[0])
    await admin.user.open("/admin")
    for _ in range(allowed):
        admin.user.find(marker="token").type("guess")
        admin.user.find(marker="login").click()
        await admin.user.should_see("That is not the operator token.")
        await asyncio.sleep(0.05)  # the click's handler has run (the message is the same each time)
    admin.user.find(marker="token").clear()
    admin.user.find(marker="token").type(TOKEN)  # even the right token: over the limit, not checked
    admin.user.find(marker="login").click()
    await admin.user.should_see("Too many log-in attempts from this address")
    await admin.user.open("/admin")
    await admin.user.should_see("Operator log-in")


async def test_versions_runs_progress_and_promote(admin: AdminSim) -> None:
    await logged_in(admin)
    await admin.user.should_see(marker="version-1.0-live")
    await admin.user.should_see("MNIST test 99.4 %")
    await admin.user.should_see("No training run yet.")
    admin.user.find(marker="epochs").type("2")
    admin.user.find(marker="retrain").click()
    await admin.user.should_see("Training run queued.")
    await admin.user.should_see("Run #1 · queued · 0 %")
    assert fake(admin).retrained == [{"auto_promote": True, "epochs": 2}]
    fake(admin).advance(1, 0.5)
    await admin.user.should_see("Run #1 · running · 50 %", retries=30)  # the timer, while a run is active
    fake(admin).advance(1, 1.0, version="2.0")
    await admin.user.should_see("Run #1 · succeeded · 100 %", retries=30)
    await admin.user.should_see("Version 2.0", retries=30)  # the run ended: everything refreshed
    await admin.user.should_see("held-out feedback 97.0 %")
    admin.user.find(marker="promote-2.0").click()
    await admin.user.should_see("Version 2.0 is live.")
    assert fake(admin).versions["2.0"].live and not fake(admin).versions["1.0"].live
    await admin.user.should_see(marker="version-2.0-live")
    admin.user.find(marker="retire-1.0").click()
    await admin.user.should_see("Version 1.0 is retired.")
    assert fake(admin).versions["1.0"].state == "retired"


async def test_roll_back_and_scale(admin: AdminSim) -> None:
    await fake(admin).retrain({})
    fake(admin).advance(1, 1.0, version="2.0")
    await fake(admin).promote("2.0")
    await logged_in(admin)
    await admin.user.should_see(marker="promote-1.0")
    button = admin.user.find(marker="promote-1.0").elements.pop()
    assert isinstance(button, ui.button) and button.text == "Roll back"
    admin.user.find(marker="promote-1.0").click()
    await admin.user.should_see("Version 1.0 is live.")
    assert fake(admin).versions["1.0"].live
    number = admin.user.find(marker="workers-2.0").elements.pop()
    assert isinstance(number, ui.number)
    number.set_value(3)
    admin.user.find(marker="scale-2.0").click()
    await admin.user.should_see("Version 2.0: 3 workers.")
    assert fake(admin).versions["2.0"].workers == 3


async def test_review_list_excludes_a_drawing(admin: AdminSim) -> None:
    await logged_in(admin)
    await admin.user.should_see(marker="review-3")
    await admin.user.should_see("labelled 7 · model 1 (80 %) · 1.0")
    admin.user.find(marker="exclude-3").click()
    await admin.user.should_see("#3 is left out of training.")
    assert fake(admin).items[3].excluded
    admin.user.find(marker="exclude-3").click()
    await admin.user.should_see("#3 is used for training again.")
    assert not fake(admin).items[3].excluded


async def test_a_refused_exclusion_puts_the_switch_back(admin: AdminSim) -> None:
    await logged_in(admin)
    await admin.user.should_see(marker="review-2")
    del fake(admin).items[2]  # deleted meanwhile
    admin.user.find(marker="exclude-2").click()
    await admin.user.should_see("no prediction with id 2")
    switch = admin.user.find(marker="exclude-2").elements.pop()
    assert isinstance(switch, ui.switch) and switch.value is False


async def test_the_loop_unavailable_is_said(tmp_path: Path) -> None:
    async with simulate_admin(tmp_path, learning=UnavailableLearning(NO_DATABASE)) as sim:
        await logged_in(sim)
        await sim.user.should_see("The learning loop is unavailable: " + NO_DATABASE)


async def test_the_loop_going_down_and_back(admin: AdminSim) -> None:
    await logged_in(admin)
    fake(admin).down = True
    admin.user.find(marker="retrain").click()
    await admin.user.should_see("The learning loop is unavailable: the learning loop is unavailable")
    fake(admin).down = False
    admin.user.find(marker="retrain").click()
    await admin.user.should_see("Run #1 · queued · 0 %")
    await admin.user.should_not_see(marker="loop-unavailable")


async def test_the_public_page_does_not_link_or_show_the_operator_page(admin: AdminSim) -> None:
    await admin.user.open("/")
    await admin.user.should_not_see("Model versions")
    await admin.user.should_not_see("Operator log-in")


# ------------------------------------------------------------------ Chromium, everything real

# This module's browser (module-scoped; Debian's chromium through Playwright, never `playwright install`).
browser = live.browser
DOCS = Path(__file__).resolve().parents[2] / "docs"
PNG = {"content-type": "image/png"}
VIOLATION = re.compile(r"Content Security Policy|Refused to (load|execute|connect|apply|frame)", re.I)


@dataclass
class RealLoop:
    """`python -m ui` and `python -m serving.trainer` on a fresh database and the session's TorchServe."""

    app: RunningApp
    database: str
    torchserve: TorchServeInstance
    wrong_id: int  # a labelled drawing the model got wrong (in the review list)


async def _seed(url: str, torchserve: TorchServeInstance) -> int:
    """The registry's shipped 1.0 (live) and a few labelled drawings, one of them disagreeing."""
    registry = await Registry.open(url)
    store = await Store.open(url)
    management = AsyncManagementClient(torchserve.management_url, torchserve.model_name)
    try:
        await ModelRegistry(
            registry, management, torchserve.model_store, workers=1, batch_size=1, max_batch_delay_ms=0
        ).seed()
        wrong = await store.record_prediction(prediction(digit=1, seed=7))
        await store.set_label(wrong, 7)
        for seed in range(8):
            right = await store.record_prediction(prediction(digit=3, seed=seed))
            await store.set_label(right, 3)
        return wrong
    finally:
        await management.close()  # `seed` only reads the archive and writes the registry
        await store.close()
        await registry.close()


def _reset(torchserve: TorchServeInstance) -> None:
    with ManagementClient(
        torchserve.management_url, torchserve.model_name, auth=torchserve.config.auth("management")
    ) as client:
        client.set_default("1.0")
        for described in client.versions():
            if described["modelVersion"] != "1.0":
                client.unregister(described["modelVersion"])


@pytest.fixture
def real_loop(
    postgres: Any, torchserve: TorchServeInstance, mnist_dir: Path, tmp_path: Path
) -> Iterator[RealLoop]:
    url: str = postgres.create_database()
    migrate(url)
    with ThreadPoolExecutor(1) as pool:  # its own event loop: Playwright's sync API runs one here
        wrong = pool.submit(asyncio.run, _seed(url, torchserve)).result()
    env: dict[str, Any] = {
        "DATABASE_URL": url,
        "INFERENCE_URL": torchserve.inference_url,
        "MANAGEMENT_URL": torchserve.management_url,
        "METRICS_URL": torchserve.metrics_url,
        "ARCHIVE_DIR": str(torchserve.model_store),
        "MNIST_DIR": str(mnist_dir),
        "MODEL_WORKERS": "1",
        "ADMIN_TOKEN": TOKEN,
        "PYTHONUNBUFFERED": "1",
    }
    trainer_log = tmp_path / "trainer.log"
    with trainer_log.open("wb") as out:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "serving.trainer"],
            cwd=live.ROOT,
            env=live.app_env(tmp_path, live.free_port(), **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with live.run_app(tmp_path / "ui", module="ui", **env) as app:
            post_feedback(app.url)
            yield RealLoop(app, url, torchserve, wrong)
    finally:
        trainer.terminate()
        try:
            trainer.wait(30)
        except subprocess.TimeoutExpired:
            trainer.kill()
            trainer.wait()
        _reset(torchserve)
        postgres.drop_database(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
        print(trainer_log.read_text(errors="replace")[-3000:])


def post_feedback(url: str, n: int = 12) -> None:
    """People's drawings in styles MNIST rarely has (training.styles), predicted by the real model
    through the public API and labelled with their true digit by whoever drew them."""
    for image, digit in make_set(n, seed=5):
        answer = httpx.post(f"{url}/api/predictions", content=image, headers=PNG)
        assert answer.status_code == 201, answer.text
        body = answer.json()
        labelled = httpx.put(
            f"{url}/api/predictions/{body['id']}/label",
            json={"label": digit},
            headers={"X-Label-Token": body["label_token"]},
        )
        assert labelled.status_code == 200, labelled.text


def default_version(torchserve: TorchServeInstance) -> str:
    with ManagementClient(
        torchserve.management_url, torchserve.model_name, auth=torchserve.config.auth("management")
    ) as client:
        return str(client.describe()[0]["modelVersion"])


def run_percent(page: Page) -> tuple[str, int]:
    """The first run's status and percentage, as its title shows them ('Run #1 · running · 40 %')."""
    title = page.get_by_test_id("run-1-title").inner_text()
    _, status, percent = (part.strip() for part in title.split("·"))
    return status, int(percent.rstrip(" %"))


@pytest.mark.slow
def test_log_in_retrain_watch_progress_promote_and_roll_back(
    browser: Browser, real_loop: RealLoop, tmp_path: Path
) -> None:
    """The operator's whole round in Chromium, on the real app, trainer, PostgreSQL and TorchServe."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda error: messages.append(f"pageerror: {error}"))
    try:
        page.goto(f"{real_loop.app.url}/admin")
        expect(page.get_by_text("Operator log-in")).to_be_visible()
        page.get_by_test_id("token").fill("not the token")
        page.get_by_test_id("login").click()
        expect(page.get_by_test_id("login-message")).to_have_text("That is not the operator token.")
        page.get_by_test_id("token").fill(TOKEN)
        page.get_by_test_id("token").press("Enter")
        expect(page.get_by_text("Model versions")).to_be_visible(timeout=15_000)
        expect(page.get_by_test_id("version-1.0-live")).to_be_visible(timeout=15_000)
        expect(page.get_by_test_id("accuracy-chart").locator("canvas").first).to_be_visible()
        image = page.get_by_test_id(f"review-{real_loop.wrong_id}").locator("img")
        expect(image).to_be_visible(timeout=15_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())

        # Retrain with a short configuration, by hand promotion.
        page.get_by_test_id("epochs").fill("1")
        page.get_by_test_id("mnist-samples").fill("600")
        page.get_by_test_id("mnist-eval-limit").fill("200")
        page.get_by_test_id("auto-promote").click()
        page.get_by_test_id("retrain").click()
        expect(page.get_by_test_id("run-1")).to_be_visible(timeout=15_000)
        seen: set[int] = set()
        deadline = time.monotonic() + 300
        status = "queued"
        while time.monotonic() < deadline:
            status, percent = run_percent(page)
            if status == "running":
                seen.add(percent)
            if status in ("succeeded", "failed"):
                break
            page.wait_for_timeout(250)
        assert status == "succeeded", page.get_by_test_id("run-1").inner_text()
        assert len(seen) >= 2, f"the progress bar did not move: {sorted(seen)}"  # refreshed while running
        expect(page.get_by_test_id("version-2.0")).to_be_visible(timeout=15_000)
        expect(page.get_by_test_id("run-1-detail")).to_contain_text("built 2.0, not promoted")
        page.get_by_test_id("version-2.0").scroll_into_view_if_needed()
        shot = tmp_path / "screenshot-admin.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("DOCS_SCREENSHOTS"):
            shutil.copy(shot, DOCS / "screenshot-admin.png")

        page.get_by_test_id("promote-2.0").click()
        expect(page.get_by_test_id("toast")).to_have_text("Version 2.0 is live.", timeout=120_000)
        expect(page.get_by_test_id("version-2.0-live")).to_be_visible()
        assert default_version(real_loop.torchserve) == "2.0"
        answered = httpx.post(
            f"{real_loop.app.url}/api/predictions", content=prediction(seed=1).image_png, headers=PNG
        )
        assert answered.status_code == 201 and answered.json()["model_version"] == "2.0", answered.text

        page.get_by_test_id(f"exclude-{real_loop.wrong_id}").click()
        expect(page.get_by_test_id("toast")).to_have_text(f"#{real_loop.wrong_id} is left out of training.")
        with psycopg.connect(real_loop.database) as conn:
            row = conn.execute(
                "SELECT excluded FROM predictions WHERE id = %s", (real_loop.wrong_id,)
            ).fetchone()
        assert row == (True,)

        expect(page.get_by_test_id("promote-1.0")).to_have_text("Roll back")
        page.get_by_test_id("promote-1.0").click()
        expect(page.get_by_test_id("toast")).to_have_text("Version 1.0 is live.", timeout=120_000)
        assert default_version(real_loop.torchserve) == "1.0"
        assert not [m for m in messages if VIOLATION.search(m) or m.startswith("pageerror")], messages
    finally:
        context.close()
