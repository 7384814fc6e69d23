"""The page and the API docs under the security headers, in a real browser (Debian's chromium).

The app runs as `make run` starts it, on the session's real TorchServe and PostgreSQL (the
fixtures of tests/ui/live.py). The Content-Security-Policy must not break NiceGUI: the page
draws and predicts, and the browser reports no CSP violation; /docs renders Swagger UI from the
app's own files with no request leaving the app's origin.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from tests.ui import live
from tests.ui.live import RunningApp, draw_with_mouse
from ui.headers import CSP

browser, model_proxy, database, app = live.browser, live.model_proxy, live.database, live.app
pytestmark = pytest.mark.slow

VIOLATION = re.compile(r"Content Security Policy|Refused to (load|execute|connect|apply|frame)", re.I)


@pytest.fixture
def watched(browser: Browser, app: RunningApp) -> Iterator[tuple[Page, list[str], list[str]]]:
    """A page, the console messages and CSP violation reports it gets, and the URLs it requested."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    messages: list[str] = []
    requested: list[str] = []

    def console(message: ConsoleMessage) -> None:
        messages.append(f"{message.type}: {message.text}")

    page.on("console", console)
    page.on("pageerror", lambda error: messages.append(f"pageerror: {error}"))
    page.on("request", lambda request: requested.append(request.url))
    # The browser's own report of a violation (also when nothing is logged to the console).
    page.add_init_script(
        "window.__csp = []; document.addEventListener('securitypolicyviolation',"
        " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    yield page, messages, requested
    context.close()


def violations(page: Page, messages: list[str]) -> list[str]:
    return [m for m in messages if VIOLATION.search(m)] + list(page.evaluate("window.__csp || []"))


def test_the_page_draws_and_predicts_under_the_csp(
    watched: tuple[Page, list[str], list[str]], app: RunningApp
) -> None:
    page, messages, _ = watched
    response = page.goto(app.url)
    assert response is not None and response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    expect(page.get_by_test_id("digit-canvas")).to_be_visible()
    draw_with_mouse(page)
    page.get_by_test_id("predict").click()
    expect(page.get_by_test_id("digit")).to_have_text("1", timeout=10_000)
    expect(page.get_by_test_id("status")).to_contain_text("saved as #", timeout=10_000)
    page.get_by_role("tab", name="Statistics").click()
    expect(page.get_by_test_id("stat-labelled")).to_be_visible()
    assert violations(page, messages) == [], messages


def test_api_docs_render_offline_from_the_apps_own_files(
    watched: tuple[Page, list[str], list[str]], app: RunningApp
) -> None:
    page, messages, requested = watched
    html = httpx.get(f"{app.url}/docs", timeout=10).text
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
    assert len(assets) >= 2 and all(a.startswith("/") for a in assets), assets
    for asset in assets:  # every script and stylesheet /docs references is served by the app
        assert httpx.get(f"{app.url}{asset}", timeout=10).status_code == 200, asset
    redoc = httpx.get(f"{app.url}/redoc", timeout=10).text
    for asset in re.findall(r'src="([^"]+\.js)"', redoc):
        assert asset.startswith("/") and httpx.get(f"{app.url}{asset}", timeout=10).status_code == 200
    page.goto(f"{app.url}/docs")
    expect(page.get_by_text("/api/predictions").first).to_be_visible(timeout=15_000)
    origin = urlsplit(app.url).netloc
    assert {urlsplit(u).netloc for u in requested if u.startswith("http")} == {origin}, requested
    assert violations(page, messages) == [], messages
