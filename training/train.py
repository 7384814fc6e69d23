"""Train the digit classifier: `python -m training.train [--epochs N] [--device auto] [--dry-run] ...`.

`--device auto` (the default) trains on the machine's accelerator when there is one
(`torch.accelerator`, as pytorch/examples mnist does), else on the CPU; `--device cpu` is the
CPU path exactly as before (same seed and threads, byte-identical weights); on CUDA the forward
and loss run in float16 autocast with a gradient scaler, and the whole training set is copied
to the GPU once (MNIST is 47 MB) and augmented there.

Writes the weights (`mnist.pt`, a state_dict), the model card (`mnist.json`, `MODEL_CARD.md`) and
the evaluation (`evaluation.json`, PNG plots) into the output directory. `python -m training.export`
then packs the archive from those weights without retraining.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from handlers.preprocess import MNIST_MEAN, MNIST_STD, normalize
from training import card, evaluate
from training.augment import PRESETS, AugmentConfig, augment
from training.data import FILES, Mnist, MnistDataError, load_mnist, sha256_of
from training.model import Net

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = ROOT / ".data" / "mnist"
DEFAULT_OUTPUT_DIR = ROOT / "model_store"
DRY_RUN_OUTPUT_DIR = ROOT / ".data" / "dry-run"
WEIGHTS_NAME = "mnist.pt"
DRY_RUN_BATCHES = 5
DRY_RUN_TEST_IMAGES = 512
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the model card)."""

    epochs: int = 20
    batch_size: int = 128
    max_lr: float = 0.05
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # or "cosine"
    label_smoothing: float = 0.05
    seed: int = 0
    threads: int = 2
    limit: int | None = None  # use only the first N training images
    holdout: int = 0  # keep the last N of those out of training, to measure on
    augment: bool = True
    dry_run: bool = False
    device: str = "cpu"  # auto | cpu | cuda (see resolve_device)
    augment_config: AugmentConfig = field(default_factory=lambda: PRESETS["pen"])  # the shipped weights'


@dataclass
class TrainResult:
    model: Net
    epoch_seconds: list[float]
    wall_seconds: float
    history: list[dict[str, float]]
    holdout_accuracy: float | None


def to_input(digits: torch.Tensor) -> torch.Tensor:
    """uint8 digits (N, 28, 28) -> normalised float (N, 1, 28, 28), via the handler's `normalize`."""
    return torch.from_numpy(normalize(digits.numpy())).unsqueeze(1)


def to_device_input(digits: torch.Tensor) -> torch.Tensor:
    """`to_input` without leaving the digits' device (an accelerator): the same normalisation in torch."""
    return ((digits.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def augmented_input(
    digits: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig, *, on_device: bool = False
) -> torch.Tensor:
    """Augment uint8 digits, round back to uint8 (what the handler's preprocessing yields), normalise."""
    ink = digits.unsqueeze(1).float() / 255.0
    warped = augment(ink, gen, cfg).mul_(255.0).round_().to(torch.uint8).squeeze(1)
    return to_device_input(warped) if on_device else to_input(warped)


def resolve_device(name: str) -> torch.device:
    """`auto`: the current accelerator if there is one, else the CPU; `cuda` fails clearly without a GPU."""
    if name == "auto":
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return accelerator or torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use auto or cpu)")
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}: use one of {', '.join(DEVICES)}")
    return torch.device(name)


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering all n items once (the last may be short)."""
    order = torch.randperm(n, generator=gen)
    yield from order.split(batch_size)


@torch.no_grad()
def predict(model: Net, digits: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Softmax probabilities (N, 10) for uint8 digits (N, 28, 28)."""
    model.eval()
    out = [F.softmax(model(to_input(chunk)), dim=1) for chunk in digits.split(batch_size)]
    return torch.cat(out) if out else torch.empty(0, 10)


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.max_lr, total_steps=steps, pct_start=0.25)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use onecycle or cosine")


