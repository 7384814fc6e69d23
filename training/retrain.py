"""Fine-tune a served version on people's labelled drawings: `python -m training.retrain ...`.

`retrain(base_state, mnist_images, mnist_labels, feedback, cfg, progress)` starts from the base
weights (the live version's) and trains for a few short epochs on a fresh random subset of the
MNIST training set each epoch plus the feedback. The feedback is weighted by its share of every
batch: `feedback_weight=0.15` puts 19 feedback examples (drawn at random with replacement) beside
109 MNIST images in each batch of 128, however few or many feedback rows there are. So a run's
length depends only on `epochs x mnist_samples`, never on the number of rows, and a few hundred
corrections weigh as much as ten thousand. MNIST in every batch keeps the model's MNIST accuracy;
augmentation (`training.augment`) keeps it from learning the few drawings by heart.

Deterministic for a given seed and thread count (torch's global RNG is left as it was).

CLI for people: `python -m training.retrain --base model_store/mnist.pt --feedback-dir DIR
--output-dir DIR [--dry-run] [--version 2.0]` with feedback PNGs named `<id>_<label>.png`: writes
`mnist.pt`, `retrain.json` (config, history, accuracy before/after) and, with `--version`, the
archive `mnist-<version>.mar`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from handlers.preprocess import MNIST_MEAN, MNIST_STD
from training import feedback as fb
from training.augment import AugmentConfig
from training.model import Net
from training.train import augmented_input, predict, to_input

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
DRY_RUN_OUTPUT_DIR = ROOT / ".data" / "dry-run-retrain"
DRY_RUN_TEST_IMAGES = 512
FEEDBACK_NAME = re.compile(r"^(\d+)_(\d)\.png$")

Progress = Callable[[float, dict[str, Any]], None]


@dataclass(frozen=True)
class RetrainConfig:
    """Everything that determines a fine-tuning run (recorded with the version it produces).

    The defaults are the configuration measured by bench/retrain.py (184 steps of 128): 10,000
    feedback rows in 77 s on these 2 cores (30 s preprocessing, 47 s fine-tuning, load average
    about 4), MNIST test 99.72% -> 99.70%, held-out crossbar 7s and flag 1s 90.95% -> 99.95%.
    Twice the learning rate and a quarter of each batch from feedback cost more MNIST accuracy
    (99.68% at 2,000 rows) for no held-out gain: the style is learnt quickly, MNIST is forgotten
    by the steps, so the run is kept short.
    """

    epochs: int = 2
    mnist_samples: int = 10_000  # MNIST training images per epoch, a fresh random subset each epoch
    feedback_weight: float = 0.15  # share of every batch drawn from the feedback (with replacement)
    batch_size: int = 128
    lr: float = 0.005  # peak learning rate (SGD, Nesterov, one-cycle); the shipped training peaked at 0.05
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05  # as the shipped training, so confidences stay comparable
    warmup: float = 0.15  # share of the steps spent warming the learning rate up
    threads: int = 2
    seed: int = 0
    augment: bool = True
    progress_every: int = 10  # steps between two "step" progress calls

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.mnist_samples < 1 or self.threads < 1:
            raise ValueError("epochs, mnist_samples and threads must be >= 1, batch_size >= 2")
        if not 0.0 <= self.feedback_weight < 1.0:
            raise ValueError(
                f"feedback_weight {self.feedback_weight} must be in [0, 1): the share of a batch"
            )
        if not 0.0 < self.lr <= 1.0 or not 0.0 < self.warmup < 1.0:
            raise ValueError("lr must be in (0, 1] and warmup in (0, 1)")
        if self.progress_every < 1:
            raise ValueError("progress_every must be >= 1")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], base: RetrainConfig | None = None) -> RetrainConfig:
        """The defaults (or `base`) with the fields named in `options` replaced; unknown names and
        wrong types are a ValueError naming them (options come from an operator's JSON)."""
        base = base or cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(f"unknown retrain option(s): {', '.join(unknown)}; known: {', '.join(fields)}")
        values: dict[str, Any] = {}
        for name, value in options.items():
            kind = type(getattr(base, name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not kind:
                raise ValueError(f"retrain option {name} must be {kind.__name__}, not {value!r}")
            values[name] = value
        return dataclasses.replace(base, **values)

    def feedback_per_batch(self, has_feedback: bool) -> int:
        """How many of a batch's examples are feedback (0 without feedback, else at least 1)."""
        if not has_feedback or self.feedback_weight == 0.0:
            return 0
        return min(self.batch_size - 1, max(1, round(self.batch_size * self.feedback_weight)))


@dataclass
class RetrainResult:
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, Any]]  # one entry per epoch: epoch, loss, accuracy, feedback_accuracy, seconds
    seconds: float
    steps: int
    feedback_count: int
    config: RetrainConfig = field(default_factory=RetrainConfig)


def to_digits(inputs: torch.Tensor) -> torch.Tensor:
    """Normalised model inputs (N, 1, 28, 28) -> the uint8 digits (N, 28, 28) they came from.

    Exact for inputs made by `handlers.preprocess.normalize`, so feedback is augmented like MNIST.
    """
    ink = inputs.squeeze(1).float() * MNIST_STD + MNIST_MEAN
    return ink.mul(255.0).round().clamp(0, 255).to(torch.uint8)


def retrain(
    base_state: Mapping[str, torch.Tensor],
    mnist_images: np.ndarray,
    mnist_labels: np.ndarray,
    feedback: Sequence[tuple[torch.Tensor, int]],
    cfg: RetrainConfig | None = None,
    progress: Progress | None = None,
) -> RetrainResult:
    """Fine-tune `Net` from `base_state` on MNIST subsets plus the feedback (see the module doc).

    `feedback`: (1x28x28 input from `training.feedback.to_tensor`, label) pairs. `progress(fraction,
    info)` is called every `progress_every` steps with info `{"event": "step", epoch, step, steps,
    loss, accuracy}` and at each epoch's end with `{"event": "epoch", **history entry}`.
    """
    cfg = cfg or RetrainConfig()
    images = np.asarray(mnist_images)
    labels = np.asarray(mnist_labels)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"mnist_images must be uint8 (N, 28, 28), not {images.dtype} {images.shape}")
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"{len(images)} MNIST images but {len(labels)} labels")
    fb_x, fb_y = fb.stack(feedback)
    if fb_x.shape[1:] != (1, 28, 28):
        raise ValueError(f"feedback inputs must be 1x28x28, not {tuple(fb_x.shape[1:])}")
    if len(fb_y) and (int(fb_y.min()) < 0 or int(fb_y.max()) > 9):
        raise ValueError("feedback labels must be digits 0..9")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return _fit(base_state, images, labels, to_digits(fb_x), fb_y, cfg, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(
    base_state: Mapping[str, torch.Tensor],
    images: np.ndarray,
    labels: np.ndarray,
    fb_digits: torch.Tensor,
    fb_labels: torch.Tensor,
    cfg: RetrainConfig,
    progress: Progress | None,
) -> RetrainResult:
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all = torch.from_numpy(np.array(images))  # a copy: the arrays read from disk are read-only
    y_all = torch.from_numpy(labels.astype(np.int64))
    n_fb = cfg.feedback_per_batch(len(fb_labels) > 0)
    n_mnist = cfg.batch_size - n_fb
    per_epoch_mnist = min(cfg.mnist_samples, len(x_all))
    steps_per_epoch = math.ceil(per_epoch_mnist / n_mnist)
    total = steps_per_epoch * cfg.epochs

    model = Net()
    model.load_state_dict(dict(base_state))
    model = model.to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=cfg.warmup)
    augment_cfg = AugmentConfig()

    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        subset = torch.randperm(len(x_all), generator=gen)[:per_epoch_mnist]
        seen = correct = fb_seen = fb_correct = 0
        loss_sum = 0.0
        for i, chunk in enumerate(subset.split(n_mnist)):
            digits, target = x_all[chunk], y_all[chunk]
            if n_fb:
                pick = torch.randint(len(fb_labels), (n_fb,), generator=gen)
                digits = torch.cat([digits, fb_digits[pick]])
                target = torch.cat([target, fb_labels[pick]])
            inputs = augmented_input(digits, gen, augment_cfg) if cfg.augment else to_input(digits)
            logits = model(inputs.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            hits = logits.detach().argmax(1) == target
            seen += len(target)
            correct += int(hits.sum())
            fb_seen += n_fb
            fb_correct += int(hits[len(chunk) :].sum())
            loss_sum += float(loss.detach()) * len(target)
            if progress is not None and step % cfg.progress_every == 0 and i < steps_per_epoch - 1:
                info = {
                    "event": "step",
                    "epoch": epoch,
                    "step": step,
                    "steps": total,
                    "loss": loss_sum / seen,
                    "accuracy": correct / seen,
                }
                progress(step / total, info)
        entry: dict[str, Any] = {
            "epoch": epoch,
            "loss": loss_sum / seen,
            "accuracy": correct / seen,
            "feedback_accuracy": fb_correct / fb_seen if fb_seen else None,
            "seconds": time.perf_counter() - t0,
        }
        history.append(entry)
        log.info("epoch %d/%d: %s", epoch, cfg.epochs, entry)
        if progress is not None:
            progress(step / total, {"event": "epoch", **entry})

    model = model.to(memory_format=torch.contiguous_format).eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return RetrainResult(state, history, time.perf_counter() - start, step, len(fb_labels), cfg)


def net_from(state: Mapping[str, torch.Tensor]) -> Net:
    """A `Net` in eval mode with these weights."""
    model = Net()
    model.load_state_dict(dict(state))
    return model.eval()


@torch.no_grad()
def accuracy(
    model: Net, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> dict[str, Any]:
    """{accuracy, n, per_digit: {digit: accuracy}} of the model on normalised inputs (N, 1, 28, 28)."""
    model.eval()
    preds = [model(chunk).argmax(1) for chunk in inputs.split(batch_size)]
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    hits = pred == labels
    per_digit = {
        str(d): float(hits[labels == d].float().mean()) for d in range(10) if bool((labels == d).any())
    }
    return {
        "accuracy": float(hits.float().mean()) if len(hits) else None,
        "n": len(hits),
        "per_digit": per_digit,
    }


def mnist_accuracy(model: Net, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """`accuracy` on uint8 MNIST digits (the training code's own input path)."""
    probs = predict(model, torch.from_numpy(np.array(images)))
    pred, y = probs.argmax(1), torch.from_numpy(np.asarray(labels).astype(np.int64))
    hits = pred == y
    per_digit = {str(d): float(hits[y == d].float().mean()) for d in range(10) if bool((y == d).any())}
    return {"accuracy": float(hits.float().mean()), "n": len(hits), "per_digit": per_digit}


# --- the command line ------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRow:
    """A feedback drawing from a folder (`<id>_<label>.png`)."""

    id: int
    png: bytes
    label: int


def read_feedback_dir(folder: Path) -> list[FileRow]:
    """The `<id>_<label>.png` files of a folder, by id; other files are ignored."""
    rows = []
    for path in sorted(folder.iterdir()):
        match = FEEDBACK_NAME.match(path.name)
        if match:
            rows.append(FileRow(int(match[1]), path.read_bytes(), int(match[2])))
    return sorted(rows, key=lambda r: r.id)


def load_base(path: Path) -> dict[str, torch.Tensor]:
    """Base weights from a state_dict file (.pt) or a model archive (.mar)."""
    if path.suffix == ".mar":
        from training.export import weights_from_archive

        return weights_from_archive(path)
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def default_mnist_dir() -> Path:
    """MNIST_DIR, else the shared offline copy, else training's own download folder."""
    from training.train import DEFAULT_DATA_DIR

    if os.environ.get("MNIST_DIR"):
        return Path(os.environ["MNIST_DIR"])
    return SHARED_MNIST if SHARED_MNIST.is_dir() else DEFAULT_DATA_DIR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = RetrainConfig()
    p = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="base weights: a state_dict .pt or a .mar")
    p.add_argument("--feedback-dir", type=Path, default=None, help="PNG files named <id>_<label>.png")
    p.add_argument(
        "--output-dir", type=Path, default=None, help=f"default {DRY_RUN_OUTPUT_DIR} with --dry-run"
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="MNIST files (default MNIST_DIR or the shared copy)"
    )
    p.add_argument("--version", default=None, help="also build the archive mnist-<version>.mar")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--mnist-samples", type=int, default=d.mnist_samples)
    p.add_argument(
        "--feedback-weight", type=float, default=d.feedback_weight, help="feedback share of a batch"
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="a few steps and a small test slice")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from training.data import MnistDataError, load_mnist

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    output_dir = args.output_dir or (DRY_RUN_OUTPUT_DIR if args.dry_run else None)
    if output_dir is None:
        print("error: --output-dir is required (or --dry-run)", file=sys.stderr)
        return 2
    try:
        cfg = RetrainConfig(
            epochs=1 if args.dry_run else args.epochs,
            mnist_samples=4 * RetrainConfig.batch_size if args.dry_run else args.mnist_samples,
            feedback_weight=args.feedback_weight,
            lr=args.lr,
            threads=args.threads,
            seed=args.seed,
            augment=not args.no_augment,
        )
        base = load_base(args.base)
        data = load_mnist(args.data_dir or default_mnist_dir())
    except (ValueError, OSError, RuntimeError, MnistDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = read_feedback_dir(args.feedback_dir) if args.feedback_dir else []
    train_rows, holdout_rows = fb.split(rows)
    train_examples, skipped = fb.to_examples(train_rows)
    holdout_examples, skipped_holdout = fb.to_examples(holdout_rows)
    test_images, test_labels = data.test_images, data.test_labels
    if args.dry_run:
        test_images, test_labels = test_images[:DRY_RUN_TEST_IMAGES], test_labels[:DRY_RUN_TEST_IMAGES]

    result = retrain(base, data.train_images, data.train_labels, train_examples, cfg)
    hx, hy = fb.stack(holdout_examples)
    before, after = net_from(base), net_from(result.state_dict)
    evaluation = {
        "before": {"mnist_test": mnist_accuracy(before, test_images, test_labels)},
        "after": {"mnist_test": mnist_accuracy(after, test_images, test_labels)},
    }
    if len(hy):
        evaluation["before"]["holdout_feedback"] = accuracy(before, hx, hy)
        evaluation["after"]["holdout_feedback"] = accuracy(after, hx, hy)

    output_dir.mkdir(parents=True, exist_ok=True)
    weights = output_dir / "mnist.pt"
    torch.save(result.state_dict, weights)
    report = {
        "base": str(args.base),
        "config": asdict(cfg),
        "feedback": {"train": len(train_examples), "holdout": len(holdout_examples)},
        "skipped_ids": skipped + skipped_holdout,
        "seconds": round(result.seconds, 1),
        "history": result.history,
        "evaluation": evaluation,
    }
    if args.version:
        from training.export import ExportError, build

        try:
            mar = build(weights, output_dir, version=args.version, file_name=f"mnist-{args.version}.mar")
        except ExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        report["archive"] = mar.name
    (output_dir / "retrain.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: {s: v["accuracy"] for s, v in ev.items()} for k, ev in evaluation.items()}
    print(json.dumps({"output_dir": str(output_dir), "seconds": report["seconds"], **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
