"""Calibrated confidence: fit a softmax temperature on held-out data, measure ECE before and after.

`python -m training.calibrate [--weights model_store/mnist.pt] [--data-dir DIR] [--output-dir DIR]`
`                             [--fit-images 5000] [--rendition-digits 1000]`

Label smoothing and augmentation leave the network under-confident (almost every answer is
93-97% "sure"). One temperature T, softmax(logits / T), fixes the scale without changing any
answer (the argmax is the same). T is fitted by minimising the negative log-likelihood on the
last `--fit-images` of the MNIST training set, never on the test set: the shipped network saw
those images in training, but always augmented and with smoothed labels, and the test-set figures
below show the fit carries over. Expected calibration error (ECE, 15 equal-width confidence bins)
and a reliability diagram are then measured before and after on the official test set and on
canvas renditions of it (tests/handlers/renditions.py, through the handler's preprocessing).

Writes `calibration` into the card (`mnist.json`: the temperature the archive carries, see
training/export.py) and into `evaluation.json`, and `reliability.png`; then rebuild the archive
with `python -m training.export`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handlers import preprocess as pp
from training import card, evaluate
from training.data import load_mnist
from training.model import Net

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = ROOT / "model_store"
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "mnist"
RELIABILITY_PNG = "reliability.png"
BINS = 15
FIT_IMAGES = 5000
RENDITION_DIGITS = 1000
# The page's "unsure" hint. Until now (ui/views.py unsure_hint, on uncalibrated figures): the best answer
# under 60%, or the best two within 20 points. On calibrated probabilities one threshold says what it means:
# unsure when the best answer is under 90% (then at least one such answer in ten is wrong); a best answer
# of 90% or more leaves the second at most 10%, so no margin rule is needed.
PAGE_RULE = (0.6, 0.2)  # (top below, margin below) of ui/views.py today
UNSURE_BELOW = 0.9  # the calibrated rule


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) per row, float64."""
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64)) / temperature
    out: np.ndarray = torch.softmax(z, dim=1).numpy()
    return out


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels at temperature T."""
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64)) / temperature
    return float(torch.nn.functional.cross_entropy(z, torch.from_numpy(labels.astype(np.int64))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The T in [low, high] minimising the NLL (golden-section search on log T; the NLL is unimodal in T)."""
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on no images")
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, labels, math.exp(c)), nll(logits, labels, math.exp(d))
    for _ in range(60):  # the bracket shrinks to 1e-12 of its width: far below any useful digit of T
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, labels, math.exp(d))
    return round(math.exp((a + b) / 2), 6)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Per confidence bin (lo, hi]: how many answers, their mean confidence and their accuracy."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for i in range(bins):
        mask = which == i
        count = int(mask.sum())
        out.append(
            {
                "lo": float(edges[i]),
                "hi": float(edges[i + 1]),
                "count": count,
                "confidence": float(confidence[mask].mean()) if count else 0.0,
                "accuracy": float(correct[mask].mean()) if count else 0.0,
            }
        )
    return out


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
    table = reliability(probs, labels, bins)
    n = sum(b["count"] for b in table)
    return sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table) / n if n else 0.0


def unsure(probs: np.ndarray, below: float = UNSURE_BELOW, margin: float = 0.0) -> np.ndarray:
    """The unsure rule per answer: the best under `below`, or the best two within `margin`."""
    ordered = np.sort(probs, axis=1)
    flagged: np.ndarray = (ordered[:, -1] < below) | (ordered[:, -1] - ordered[:, -2] < margin)
    return flagged


