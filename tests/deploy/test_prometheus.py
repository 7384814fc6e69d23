"""A real Prometheus (Debian's binary) with the repo's config scrapes TorchServe and the UI, and loads the
repo's alert rules."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from tests.deploy.scrape import PROMETHEUS_DIR, api, local_config, query, running_prometheus, target_health
from tests.fixtures.torchserve import TorchServeInstance
from tests.handlers.renditions import png, read_mnist_test
from tests.ui.live import run_app


@pytest.fixture
def digit_png(mnist_dir: Path) -> bytes:
    images, _ = read_mnist_test(mnist_dir, 1)
    return png(Image.fromarray(images[0]))


def alert_names() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}


def test_prometheus_scrapes_torchserve_and_ui(
    torchserve: TorchServeInstance, db_url: str, tmp_path: Path, digit_png: bytes
) -> None:
    with run_app(
        tmp_path / "app",
        "--no-torchserve",
        DATABASE_URL=db_url,
        INFERENCE_URL=torchserve.inference_url,
        MANAGEMENT_URL=torchserve.management_url,
        METRICS_URL=torchserve.metrics_url,
    ) as app:
        # Traffic, so that both servers have counters to report.
        stored = httpx.post(
            f"{app.url}/api/predictions", content=digit_png, headers={"Content-Type": "image/png"}
        )
        assert stored.status_code in (200, 201), stored.text

        config = local_config(torchserve.metrics_url, app.url)
        with running_prometheus(tmp_path / "prometheus", config) as prom_url:
            health: dict[str, str] = {}
            ingested: list[dict] = []
            ui_counted: list[dict] = []
            rules: list[dict] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                health = target_health(prom_url)
                ingested = query(prom_url, "ts_inference_requests_total")
                ui_counted = query(prom_url, "digit_ui_predictions_total")
                rules = [r for g in api(prom_url, "rules")["groups"] for r in g["rules"]]
                evaluated = bool(rules) and all(r["lastEvaluation"] > "2000" for r in rules)
                if health == {"torchserve": "up", "ui": "up"} and ingested and ui_counted and evaluated:
                    break
                time.sleep(0.5)
            log = (tmp_path / "prometheus" / "prometheus.log").read_text()[-2000:]
            assert health == {"torchserve": "up", "ui": "up"}, (health, log)
            assert sum(float(s["value"][1]) for s in ingested) >= 1
            assert sum(float(s["value"][1]) for s in ui_counted) >= 1
            # The repo's alert rules are loaded by the repo's config and evaluate without error.
            assert {r["name"] for r in rules if r["type"] == "alerting"} == alert_names()
            assert [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
