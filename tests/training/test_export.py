"""The archive: reproducible builds, clear errors, and the committed .mar never stale."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from training import card, export
from training.data import sha256_of
from training.model import Net

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "model_store"


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "w" / "mnist.pt"
    path.parent.mkdir()
    torch.save(Net().state_dict(), path)
    return path


def test_same_inputs_give_a_byte_identical_archive(weights: Path, tmp_path: Path) -> None:
    a = export.build(weights, tmp_path / "a")
    b = export.build(weights, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as z:
        assert json.loads(z.read(export.MANIFEST))["createdOn"] == export.FALLBACK_CREATED_ON
        assert z.read("mnist.pt") == weights.read_bytes()
        assert all(info.date_time == export.ZIP_EPOCH for info in z.infolist())


def test_missing_input_is_a_clear_error(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match=r"missing: .*no_handler\.py"):
        export.build(weights, tmp_path / "x", handler=tmp_path / "no_handler.py")
    assert not (tmp_path / "x" / "mnist.mar").exists()
    assert export.main(["--weights", str(tmp_path / "none.pt")]) == 1


def test_card_gets_the_archive_hash(weights: Path) -> None:
    out = weights.parent
    card.write(out, {**json.loads((STORE / card.CARD_JSON).read_text()), "archive": None})
    mar = export.build(weights, out)
    model_card = card.read(out)
    assert model_card is not None
    assert model_card["archive"]["sha256"] == sha256_of(mar)
    assert model_card["archive"]["bytes"] == mar.stat().st_size
    assert sha256_of(mar) in (out / card.CARD_MD).read_text()


# --- the committed archive -------------------------------------------------------------------


@pytest.fixture(scope="module")
def committed() -> Iterator[zipfile.ZipFile]:
    with zipfile.ZipFile(STORE / "mnist.mar") as z:
        yield z


@pytest.mark.parametrize(
    "source", [export.HANDLER, export.MODEL_FILE, *export.EXTRA_FILES], ids=lambda p: p.name
)
def test_committed_archive_matches_the_sources(committed: zipfile.ZipFile, source: Path) -> None:
    assert committed.read(source.name) == source.read_bytes(), (
        f"{source.name} changed since model_store/mnist.mar was built: run `python -m training.export`"
    )


def test_committed_archive_holds_the_committed_weights_and_card(committed: zipfile.ZipFile) -> None:
    assert committed.read("mnist.pt") == (STORE / "mnist.pt").read_bytes()
    model_card = card.read(STORE)
    assert model_card is not None
    assert model_card["archive"]["sha256"] == sha256_of(STORE / "mnist.mar")
    assert model_card["training"]["dry_run"] is False
    assert (STORE / "mnist.mar").stat().st_size <= 5 * 1024 * 1024


def test_rebuilding_the_committed_archive_is_byte_identical(tmp_path: Path) -> None:
    (tmp_path / card.CARD_JSON).write_text((STORE / card.CARD_JSON).read_text())
    (tmp_path / "mnist.pt").write_bytes((STORE / "mnist.pt").read_bytes())
    rebuilt = export.build(tmp_path / "mnist.pt", tmp_path)
    assert rebuilt.read_bytes() == (STORE / "mnist.mar").read_bytes()
