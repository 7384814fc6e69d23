"""Accuracy on real handwriting that is not MNIST, and on the drawn styles MNIST lacks.

`python -m training.handwritten [--model-dir model_store] [--weights FILE] [--compare NEW.pt] [--no-write]`

The MNIST test figure says how the network reads MNIST's own writers. Two sets say how it reads
other people, as the app sees them:

- the UCI optdigits test set: 1,797 digits by 13 writers who are not MNIST's (E. Alpaydin,
  C. Kaynak, 1998; CC BY 4.0; training/data/optdigits/README.md), never used for training. Each
  8x8 image is drawn on the page's 280x280 black canvas in white ink (upscaled bicubically) and
  read through the handler's own `preprocess`, so the figure is what the app answers to it.
- the drawn styles of training/styles.py (crossbar 7, 1 with a flag and a base, 1 with a flag,
  open 4), with a seed of their own (the tests and benchmarks train on other seeds).

Accuracy does not depend on the softmax temperature; the calibrated one (the card's, when the card
describes these weights) gives the confidence figures. Writes `handwritten` into the card
(`mnist.json`; MODEL_CARD.md shows it beside the MNIST figure) and into `evaluation.json`.
`--compare NEW.pt` measures a second weight file on the same drawings and writes nothing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from handlers import preprocess as pp
from training import calibrate, card, evaluate, styles
from training.data import sha256_of
from training.model import Net

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = ROOT / "model_store"
OPTDIGITS = Path(__file__).resolve().parent / "data" / "optdigits" / "optdigits-test.csv.gz"
SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
SOURCE = "https://archive.ics.uci.edu/ml/machine-learning-databases/optdigits/optdigits.tes"
NAME = "UCI optdigits test set"
WRITERS = 13
LEVELS = 16  # an 8x8 value counts the ink pixels of a 4x4 block: 0..16
# The 8x8 grid at 20 px a cell, centred: a 160 px drawing, as large as people draw on the canvas
# (styles.py draws 112-224 px); the handler rescales it to 20x20 whatever the size.
DRAWING_PX = 160
STYLE_IMAGES = 300  # per style
STYLE_SEED = 1400
TOP_CONFUSIONS = 8


class HandwrittenError(ValueError):
    """The data set or the model directory is not what this evaluation expects."""


def load_optdigits(path: Path = OPTDIGITS) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8) with levels 0..16, labels int64 (N,)), the file's sha256 checked first."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise HandwrittenError(
            f"{path}: sha256 {digest[:12]}… is not the optdigits test set's {SHA256[:12]}…"
        )
    rows = np.loadtxt(io.BytesIO(gzip.decompress(data)), delimiter=",", dtype=np.int64, ndmin=2)
    images, labels = rows[:, :64], rows[:, 64]
    return images.reshape(-1, 8, 8).astype(np.uint8), labels


def drawing(image: np.ndarray, side: int = DRAWING_PX) -> bytes:
    """One 8x8 digit as the page sends a drawing: white ink on the black 280x280 canvas, an RGBA PNG."""
    levels = Image.fromarray(np.rint(image.astype(np.float32) * (255 / LEVELS)).astype(np.uint8), mode="L")
    canvas = Image.new("L", (styles.CANVAS, styles.CANVAS), 0)
    offset = (styles.CANVAS - side) // 2
    canvas.paste(levels.resize((side, side), Image.Resampling.BICUBIC), (offset, offset))
    out = io.BytesIO()
    canvas.convert("RGBA").save(out, format="PNG", compress_level=1)  # the pixels, not the bytes, matter
    return out.getvalue()


def optdigits_inputs(images: np.ndarray) -> np.ndarray:
    """The 28x28 uint8 inputs the handler makes of the drawings of 8x8 digits (N, 8, 8)."""
    return np.stack([pp.preprocess(drawing(img)) for img in images]).reshape(-1, pp.SIZE, pp.SIZE)


def style_inputs(count: int, seed: int = STYLE_SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per style of training/styles.py: `count` drawings through the handler's preprocessing, labels."""
    out = {}
    for i, style in enumerate(styles.STYLES):
        drawn = styles.make_set(count, seed + i, (style,))
        digits = np.stack([pp.preprocess(png) for png, _ in drawn]).reshape(-1, pp.SIZE, pp.SIZE)
        out[style] = (digits, np.array([label for _, label in drawn], dtype=np.int64))
    return out


