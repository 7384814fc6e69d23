"""Batch augmentation: range, determinism, and each transform doing what it says."""

from __future__ import annotations

import torch

from training.augment import AugmentConfig, affine, augment, stroke_width

IDENTITY = AugmentConfig(rotate_deg=0, shear_deg=0, scale=(1.0, 1.0), shift_px=0, stroke=(0.0, 0.0))


def bar_image() -> torch.Tensor:
    """A batch of 4 images with a vertical 2-pixel bar in the middle."""
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 6:22, 13:15] = 1.0
    return x


def test_output_stays_in_range_and_shape() -> None:
    x = bar_image()
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_same_seed_same_result_other_seed_differs() -> None:
    x = bar_image()
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_zero_ranges_leave_the_image_unchanged() -> None:
    x = bar_image()
    torch.testing.assert_close(augment(x, torch.Generator().manual_seed(0), IDENTITY), x)


def test_shift_moves_the_ink() -> None:
    x = bar_image()
    cfg = AugmentConfig(rotate_deg=0, shear_deg=0, scale=(1.0, 1.0), shift_px=3.0)
    out = affine(x, cfg, torch.Generator().manual_seed(0))
    cols = torch.arange(28.0)
    centre = (out.sum(dim=(1, 2)) * cols).sum(1) / out.sum(dim=(1, 2, 3))
    assert (centre - 13.5).abs().max() > 0.5  # moved horizontally by up to 3 pixels
    assert (centre - 13.5).abs().max() <= 3.01


def test_thickening_and_thinning_change_the_ink_amount() -> None:
    x = bar_image()
    thick = stroke_width(x, AugmentConfig(stroke=(0.8, 0.8), stroke_p=1.0), torch.Generator())
    thin = stroke_width(x, AugmentConfig(stroke=(-0.8, -0.8), stroke_p=1.0), torch.Generator())
    assert float(thick.sum()) > float(x.sum()) > float(thin.sum()) > 0
