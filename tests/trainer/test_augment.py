"""The self-supervised augmentations (hardneg.trainer.augment) against numpy references and torch.flip.

Each random draw is replayed from a copy of the generator's state, so the references see the very numbers
the augmentation drew and compute the expected images independently (bilinear sampling written out in numpy).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hardneg.miner.errors import ValidationError
from hardneg.trainer.augment import (
    AugmentConfig, augment, brightness_contrast, gaussian_noise, random_flip, random_resized_crop,
)

IDENTITY = AugmentConfig(crop_min_scale=1.0, crop_max_ratio=1.0, flip=0.0, brightness=0.0, contrast=0.0, noise=0.0)


def images(b: int = 6, c: int = 1, h: int = 8, w: int = 8, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded random images (b, c, h, w) in [0, 1] with exact 0s and 1s (like digits)."""
    x = torch.from_numpy(np.random.default_rng(seed).random((b, c, h, w))).to(dtype)
    x[:, :, 0, 0], x[:, :, -1, -1] = 0.0, 1.0
    return x


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def replay(g: torch.Generator) -> torch.Generator:
    """A generator that will draw what ``g`` draws next."""
    return torch.Generator().set_state(g.get_state())


# ----------------------------------------------------------------------------- reproducibility, invariants
def test_same_seed_same_views_other_seed_other_views() -> None:
    x, cfg = images(), AugmentConfig()
    a, b, c = augment(x, cfg, gen(7)), augment(x, cfg, gen(7)), augment(x, cfg, gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_two_views_from_one_generator_differ() -> None:
    # SimCLR's positive pair: two draws in a row from the epoch's generator are two different views.
    g, x = gen(1), images()
    v1, v2 = augment(x, AugmentConfig(), g), augment(x, AugmentConfig(), g)
    assert (v1 - v2).abs().amax(dim=(1, 2, 3)).min() > 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (3, 3, 10, 16)])
def test_shape_dtype_and_value_range_are_kept(dtype: torch.dtype, shape: tuple[int, int, int, int]) -> None:
    x = images(*shape, dtype=dtype)
    strong = AugmentConfig(crop_min_scale=0.2, crop_max_ratio=2.0, flip=0.5, brightness=0.5, contrast=0.9,
                           noise=0.3)
    out = augment(x, strong, gen(3))
    assert out.shape == x.shape and out.dtype == dtype
    assert out.min() >= x.min() and out.max() <= x.max()  # clamped to the batch's range, here [0, 1]
    assert not torch.allclose(out, x)


def test_zero_strengths_are_the_identity() -> None:
    x = images(b=4, c=2, h=8, w=12)
    torch.testing.assert_close(augment(x, IDENTITY, gen(0)), x, atol=1e-6, rtol=0)
    # the pointwise steps are exactly the identity, not just close to it
    assert torch.equal(random_flip(x, gen(0), 0.0), x)
    assert torch.equal(brightness_contrast(x, gen(0), 0.0, 0.0, (0.0, 1.0)), x)
    assert torch.equal(gaussian_noise(x, gen(0), 0.0, (0.0, 1.0)), x)


# ------------------------------------------------------------------------------------------------- flips
def test_flip_with_probability_one_is_torch_flip() -> None:
    x = images(b=4, c=3, h=5, w=7)
    assert torch.equal(random_flip(x, gen(0), 1.0), torch.flip(x, dims=[-1]))


def test_flip_mirrors_exactly_the_images_its_draws_select() -> None:
    x, g = images(b=64), gen(5)
    chosen = torch.rand(64, generator=replay(g)) < 0.5
    out = random_flip(x, g, 0.5)
    assert 0 < int(chosen.sum()) < 64
    assert torch.equal(out[chosen], torch.flip(x[chosen], dims=[-1]))
    assert torch.equal(out[~chosen], x[~chosen])


# ------------------------------------------------------------------------------------------------- crops
def bilinear_crop_reference(x: np.ndarray, w: np.ndarray, h: np.ndarray, cx: np.ndarray,
                            cy: np.ndarray) -> np.ndarray:
    """Box ``(w, h)`` (fractions of the sides) centred at ``(cx, cy)`` (in [-1, 1] coordinates) of each image
    of ``x`` (B, C, H, W), resampled to (H, W) bilinearly at pixel centres, edge pixels repeated outside."""
    b, c, hh, ww = x.shape
    out = np.empty_like(x, dtype=np.float64)
    for n in range(b):
        for i in range(hh):
            for j in range(ww):
                # output pixel centre -> normalised -> inside the box -> source pixel coordinates
                sx = w[n] * ((2 * j + 1) / ww - 1) + cx[n]
                sy = h[n] * ((2 * i + 1) / hh - 1) + cy[n]
                px = min(max(((sx + 1) * ww - 1) / 2, 0.0), ww - 1)
                py = min(max(((sy + 1) * hh - 1) / 2, 0.0), hh - 1)
                x0, y0 = int(math.floor(px)), int(math.floor(py))
                x1, y1 = min(x0 + 1, ww - 1), min(y0 + 1, hh - 1)
                fx, fy = px - x0, py - y0
                out[n, :, i, j] = ((1 - fy) * ((1 - fx) * x[n, :, y0, x0] + fx * x[n, :, y0, x1])
                                   + fy * ((1 - fx) * x[n, :, y1, x0] + fx * x[n, :, y1, x1]))
    return out