def evaluation_sets(
    limit: int | None = None, style_images: int = STYLE_IMAGES
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The sets measured: "optdigits" (its first `limit` digits, default all) and one per style."""
    images, labels = load_optdigits()
    sets = {"optdigits": (optdigits_inputs(images[:limit]), labels[:limit])}
    return sets | (style_inputs(style_images) if style_images else {})


def load_model(weights: Path) -> Net:
    model = Net()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def temperature_for(weights: Path, model_card: dict[str, Any] | None) -> float:
    """The card's calibrated temperature when the card describes these weights, else 1."""
    if not model_card or model_card.get("weights_sha256") != sha256_of(weights):
        return 1.0
    return float((model_card.get("calibration") or {}).get("temperature", 1.0))


def figures(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, Any]:
    """Accuracy, errors, calibrated ECE and mean confidence, per-class accuracy and the top confusions."""
    pred = logits.argmax(axis=1)
    probs = calibrate.probabilities(logits, temperature)
    cm = evaluate.confusion_matrix(labels, pred)
    totals = cm.sum(axis=1)
    off = [(int(cm[t, p]), t, p) for t in range(10) for p in range(10) if t != p and cm[t, p]]
    return {
        "images": len(labels),
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "errors": int((pred != labels).sum()),
        "ece": calibrate.ece(probs, labels),
        "mean_confidence": float(probs.max(axis=1).mean()) if len(labels) else 0.0,
        "per_class": [float(cm[c, c] / totals[c]) if totals[c] else None for c in range(10)],
        "confusions": [
            {"true": t, "predicted": p, "count": n}
            for n, t, p in sorted(off, key=lambda e: -e[0])[:TOP_CONFUSIONS]
        ],
    }


def measure(
    weights: Path, sets: dict[str, tuple[np.ndarray, np.ndarray]], temperature: float
) -> dict[str, Any]:
    """The `handwritten` section for one weight file on the given sets."""
    model = load_model(weights)
    measured = {name: figures(calibrate.logits_of(model, x), y, temperature) for name, (x, y) in sets.items()}
    optdigits = measured.pop("optdigits")
    return {
        "weights_sha256": sha256_of(weights),
        "temperature": temperature,
        "optdigits": {
            "name": NAME,
            "source": SOURCE,
            "licence": "CC BY 4.0 (E. Alpaydin, C. Kaynak, 1998)",
            "sha256": SHA256,
            "writers": WRITERS,
            "rendering": f"8x8 levels upscaled bicubically to {DRAWING_PX} px on the {styles.CANVAS} px "
            "canvas, through handlers.preprocess",
            **optdigits,
        },
        "styles": {  # one digit each: its per-class list would be that accuracy and nine gaps
            name: {"digit": styles.STYLES[name][0], **{k: v for k, v in f.items() if k != "per_class"}}
            for name, f in measured.items()
        },
        "styles_seed": STYLE_SEED,
    }


def card_section(section: dict[str, Any]) -> dict[str, Any]:
    """The section without the confusion lists (those stay in evaluation.json)."""

    def brief(figures: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in figures.items() if k != "confusions"}

    return {
        **section,
        "optdigits": brief(section["optdigits"]),
        "styles": {name: brief(s) for name, s in section["styles"].items()},
    }


def summary(section: dict[str, Any]) -> str:
    """One line: the optdigits accuracy and each style's."""
    o = section["optdigits"]
    per_style = ", ".join(f"{name} {s['accuracy'] * 100:.2f}%" for name, s in section["styles"].items())
    return f"optdigits {o['accuracy'] * 100:.2f}% ({o['errors']} wrong of {o['images']:,})" + (
        f"; styles: {per_style}" if per_style else ""
    )


def run(
    weights: Path,
    model_dir: Path,
    *,
    write: bool = True,
    limit: int | None = None,
    style_images: int = STYLE_IMAGES,
    threads: int = 1,
) -> dict[str, Any]:
    """Measure `weights`; unless `write` is False, put the section into model_dir's card and evaluation."""
    model_card = card.read(model_dir)
    if write and model_card and model_card.get("weights_sha256") not in (None, sha256_of(weights)):
        raise HandwrittenError(
            f"the card in {model_dir} describes other weights than {weights}: "
            "use --no-write, or --model-dir the weights' own folder"
        )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        section = measure(weights, evaluation_sets(limit, style_images), temperature_for(weights, model_card))
    finally:
        torch.set_num_threads(previous)
    if write:
        evaluation_path = model_dir / evaluate.EVALUATION_JSON
        evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else {}
        evaluation["handwritten"] = section
        evaluation_path.write_text(json.dumps(evaluation, indent=2) + "\n")
        if model_card is not None:
            model_card["handwritten"] = card_section(section)
            card.write(model_dir, model_card)
    return section


def compare(
    old: Path,
    new: Path,
    *,
    limit: int | None = None,
    style_images: int = STYLE_IMAGES,
    threads: int = 1,
) -> dict[str, dict[str, Any]]:
    """Both weight files on the same drawings (drawn and preprocessed once), each at its own card's T."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sets = evaluation_sets(limit, style_images)
        return {
            str(path): measure(path, sets, temperature_for(path, card.read(path.parent)))
            for path in (old, new)
        }
    finally:
        torch.set_num_threads(previous)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.handwritten", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_STORE, help="the card and evaluation to update")
    p.add_argument("--weights", type=Path, default=None, help="default: MODEL_DIR/mnist.pt")
    p.add_argument(
        "--compare", type=Path, default=None, metavar="NEW.pt", help="measure these too; write nothing"
    )
    p.add_argument("--no-write", action="store_true", help="print the figures only")
    p.add_argument("--limit", type=int, default=None, help="only the first N optdigits digits")
    p.add_argument("--style-images", type=int, default=STYLE_IMAGES, help="drawings per style (0: none)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    weights = args.weights or args.model_dir / "mnist.pt"
    t0 = time.perf_counter()
    try:
        if args.compare is not None:
            for path, section in compare(
                weights, args.compare, limit=args.limit, style_images=args.style_images, threads=args.threads
            ).items():
                print(f"{path}: {summary(section)}")
        else:
            section = run(
                weights,
                args.model_dir,
                write=not args.no_write,
                limit=args.limit,
                style_images=args.style_images,
                threads=args.threads,
            )
            where = "" if args.no_write else f"; written to {args.model_dir}"
            print(f"{summary(section)}{where} ({time.perf_counter() - t0:.0f} s)")
    except (HandwrittenError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
