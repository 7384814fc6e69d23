"""Batch augmentation: range, determinism, and each transform doing what it says."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from training.augment import PRESETS, AugmentConfig, affine, augment, elastic_field, nib, stroke_width, warp

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


PEN = PRESETS["pen"]
EVERYTHING = replace(PEN, small_p=1.0, elastic_p=1.0, nib_p=1.0, flat_p=1.0)


def ink_centre_x(x: torch.Tensor) -> torch.Tensor:
    """Per image, the ink's mean column."""
    cols = torch.arange(x.shape[-1], dtype=x.dtype)
    return (x.sum(dim=(1, 2)) * cols).sum(1) / x.sum(dim=(1, 2, 3))


@pytest.mark.parametrize("cfg", [PEN, EVERYTHING], ids=["pen", "every transform"])
def test_the_pen_transforms_keep_shape_range_and_determinism(cfg: AugmentConfig) -> None:
    x = bar_image()
    a = augment(x, torch.Generator().manual_seed(5), cfg)
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, augment(x, torch.Generator().manual_seed(5), cfg))
    assert not torch.allclose(a, augment(x, torch.Generator().manual_seed(6), cfg))


def test_the_default_draws_no_random_numbers_for_the_transforms_it_leaves_off() -> None:
    """A default run is the shipped weights' augmentation: the same draws, hence the same weights."""
    x = bar_image()
    used, fresh = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    augment(x, used, AugmentConfig())
    for _ in range(7):  # affine: five draws; stroke width: two
        torch.rand(4, generator=fresh)
    assert torch.equal(used.get_state(), fresh.get_state())


def test_elastic_with_alpha_zero_is_the_identity() -> None:
    x = bar_image()
    cfg = replace(IDENTITY, elastic_p=1.0, elastic_alpha=0.0)
    torch.testing.assert_close(warp(x, cfg, torch.Generator().manual_seed(0)), x)
    assert float(elastic_field(4, 28, 28, cfg, torch.Generator()).abs().max()) == 0.0


def test_elastic_bends_the_stroke_smoothly_and_keeps_its_ink() -> None:
    x = bar_image()
    cfg = replace(IDENTITY, elastic_p=1.0, elastic_alpha=PEN.elastic_alpha)
    field = elastic_field(64, 28, 28, cfg, torch.Generator().manual_seed(0)) * 14  # grid units -> px
    assert 0.3 < float(field.abs().max()) <= cfg.elastic_alpha  # never beyond the nodes' displacements
    steps = torch.cat(
        [(field[:, 1:] - field[:, :-1]).flatten(), (field[:, :, 1:] - field[:, :, :-1]).flatten()]
    )
    assert float(steps.abs().max()) < 1.0  # smooth: neighbours move alike, the stroke bends without folding
    out = warp(x, cfg, torch.Generator().manual_seed(0))
    assert not torch.allclose(out, x)
    ratio = out.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert ((ratio > 0.7) & (ratio < 1.3)).all()  # stretched here, squeezed there: about the same ink


def test_slant_leans_the_top_right() -> None:
    x = bar_image()
    out = warp(x, replace(IDENTITY, slant_deg=(10.0, 10.0)), torch.Generator())
    top, bottom = ink_centre_x(out[:, :, 6:12]), ink_centre_x(out[:, :, 16:22])
    assert (top > bottom + 1.0).all()


def test_small_digits_are_smaller() -> None:
    x = torch.zeros(4, 1, 28, 28)
    x[..., 6:22, 6:22] = 1.0  # a 16 px square
    out = warp(x, replace(IDENTITY, small_p=1.0, small_scale=(0.6, 0.6)), torch.Generator())
    assert torch.allclose(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)) * 0.6**2, rtol=0.1)
    torch.testing.assert_close(
        warp(x, replace(IDENTITY, small_p=0.0, small_scale=(0.6, 0.6)), torch.Generator()), x
    )


def test_the_nib_widens_strokes_across_it_more_than_along_it() -> None:
    across = torch.zeros(1, 1, 28, 28)
    across[..., 4:24, 13:15] = 1.0  # a vertical bar; a horizontal nib widens it
    along = across.transpose(2, 3).contiguous()
    cfg = replace(IDENTITY, nib_p=1.0, nib_px=(1.0, 1.0))
    # the nib's angle is drawn first: find a seed giving a horizontal nib (angle near 0 or pi)
    seed = next(
        s
        for s in range(100)
        if abs(torch.cos(torch.rand(1, generator=torch.Generator().manual_seed(s)) * torch.pi)) > 0.95
    )
    wide_across = nib(across, cfg, torch.Generator().manual_seed(seed)).sum()
    wide_along = nib(along, cfg, torch.Generator().manual_seed(seed)).sum()
    assert float(wide_across) > float(wide_along) * 1.3 > float(along.sum()) * 1.3
    assert torch.equal(nib(across, replace(cfg, nib_p=0.0), torch.Generator()), across)


def test_flat_ink_makes_soft_ink_solid() -> None:
    soft = bar_image() * 0.7  # MNIST-like grey ink
    out = augment(soft, torch.Generator(), replace(IDENTITY, flat_p=1.0))
    assert float(out.max()) == 1.0 and float(soft.max()) < 0.71
    grey = ((out > 0.05) & (out < 0.95)).sum() / (out > 0.05).sum()
    assert float(grey) < 0.6  # mostly full ink, a thin soft edge


def test_pen_share_leaves_the_other_images_to_the_base_transforms() -> None:
    soft = torch.zeros(64, 1, 28, 28)
    soft[:, :, 6:22, 13:15] = 0.7  # MNIST-like grey ink: flat ink would make it 1.0
    cfg = replace(IDENTITY, flat_p=1.0, pen_share=0.5)
    out = augment(soft, torch.Generator().manual_seed(0), cfg)
    penned = out.amax(dim=(1, 2, 3)) == 1.0
    assert 16 <= int(penned.sum()) <= 48  # about half
    torch.testing.assert_close(out[~penned], soft[~penned])  # the rest: the base (here the identity)
    torch.testing.assert_close(out, augment(soft, torch.Generator().manual_seed(0), cfg))
