"""A real Prometheus (Debian's binary) with the repo's config and alert rules, scraping servers on this
machine fast (1 s), for tests/deploy/test_prometheus.py and test_dashboard.py."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serving.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "docker/prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
INTERVAL = "1s"  # scrape and rule evaluation: the tests wait seconds, not minutes


def local_config(torchserve_metrics: str, ui: str) -> dict[str, Any]:
    """The repo's config with its targets pointed at this machine's servers, scraping and evaluating fast.

    Rule files are made absolute (the config is written elsewhere), so the repo's alert rules load.
    """
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = INTERVAL
    config["global"]["evaluation_interval"] = INTERVAL
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config.get("rule_files", [])]
    targets = {"torchserve": torchserve_metrics, "ui": ui}
    for job in config["scrape_configs"]:
        address = targets.pop(job["job_name"])
        job["static_configs"] = [{"targets": [address.removeprefix("http://")]}]
    assert targets == {}, f"jobs missing from the repo's config: {targets}"
    return config


@contextlib.contextmanager
def running_prometheus(tmp: Path, config: dict[str, Any]) -> Iterator[str]:
    """Prometheus with `config` until the block ends; yields its URL once it is ready."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is missing: `make test` installs it (scripts/system-deps.sh)")
    tmp.mkdir(parents=True, exist_ok=True)
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                exe,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _ready(url), 30, f"Prometheus ready:\n{log_path.read_text()[-2000:]}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    return False


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 0.5 s; fail the test with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def api(prom_url: str, path: str, **params: str) -> Any:
    """The `data` of a Prometheus HTTP API answer; fails the test with Prometheus's error otherwise."""
    response = httpx.get(f"{prom_url}/api/v1/{path}", params=params, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (path, params, body)
    return body["data"]


def query(prom_url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query at now: the result vector."""
    data = api(prom_url, "query", query=promql)
    assert data["resultType"] in ("vector", "scalar"), data
    result = data["result"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": result}]
    return list(result)


def target_health(prom_url: str) -> dict[str, str]:
    """Scrape health by job, e.g. {"torchserve": "up", "ui": "up"}."""
    targets = api(prom_url, "targets")["activeTargets"]
    return {t["labels"]["job"]: t["health"] for t in targets}
