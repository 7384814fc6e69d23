"""The operator page `/admin`: log in with the operator token, then the learning loop at a glance and its
actions: versions (accuracy chart, Promote / Roll back, Retire, Scale), training runs (Retrain, progress
bars that move), and the review of labels the model disagrees with (Exclude).

Built from small parts (`admin_login`, `admin_versions`, `admin_runs`, `admin_review`, the pure
`admin_views`) in the shared frame (`frame.page_frame`); it talks to the loop only through
`ui.learning.Learning`. Nothing is loaded while the page is built: the data follows when the
browser connects; a timer refreshes the runs every second while one is queued or running, and
everything every `IDLE_REFRESH_S` otherwise (a run started from the API shows up too).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from nicegui import ui

from db.errors import DatabaseUnavailable

from .admin_login import TOKEN_KEY, LoginLimit
from .admin_review import PAGE, ReviewPanel
from .admin_runs import RunsPanel
from .admin_versions import VersionsPanel
from .frame import APP_TITLE, Frame, page_frame, tag
from .learning import Learning, LearningError, LearningSlot, LoopUnavailable, with_labelled
from .service import PredictionService

T = TypeVar("T")

TITLE = f"{APP_TITLE} - operator"
PATH = "/admin"
TICK_S = 1.0
IDLE_REFRESH_S = 10.0
LOGIN_HINT = "The operator token is ADMIN_TOKEN (make run prints where it keeps one)."


class AdminSite:
    """What every operator page shares: the service (the operator rule), the loop, the log-in limit."""

    def __init__(self, service: PredictionService, loop: LearningSlot, login_limit: LoginLimit) -> None:
        self.service, self.loop, self.login_limit = service, loop, login_limit

    async def build(self) -> None:
        await AdminPage(self).build()


class AdminPage:
    """One tab of the operator page."""

    def __init__(self, site: AdminSite) -> None:
        self.site = site
        self.service = site.service
        self.review_offset = 0
        self.last_full = -IDLE_REFRESH_S
        self.active = False
        self.busy = False

    async def build(self) -> None:
        self.frame: Frame = page_frame(TITLE)
        with self.frame.actions:
            ui.link("Page", "/").classes("text-white")
        token = self.frame.prefs.get(TOKEN_KEY)
        if not self.service.is_operator(token if isinstance(token, str) else None):
            self.frame.prefs.pop(TOKEN_KEY, None)
            self._login()
            return
        with self.frame.actions:
            # The export is the operator's: a link signed for a few minutes (a download sends no header).
            tag(
                ui.button("Download labelled drawings", icon="download", on_click=self.download), "export"
            ).props("flat color=white dense")
            tag(ui.button("Log out", on_click=self.logout), "logout").props("flat color=white dense")
        self.banner = tag(ui.label(), "loop-unavailable").props("role=alert")
        self.banner.classes("w-full p-3 rounded bg-negative text-white")
        self.banner.set_visibility(False)
        with ui.column().classes("w-full max-w-5xl mx-auto gap-6"):
            self.versions = VersionsPanel(self.promote, self.retire, self.scale)
            self.runs = RunsPanel(self.retrain)
            self.review = ReviewPanel(self.exclude, self.review_page, self.service.links.image_url)
        ui.timer(TICK_S, self.tick)
        ui.context.client.on_connect(self.refresh)

    def download(self) -> None:
        ui.download(self.service.links.export_url(), "labelled-digits.zip")

    # ---------------------------------------------------------------- log-in
    def _login(self) -> None:
        request = ui.context.client.request
        client = self.site.login_limit.client_of(request)
        with ui.card().classes("mx-auto mt-12 w-full max-w-sm gap-3"):
            ui.label("Operator log-in").classes("text-h6")
            token = tag(ui.input("Operator token", password=True, password_toggle_button=True), "token")
            token.classes("w-full").props("autofocus autocomplete=current-password")
            message = tag(ui.label(LOGIN_HINT), "login-message").classes("text-caption")

            async def submit() -> None:
                refused = await self.site.login_limit.attempt(client)
                if refused is not None:
                    message.set_text(refused.message)
                    message.classes(replace="text-caption text-negative")
                    return
                value = (token.value or "").strip()
                if not self.service.is_operator(value):
                    message.set_text("That is not the operator token.")
                    message.classes(replace="text-caption text-negative")
                    return
                self.frame.prefs[TOKEN_KEY] = value
                ui.navigate.to(PATH)

            token.on("keydown.enter", submit)
            tag(ui.button("Log in", on_click=submit), "login").classes("w-full")

    def logout(self) -> None:
        self.frame.prefs.pop(TOKEN_KEY, None)
        ui.navigate.to(PATH)

    # ---------------------------------------------------------------- loading
    async def _learning(self) -> Learning:
        return await self.site.loop.get()

    def _unavailable(self, reason: str | None) -> None:
        self.banner.set_visibility(reason is not None)
        if reason is not None:
            self.banner.set_text(f"The learning loop is unavailable: {reason}")

    async def refresh(self) -> None:
        """Everything: versions (with live labelled accuracy), runs, the review page."""
        self.last_full = time.monotonic()
        try:
            learning = await self._learning()
            versions = await learning.models()
            runs = await learning.runs()
            review = await learning.review(PAGE, self.review_offset)
        except LoopUnavailable as exc:
            self._unavailable(str(exc))
            return
        try:
            stats = await self.service.stats()
        except DatabaseUnavailable:
            stats = None
        self._unavailable(None)
        self.versions.show(with_labelled(versions, stats))
        self.runs.show(runs)
        self.review.show(review, self.review_offset)
        self.active = any(r.active for r in runs)

    async def tick(self) -> None:
        """Every second: the runs while one is active (and everything once it ends), else a slow refresh."""
        if self.busy:
            return
        self.busy = True
        try:
            if time.monotonic() - self.last_full >= IDLE_REFRESH_S:
                await self.refresh()
            elif self.active:
                try:
                    runs = await (await self._learning()).runs()
                except LoopUnavailable as exc:
                    self._unavailable(str(exc))
                    return
                self.runs.show(runs)
                if not any(r.active for r in runs):
                    await self.refresh()  # a run ended: its version, perhaps promoted
        finally:
            self.busy = False

    # ---------------------------------------------------------------- actions
    async def _do(self, call: Callable[[Learning], Awaitable[T]], done: str) -> T | None:
        try:
            result = await call(await self._learning())
        except LearningError as exc:
            self.frame.toast.show(str(exc), "negative")
            if isinstance(exc, LoopUnavailable):
                self._unavailable(str(exc))
            return None
        self.frame.toast.show(done, "positive")
        await self.refresh()
        return result

    async def promote(self, version: str) -> None:
        await self._do(lambda it: it.promote(version), f"Version {version} is live.")

    async def retire(self, version: str) -> None:
        await self._do(lambda it: it.retire(version), f"Version {version} is retired.")

    async def scale(self, version: str, count: int) -> None:
        await self._do(lambda it: it.scale(version, count), f"Version {version}: {count} workers.")

    async def retrain(self, options: dict[str, Any]) -> None:
        run = await self._do(lambda it: it.retrain(options), "Training run queued.")
        if run is not None:
            self.active = True

    async def exclude(self, prediction_id: int, excluded: bool) -> bool:
        try:
            await (await self._learning()).exclude(prediction_id, excluded)
        except LearningError as exc:
            self.frame.toast.show(str(exc), "negative")
            return False
        what = "left out of training" if excluded else "used for training again"
        self.frame.toast.show(f"#{prediction_id} is {what}.", "positive")
        return True

    async def review_page(self, offset: int) -> None:
        self.review_offset = offset
        try:
            items = await (await self._learning()).review(PAGE, offset)
        except LearningError as exc:
            self.frame.toast.show(str(exc), "negative")
            return
        self.review.show(items, offset)