def test_crop_of_the_whole_image_is_the_identity() -> None:
    x = images(b=3, c=2, h=8, w=12)
    torch.testing.assert_close(random_resized_crop(x, gen(0), 1.0, 1.0), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("min_scale, max_ratio", [(0.3, 2.0), (0.5, 4 / 3), (0.08, 1.0)])
def test_crop_matches_a_numpy_bilinear_reference(min_scale: float, max_ratio: float) -> None:
    x, g = images(b=8, c=2, h=8, w=12, seed=4, dtype=torch.float64), gen(11)
    u = torch.rand((8, 4), generator=replay(g), dtype=torch.float64).numpy()
    # the documented draw: area s ~ U(min_scale, 1), log-ratio ~ U(-log r, log r), centre inside the image
    s = min_scale + (1 - min_scale) * u[:, 0]
    r = np.exp((2 * u[:, 1] - 1) * math.log(max_ratio))
    w, h = np.minimum(np.sqrt(s * r), 1.0), np.minimum(np.sqrt(s / r), 1.0)
    cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)
    assert np.all(np.abs(cx) + w <= 1 + 1e-12) and np.all(np.abs(cy) + h <= 1 + 1e-12)  # the box is inside
    out = random_resized_crop(x, g, min_scale, max_ratio)
    np.testing.assert_allclose(out.numpy(), bilinear_crop_reference(x.numpy(), w, h, cx, cy), atol=1e-9)


# ----------------------------------------------------------------------------- brightness, contrast, noise
def test_brightness_contrast_by_hand() -> None:
    # One 2x2 image [[0.2, 0.4], [0.6, 0.8]] (mean 0.5). Contrast factor c and shift b come from the draws u:
    # c = 1 + 0.5·(2·u0 - 1), b = 0.1·(2·u1 - 1); each pixel becomes c·x + (1 - c)·0.5 + b, clamped to [0.2, 0.8].
    x = torch.tensor([[[[0.2, 0.4], [0.6, 0.8]]]], dtype=torch.float64)
    g = gen(9)
    u0, u1 = torch.rand((1, 2), generator=replay(g), dtype=torch.float64)[0].tolist()
    c, b = 1 + 0.5 * (2 * u0 - 1), 0.1 * (2 * u1 - 1)
    expected = np.clip(c * np.array([[0.2, 0.4], [0.6, 0.8]]) + (1 - c) * 0.5 + b, 0.2, 0.8)
    out = brightness_contrast(x, g, 0.1, 0.5, (x.min(), x.max()))
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-12)


def test_contrast_keeps_the_mean_and_scales_deviations() -> None:
    # No brightness and no clamping in reach: the mean stays, deviations from it scale by one factor per image.
    x = 0.4 + 0.1 * images(b=5, seed=6, dtype=torch.float64)
    out = brightness_contrast(x, gen(2), 0.0, 0.5, (0.0, 1.0))
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-12, rtol=0)
    dev_in = x - x.mean(dim=(1, 2, 3), keepdim=True)
    dev_out = out - out.mean(dim=(1, 2, 3), keepdim=True)
    ratio = dev_out.flatten(1) / dev_in.flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), atol=1e-9, rtol=0)
    assert ratio[:, 0].min() >= 0.5 - 1e-12 and ratio[:, 0].max() <= 1.5 + 1e-12


def test_gaussian_noise_is_the_drawn_noise_clamped() -> None:
    x, g = images(b=4, seed=8, dtype=torch.float64), gen(4)
    noise = torch.randn(x.shape, generator=replay(g), dtype=torch.float64)
    out = gaussian_noise(x, g, 0.2, (0.0, 1.0))
    np.testing.assert_allclose(out.numpy(), np.clip((x + 0.2 * noise).numpy(), 0.0, 1.0), atol=1e-15)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("field, value, match", [
    ("crop_min_scale", 0.0, "aug_crop_min_scale must lie in"),
    ("crop_min_scale", 1.5, "aug_crop_min_scale must lie in"),
    ("crop_max_ratio", 0.5, "aug_crop_max_ratio must be a finite number >= 1"),
    ("flip", 1.5, "aug_flip must be a probability"),
    ("brightness", -0.1, "aug_brightness must be a finite number >= 0"),
    ("noise", float("nan"), "aug_noise must be a finite number >= 0"),
    ("contrast", 1.0, "aug_contrast must lie in"),
])
def test_bad_strengths_are_refused(field: str, value: float, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        AugmentConfig(**{field: value})


def test_non_image_batches_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"\(B, C, H, W\)"):
        augment(torch.zeros(4, 64), AugmentConfig(), gen())
    with pytest.raises(ValidationError, match="float batch"):
        random_flip(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), gen(), 0.5)
