"""Batch augmentation with torch ops, to look like digits drawn on a canvas.

Small rotations, shears, shifts and scaling (one affine warp per image) and stroke thickening or
thinning (a partial grey-level dilation or erosion). Works on (N, 1, 28, 28) ink in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (each drawn uniformly per image)."""

    rotate_deg: float = 12.0
    shear_deg: float = 8.0
    scale: tuple[float, float] = (0.85, 1.10)
    shift_px: float = 2.5
    stroke: tuple[float, float] = (-0.5, 0.7)  # < 0 thins, > 0 thickens (fraction of a 3x3 erosion/dilation)
    stroke_p: float = 0.5  # share of images whose stroke width changes


def affine(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Warp each image by a random rotation, shear, scale and shift (bilinear, black outside)."""
    n, _, h, w = x.shape

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180
    shear = uniform(-cfg.shear_deg, cfg.shear_deg) * math.pi / 180
    scale = uniform(*cfg.scale)
    tx = uniform(-cfg.shift_px, cfg.shift_px) * 2 / w
    ty = uniform(-cfg.shift_px, cfg.shift_px) * 2 / h
    # affine_grid maps output to input coordinates: the inverse of the wanted transform, so divide
    # by the scale (a larger `scale` makes the digit larger).
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos, -sin + torch.tan(shear) * cos, tx], dim=1),
            torch.stack([sin, cos + torch.tan(shear) * sin, ty], dim=1),
        ],
        dim=1,
    ) / scale.view(n, 1, 1)
    theta[:, :, 2] *= scale.view(n, 1)  # the shift is not scaled
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def stroke_width(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Blend each image towards its 3x3 dilation (thicker) or erosion (thinner) by a random amount."""
    n = x.shape[0]
    lo, hi = cfg.stroke
    amount = torch.rand(n, generator=gen) * (hi - lo) + lo
    amount = torch.where(torch.rand(n, generator=gen) < cfg.stroke_p, amount, torch.zeros_like(amount))
    amount = amount.view(n, 1, 1, 1)
    thick = F.max_pool2d(x, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-x, 3, stride=1, padding=1)
    target = torch.where(amount > 0, thick, thin)
    return x + amount.abs() * (target - x)


def augment(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig | None = None) -> torch.Tensor:
    """Random affine warp then stroke-width change; output clamped to [0, 1]."""
    cfg = cfg or AugmentConfig()
    return stroke_width(affine(x, cfg, gen), cfg, gen).clamp_(0.0, 1.0)
