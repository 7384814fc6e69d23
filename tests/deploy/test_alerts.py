"""The alert rules of docker/prometheus/alerts.yml: `promtool check rules`, `promtool test rules`, and every
alert with at least one firing and one quiet unit test."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.scrape import PROMETHEUS_DIR
from ui import metrics

RULES = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerts.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: `make test` installs Debian's prometheus (scripts/system-deps.sh)")
    return subprocess.run(
        [exe, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120, check=False
    )


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_passes() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_check_config_loads_the_rules() -> None:
    """The config Compose runs names the rule file (relative to it), and both are valid."""
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases: dict[str, dict[str, int]] = {rule["alert"]: {"firing": 0, "quiet": 0} for rule in alerts()}
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            assert case["alertname"] in cases, f"unit test for an unknown alert: {case['alertname']}"
            cases[case["alertname"]]["firing" if case.get("exp_alerts") else "quiet"] += 1
    missing = {name: c for name, c in cases.items() if not (c["firing"] and c["quiet"])}
    assert missing == {}


def test_every_alert_has_a_severity_a_summary_and_a_wait() -> None:
    for rule in alerts():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]  # no alert on a single bad scrape


def test_the_5xx_rule_selects_the_server_error_kinds_of_the_ui() -> None:
    """The rule lists the kinds by name; they must be the ones `ui.metrics` declares as answered 5xx."""
    (rule,) = (r for r in alerts() if r["alert"] == "UIServerErrors")
    selectors = set(re.findall(r'kind=~"([^"]+)"', rule["expr"]))
    assert selectors == {"|".join(metrics.SERVER_ERROR_KINDS)}
    assert set(metrics.SERVER_ERROR_KINDS) <= set(metrics.ERROR_KINDS)
