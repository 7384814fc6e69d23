"""Static checks of the Docker deployment (no Docker engine here): Compose, Dockerfiles, Prometheus config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted(ROOT.glob("docker/*/Dockerfile"))
ENV = {"POSTGRES_PASSWORD": "test-only-password", "STORAGE_SECRET": "test-only-secret"}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` (Debian's docker-compose) on the repo's Compose file."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is missing: `make test` installs it (scripts/system-deps.sh)")
    clean = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "STORAGE_SECRET")}
    return subprocess.run(
        [exe, "-f", str(COMPOSE), "--project-directory", str(ROOT), "config"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def resolved() -> dict:
    result = compose_config(ENV)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_is_valid_and_has_the_four_services(resolved: dict) -> None:
    assert set(resolved["services"]) >= {"postgres", "torchserve", "ui", "prometheus"}


def test_secrets_are_required_not_defaulted() -> None:
    result = compose_config({})
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_only_the_ui_is_published_and_on_loopback(resolved: dict) -> None:
    published = {name for name, svc in resolved["services"].items() if svc.get("ports")}
    assert published == {"ui"}
    (port,) = resolved["services"]["ui"]["ports"]
    text = port if isinstance(port, str) else f"{port.get('host_ip')}:{port.get('published')}"
    assert text.startswith("127.0.0.1:"), port


def test_every_service_has_a_healthcheck(resolved: dict) -> None:
    services = resolved["services"]
    missing = [name for name, svc in services.items() if not svc.get("healthcheck", {}).get("test")]
    assert missing == []


def test_ui_waits_for_healthy_dependencies(resolved: dict) -> None:
    depends = resolved["services"]["ui"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["torchserve"]["condition"] == "service_healthy"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_runs_as_non_root_with_a_healthcheck(dockerfile: Path) -> None:
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)


def test_dockerfiles_copy_only_what_exists() -> None:
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
                sources = [p for p in parts[1:-1] if not p.startswith("--")]
                for source in sources:
                    assert (ROOT / source).exists(), f"{dockerfile}: {source} does not exist"


def test_prometheus_scrapes_torchserve_and_the_ui() -> None:
    config = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets["torchserve"] == ["torchserve:8082"]
    assert targets["ui"] == ["ui:8500"]


def test_env_example_has_no_secret_values() -> None:
    values = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert values["POSTGRES_PASSWORD"] == ""
    assert values["STORAGE_SECRET"] == ""
