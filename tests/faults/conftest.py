"""The fault matrix: its marker, its scale (`FAULTS_SCALE`), and the real parts it runs on.

`make test` runs the bounded version (FAULTS_SCALE=1: a few hundred requests per case, one round
of the page-load reproduction); `FAULTS_SCALE=10 pytest tests/faults` runs ten times as many
requests per case and ten rounds of page loads in a row. `pytest -m "not faults"` leaves it out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.faults.checks import assert_nothing_left
from tests.faults.harness import Stack, StackDirs, force_stop, make_run, new_stack_dirs
from tests.handlers.renditions import png, read_mnist_test

MARKER = "faults: the fault matrix; bounded in make test, FAULTS_SCALE=10 runs the long version"
DIGITS = 32  # distinct real drawings the load cycles through


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker unless pyproject.toml already does (it must exist under --strict-markers)."""
    if not any(line.split(":", 1)[0].strip() == "faults" for line in config.getini("markers")):
        config.addinivalue_line("markers", MARKER)


def fault_scale() -> int:
    """`FAULTS_SCALE` (default 1): multiplies the requests per case and the page-load rounds."""
    raw = os.environ.get("FAULTS_SCALE", "1")
    try:
        scale = int(raw)
    except ValueError:
        raise pytest.UsageError(f"FAULTS_SCALE must be a whole number >= 1, got {raw!r}") from None
    if scale < 1:
        raise pytest.UsageError(f"FAULTS_SCALE must be a whole number >= 1, got {raw!r}")
    return scale


@pytest.fixture(scope="session")
def scale() -> int:
    return fault_scale()


@pytest.fixture(scope="session")
def digits(mnist_dir: Path) -> list[bytes]:
    """Real handwritten digits (the MNIST test set) as PNGs: what the load sends."""
    images, _ = read_mnist_test(mnist_dir, DIGITS)
    return [png(Image.fromarray(image)) for image in images]


@pytest.fixture
def stack_dirs() -> Iterator[StackDirs]:
    """A folder of its own for one `make run` (data, run folder, TorchServe ports); anything still
    running from it afterwards is stopped (the tests assert first that nothing is left)."""
    dirs = new_stack_dirs()
    try:
        yield dirs
    finally:
        force_stop(dirs)


@pytest.fixture(scope="package")
def shared() -> Iterator[Stack]:
    """One `make run` for the faults the running app survives (test_matrix.py, then the page loads of
    test_page_loads.py): starting the stack is most of a case's time on 2 shared cores. Each case
    starts from a ready app (`checks.ready_for_a_case`) and reconciles the rows stored since it
    began. Stopped after the package's last test (SIGTERM: exit 0); nothing of it left running."""
    dirs = new_stack_dirs()
    try:
        with make_run(dirs) as stack:
            yield stack
        assert_nothing_left(dirs)
    finally:
        force_stop(dirs)
