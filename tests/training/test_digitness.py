"""The "not a digit" head and the drawn non-digits it learns from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from handlers import model_runtime
from handlers.preprocess import normalize
from training import digitness, negatives
from training.model import Net


def test_negatives_are_repeatable_varied_and_shaped_like_the_handlers_input() -> None:
    a, kinds = negatives.make(44, seed=3)
    b, _ = negatives.make(44, seed=3)
    held_out, _ = negatives.make(44, seed=3, held_out=True)
    assert a.shape == (44, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, held_out)  # another seed stream and other fonts
    assert set(kinds) == set(negatives.KINDS)
    assert all(int((img > 50).sum()) >= 4 for img in a)  # never blank


def test_no_letter_reads_as_a_digit_by_construction() -> None:
    assert not set(negatives.LETTERS) & set("OoIliSsZzBbgqGD0123456789")
    assert not set(negatives.TRAIN_FONTS) & set(negatives.HELD_OUT_FONTS)


def test_every_kind_draws_a_png() -> None:
    rng = np.random.default_rng(0)
    for kind in negatives.KINDS:
        assert negatives.drawing(kind, rng)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown kind"):
        negatives.drawing("cloud", rng)


def test_the_head_separates_two_clouds_and_round_trips_through_the_archive_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    digits, others = rng.normal(1.0, 1.0, (300, 20)), rng.normal(-1.0, 1.0, (300, 20))
    weights, bias = digitness.fit_head(digits, others)
    s_digits, s_others = digitness.scores(digits, weights, bias), digitness.scores(others, weights, bias)
    assert (s_digits > 0).mean() > 0.95 and (s_others < 0).mean() > 0.95
    threshold = float(np.quantile(s_digits, 0.01))
    assert digitness.rejected(s_digits, threshold) == pytest.approx(0.01, abs=0.005)

    (tmp_path / model_runtime.DIGITNESS_FILE).write_text(
        json.dumps(digitness.head_json(weights, bias, threshold))
    )
    head = model_runtime.read_digit_head(tmp_path)
    assert head is not None and head.threshold == threshold
    expected = digitness.scores(digits, weights, bias) >= threshold
    assert (head.is_digit(digits) == expected).mean() > 0.99  # float32 weights in the archive
    assert model_runtime.read_digit_head(tmp_path / "none") is None


def test_features_are_what_the_classifier_reads() -> None:
    torch.manual_seed(0)
    net = Net().eval()
    digits = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    feats = digitness.features(net, digits)
    assert feats.shape == (5, 128 * 7 * 7)
    with torch.inference_mode():
        x = torch.from_numpy(normalize(digits)).unsqueeze(1)
        logits, expected = model_runtime.LogitsAndFeatures(net)(x)
        torch.testing.assert_close(logits, net(x))
    np.testing.assert_allclose(feats, expected.numpy(), rtol=0, atol=1e-5)