def unsure_figures(flagged: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How a hint behaves: the share of answers it marks, of wrong ones it marks, the accuracy of the rest."""
    wrong = probs.argmax(axis=1) != labels
    return {
        "flagged": float(flagged.mean()) if len(labels) else 0.0,
        "wrong_flagged": float(flagged[wrong].mean()) if wrong.any() else 1.0,
        "right_flagged": float(flagged[~wrong].mean()) if (~wrong).any() else 0.0,
        "accuracy_unflagged": float((~wrong[~flagged]).mean()) if (~flagged).any() else 1.0,
    }


def measure(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, Any]:
    """ECE, NLL, mean confidence and the reliability table, before (T=1) and after (T)."""
    labels = labels.astype(np.int64)
    out: dict[str, Any] = {
        "images": len(labels),
        "accuracy": float((logits.argmax(axis=1) == labels).mean()) if len(labels) else 0.0,
    }
    for key, t in (("before", 1.0), ("after", temperature)):
        probs = probabilities(logits, t)
        out[key] = {
            "ece": ece(probs, labels),
            "nll": nll(logits, labels, t),
            "mean_confidence": float(probs.max(axis=1).mean()),
            "unsure_page_rule": unsure_figures(unsure(probs, *PAGE_RULE), probs, labels),
            "unsure_calibrated_rule": unsure_figures(unsure(probs), probs, labels),
            "reliability": reliability(probs, labels),
        }
    return out


def plot_reliability(sets: dict[str, dict[str, Any]], temperature: float, path: Path) -> None:
    """One panel per data set: accuracy against confidence per bin, before and after calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(4.6 * len(sets), 4.4), dpi=100, squeeze=False)
    for ax, (name, figures) in zip(axes.flat, sets.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
        for key, colour, label in (
            ("before", "tab:red", "T=1"),
            ("after", "tab:blue", f"T={temperature:.3f}"),
        ):
            table = [b for b in figures[key]["reliability"] if b["count"]]
            ax.plot(
                [b["confidence"] for b in table],
                [b["accuracy"] for b in table],
                marker="o",
                color=colour,
                label=f"{label}: ECE {figures[key]['ece'] * 100:.2f}%",
            )
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="confidence (bin mean)", ylabel="accuracy")
        ax.set_title(f"{name} ({figures['images']:,} images, {BINS} bins)", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Reliability before and after temperature scaling", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def logits_of(model: Net, digits: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits (N, 10) for uint8 28x28 digits (N, 28, 28), through the handler's normalisation."""
    model.eval()
    out = [np.empty((0, 10), np.float32)]
    with torch.inference_mode():
        for i in range(0, len(digits), batch_size):
            x = torch.from_numpy(pp.normalize(digits[i : i + batch_size])).unsqueeze(1)
            out.append(model(x).numpy())
    return np.concatenate(out)


def renditions(images: np.ndarray, labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` test digits spread over the set, each drawn in every canvas rendition, preprocessed."""
    sys.path.insert(0, str(ROOT))  # the renditions live with the tests; the repository is the source
    from tests.handlers.renditions import RENDITIONS, render

    pick = np.linspace(0, len(images) - 1, count).astype(int)
    digits = [pp.preprocess(render(img, name)) for name in RENDITIONS for img in images[pick]]
    return np.stack(digits), np.tile(labels[pick], len(RENDITIONS))


def run(
    weights: Path,
    data_dir: Path,
    output_dir: Path,
    fit_images: int = FIT_IMAGES,
    rendition_digits: int = RENDITION_DIGITS,
    threads: int = 1,
) -> dict[str, Any]:
    """Fit T, measure, write the card's and the evaluation's `calibration` and the reliability plot."""
    torch.set_num_threads(threads)
    data = load_mnist(data_dir)
    model = Net()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    fit_x, fit_y = data.train_images[-fit_images:], data.train_labels[-fit_images:]
    temperature = fit_temperature(logits_of(model, fit_x), fit_y)

    sets = {"MNIST test": measure(logits_of(model, data.test_images), data.test_labels, temperature)}
    if rendition_digits:
        digits, labels = renditions(data.test_images, data.test_labels, rendition_digits)
        sets["canvas renditions"] = measure(logits_of(model, digits), labels, temperature)

    calibration = {
        "temperature": temperature,
        "method": "temperature scaling (NLL)",
        "fitted_on": f"the last {len(fit_y):,} images of the MNIST training set",
        "bins": BINS,
        "ece": {name: {k: s[k]["ece"] for k in ("before", "after")} for name, s in sets.items()},
        "unsure_rule": f"unsure when the calibrated top probability is under {UNSURE_BELOW:.0%}",
        "unsure": {name: s["after"]["unsure_calibrated_rule"] for name, s in sets.items()},
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    evaluation_path = output_dir / evaluate.EVALUATION_JSON
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else {}
    evaluation["calibration"] = {"temperature": temperature, "bins": BINS, "sets": sets}
    evaluation_path.write_text(json.dumps(evaluation, indent=2) + "\n")
    plot_reliability(sets, temperature, output_dir / RELIABILITY_PNG)
    model_card = card.read(output_dir)
    if model_card is not None:
        model_card["calibration"] = calibration
        card.write(output_dir, model_card)
    return calibration


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_STORE / "mnist.pt")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--output-dir", type=Path, default=None, help="default: the weights' directory")
    p.add_argument("--fit-images", type=int, default=FIT_IMAGES, help="last N training images to fit T on")
    p.add_argument("--rendition-digits", type=int, default=RENDITION_DIGITS, help="x 11 renditions (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = run(
        args.weights,
        args.data_dir,
        args.output_dir or args.weights.parent,
        args.fit_images,
        args.rendition_digits,
        args.threads,
    )
    print(json.dumps({k: result[k] for k in ("temperature", "ece", "unsure")}, indent=2))
    print(f"{time.perf_counter() - t0:.0f} s; now rebuild the archive: python -m training.export")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