def train(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig) -> TrainResult:
    """Train a fresh `Net` on uint8 images/labels; deterministic for a given seed and thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _fit(images, labels, cfg)
    finally:
        torch.set_num_threads(previous)


def _fit(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig) -> TrainResult:
    device = resolve_device(cfg.device)
    on_cpu = device.type == "cpu"  # the CPU path stays exactly the path that made the shipped weights
    torch.manual_seed(cfg.seed)
    gen = torch.Generator() if on_cpu else torch.Generator(device=device)
    gen.manual_seed(cfg.seed)

    x_all = torch.from_numpy(np.array(images[: cfg.limit]))
    y_all = torch.from_numpy(np.array(labels[: cfg.limit])).long()
    n_train = len(x_all) - cfg.holdout
    if n_train <= 0:
        raise ValueError(f"holdout {cfg.holdout} leaves no training images out of {len(x_all)}")
    x, y = x_all[:n_train], y_all[:n_train]
    if not on_cpu:
        x, y = x.to(device), y.to(device)

    # channels-last: faster convolutions on CPU (torch's stubs lack to(memory_format=...))
    model = Net().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if not on_cpu:
        model = model.to(device)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    # Off the CPU, random numbers (shuffling, augmentation) are drawn on the device with `gen`.
    on_the_device = contextlib.nullcontext() if on_cpu else device
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.max_lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
    )
    per_epoch = DRY_RUN_BATCHES if cfg.dry_run else math.ceil(n_train / cfg.batch_size)
    epochs = 1 if cfg.dry_run else cfg.epochs
    sched = make_scheduler(opt, cfg, per_epoch * epochs)

    epoch_seconds: list[float] = []
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    with on_the_device:
        _epochs(model, opt, sched, scaler, x, y, gen, cfg, per_epoch, epochs, on_cpu, epoch_seconds, history)
    wall = time.perf_counter() - start
    model = model.to(memory_format=torch.contiguous_format).eval()
    if not on_cpu:
        model = model.cpu()

    holdout_accuracy = None
    if cfg.holdout:
        probs = predict(model, x_all[n_train:])
        holdout_accuracy = float((probs.argmax(1) == y_all[n_train:]).float().mean())
        log.info("held-out accuracy on %d images: %.4f", cfg.holdout, holdout_accuracy)
    return TrainResult(model, epoch_seconds, wall, history, holdout_accuracy)


def _epochs(
    model: Net,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    cfg: TrainConfig,
    per_epoch: int,
    epochs: int,
    on_cpu: bool,
    epoch_seconds: list[float],
    history: list[dict[str, float]],
) -> None:
    """The training loop; on CUDA with float16 autocast and a gradient scaler."""
    n_train = len(x)
    autocast = torch.autocast("cuda", dtype=torch.float16) if scaler else contextlib.nullcontext()
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(total=per_epoch, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=True)
        for step, idx in enumerate(batches(n_train, cfg.batch_size, gen)):
            if step >= per_epoch:
                break
            if cfg.augment:
                inputs = augmented_input(x[idx], gen, cfg.augment_config, on_device=not on_cpu)
            else:
                inputs = to_input(x[idx]) if on_cpu else to_device_input(x[idx])
            target = y[idx]
            with autocast:
                logits = model(inputs.contiguous(memory_format=torch.channels_last))
                loss = F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            sched.step()
            seen += len(idx)
            correct += int((logits.argmax(1) == target).sum())
            loss_sum += float(loss.detach()) * len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()
        epoch_seconds.append(time.perf_counter() - t0)
        history.append(
            {
                "epoch": epoch,
                "loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "seconds": epoch_seconds[-1],
            }
        )


def run(cfg: TrainConfig, data_dir: Path, output_dir: Path) -> dict[str, Any]:
    """Load the data, train, evaluate on the official test set, write weights, evaluation and card."""
    data: Mnist = load_mnist(data_dir)
    result = train(data.train_images, data.train_labels, cfg)

    test_images, test_labels = data.test_images, data.test_labels
    if cfg.dry_run:
        test_images, test_labels = test_images[:DRY_RUN_TEST_IMAGES], test_labels[:DRY_RUN_TEST_IMAGES]
    probs = predict(result.model, torch.from_numpy(np.array(test_images))).numpy()
    report = evaluate.report(probs, test_labels)

    output_dir.mkdir(parents=True, exist_ok=True)
    weights = output_dir / WEIGHTS_NAME
    torch.save(result.model.state_dict(), weights)
    evaluate.write(report, test_images, output_dir)

    model_card = {
        "model": "mnist",
        "architecture": Net.__doc__,
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": sha256_of(weights),
        "trained_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": {
            name: {"sha256": digest, "official": digest == spec.sha256}
            for spec in FILES.values()
            for name, digest in [(spec.name, data.sha256[spec.name])]
        },
        "training": {
            **{k: v for k, v in asdict(cfg).items() if k != "augment_config"},
            "augment_config": asdict(cfg.augment_config),
            "train_images": len(data.train_images[: cfg.limit]) - cfg.holdout,
            "epoch_seconds": [round(s, 1) for s in result.epoch_seconds],
            "wall_seconds": round(result.wall_seconds, 1),
            "history": result.history,
            "holdout_accuracy": result.holdout_accuracy,
        },
        "test": {"images": len(test_labels), "accuracy": report["accuracy"], "errors": report["errors"]},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "device": str(resolve_device(cfg.device)),
        },
        "archive": None,  # filled in by `python -m training.export`
    }
    card.write(output_dir, model_card)
    return model_card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.max_lr, help="peak learning rate (SGD, Nesterov)")
    p.add_argument("--schedule", choices=["onecycle", "cosine"], default=d.schedule)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: the accelerator when there is one (mixed precision on CUDA), else cpu",
    )
    p.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="MNIST files (downloaded if missing)"
    )
    p.add_argument("--output-dir", type=Path, default=None, help=f"default {DEFAULT_OUTPUT_DIR}")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--holdout", type=int, default=0, help="keep the last N of those out, report accuracy")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument(
        "--augment-preset",
        choices=sorted(PRESETS),
        default="pen",
        help="pen (the shipped weights'): mnist's + slant, small digits, elastic, nib, flat ink",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help=f"{DRY_RUN_BATCHES} batches and a small test slice; output to {DRY_RUN_OUTPUT_DIR} by default",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        seed=args.seed,
        threads=args.threads,
        limit=args.limit,
        holdout=args.holdout,
        augment=not args.no_augment,
        dry_run=args.dry_run,
        device=args.device,
        augment_config=PRESETS[args.augment_preset],
    )
    output_dir = args.output_dir or (DRY_RUN_OUTPUT_DIR if args.dry_run else DEFAULT_OUTPUT_DIR)
    try:
        model_card = run(cfg, args.data_dir, output_dir)
    except MnistDataError as exc:
        print(
            f"error: {exc}\n(offline? point --data-dir, or MNIST_DIR for `make model`, at a local copy)",
            file=sys.stderr,
        )
        return 1
    print(
        json.dumps(
            {
                "output_dir": str(output_dir),
                "test_accuracy": model_card["test"]["accuracy"],
                "wall_seconds": model_card["training"]["wall_seconds"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
