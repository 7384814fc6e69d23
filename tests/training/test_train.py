"""Training end to end: a --dry-run that ends in a valid archive, and a short real training."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from training import data, export, train
from training.data import FILES


def test_dry_run_end_to_end_produces_an_archive(mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    with pytest.warns(data.ChecksumMismatchWarning):
        assert train.main(["--dry-run", "--data-dir", str(mnist_dir), "--output-dir", str(out)]) == 0
    for name in ("mnist.pt", "mnist.json", "MODEL_CARD.md", "evaluation.json", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert export.main(["--weights", str(out / "mnist.pt")]) == 0

    mar = out / "mnist.mar"
    with zipfile.ZipFile(mar) as z:
        assert z.testzip() is None
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        names = set(z.namelist())
    assert manifest["model"] == {
        "modelName": "mnist",
        "serializedFile": "mnist.pt",
        "handler": "mnist_handler.py",
        "modelFile": "model.py",
        "modelVersion": export.VERSION,
    }
    assert {"mnist.pt", "model.py", "mnist_handler.py", "preprocess.py"} <= names
    model_card = json.loads((out / "mnist.json").read_text())
    assert model_card["archive"]["sha256"] == data.sha256_of(mar)
    assert model_card["training"]["dry_run"] is True
    assert model_card["data"][FILES["train_images"].name]["official"] is False
    assert model_card["data"][FILES["test_images"].name]["official"] is True


@pytest.mark.slow
def test_short_training_clearly_learns(mnist_dir: Path) -> None:
    images = data.read_idx(mnist_dir / FILES["train_images"].name, FILES["train_images"])
    labels = data.read_idx(mnist_dir / FILES["train_labels"].name, FILES["train_labels"])
    # One thread: the suite shares two cores, and two threads slow down badly when oversubscribed.
    cfg = train.TrainConfig(epochs=3, batch_size=64, max_lr=0.05, limit=3000, holdout=1000, seed=1, threads=1)
    result = train.train(images, labels, cfg)
    assert result.holdout_accuracy is not None and result.holdout_accuracy > 0.90
    assert len(result.epoch_seconds) == 3
    assert np.isfinite([h["loss"] for h in result.history]).all()


def test_same_seed_gives_identical_weights(mnist_dir: Path) -> None:
    images = data.read_idx(mnist_dir / FILES["test_images"].name, FILES["test_images"])[:1024]
    labels = data.read_idx(mnist_dir / FILES["test_labels"].name, FILES["test_labels"])[:1024]

    def weights(seed: int) -> dict:
        cfg = train.TrainConfig(dry_run=True, batch_size=64, seed=seed, threads=1)
        return train.train(images, labels, cfg).model.state_dict()

    a, b, c = weights(7), weights(7), weights(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- --device -------------------------------------------------------------------------------------


def test_device_auto_picks_the_accelerator_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    assert train.resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert train.resolve_device("auto") == torch.device("cpu")
    assert train.resolve_device("cpu") == torch.device("cpu")


def test_device_cuda_without_a_gpu_and_unknown_devices_are_clear_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        train.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        train.resolve_device("tpu")
    assert train.parse_args([]).device == "auto"
    assert train.parse_args(["--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "tpu"])


def test_device_input_is_the_handlers_normalisation(mnist_dir: Path) -> None:
    digits = torch.from_numpy(
        np.array(data.read_idx(mnist_dir / FILES["test_images"].name, FILES["test_images"])[:64])
    )
    torch.testing.assert_close(train.to_device_input(digits), train.to_input(digits), rtol=0, atol=1e-6)
