"""Weight files side by side on what the app is shown: `python -m training.compare A.pt B.pt [...]`.

`[--data-dir D] [--test-images N] [--rendition-digits 1000] [--optdigits N] [--style-images 300]`

A network is worth shipping only if it is better where the app is used, not only on MNIST's own
test set, and one training run's figure moves by a few tenths of a point with the seed. So every
candidate is measured on the same inputs, prepared once through the handler's own `preprocess`:

- MNIST test: the official images as they are (the model card's figure);
- MNIST test, served: each image through the handler's `preprocess`, as the API reads it (a PNG
  of it decodes to the same pixels: the 10,000 come out identical either way);
- canvas renditions: test digits drawn on the page's canvas in 11 ways (tests/handlers/renditions.py);
- optdigits: other people's handwriting (training.handwritten), never trained on;
- the drawn styles of training/styles.py (crossbar 7, 1 with a flag and a base, 1 with a flag, open 4).

Prints one row per weight file (accuracy, and errors where a few tell more than a percentage).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handlers import preprocess as pp
from training import calibrate, handwritten
from training.data import load_mnist
from training.train import DEFAULT_DATA_DIR

Inputs = dict[str, tuple[np.ndarray, np.ndarray]]


def inputs(
    data_dir: Path,
    test_images: int | None = None,
    rendition_digits: int = calibrate.RENDITION_DIGITS,
    optdigits: int | None = None,
    style_images: int = handwritten.STYLE_IMAGES,
) -> Inputs:
    """Every set as the 28x28 digits the network reads, with labels (the slow part: done once)."""
    data = load_mnist(data_dir)
    images, labels = data.test_images[:test_images], data.test_labels[:test_images]
    sets: Inputs = {
        "MNIST test": (images, labels),
        "MNIST served": (np.stack([pp.preprocess(Image.fromarray(d)) for d in images]), labels),
    }
    if rendition_digits:
        sets["renditions"] = calibrate.renditions(images, labels, min(rendition_digits, len(images)))
    return sets | handwritten.evaluation_sets(optdigits, style_images)


def accuracies(weights: Path, sets: Inputs) -> dict[str, tuple[float, int]]:
    """Per set: (accuracy, errors) of one weight file."""
    model = handwritten.load_model(weights)
    out = {}
    for name, (x, y) in sets.items():
        right = calibrate.logits_of(model, x).argmax(1) == y
        out[name] = (float(right.mean()), int((~right).sum()))
    return out


def table(rows: dict[str, dict[str, tuple[float, int]]]) -> str:
    """A plain-text table: weight files down, sets across; accuracy % and (errors)."""
    names = list(next(iter(rows.values())))
    width = max(len(w) for w in rows)
    lines = [" " * width + "".join(f"{n:>20s}" for n in names)]
    for weights, figures in rows.items():
        cells = (f"{acc * 100:.2f}% ({errors})" for acc, errors in figures.values())
        lines.append(f"{weights:{width}s}" + "".join(f"{c:>20s}" for c in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.splitlines()[0])
    p.add_argument("weights", type=Path, nargs="+", help="state_dict files (mnist.pt)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--test-images", type=int, default=None, help="the first N MNIST test images (all)")
    p.add_argument("--rendition-digits", type=int, default=calibrate.RENDITION_DIGITS, help="x 11 (0: none)")
    p.add_argument("--optdigits", type=int, default=None, help="the first N optdigits digits (all)")
    p.add_argument("--style-images", type=int, default=handwritten.STYLE_IMAGES, help="per style (0: none)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    missing = [str(w) for w in args.weights if not w.is_file()]
    if missing:
        print(f"error: no such weight file: {', '.join(missing)}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sets = inputs(args.data_dir, args.test_images, args.rendition_digits, args.optdigits, args.style_images)
    print(
        f"inputs ready in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{n} {len(y):,}" for n, (_, y) in sets.items())
    )
    print(table({str(w): accuracies(w, sets) for w in args.weights}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
