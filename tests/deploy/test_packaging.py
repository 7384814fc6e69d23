"""The non-editable install (what the UI image gets with `pip install .`) carries every file the app reads."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_the_non_python_files(tmp_path: Path) -> None:
    # Build from a clean copy, as `pip install .` in the image does: no build/ or *.egg-info leftovers.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".data", ".run", "build", "*.egg-info", "__pycache__", "model_store", "tests"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = [
        *(f"db/migrations/{p.name}" for p in (ROOT / "db/migrations").glob("*.sql")),
        *(f"ui/{p.name}" for p in (ROOT / "ui").glob("*.js")),
        *(f"serving/{p.name}" for p in (ROOT / "serving").glob("*.xml")),
        "settings.py",
        "handlers/preprocess.py",
    ]
    assert len(needed) >= 6
    assert [name for name in needed if name not in names] == []
