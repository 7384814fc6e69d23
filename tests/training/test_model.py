"""The network file: shape, size, and fit for TorchServe's eager loader (shipped via --model-file)."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from training.model import Net

MODEL_FILE = Path(__file__).resolve().parents[2] / "training" / "model.py"


def test_logits_for_a_batch() -> None:
    net = Net().eval()
    with torch.no_grad():
        out = net(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()


def test_small_enough_to_commit() -> None:
    params = sum(p.numel() for p in Net().parameters())
    assert 200_000 <= params <= 500_000  # about 1.4 MB of float32 weights


def test_model_file_has_one_module_class_and_imports_only_torch() -> None:
    tree = ast.parse(MODEL_FILE.read_text())
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes == ["Net"]
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }
    assert imported <= {"torch", "__future__"}


def test_state_dict_round_trip(tmp_path: Path) -> None:
    net = Net().eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    other = Net().eval()
    other.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x), other(x))
