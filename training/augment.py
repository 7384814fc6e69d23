"""Batch augmentation with torch ops, to look like digits drawn on a canvas or with a pen.

One warp per image: a random affine (rotation, shear and slant, scale, shift) and, optionally, a
smooth elastic displacement (Simard et al. 2003: a random field, smoothed, scaled by alpha), both
in a single `grid_sample`. Then the pen: optionally a flat nib (the ink dilated along a short
segment at a random angle, so strokes across the nib come out wider than strokes along it), the
stroke width (a partial 3x3 grey-level dilation or erosion), and optionally the flat ink of a
canvas brush (blur, then a steep ramp: full ink inside, a sharp edge, none of MNIST's soft grey).
Works on (N, 1, 28, 28) ink in [0, 1].

`AugmentConfig()` (preset `mnist`) is the first model's augmentation, and fine-tuning's
(`training/retrain.py`): the newer transforms are off there and draw no random numbers, so it
reproduces those weights byte for byte. `PRESETS["pen"]` turns them on: the shipped weights'
(`python -m training.train`, whose default it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (each drawn uniformly per image); `*_p` are per-image shares."""

    rotate_deg: float = 12.0
    shear_deg: float = 8.0
    scale: tuple[float, float] = (0.85, 1.10)
    shift_px: float = 2.5
    stroke: tuple[float, float] = (-0.5, 0.7)  # < 0 thins, > 0 thickens (fraction of a 3x3 erosion/dilation)
    stroke_p: float = 0.5  # share of images whose stroke width changes
    # Added to the shear, in degrees (> 0 leans the top right): people lean right more than left.
    slant_deg: tuple[float, float] = (0.0, 0.0)
    small_p: float = 0.0  # share of images scaled from `small_scale` instead of `scale`
    small_scale: tuple[float, float] = (0.6, 0.85)
    elastic_p: float = 0.0  # share of images given an elastic distortion
    elastic_alpha: float = 2.5  # px: the largest displacement (of the random field's nodes)
    elastic_sigma: float = 6.0  # px between the field's nodes: the larger, the smoother the bend
    nib_p: float = 0.0  # share of images drawn with a flat nib
    nib_px: tuple[float, float] = (0.5, 1.0)  # half the nib's width, px
    flat_p: float = 0.0  # share of images given a canvas brush's flat ink
    flat_ramp: tuple[float, float] = (0.3, 0.6)  # blurred ink below lo -> none, above hi -> full
    # Share of images given the pen transforms above (slant, small, elastic, nib, flat ink) at all;
    # the others get only the base warp and stroke width, as the `mnist` preset draws them.
    pen_share: float = 1.0


# `pen`: canvas and pen strokes: slanted, small and bent digits, flat nibs, flat ink.
PEN = AugmentConfig(slant_deg=(-3.0, 8.0), small_p=0.15, elastic_p=0.5, nib_p=0.25, flat_p=0.3)
# `pen-half`: the same on half the images only (measured worse: training/README.md).
PRESETS: dict[str, AugmentConfig] = {
    "mnist": AugmentConfig(),
    "pen": PEN,
    "pen-half": replace(PEN, pen_share=0.5),
}


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def affine_theta(n: int, h: int, w: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) `affine_grid` matrices: random rotation, shear (+ slant), scale (or small) and shift."""
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, gen) * math.pi / 180
    shear = _uniform(n, -cfg.shear_deg, cfg.shear_deg, gen) * math.pi / 180
    scale = _uniform(n, *cfg.scale, gen)
    tx = _uniform(n, -cfg.shift_px, cfg.shift_px, gen) * 2 / w
    ty = _uniform(n, -cfg.shift_px, cfg.shift_px, gen) * 2 / h
    if cfg.slant_deg != (0.0, 0.0):  # drawn only when asked: the default draws what it always drew
        shear = shear + _uniform(n, *cfg.slant_deg, gen) * math.pi / 180
    if cfg.small_p > 0:
        small = _uniform(n, *cfg.small_scale, gen)
        scale = torch.where(torch.rand(n, generator=gen) < cfg.small_p, small, scale)
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
    return theta


def _spline_basis(nodes: int, size: int) -> torch.Tensor:
    """(size, nodes): cubic B-spline weights from `nodes` evenly spread points to `size` pixels.

    Each pixel's displacement is a weighted mean of its nearest nodes' (rows sum to 1), so the field
    never exceeds the nodes' largest and is smooth (twice differentiable) everywhere.
    """
    t = (torch.linspace(0, nodes - 1, size).view(-1, 1) - torch.arange(nodes).view(1, -1)).abs()
    w = torch.where(
        t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, torch.where(t < 2, (2 - t).clamp(min=0) ** 3 / 6, 0.0)
    )
    return w / w.sum(dim=1, keepdim=True)


def elastic_field(n: int, h: int, w: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(n, h, w, 2) smooth random displacements in grid units (zero for images left undistorted).

    A coarse grid of uniform [-alpha, alpha] px displacements, one node every `elastic_sigma` px,
    spread smoothly over the pixels by cubic B-splines: a field like Simard's Gaussian-filtered
    noise, for two small matrix products rather than a filter over every pixel.
    """
    nodes = max(2, round(max(h, w) / cfg.elastic_sigma) + 1)
    coarse = torch.rand(n, 2, nodes, nodes, generator=gen) * 2 - 1
    field = _spline_basis(nodes, h) @ coarse @ _spline_basis(nodes, w).T  # (n, 2, h, w)
    on = (torch.rand(n, generator=gen) < cfg.elastic_p).to(field.dtype)
    px = torch.tensor([2.0 / w, 2.0 / h], dtype=field.dtype, device=field.device)  # pixels -> grid units
    return field.permute(0, 2, 3, 1) * (cfg.elastic_alpha * on).view(n, 1, 1, 1) * px


