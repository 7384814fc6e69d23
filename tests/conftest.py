"""Shared fixtures. The real servers (PostgreSQL, TorchServe) are started once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.torchserve",
]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The offline MNIST copy beside the clone (`../shared/data/mnist`); tests may read it."""
    path = ROOT.parent / "shared" / "data" / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"offline MNIST copy not found at {path}")
    return path
