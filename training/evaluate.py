"""Measure a trained model on labelled digits: accuracy, per-class precision and recall, the
confusion matrix and the worst-classified images; written as JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

EVALUATION_JSON = "evaluation.json"
CONFUSION_PNG = "confusion_matrix.png"
WORST_PNG = "worst_classified.png"
WORST_COUNT = 24


def confusion_matrix(true: np.ndarray, pred: np.ndarray, classes: int = 10) -> np.ndarray:
    """counts[t, p]: how many images of class t were predicted as p."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (true.astype(np.int64), pred.astype(np.int64)), 1)
    return counts


def report(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The figures for probabilities (N, 10) against labels (N): a JSON-ready dict."""
    labels = labels.astype(np.int64)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(labels, pred)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    actual = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    true_prob = probs[np.arange(len(labels)), labels]
    worst = np.argsort(true_prob, kind="stable")[:WORST_COUNT]
    return {
        "images": len(labels),
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "errors": int((pred != labels).sum()),
        "per_class": {
            str(c): {"precision": float(precision[c]), "recall": float(recall[c]), "support": int(actual[c])}
            for c in range(cm.shape[0])
        },
        "confusion_matrix": cm.tolist(),
        "worst": [
            {
                "index": int(i),
                "label": int(labels[i]),
                "predicted": int(pred[i]),
                "p_label": float(true_prob[i]),
                "p_predicted": float(probs[i, pred[i]]),
            }
            for i in worst
        ],
    }


def plot_confusion(cm: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=100)
    shown = np.log1p(cm)
    im = ax.imshow(shown, cmap="Blues")
    for t in range(cm.shape[0]):
        for p in range(cm.shape[1]):
            if cm[t, p]:
                colour = "white" if shown[t, p] > shown.max() / 2 else "black"
                ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=7, color=colour)
    ax.set(xlabel="predicted", ylabel="true", xticks=range(10), yticks=range(10))
    ax.set_title(f"Confusion matrix ({int(cm.sum())} test images, log colour scale)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plot_worst(images: np.ndarray, worst: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 8
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.9 + 0.4), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, w in zip(axes.flat, worst, strict=False):
        ax.imshow(images[w["index"]], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"#{w['index']} {w['label']}→{w['predicted']}\np={w['p_predicted']:.2f}", fontsize=7)
    fig.suptitle("Worst-classified test images (index label→predicted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def write(rep: dict[str, Any], images: np.ndarray, out_dir: Path) -> None:
    """evaluation.json and the two PNG plots into out_dir."""
    (out_dir / EVALUATION_JSON).write_text(json.dumps(rep, indent=2) + "\n")
    plot_confusion(np.asarray(rep["confusion_matrix"]), out_dir / CONFUSION_PNG)
    plot_worst(images, rep["worst"], out_dir / WORST_PNG)