def warp(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """The affine warp, plus the elastic field when enabled, in one bilinear `grid_sample` (black outside)."""
    n, _, h, w = x.shape
    grid = F.affine_grid(affine_theta(n, h, w, cfg, gen), list(x.shape), align_corners=False)
    if cfg.elastic_p > 0:
        grid = grid + elastic_field(n, h, w, cfg, gen)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Warp each image by a random rotation, shear, scale and shift (bilinear, black outside)."""
    return warp(x, replace(cfg, elastic_p=0.0), gen)


def nib(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """A flat pen: the ink dilated along a segment of random angle and half-width (`nib_px`).

    Only the images drawn for it are computed (`nib_p` of them): four shifted copies each.
    """
    n, _, h, w = x.shape
    angle = torch.rand(n, generator=gen) * math.pi
    half = _uniform(n, *cfg.nib_px, gen)
    pick = torch.nonzero(torch.rand(n, generator=gen) < cfg.nib_p).flatten()
    if len(pick) == 0:
        return x
    angle, half, some = angle[pick], half[pick], x[pick]
    steps = torch.tensor([-1.0, -0.5, 0.5, 1.0])  # points along the nib, as shares of its half-width
    dx = (steps.view(-1, 1) * (half * torch.cos(angle)) * 2 / w).flatten()  # (4k,) in grid units
    dy = (steps.view(-1, 1) * (half * torch.sin(angle)) * 2 / h).flatten()
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    theta = torch.stack([torch.stack([one, zero, dx], 1), torch.stack([zero, one, dy], 1)], 1)
    shifted = some.repeat(len(steps), 1, 1, 1)
    grid = F.affine_grid(theta.to(x.dtype), list(shifted.shape), align_corners=False)
    shifted = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    wide = torch.maximum(some, shifted.view(len(steps), len(pick), 1, h, w).amax(0))
    return x.index_copy(0, pick, wide)


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


def flat_ink(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """A canvas brush's ink: a 3x3 blur, then a steep ramp from `flat_ramp` lo (none) to hi (full).

    The ramp is relative to each image's darkest blurred ink, as the handler stretches the contrast.
    """
    n = x.shape[0]
    on = torch.rand(n, generator=gen) < cfg.flat_p
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device) / 4
    blurred = F.conv2d(x, (k.view(3, 1) * k.view(1, 3)).view(1, 1, 3, 3), padding=1)
    blurred = blurred / blurred.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    lo, hi = cfg.flat_ramp
    flat = ((blurred - lo) / (hi - lo)).clamp(0.0, 1.0)
    return torch.where(on.view(n, 1, 1, 1), flat, x)


def augment(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig | None = None) -> torch.Tensor:
    """Warp (affine, elastic), then the pen (nib, stroke width, flat ink); output clamped to [0, 1].

    Transforms whose share is 0 are skipped and draw no random numbers.
    """
    cfg = cfg or AugmentConfig()
    if cfg.pen_share < 1.0:
        pen = torch.rand(x.shape[0], generator=gen) < cfg.pen_share
        out = torch.empty_like(x)
        out[pen] = _augment(x[pen], gen, replace(cfg, pen_share=1.0))
        out[~pen] = _augment(x[~pen], gen, base_of(cfg))
        return out
    return _augment(x, gen, cfg)


def base_of(cfg: AugmentConfig) -> AugmentConfig:
    """`cfg` without the pen transforms: the base warp and stroke width only."""
    return replace(
        cfg, slant_deg=(0.0, 0.0), small_p=0.0, elastic_p=0.0, nib_p=0.0, flat_p=0.0, pen_share=1.0
    )


def _augment(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    x = warp(x, cfg, gen)
    if cfg.nib_p > 0:
        x = nib(x, cfg, gen)
    x = stroke_width(x, cfg, gen)
    if cfg.flat_p > 0:
        x = flat_ink(x, cfg, gen)
    return x.clamp_(0.0, 1.0)
