"""The network at serving time: the runtimes it runs in, its calibration and its "not a digit" head.

Shipped inside the model archive beside the handler (TorchServe wants exactly one class in the
handler's own module, so the small classes live here). Imports only torch, numpy and, when
installed, onnxruntime.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"  # {"temperature": T}, written by training/export.py
ONNX_FILE = "mnist.onnx"  # the same network for ONNX Runtime, written by training/export.py
DIGITNESS_FILE = "digitness.json"  # the "not a digit" head, written by training/export.py

# (N, 1, 28, 28) float32 normalised digits -> (N, 10) logits and (N, 6272) features, float32
Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class LogitsAndFeatures(torch.nn.Module):
    """The network with both outputs the handler reads: the logits and the classifier's input features."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.body: torch.nn.Module = getattr(net, "features")  # noqa: B009  # Net's two halves, typed
        self.head: torch.nn.Module = getattr(net, "classifier")  # noqa: B009

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x).flatten(1)
        return self.head(features), features


@dataclass(frozen=True)
class DigitHead:
    """A linear "is it a digit at all" score on the features; at or above the threshold is a digit."""

    weights: np.ndarray  # (6272,) float64
    bias: float
    threshold: float

    def is_digit(self, features: np.ndarray) -> np.ndarray:
        verdict: np.ndarray = features.astype(np.float64) @ self.weights + self.bias >= self.threshold
        return verdict


def read_digit_head(model_dir: Path) -> DigitHead | None:
    """The head in model_dir's digitness.json, or None (an archive without one: no `is_digit`)."""
    path = model_dir / DIGITNESS_FILE
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    weights = np.frombuffer(base64.b64decode(spec["weights_f32_base64"]), dtype="<f4").astype(np.float64)
    return DigitHead(weights, float(spec["bias"]), float(spec["threshold"]))


def read_temperature(model_dir: Path) -> float:
    """The softmax temperature in model_dir's calibration.json; 1.0 (uncalibrated) without one."""
    path = model_dir / CALIBRATION_FILE
    if not path.is_file():
        return 1.0
    temperature = float(json.loads(path.read_text())["temperature"])
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{path}: the temperature must be a positive number, not {temperature}")
    return temperature


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) per row, float64 (stable: the row's maximum is subtracted first)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """The same model, faster on CPU: BatchNorm folded into the convolutions, channels-last memory.

    About 1.5x faster at batch 1 to 32 on this machine (bench/serve.py); a model that cannot be
    traced is kept as it is.
    """
    model.eval()
    try:
        with warnings.catch_warnings():  # the module touches deprecated torch.jit APIs on import
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.fx.experimental.optimization import fuse

        model = fuse(model)
    except Exception:  # tracing failed: run the model unfused
        logger.warning(
            "could not fold BatchNorm into the convolutions; serving the model as it is", exc_info=True
        )
    # torch's stubs lack to(memory_format=...)
    fast: torch.nn.Module = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return fast


def torch_forward(model: torch.nn.Module, device: torch.device) -> Forward:
    """The network (a `LogitsAndFeatures`, maybe fused) in torch on `device` (what TorchServe gave)."""

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(batch).to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits, features = model(x)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()

    return run


def onnx_forward(path: Path, threads: int) -> Forward | None:
    """The network in ONNX Runtime on the CPU, or None when onnxruntime or the file is missing."""
    if not path.is_file():
        return None
    try:
        import onnxruntime as ort  # type: ignore[import-untyped,import-not-found,unused-ignore]  # no stubs
    except ImportError:
        logger.info("onnxruntime is not installed: the model runs in torch")
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = session.run(["logits", "features"], {name: batch})
        return logits, features

    return run
