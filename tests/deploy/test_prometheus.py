"""A real Prometheus (Debian's binary) with the repo's config scrapes TorchServe and the UI."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from tests.fixtures.torchserve import TorchServeInstance, free_ports
from tests.handlers.renditions import png, read_mnist_test
from tests.ui.live import run_app

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "docker/prometheus/prometheus.yml"


def local_config(torchserve_metrics: str, ui: str) -> dict:
    """The repo's Prometheus config with its targets pointed at this machine's servers, scraping fast."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    targets = {"torchserve": torchserve_metrics, "ui": ui}
    for job in config["scrape_configs"]:
        address = targets.pop(job["job_name"])
        job["static_configs"] = [{"targets": [address.removeprefix("http://")]}]
    assert targets == {}, f"jobs missing from the repo's config: {targets}"
    return config


@pytest.fixture
def digit_png(mnist_dir: Path) -> bytes:
    images, _ = read_mnist_test(mnist_dir, 1)
    return png(Image.fromarray(images[0]))


def query(prom_url: str, promql: str) -> list[dict]:
    response = httpx.get(f"{prom_url}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


def test_prometheus_scrapes_torchserve_and_ui(
    torchserve: TorchServeInstance, db_url: str, tmp_path: Path, digit_png: bytes
) -> None:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is missing: `make test` installs it (scripts/system-deps.sh)")
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

        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(local_config(torchserve.metrics_url, app.url)))
        (port,) = free_ports(1)
        prom_url = f"http://127.0.0.1:{port}"
        log = (tmp_path / "prometheus.log").open("w")
        process = subprocess.Popen(
            [
                exe,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            health: dict[str, str] = {}
            ingested: list[dict] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(1)
                try:
                    targets = httpx.get(f"{prom_url}/api/v1/targets", timeout=5).json()
                    health = {t["labels"]["job"]: t["health"] for t in targets["data"]["activeTargets"]}
                    ingested = query(prom_url, "ts_inference_requests_total")
                    ui_counted = query(prom_url, "digit_ui_predictions_total")
                except httpx.HTTPError:
                    continue
                if health == {"torchserve": "up", "ui": "up"} and ingested and ui_counted:
                    break
            assert health == {"torchserve": "up", "ui": "up"}, (
                health,
                (tmp_path / "prometheus.log").read_text()[-2000:],
            )
            assert sum(float(s["value"][1]) for s in ingested) >= 1
            assert sum(float(s["value"][1]) for s in ui_counted) >= 1
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()
