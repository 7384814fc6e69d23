"""Training speed on this machine, and the shipped model's accuracy re-measured from the archive.

`python bench/train.py [--threads 2] [--batches 30] [--repeats 3]`

Speed: median over repeats of `--batches` training steps (batch 128, augmentation on, the real
`Net`), as images/s and the implied seconds per 60,000-image epoch. Accuracy: `model.py`,
`mnist.pt` and `preprocess.py` are taken out of `model_store/mnist.mar`, and the archive's own
`Net` and `normalize` classify the 10,000 official test images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training import train  # noqa: E402
from training.data import FILES, read_idx  # noqa: E402
from training.model import Net  # noqa: E402

MAR = ROOT / "model_store" / "mnist.mar"
CARD = ROOT / "model_store" / "mnist.json"
MNIST = ROOT.parent / "shared" / "data" / "mnist"
BATCH = 128


def training_speed(images: np.ndarray, labels: np.ndarray, batches: int, repeats: int) -> list[float]:
    """Images per second of full training steps, one figure per repeat."""
    cfg = train.TrainConfig()
    gen = torch.Generator().manual_seed(0)
    # torch's stubs lack to(memory_format=...)
    model = Net().to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels)).long()
    rates = []
    for r in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        for idx in list(train.batches(len(x), BATCH, gen))[:batches]:
            inputs = train.augmented_input(x[idx], gen, cfg.augment_config)
            loss = F.cross_entropy(model(inputs.contiguous(memory_format=torch.channels_last)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if r:
            rates.append(batches * BATCH / (time.perf_counter() - start))
    return rates


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def archive_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the network inside the .mar, using the archive's own model and normalisation."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(MAR) as z:
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
            z.extractall(tmp)
        net_module = load_module("mar_model", Path(tmp) / manifest["modelFile"])
        pre = load_module("mar_preprocess", Path(tmp) / "preprocess.py")
        net = net_module.Net()
        net.load_state_dict(torch.load(Path(tmp) / manifest["serializedFile"], weights_only=True))
    net.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), 1000):
            batch = torch.from_numpy(pre.normalize(images[start : start + 1000])).unsqueeze(1)
            correct += int((net(batch).argmax(1).numpy() == labels[start : start + 1000]).sum())
    return correct / len(labels)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    train_images = read_idx(MNIST / FILES["train_images"].name, FILES["train_images"])
    train_labels = read_idx(MNIST / FILES["train_labels"].name, FILES["train_labels"])
    rates = training_speed(train_images, train_labels, args.batches, args.repeats)
    rate = statistics.median(rates)
    print(
        f"training ({args.threads} threads, batch {BATCH}, augmentation on): "
        f"median {rate:.0f} images/s over {args.repeats} x {args.batches} batches "
        f"(all: {', '.join(f'{r:.0f}' for r in rates)})"
    )
    print(f"implied seconds per 60,000-image epoch: {60000 / rate:.1f}")
    print(
        "load average (1, 5, 15 min) at the end: {:.1f} {:.1f} {:.1f} on {} CPUs".format(
            *os.getloadavg(), os.cpu_count() or 0
        )
    )

    test_images = read_idx(MNIST / FILES["test_images"].name, FILES["test_images"])
    test_labels = read_idx(MNIST / FILES["test_labels"].name, FILES["test_labels"])
    start = time.perf_counter()
    accuracy = archive_accuracy(test_images, test_labels)
    seconds = time.perf_counter() - start
    card = json.loads(CARD.read_text())
    print(
        f"{MAR.relative_to(ROOT)}: test accuracy {accuracy * 100:.2f}% on {len(test_labels):,} images "
        f"({round((1 - accuracy) * len(test_labels))} errors, {len(test_labels) / seconds:.0f} images/s); "
        f"model card says {card['test']['accuracy'] * 100:.2f}%"
    )
    print(
        f"recorded full training: {card['training']['wall_seconds']:.0f} s wall, "
        f"per epoch {', '.join(f'{s:.0f}' for s in card['training']['epoch_seconds'])} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
