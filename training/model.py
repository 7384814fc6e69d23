"""The digit classifier: a small conv-BN-ReLU network (28x28 greyscale in, 10 logits out).

This file is shipped inside the TorchServe archive (`--model-file`), so it imports only torch and
defines exactly one `nn.Module` subclass, constructible without arguments.
"""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """conv5-32 | pool | conv3-64 x2 | pool | conv3-128 x2 | dropout | linear; every conv is conv-BN-ReLU."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()

        def block(cin: int, cout: int, kernel: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(1, 32, 5),
            nn.MaxPool2d(2),  # 14x14
            *block(32, 64, 3),
            *block(64, 64, 3),
            nn.MaxPool2d(2),  # 7x7
            *block(64, 128, 3),
            *block(128, 128, 3),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(128 * 7 * 7, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) normalised images -> (N, 10) logits."""
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits
