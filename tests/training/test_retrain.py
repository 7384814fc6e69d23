"""Fine-tuning on feedback: tiny configurations on random data, so each test takes seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from handlers.preprocess import normalize
from training import data, feedback, styles
from training.model import Net
from training.retrain import RetrainConfig, main, read_feedback_dir, retrain, to_digits

ROOT = Path(__file__).resolve().parents[2]
Mnistish = tuple[np.ndarray, np.ndarray]
TINY = RetrainConfig(
    epochs=2, mnist_samples=48, batch_size=16, feedback_weight=0.25, threads=1, progress_every=1
)


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Net().state_dict()


@pytest.fixture(scope="module")
def mnist_like() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), rng.integers(0, 10, 200).astype(np.uint8)


@pytest.fixture(scope="module")
def fb_examples() -> list[tuple[torch.Tensor, int]]:
    return [(feedback.to_tensor(png), label) for png, label in styles.make_set(6, seed=0)]


def test_same_seed_same_weights_another_seed_other_weights(
    base: dict[str, torch.Tensor], mnist_like: Mnistish, fb_examples: list[tuple[torch.Tensor, int]]
) -> None:
    a = retrain(base, *mnist_like, fb_examples, TINY)
    b = retrain(base, *mnist_like, fb_examples, TINY)
    c = retrain(base, *mnist_like, fb_examples, RetrainConfig(**{**TINY.__dict__, "seed": 1}))
    assert a.state_dict.keys() == base.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert not all(torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)
    assert not all(torch.equal(a.state_dict[k], base[k]) for k in base)  # it did train


def test_global_rng_and_thread_count_are_left_as_they_were(
    base: dict[str, torch.Tensor], mnist_like: Mnistish, fb_examples: list[tuple[torch.Tensor, int]]
) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    retrain(base, *mnist_like, fb_examples, TINY)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_progress_steps_and_one_history_entry_per_epoch(
    base: dict[str, torch.Tensor], mnist_like: Mnistish, fb_examples: list[tuple[torch.Tensor, int]]
) -> None:
    calls: list[tuple[float, dict[str, Any]]] = []
    result = retrain(base, *mnist_like, fb_examples, TINY, progress=lambda f, info: calls.append((f, info)))
    per_epoch = -(-TINY.mnist_samples // (TINY.batch_size - TINY.feedback_per_batch(True)))  # 48 / 12
    assert result.steps == TINY.epochs * per_epoch == 8
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] > 0
    epochs = [info for _, info in calls if info["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert [{k: v for k, v in e.items() if k != "event"} for e in epochs] == result.history
    for entry in result.history:
        assert entry["loss"] > 0 and 0 <= entry["accuracy"] <= 1 and 0 <= entry["feedback_accuracy"] <= 1
    assert [info["step"] for _, info in calls if info["event"] == "step"] == [1, 2, 3, 5, 6, 7]
    assert result.feedback_count == len(fb_examples) and result.seconds > 0


def test_feedback_share_of_each_batch() -> None:
    assert RetrainConfig(batch_size=128, feedback_weight=0.25).feedback_per_batch(True) == 32
    assert RetrainConfig(batch_size=128, feedback_weight=0.25).feedback_per_batch(False) == 0
    assert RetrainConfig(batch_size=16, feedback_weight=0.01).feedback_per_batch(True) == 1
    assert RetrainConfig(batch_size=16, feedback_weight=0.0).feedback_per_batch(True) == 0


def test_feedback_is_learnt(base: dict[str, torch.Tensor], mnist_like: Mnistish) -> None:
    """A few feedback drawings weighed heavily against noise are learnt: training accuracy on them rises."""
    examples = [(feedback.to_tensor(png), label) for png, label in styles.make_set(4, seed=1)]
    cfg = RetrainConfig(
        epochs=4, mnist_samples=32, batch_size=16, feedback_weight=0.5, lr=0.05, threads=1, augment=False
    )
    result = retrain(base, *mnist_like, examples, cfg)
    model = Net()
    model.load_state_dict(result.state_dict)
    x, y = feedback.stack(examples)
    with torch.no_grad():
        assert (model.eval()(x).argmax(1) == y).all()


def test_without_feedback_it_trains_on_mnist_alone(
    base: dict[str, torch.Tensor], mnist_like: Mnistish
) -> None:
    result = retrain(base, *mnist_like, [], TINY)
    assert result.feedback_count == 0 and result.steps == TINY.epochs * 3
    assert all(entry["feedback_accuracy"] is None for entry in result.history)


def test_bad_inputs_are_clear_errors(base: dict[str, torch.Tensor], mnist_like: Mnistish) -> None:
    images, labels = mnist_like
    with pytest.raises(ValueError, match="uint8"):
        retrain(base, images.astype(np.float32), labels, [], TINY)
    with pytest.raises(ValueError, match="labels"):
        retrain(base, images, labels[:5], [], TINY)
    with pytest.raises(ValueError, match="1x28x28"):
        retrain(base, images, labels, [(torch.zeros(28, 28), 1)], TINY)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        retrain(base, images, labels, [(torch.zeros(1, 28, 28), 12)], TINY)
    with pytest.raises(ValueError, match="share"):
        RetrainConfig(feedback_weight=1.0)


def test_options_override_fields_and_refuse_unknown_or_mistyped() -> None:
    cfg = RetrainConfig.from_options({"epochs": 1, "lr": 1, "augment": False})
    assert (cfg.epochs, cfg.lr, cfg.augment) == (1, 1.0, False)
    assert cfg.mnist_samples == RetrainConfig().mnist_samples
    with pytest.raises(ValueError, match=r"unknown retrain option.*bogus"):
        RetrainConfig.from_options({"bogus": 1})
    with pytest.raises(ValueError, match="epochs must be int"):
        RetrainConfig.from_options({"epochs": "3"})
    with pytest.raises(ValueError, match="epochs must be int"):
        RetrainConfig.from_options({"epochs": True})


def test_to_digits_inverts_the_handlers_normalisation_exactly() -> None:
    digits = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    inputs = torch.from_numpy(normalize(digits)).unsqueeze(1)
    assert torch.equal(to_digits(inputs), torch.from_numpy(digits))


def test_cli_dry_run_reads_a_feedback_folder(
    tmp_path: Path,
    mnist_like: Mnistish,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    images, labels = mnist_like  # loading the real 60,000 images is the benchmark's part, not this test's
    fake = data.Mnist(images, labels, np.repeat(images, 3, axis=0), np.repeat(labels, 3), sha256={})
    monkeypatch.setattr(data, "load_mnist", lambda _dir: fake)
    folder = tmp_path / "feedback"
    folder.mkdir()
    for i, (png, label) in enumerate(styles.make_set(10, seed=2), start=1):
        (folder / f"{i}_{label}.png").write_bytes(png)
    (folder / "notes.txt").write_text("ignored")
    assert [r.id for r in read_feedback_dir(folder)] == list(range(1, 11))
    out = tmp_path / "out"
    args = ["--base", str(ROOT / "model_store" / "mnist.pt"), "--feedback-dir", str(folder)]
    assert main([*args, "--output-dir", str(out), "--dry-run", "--data-dir", str(tmp_path)]) == 0
    report = json.loads((out / "retrain.json").read_text())
    assert report["feedback"] == {"train": 8, "holdout": 2}  # ids 4 and 9 are held out
    assert report["evaluation"]["before"]["mnist_test"]["n"] == 512
    assert set(report["evaluation"]["after"]) == {"mnist_test", "holdout_feedback"}
    state = torch.load(out / "mnist.pt", weights_only=True)
    Net().load_state_dict(state)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output_dir"] == str(out)
    assert main(["--base", str(tmp_path / "missing.pt"), "--output-dir", str(out)]) == 1
