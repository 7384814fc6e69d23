"""The archive: reproducible builds, clear errors, and the committed .mar never stale."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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


# --- versions for the learning loop ------------------------------------------------------------


def test_a_new_version_gets_its_own_manifest_version_and_file_name(weights: Path, tmp_path: Path) -> None:
    mar = export.build(weights, tmp_path / "v", version="2.0", file_name="mnist-2.0.mar")
    assert mar == tmp_path / "v" / "mnist-2.0.mar"
    assert not (tmp_path / "v" / "mnist.mar").exists()
    manifest = export.read_manifest(mar)
    assert manifest["model"]["modelVersion"] == "2.0"
    assert manifest["model"]["modelName"] == export.MODEL_NAME
    with pytest.raises(export.ExportError, match="plain name"):
        export.build(weights, tmp_path / "v", file_name="../escape.mar")


def test_weights_come_back_out_of_an_archive(weights: Path, tmp_path: Path) -> None:
    state = export.weights_from_archive(export.build(weights, tmp_path / "r", version="3.0"))
    expected = torch.load(weights, weights_only=True)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    Net().load_state_dict(state)
    with pytest.raises(export.ExportError, match="cannot read the weights"):
        export.weights_from_archive(weights)  # not a zip


def test_calibration_travels_in_the_archive(weights: Path, tmp_path: Path) -> None:
    plain = export.build(weights, tmp_path / "p")
    assert export.CALIBRATION_FILE not in zipfile.ZipFile(plain).namelist()
    a = export.build(weights, tmp_path / "a", calibration={"temperature": 0.8})
    b = export.build(weights, tmp_path / "b", calibration={"temperature": 0.8})
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(zipfile.ZipFile(a).read(export.CALIBRATION_FILE)) == {"temperature": 0.8}
    out = weights.parent
    card.write(out, {**json.loads((STORE / card.CARD_JSON).read_text()), "calibration": {"temperature": 0.7}})
    from_card = export.build(weights, out)
    assert json.loads(zipfile.ZipFile(from_card).read(export.CALIBRATION_FILE)) == {"temperature": 0.7}


def test_update_card_false_leaves_the_card_alone(weights: Path) -> None:
    out = weights.parent
    card.write(out, {**json.loads((STORE / card.CARD_JSON).read_text()), "archive": None})
    export.build(weights, out, version="2.0", file_name="mnist-2.0.mar", update_card=False)
    model_card = card.read(out)
    assert model_card is not None and model_card["archive"] is None


def test_the_digit_head_travels_in_the_archive(weights: Path, tmp_path: Path) -> None:
    head = {"bias": 0.5, "features": "f", "threshold": -1.0, "weights_f32_base64": "AACAPw==", "figures": {}}
    mar = export.build(weights, tmp_path / "d", digitness=head)
    stored = json.loads(zipfile.ZipFile(mar).read(export.DIGITNESS_FILE))
    assert stored == {k: head[k] for k in export.DIGITNESS_KEYS}  # the head only, not the figures
    assert export.DIGITNESS_FILE not in zipfile.ZipFile(export.build(weights, tmp_path / "n")).namelist()


def test_the_archive_holds_the_network_for_onnx_runtime(weights: Path, tmp_path: Path) -> None:
    import onnxruntime as ort  # type: ignore[import-untyped,import-not-found,unused-ignore]  # no stubs

    mar = export.build(weights, tmp_path / "o")
    session = ort.InferenceSession(
        zipfile.ZipFile(mar).read(export.ONNX_FILE), providers=["CPUExecutionProvider"]
    )
    x = torch.randn(3, 1, 28, 28)
    logits, features = session.run(["logits", "features"], {"input": x.numpy()})
    net = Net()
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    with torch.inference_mode():
        np.testing.assert_allclose(logits, net(x).numpy(), rtol=0, atol=1e-4)
    assert features.shape == (3, 128 * 7 * 7)


def test_a_new_version_can_carry_the_base_versions_calibration_and_head(
    weights: Path, tmp_path: Path
) -> None:
    head = {"bias": 0.5, "features": "f", "threshold": -1.0, "weights_f32_base64": "AACAPw=="}
    base = export.build(weights, tmp_path / "b", calibration={"temperature": 0.6}, digitness=head)
    extras = export.extras_from_archive(base)
    assert extras == {"calibration": {"temperature": 0.6}, "digitness": head}
    new = export.build(
        weights,
        tmp_path / "n",
        version="2.0",
        file_name="mnist-2.0.mar",
        calibration=extras.get("calibration"),
        digitness=extras.get("digitness"),
    )
    assert export.extras_from_archive(new) == extras
    assert export.extras_from_archive(export.build(weights, tmp_path / "p")) == {}
