"""The Grafana dashboard (docker/grafana/): the structure Grafana's provisioning expects, and every panel
expression evaluated by a real Prometheus scraping a real TorchServe and the real UI after real traffic."""

from __future__ import annotations

import json
import math
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from tests.deploy.scrape import (
    PROMETHEUS_DIR,
    api,
    local_config,
    query,
    running_prometheus,
    target_health,
    wait_for,
)
from tests.fixtures.torchserve import TorchServeInstance, manifest_version
from tests.handlers.renditions import png, read_mnist_test
from tests.ui.live import run_app

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "docker/grafana"
DASHBOARD = GRAFANA / "dashboards/digit-classifier.json"
DATASOURCES = GRAFANA / "provisioning/datasources/prometheus.yml"
PROVIDERS = GRAFANA / "provisioning/dashboards/digit-classifier.yml"
COMPOSE = ROOT / "docker-compose.yml"
# Grafana's own variables, and the window the test gives the dashboard's duration variables.
WINDOW = "1m"
GRAFANA_VARIABLES = ("__rate_interval", "__interval", "__range")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or"}
PROMQL_WORDS |= {"unless", "inf", "nan"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (rows hold their panels when collapsed)."""
    out: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def panel_targets(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title and refId, expression) of every query of every panel."""
    return [(f"{p['title']} [{t['refId']}]", t["expr"]) for p in panels(board) for t in p["targets"]]


def annotation_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [(a["name"], a["expr"]) for a in board["annotations"]["list"] if "expr" in a]


def alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"] if "alert" in r]


def concrete(expr: str, board: dict[str, Any]) -> str:
    """The expression as Grafana would send it, with a fixed window for every variable."""
    names = [*GRAFANA_VARIABLES, *(v["name"] for v in board["templating"]["list"])]
    for name in sorted(names, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", WINDOW).replace(f"${name}", WINDOW)
    left = re.findall(r"\$\{?[A-Za-z_]\w*", expr)
    assert left == [], f"unknown variables {left} in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (strings, matchers, ranges, label lists and calls removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        word = match.group()
        if word.lower() in PROMQL_WORDS or s[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def test_metric_names_finds_the_selected_metrics() -> None:
    expr = (
        'sum by (le) (rate(a_total{kind=~"x|y"}[$w])) / 1e6 or b * 0 offset 1m '
        'and on (v) label_replace(c, "v", "$1", "n", "(.*)")'
    )
    assert metric_names(expr) == {"a_total", "b", "c"}


# -- the structure Grafana's provisioning expects ---------------------------------------------------
def test_dashboard_has_what_grafana_provisioning_expects() -> None:
    board = dashboard()
    assert re.fullmatch(r"[a-z0-9-]{1,40}", board["uid"]) and board["title"]
    assert isinstance(board["schemaVersion"], int) and board["editable"] is False
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    expected = {"type": source["type"], "uid": source["uid"]}
    ids = [p["id"] for p in board["panels"]] + [p["id"] for r in board["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    shown = panels(board)
    assert len(shown) >= 12
    for panel in shown:
        where = panel["title"]
        assert panel["type"] and panel["title"], where
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, where
        assert panel["datasource"] == expected, where
        assert panel["targets"], where
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == expected, where
    for name, _ in annotation_exprs(board):
        (annotation,) = (a for a in board["annotations"]["list"] if a.get("name") == name)
        assert annotation["datasource"] == expected


def test_the_panels_cover_the_story() -> None:
    """What an operator asks of the dashboard, each answered by a panel reading the right metrics."""
    reads = {
        p["title"]: set().union(*(metric_names(t["expr"]) for t in p["targets"])) for p in panels(dashboard())
    }
    needed = {
        "digit_ui_predictions_total",
        "ts_inference_requests_total",
        "digit_ui_prediction_latency_seconds_bucket",
        "ts_inference_latency_microseconds",
        "digit_ui_errors_total",
        "Requests5XX",
        "ts_queue_latency_microseconds",
        "WorkerThreadTime",
        "WorkerLoadTime",
        "process_resident_memory_bytes",
        "digit_ui_feedback_total",
        "digit_ui_waiting",
        "digit_ui_model_version_info",
        "digit_ui_dependency_up",
    }
    assert needed - set().union(*reads.values()) == set()


def test_provisioning_points_at_prometheus_and_the_dashboard_folder() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    grafana = compose["grafana"]
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose
    mounts = dict(reversed(v.split(":")[:2]) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    folder = mounts[provider["options"]["path"]]
    assert (ROOT / folder / DASHBOARD.name).is_file()
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert mounts[str(home.parent)] == folder and (ROOT / folder / home.name).is_file()


def test_grafana_is_pinned_unpublished_and_needs_a_password() -> None:
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    assert "ports" not in grafana
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    (port,) = yaml.safe_load((GRAFANA / "publish.yml").read_text())["services"]["grafana"]["ports"]
    assert port.startswith("127.0.0.1:")
    env = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if "=" in line)
    assert env["GRAFANA_ADMIN_PASSWORD"] == ""


# -- against the real thing --------------------------------------------------------------------------
def drive(ui_url: str, torchserve: TorchServeInstance, images: list[bytes]) -> None:
    """Predictions labelled right and wrong, a readiness check, and a 4xx and a 5xx from TorchServe."""
    for n, image in enumerate(images):
        answer = httpx.post(f"{ui_url}/api/predictions", content=image, headers={"Content-Type": "image/png"})
        assert answer.status_code == 201, answer.text
        body = answer.json()
        label = body["digit"] if n % 2 == 0 else (body["digit"] + 1) % 10
        labelled = httpx.put(
            f"{ui_url}/api/predictions/{body['id']}/label",
            json={"label": label},
            headers={"X-Label-Token": body["label_token"]},
        )
        assert labelled.status_code == 200, labelled.text
    assert httpx.get(f"{ui_url}/readyz", timeout=10).status_code == 200
    keys = torchserve.inference_headers()  # token authorization is on
    refused = httpx.post(
        torchserve.predictions_url(), content=b"not an image", headers={"Content-Type": "image/png", **keys}
    )
    assert 400 <= refused.status_code < 500, refused.text
    # A form with a broken escape fails in TorchServe's frontend, before the handler: a real 5xx.
    failed = httpx.post(
        torchserve.predictions_url(),
        content=b"a=%E0%A4%A",
        headers={"Content-Type": "application/x-www-form-urlencoded", **keys},
    )
    assert failed.status_code >= 500, failed.text


def seen(prom_url: str, promql: str, at_least: float) -> bool:
    return sum(float(s["value"][1]) for s in query(prom_url, promql)) >= at_least


def finite(samples: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in samples if math.isfinite(float(s["value"][1]))]


@pytest.mark.slow
def test_every_panel_expression_returns_data(
    torchserve: TorchServeInstance, db_url: str, tmp_path: Path, mnist_dir: Path
) -> None:
    board = dashboard()
    digits, _ = read_mnist_test(mnist_dir, 2)
    images = [png(Image.fromarray(d)) for d in digits]
    with run_app(
        tmp_path / "app",
        "--no-torchserve",
        DATABASE_URL=db_url,
        INFERENCE_URL=torchserve.inference_url,
        MANAGEMENT_URL=torchserve.management_url,
        METRICS_URL=torchserve.metrics_url,
    ) as app:
        config = local_config(torchserve.metrics_url, app.url)
        with running_prometheus(tmp_path / "prometheus", config) as prom_url:
            wait_for(
                lambda: target_health(prom_url) == {"torchserve": "up", "ui": "up"}, 30, "both targets up"
            )
            # Two rounds of traffic with scrapes between: every counter moves within the window.
            for round_ in (1, 2):
                drive(app.url, torchserve, images)
                labels_scraped = partial(seen, prom_url, "sum(digit_ui_feedback_total)", 2 * round_)
                wait_for(labels_scraped, 30, f"round {round_} scraped")
            time.sleep(1.5)  # one more scrape of everything

            known = set(api(prom_url, "label/__name__/values"))
            empty, unknown = [], []
            for where, expr in panel_targets(board):
                promql = concrete(expr, board)
                unknown += [(where, name) for name in metric_names(promql) - known]
                if not finite(query(prom_url, promql)):
                    empty.append((where, promql))
            assert unknown == [], "metrics no target exposes"
            assert empty == [], "panel expressions without data"
            for where, expr in [*annotation_exprs(board), *alert_exprs()]:
                query(prom_url, concrete(expr, board))  # valid PromQL (Prometheus answers success)
                assert metric_names(expr) - known == set(), where

            # What the panels say is what happened: half the labels right, the served version answering.
            (accuracy,) = (e for w, e in panel_targets(board) if w.startswith("Live accuracy"))
            (value,) = finite(query(prom_url, concrete(accuracy, board)))
            assert value == pytest.approx(0.5, abs=0.05)
            version = manifest_version(torchserve.model_store / f"{torchserve.model_name}.mar")
            info = query(prom_url, "digit_ui_model_version_info")
            assert [(s["metric"]["model_version"], s["value"][1]) for s in info] == [(version, "1")]
