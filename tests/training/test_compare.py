"""Weight files side by side on the inputs the app is shown."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training import compare
from training.model import Net

STORE = Path(__file__).resolve().parents[2] / "model_store"


def test_the_shipped_weights_beat_untrained_ones_on_every_set(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    untrained = tmp_path / "untrained.pt"
    torch.save(Net().state_dict(), untrained)
    argv = [str(STORE / "mnist.pt"), str(untrained), "--data-dir", str(mnist_dir), "--test-images", "200"]
    assert (
        compare.main([*argv, "--rendition-digits", "10", "--optdigits", "100", "--style-images", "10"]) == 0
    )
    out = capsys.readouterr().out
    assert "MNIST test 200, MNIST served 200, renditions 110, optdigits 100, seven_crossbar 10" in out
    shipped, other = (line.split() for line in out.splitlines()[-2:])
    assert shipped[0].endswith("mnist.pt") and other[0].endswith("untrained.pt")
    sets = compare.inputs(mnist_dir, 200, 10, 100, 10)
    good, bad = compare.accuracies(STORE / "mnist.pt", sets), compare.accuracies(untrained, sets)
    assert good["MNIST test"][0] >= 0.98 and good["MNIST served"][0] >= 0.97 and good["optdigits"][0] >= 0.9
    assert all(good[name][0] > bad[name][0] for name in ("MNIST test", "renditions", "optdigits"))
    assert bad["MNIST test"][1] == round((1 - bad["MNIST test"][0]) * 200)


def test_a_missing_weight_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.main([str(tmp_path / "nope.pt")]) == 1
    assert "no such weight file" in capsys.readouterr().err
