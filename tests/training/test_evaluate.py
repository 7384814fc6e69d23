"""Evaluation figures on a hand-checked example, and the files written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training import evaluate


def one_hot_probs(pred: list[int]) -> np.ndarray:
    probs = np.full((len(pred), 10), 0.01)
    probs[np.arange(len(pred)), pred] = 0.91
    return probs


def test_report_figures() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    probs = one_hot_probs([0, 1, 1, 1, 0])
    rep = evaluate.report(probs, labels)
    assert rep["accuracy"] == 0.6 and rep["errors"] == 2
    assert rep["confusion_matrix"][0][:3] == [1, 1, 0]
    assert rep["confusion_matrix"][2][:3] == [1, 0, 0]
    assert rep["per_class"]["0"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert rep["per_class"]["1"]["precision"] == 2 / 3 and rep["per_class"]["1"]["recall"] == 1.0
    assert rep["per_class"]["2"] == {"precision": 0.0, "recall": 0.0, "support": 1}
    worst = {w["index"] for w in rep["worst"][:2]}
    assert worst == {1, 4}  # the two misclassified images come first


def test_write_json_and_plots(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 50)
    rep = evaluate.report(one_hot_probs(list(rng.integers(0, 10, 50))), labels)
    evaluate.write(rep, rng.integers(0, 256, (50, 28, 28)).astype(np.uint8), tmp_path)
    assert json.loads((tmp_path / evaluate.EVALUATION_JSON).read_text())["images"] == 50
    for png in (evaluate.CONFUSION_PNG, evaluate.WORST_PNG):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
