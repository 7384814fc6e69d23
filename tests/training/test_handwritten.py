"""Real handwriting that is not MNIST: the vendored set, its drawings, the figures and the card."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handlers import preprocess as pp
from training import card, card_sections, evaluate, handwritten, styles
from training.data import sha256_of
from training.model import Net

STORE = Path(__file__).resolve().parents[2] / "model_store"


@pytest.fixture(scope="module")
def optdigits() -> tuple[np.ndarray, np.ndarray]:
    return handwritten.load_optdigits()


def test_the_vendored_set_is_the_optdigits_test_set(optdigits: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = optdigits
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert int(images.min()) == 0 and int(images.max()) == handwritten.LEVELS
    assert sorted(set(labels.tolist())) == list(range(10))
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 1797 and counts.min() >= 170 and counts.max() <= 190  # about 180 of each
    readme = (handwritten.OPTDIGITS.parent / "README.md").read_text()
    assert handwritten.SHA256 in readme and "CC BY 4.0" in readme


def test_a_changed_file_is_refused(tmp_path: Path) -> None:
    text = gzip.decompress(handwritten.OPTDIGITS.read_bytes()).replace(b"0,0,5,13", b"0,0,5,14", 1)
    changed = tmp_path / "optdigits-test.csv.gz"
    changed.write_bytes(gzip.compress(text))
    with pytest.raises(handwritten.HandwrittenError, match="sha256"):
        handwritten.load_optdigits(changed)


def test_a_digit_is_drawn_as_the_page_sends_it_and_read_by_the_handler(
    optdigits: tuple[np.ndarray, np.ndarray],
) -> None:
    images, _ = optdigits
    png = handwritten.drawing(images[0])
    canvas = np.asarray(Image.open(io.BytesIO(png)))
    assert png.startswith(pp.PNG_SIGNATURE) and canvas.shape == (styles.CANVAS, styles.CANVAS, 4)
    assert (canvas[..., 3] == 255).all() and canvas[0, :, :3].max() == 0 and canvas[..., 0].max() >= 200
    ink_rows = np.flatnonzero(canvas[..., 0].max(axis=1) > 50)
    assert 0.3 * styles.CANVAS < ink_rows[-1] - ink_rows[0] < 0.7 * styles.CANVAS  # a realistic size
    digits = handwritten.optdigits_inputs(images[:3])
    assert digits.shape == (3, 28, 28) and digits.dtype == np.uint8
    assert (digits[0] == pp.preprocess(png)).all()


def test_the_style_sets_are_one_digit_each_and_repeatable() -> None:
    sets = handwritten.style_inputs(2)
    assert list(sets) == list(styles.STYLES)
    for name, (digits, labels) in sets.items():
        assert digits.shape == (2, 28, 28) and (labels == styles.STYLES[name][0]).all()
    again = handwritten.style_inputs(2)
    assert all((again[name][0] == digits).all() for name, (digits, _) in sets.items())


def test_figures_on_known_answers() -> None:
    labels = np.array([0, 0, 1, 1])
    logits = np.eye(10)[[0, 1, 1, 1]] * 10.0  # one 0 read as a 1
    f = handwritten.figures(logits, labels, temperature=1.0)
    assert f["accuracy"] == 0.75 and f["errors"] == 1 and f["images"] == 4
    assert f["per_class"][:2] == [0.5, 1.0] and f["per_class"][2] is None
    assert f["confusions"] == [{"true": 0, "predicted": 1, "count": 1}]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A model folder with an untrained network and the shipped card rewritten for it."""
    torch.manual_seed(0)
    weights = tmp_path / "mnist.pt"
    torch.save(Net().state_dict(), weights)
    model_card = json.loads((STORE / card.CARD_JSON).read_text())
    model_card.pop("handwritten", None)
    card.write(tmp_path, {**model_card, "weights_sha256": sha256_of(weights)})
    (tmp_path / evaluate.EVALUATION_JSON).write_text(json.dumps({"accuracy": 0.1}))
    return tmp_path


def test_the_cli_writes_the_card_section(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model-dir", str(store), "--limit", "40", "--style-images", "3"]
    assert handwritten.main(argv) == 0
    assert "optdigits" in capsys.readouterr().out

    model_card = card.read(store)
    assert model_card is not None
    hw = model_card["handwritten"]
    o = hw["optdigits"]
    assert o["images"] == 40 and 0.0 <= o["accuracy"] <= 1.0
    assert o["errors"] == round((1 - o["accuracy"]) * 40)
    assert hw["weights_sha256"] == sha256_of(store / "mnist.pt")
    assert hw["temperature"] == model_card["calibration"]["temperature"]  # the card's own T
    assert set(hw["styles"]) == set(styles.STYLES) and all(s["images"] == 3 for s in hw["styles"].values())
    assert "confusions" not in o  # those stay in evaluation.json
    evaluation = json.loads((store / evaluate.EVALUATION_JSON).read_text())
    assert evaluation["accuracy"] == 0.1 and "confusions" in evaluation["handwritten"]["optdigits"]

    text = (store / card.CARD_MD).read_text()
    table = text.index("| test accuracy (official MNIST test set)")
    row = text.index("| real handwritten digits, not MNIST (UCI optdigits test set, 40)")
    assert table < row < text.index("| training images")  # beside the MNIST figure
    assert f"{o['accuracy'] * 100:.2f}%" in text and "1 with a long flag" in text


def test_the_cli_refuses_a_card_of_other_weights_unless_told_not_to_write(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(Net().state_dict(), other)
    before = (store / card.CARD_JSON).read_text()
    argv = ["--model-dir", str(store), "--weights", str(other), "--limit", "5", "--style-images", "0"]
    assert handwritten.main(argv) == 1
    assert "other weights" in capsys.readouterr().err
    assert handwritten.main([*argv, "--no-write"]) == 0
    assert (store / card.CARD_JSON).read_text() == before


def test_compare_measures_both_on_the_same_drawings(store: Path, tmp_path: Path) -> None:
    new = tmp_path / "new" / "mnist.pt"
    new.parent.mkdir()
    shutil.copy(store / "mnist.pt", new)  # the same weights without a card: T = 1
    before = (store / card.CARD_JSON).read_text()
    both = handwritten.compare(store / "mnist.pt", new, limit=20, style_images=2)
    old_fig, new_fig = both[str(store / "mnist.pt")], both[str(new)]
    assert old_fig["optdigits"]["accuracy"] == new_fig["optdigits"]["accuracy"]
    assert old_fig["temperature"] != 1.0 and new_fig["temperature"] == 1.0
    assert (store / card.CARD_JSON).read_text() == before  # compare writes nothing


def test_the_card_sections_are_empty_without_the_figures() -> None:
    assert card_sections.handwritten_rows({}) == [] and card_sections.handwritten_lines({}) == []
