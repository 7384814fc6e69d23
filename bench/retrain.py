"""Retraining on feedback: wall time with 1,000 and 10,000 rows, and accuracy before and after.

`python bench/retrain.py [--rows 1000,10000] [--epochs N] [--mnist-samples N] [--feedback-weight F]
[--lr F] [--threads 2] [--styles seven_crossbar,one_flag_base,one_flag]`

The feedback is drawn by `training.styles` (styles MNIST rarely has) with ids 1..N, split by
`training.feedback.is_holdout`; the shipped weights are fine-tuned by `training.retrain` with the
default `RetrainConfig` unless flags say otherwise. A run's wall time counts what the trainer does:
preprocessing every stored PNG through the handler's preprocessing, then the fine-tuning (drawing
the PNGs is not part of it); its CPU time (all threads) is printed beside it, because on a shared
machine the wall time says as much about the neighbours as about the run. Accuracy: held-out
feedback and the official MNIST test set, before (shipped weights) and after. The load average is
printed beside the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training import feedback, styles  # noqa: E402
from training.data import load_mnist  # noqa: E402
from training.retrain import (  # noqa: E402
    FileRow,
    RetrainConfig,
    accuracy,
    default_mnist_dir,
    mnist_accuracy,
    net_from,
    retrain,
)

BASE = ROOT / "model_store" / "mnist.pt"
TARGET_SECONDS = 300.0
TARGET_MNIST = 0.996


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


def run(
    rows: list[FileRow],
    base: dict[str, torch.Tensor],
    mnist: Any,
    cfg: RetrainConfig,
    before_mnist: dict[str, Any],
) -> dict[str, Any]:
    """One trainer run on `rows`: preprocessing + fine-tuning timed, then both evaluations."""
    start, cpu_start = time.perf_counter(), time.process_time()
    train_rows, holdout_rows = feedback.split(rows)
    train_examples, skipped = feedback.to_examples(train_rows)
    prep = time.perf_counter() - start
    result = retrain(base, mnist.train_images, mnist.train_labels, train_examples, cfg)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    holdout_examples, _ = feedback.to_examples(holdout_rows)
    hx, hy = feedback.stack(holdout_examples)
    before, after = net_from(base), net_from(result.state_dict)
    return {
        "rows": len(rows),
        "train_rows": len(train_examples),
        "holdout_rows": len(holdout_examples),
        "skipped": len(skipped),
        "preprocess_seconds": round(prep, 1),
        "train_seconds": round(result.seconds, 1),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "steps": result.steps,
        "holdout_before": accuracy(before, hx, hy),
        "holdout_after": accuracy(after, hx, hy),
        "mnist_before": before_mnist,
        "mnist_after": mnist_accuracy(after, mnist.test_images, mnist.test_labels),
        "history": result.history,
        "load": load_average(),
    }


def describe(r: dict[str, Any]) -> str:
    mb, ma = r["mnist_before"], r["mnist_after"]
    hb, ha = r["holdout_before"], r["holdout_after"]
    worst = sorted(ma["per_digit"], key=lambda d: ma["per_digit"][d] - mb["per_digit"][d])[:2]
    trade = ", ".join(
        f"digit {d} {100 * mb['per_digit'][d]:.2f}% -> {100 * ma['per_digit'][d]:.2f}%" for d in worst
    )
    ok_time = "meets" if r["wall_seconds"] <= TARGET_SECONDS else "MISSES"
    ok_mnist = "meets" if ma["accuracy"] >= TARGET_MNIST else "MISSES"
    return "\n".join(
        [
            f"{r['rows']:>6,} feedback rows ({r['train_rows']:,} trained on, {r['holdout_rows']:,} held out)",
            f"  wall {r['wall_seconds']:.1f} s = preprocessing {r['preprocess_seconds']:.1f} s + "
            f"fine-tuning {r['train_seconds']:.1f} s ({r['steps']} steps)  [{ok_time} the 5 min target]; "
            f"CPU time {r['cpu_seconds']:.1f} s (all threads: the share of 2 cores it really had)",
            f"  held-out feedback: {100 * hb['accuracy']:.2f}% -> {100 * ha['accuracy']:.2f}%",
            f"  MNIST test:        {100 * mb['accuracy']:.2f}% -> {100 * ma['accuracy']:.2f}%  "
            f"[{ok_mnist} the 99.6% target]; largest per-digit changes: {trade}",
            f"  {r['load']}",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = RetrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1000,10000", help="comma-separated feedback row counts")
    p.add_argument("--styles", default=",".join(styles.DEFAULT_STYLES))
    p.add_argument("--seed", type=int, default=1, help="seed of the drawings")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--mnist-samples", type=int, default=d.mnist_samples)
    p.add_argument("--feedback-weight", type=float, default=d.feedback_weight)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = sorted(int(n) for n in args.rows.split(","))
    cfg = dataclasses.replace(
        RetrainConfig(),
        epochs=args.epochs,
        mnist_samples=args.mnist_samples,
        feedback_weight=args.feedback_weight,
        lr=args.lr,
        threads=args.threads,
    )
    torch.set_num_threads(cfg.threads)
    print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    print(f"before: {load_average()}")
    mnist = load_mnist(default_mnist_dir())
    base: dict[str, torch.Tensor] = torch.load(BASE, map_location="cpu", weights_only=True)

    t0 = time.perf_counter()
    drawn = styles.make_set(max(counts), args.seed, args.styles.split(","))
    rows = [FileRow(i + 1, png, label) for i, (png, label) in enumerate(drawn)]
    print(f"drew {len(rows):,} feedback drawings ({args.styles}) in {time.perf_counter() - t0:.1f} s")
    before_mnist = mnist_accuracy(net_from(base), mnist.test_images, mnist.test_labels)

    results = []
    for n in counts:
        result = run(rows[:n], base, mnist, cfg, before_mnist)
        results.append(result)
        print(describe(result), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"config": dataclasses.asdict(cfg), "runs": results}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
