"""`python -m ui` serves only: it needs DATABASE_URL and says so clearly when it is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.ui.live import ROOT, app_env, free_port


def test_python_m_ui_without_database_url_says_what_is_missing(tmp_path: Path) -> None:
    env = app_env(tmp_path, free_port())
    env.pop("DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "ui"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "DATABASE_URL is not set" in done.stderr and "python -m db migrate" in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was started or created
