"""The hashed locks under requirements/ agree with pyproject.toml and with each other (offline, no resolver).

`make lock` writes them; this fails when pyproject.toml changed without a new lock, when a lock lost a
hash, or when a resolution slipped in a CUDA torch (gigabytes of nvidia-* wheels).
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = ("dev.txt", "ui.txt", "torchserve.txt", "trainer.txt")


def parse_lock(text: str) -> dict[str, tuple[Version, list[str]]]:
    """`name==version --hash=...` entries of a pip requirements file: name -> (version, hashes)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    pins: dict[str, tuple[Version, list[str]]] = {}
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        name, _, version = words[0].partition("==")
        assert version, f"not pinned with ==: {line}"
        hashes = [w.removeprefix("--hash=") for w in words[1:] if w.startswith("--hash=")]
        pins[canonicalize_name(name)] = (Version(version), hashes)
    return pins


def lock(name: str) -> dict[str, tuple[Version, list[str]]]:
    return parse_lock((REQUIREMENTS / name).read_text())


def declared(*extras: str) -> list[Requirement]:
    """pyproject's base dependencies plus the given extras."""
    project = PYPROJECT["project"]
    specs = [*project["dependencies"], *(s for e in extras for s in project["optional-dependencies"][e])]
    return [Requirement(s) for s in specs]


def build_requires() -> list[Requirement]:
    return [Requirement(s) for s in PYPROJECT["build-system"]["requires"]]


def unmet(requirements: list[Requirement], pins: dict[str, tuple[Version, list[str]]]) -> list[str]:
    """The requirements that the pins miss or pin to a version outside the declared range."""
    bad = []
    for req in requirements:
        pin = pins.get(canonicalize_name(req.name))
        if pin is None or not req.specifier.contains(pin[0], prereleases=True):
            bad.append(f"{req} (locked: {pin[0] if pin else 'missing'})")
    return bad


def test_the_dev_lock_pins_every_declared_dependency_within_its_range() -> None:
    extras = list(PYPROJECT["project"]["optional-dependencies"])
    assert unmet([*declared(*extras), *build_requires(), Requirement("pip")], lock("dev.txt")) == []


def test_the_ui_lock_pins_the_base_dependencies_and_no_torch() -> None:
    pins = lock("ui.txt")
    assert unmet([*declared(), *build_requires()], pins) == []
    assert "torch" not in pins


@pytest.mark.parametrize("image", ["torchserve", "trainer"])
def test_an_image_lock_pins_what_its_input_names_all_declared_in_pyproject(image: str) -> None:
    names = [
        canonicalize_name(Requirement(line.strip()).name)
        for line in (REQUIREMENTS / f"{image}.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    everything = {canonicalize_name(r.name) for r in declared(*PYPROJECT["project"]["optional-dependencies"])}
    assert "torch" in names
    assert [n for n in names if n not in everything] == []
    assert [n for n in names if n not in lock(f"{image}.txt")] == []


@pytest.mark.parametrize("name", ["ui.txt", "torchserve.txt", "trainer.txt"])
def test_the_image_locks_run_the_versions_the_tests_ran(name: str) -> None:
    dev = lock("dev.txt")
    differ = {pkg: str(pin[0]) for pkg, pin in lock(name).items() if dev.get(pkg, (None,))[0] != pin[0]}
    assert differ == {}


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_carries_a_sha256(name: str) -> None:
    pins = lock(name)
    assert len(pins) > 10
    unhashed = [pkg for pkg, (_, hashes) in pins.items() if not hashes]
    assert unhashed == []
    assert all(h.startswith("sha256:") and len(h) == 71 for _, hashes in pins.values() for h in hashes)


@pytest.mark.parametrize("name", ["dev.txt", "torchserve.txt", "trainer.txt"])
def test_torch_is_the_pinned_cpu_build(name: str) -> None:
    pins = lock(name)
    (wanted,) = [r for r in declared("model") if r.name == "torch"]
    version, hashes = pins["torch"]
    assert str(wanted.specifier) == "==2.13.0"
    assert wanted.specifier.contains(version) and version.local == "cpu"
    assert hashes
    # Where pip's find-links hold that build (this machine does), the lock accepts exactly that file.
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        for wheel in Path(folder).glob(f"torch-{version}-cp311-*.whl") if Path(folder).is_dir() else []:
            assert f"sha256:{hashlib.file_digest(wheel.open('rb'), 'sha256').hexdigest()}" in hashes, wheel
    cuda = [pkg for pkg in pins if pkg.startswith("nvidia-") or pkg in ("triton", "cuda-toolkit")]
    assert cuda == []


def test_installs_go_through_the_locks_with_hashes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements/dev.txt" in makefile
    assert "pip install -q --require-hashes -r $(LOCK)" in makefile
    assert "pip install -q --no-deps --no-build-isolation -e ." in makefile
    for image, name in (("ui", "ui.txt"), ("torchserve", "torchserve.txt"), ("trainer", "trainer.txt")):
        dockerfile = re.sub(r"\\\n\s*", " ", (ROOT / "docker" / image / "Dockerfile").read_text())
        pip_lines = [line for line in dockerfile.splitlines() if "pip install" in line]
        assert any(f"--require-hashes -r requirements/{name}" in line for line in pip_lines), image
        # Apart from the lock, only the project itself (never a dependency) is installed.
        for line in pip_lines:
            for command in line.split("&&"):
                if "pip install" in command and "--require-hashes" not in command:
                    assert "--no-deps" in command and command.split()[-1] == ".", command
