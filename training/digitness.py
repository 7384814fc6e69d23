"""The "not a digit" head: a linear classifier on the frozen network's features, digit or not.

`python -m training.digitness [--weights model_store/mnist.pt] [--data-dir DIR] [--output-dir DIR]`

The network itself is not changed (its weights, answers and MNIST accuracy stay as they are). A
logistic regression reads the 6,272 features the classifier reads (the last conv block,
flattened) and says whether the drawing is a digit at all. It is trained on MNIST training
digits (raw and as canvas renditions) against drawn non-digits (training/negatives.py), with the
last 3,000 training digits and a held-out set of non-digits (other fonts, another seed) kept out.
The threshold is the 0.2% quantile of the kept-out digits' scores: about 1 real digit in 500 is
refused. Measured then on the MNIST test set (digits wrongly refused), canvas renditions of test
digits, and the held-out non-digits (refused: the target is at least 90%).

Writes `digitness` into the card (the head the archive carries as `digitness.json`, see
training/export.py) and into `evaluation.json`; then `python -m training.export`.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handlers import preprocess as pp
from training import card, evaluate, negatives
from training.data import load_mnist
from training.model import Net

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = ROOT / "model_store"
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "mnist"
REJECT_QUANTILE = 0.002  # share of kept-out real digits the threshold refuses
L2 = 1e-3
KEPT_OUT_DIGITS = 3000  # the last training digits: only for the threshold


def features(model: Net, digits: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The flattened features (N, 6272) the classifier reads, for uint8 28x28 digits (N, 28, 28)."""
    model.eval()
    out = [np.empty((0, 128 * 7 * 7), np.float32)]
    with torch.inference_mode():
        for i in range(0, len(digits), batch_size):
            x = torch.from_numpy(pp.normalize(digits[i : i + batch_size])).unsqueeze(1)
            out.append(model.features(x).flatten(1).numpy())
    return np.concatenate(out)


def fit_head(digits: np.ndarray, others: np.ndarray, l2: float = L2) -> tuple[np.ndarray, float]:
    """Logistic regression (digit = 1) on standardised features, classes weighted equally.

    Returns the weights and bias on the raw features (the standardisation folded in), float64.
    """
    x = np.concatenate([digits, others]).astype(np.float64)
    y = np.concatenate([np.ones(len(digits)), np.zeros(len(others))])
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-3
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    pos_weight = torch.tensor(len(others) / max(1, len(digits)), dtype=torch.float64)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logit = xt @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, yt, pos_weight=pos_weight)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weights = w.detach().numpy() / std
    return weights, float(b.detach()) - float((mean * weights).sum())


def scores(feats: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """The head's logit per drawing: high = a digit."""
    out: np.ndarray = feats.astype(np.float64) @ weights + bias
    return out


def head_json(weights: np.ndarray, bias: float, threshold: float) -> dict[str, Any]:
    """The head as the archive carries it: float32 weights (little-endian, base64), bias, threshold."""
    return {
        "features": "flattened last conv block (128 x 7 x 7), the classifier's input",
        "weights_f32_base64": base64.b64encode(weights.astype("<f4").tobytes()).decode(),
        "bias": bias,
        "threshold": threshold,
    }


def rejected(s: np.ndarray, threshold: float) -> float:
    return float((s < threshold).mean()) if len(s) else 0.0


def run(
    weights_path: Path,
    data_dir: Path,
    output_dir: Path,
    digits: int = 6000,
    renditions: int = 1500,
    others: int = 5000,
    held_out: int = 1500,
    test_renditions: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Make the data, fit the head, pick the threshold, measure; write the card and the evaluation."""
    sys.path.insert(0, str(ROOT))  # the canvas renditions live with the tests
    from tests.handlers.renditions import RENDITIONS, render

    torch.set_num_threads(1)
    data = load_mnist(data_dir)
    model = Net()
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    rng = np.random.default_rng(seed)
    names = sorted(RENDITIONS)
    pool = len(data.train_images) - KEPT_OUT_DIGITS
    raw = data.train_images[rng.choice(pool, digits, replace=False)]
    drawn_idx = rng.choice(pool, renditions, replace=False)
    drawn = [
        pp.preprocess(render(data.train_images[i], names[j % len(names)])) for j, i in enumerate(drawn_idx)
    ]
    positive = np.concatenate([raw, np.stack(drawn)]) if drawn else raw
    negative, _ = negatives.make(others, seed)
    head_w, head_b = fit_head(features(model, positive), features(model, negative))

    kept_out = scores(features(model, data.train_images[-KEPT_OUT_DIGITS:]), head_w, head_b)
    threshold = float(np.quantile(kept_out, REJECT_QUANTILE))
    ho_images, ho_kinds = negatives.make(held_out, seed, held_out=True)
    ho = scores(features(model, ho_images), head_w, head_b)
    test = scores(features(model, data.test_images), head_w, head_b)
    pick = np.linspace(0, len(data.test_images) - 1, test_renditions).astype(int)
    test_drawn = [pp.preprocess(render(img, n)) for n in names for img in data.test_images[pick]]
    drawn_scores = (
        scores(features(model, np.stack(test_drawn)), head_w, head_b) if test_drawn else np.empty(0)
    )
    kinds = np.array(ho_kinds)
    figures = {
        "held_out_non_digits": len(ho),
        "held_out_non_digits_rejected": rejected(ho, threshold),
        "held_out_rejected_by_kind": {k: rejected(ho[kinds == k], threshold) for k in negatives.KINDS},
        "mnist_test_digits": len(test),
        "mnist_test_digits_rejected": rejected(test, threshold),
        "canvas_rendition_digits": len(drawn_scores),
        "canvas_rendition_digits_rejected": rejected(drawn_scores, threshold),
        "kept_out_digits_rejected": rejected(kept_out, threshold),
    }
    digitness = {
        **head_json(head_w, head_b, threshold),
        "method": (
            f"logistic regression (L2 {L2}) on the frozen network's features; {len(positive):,} MNIST "
            f"training digits ({renditions:,} as canvas renditions) vs {len(negative):,} drawn non-digits; "
            f"threshold: the {REJECT_QUANTILE:.1%} quantile of {KEPT_OUT_DIGITS:,} kept-out training digits"
        ),
        "figures": figures,
    }
    evaluation_path = output_dir / evaluate.EVALUATION_JSON
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else {}
    evaluation["digitness"] = figures
    evaluation_path.write_text(json.dumps(evaluation, indent=2) + "\n")
    model_card = card.read(output_dir)
    if model_card is not None:
        model_card["digitness"] = digitness
        card.write(output_dir, model_card)
    return digitness


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.digitness", description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_STORE / "mnist.pt")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--output-dir", type=Path, default=None, help="default: the weights' directory")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args.weights, args.data_dir, args.output_dir or args.weights.parent)
    print(json.dumps(result["figures"], indent=2))
    print(f"{time.perf_counter() - t0:.0f} s; now rebuild the archive: python -m training.export")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
