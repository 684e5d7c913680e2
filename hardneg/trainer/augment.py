"""Image augmentations for self-supervised training, written with torch tensor ops (no torchvision).

SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations") makes a
positive pair from two random views of one image: a random resized crop, a horizontal flip and colour
jitter. hardneg's images are small and mostly grayscale (8 x 8 digits), so the views here are:

* :func:`random_resized_crop`: a crop of random area and aspect ratio, resampled back to (H, W) with one
  batched ``affine_grid`` + ``grid_sample`` call (bilinear);
* :func:`random_flip`: a horizontal flip with probability ``p`` (off by default: a mirrored digit is
  often another glyph, and on digits flips lowered MAP@R, see docs/benchmarks.md);
* :func:`brightness_contrast`: ``x' = c·x + (1 - c)·mean(x) + b`` per image, clamped to the batch's own
  value range;
* :func:`gaussian_noise`: ``x + sigma·N(0, 1)``, clamped the same way.

Every function works on a whole batch (B, C, H, W) at once, draws all its randomness from the
``torch.Generator`` it is given (seed it per (seed, epoch) and a run is reproducible, and a resumed run
draws what the uninterrupted one drew), keeps shape and dtype, and is the identity when its strength is
zero (the crop at scale 1 and ratio 1 up to float rounding of the sampling grid).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hardneg.miner.errors import ValidationError
from hardneg.trainer.recipes.settings import AugmentConfig  # torch-free, with the recipe settings

__all__ = ["AugmentConfig", "augment", "brightness_contrast", "gaussian_noise", "random_flip", "random_resized_crop"]


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One random view of every image in ``x`` (B, C, H, W): crop, flip, brightness/contrast, noise.

    Returns a new (B, C, H, W) tensor of ``x``'s dtype on ``x``'s device; ``generator`` must live there too.
    """
    _check_images(x)
    lo, hi = x.amin(), x.amax()  # views keep the batch's value range: [0, 1] for hardneg's images
    out = random_resized_crop(x, generator, cfg.crop_min_scale, cfg.crop_max_ratio)
    out = random_flip(out, generator, cfg.flip)
    out = brightness_contrast(out, generator, cfg.brightness, cfg.contrast, (lo, hi))
    return gaussian_noise(out, generator, cfg.noise, (lo, hi))


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, min_scale: float,
                        max_ratio: float) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) to a random box and resample it to (H, W), bilinearly.

    The box's area is a fraction ``s ~ U(min_scale, 1)`` of the image and its aspect ratio ``r`` is
    log-uniform in ``[1/max_ratio, max_ratio]`` (sides ``sqrt(s·r)`` and ``sqrt(s/r)``, each capped at the
    full side); its centre is uniform over the positions that keep it inside the image.
    """
    _check_images(x)
    b = x.shape[0]
    u = _uniform(generator, (b, 4), x)
    scale = min_scale + (1.0 - min_scale) * u[:, 0]
    log_r = math.log(max_ratio)
    ratio = torch.exp((2.0 * u[:, 1] - 1.0) * log_r)
    w = torch.sqrt(scale * ratio).clamp(max=1.0)  # box sides as fractions of the image's sides
    h = torch.sqrt(scale / ratio).clamp(max=1.0)
    # In affine_grid's normalised coordinates the image spans [-1, 1]: a box of side w fits with its centre
    # anywhere in [-(1 - w), 1 - w].
    cx = (2.0 * u[:, 2] - 1.0) * (1.0 - w)
    cy = (2.0 * u[:, 3] - 1.0) * (1.0 - h)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Mirror each image of ``x`` (B, C, H, W) left-right with probability ``p``."""
    _check_images(x)
    flip = _uniform(generator, (x.shape[0],), x) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def brightness_contrast(x: torch.Tensor, generator: torch.Generator, brightness: float, contrast: float,
                        value_range: tuple[torch.Tensor | float, torch.Tensor | float]) -> torch.Tensor:
    """Per image of ``x`` (B, C, H, W): ``c·x + (1 - c)·mean + b``, clamped to ``value_range``.

    ``c ~ U(1 - contrast, 1 + contrast)`` scales the contrast about the image's mean (torchvision's
    definition, on the raw values); ``b ~ U(-brightness, brightness)`` shifts it.
    """
    _check_images(x)
    u = _uniform(generator, (x.shape[0], 2), x)
    c = (1.0 + contrast * (2.0 * u[:, 0] - 1.0))[:, None, None, None]
    shift = (brightness * (2.0 * u[:, 1] - 1.0))[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (c * x + (1.0 - c) * mean + shift).clamp(*value_range)


def gaussian_noise(x: torch.Tensor, generator: torch.Generator, sigma: float,
                   value_range: tuple[torch.Tensor | float, torch.Tensor | float]) -> torch.Tensor:
    """``x + sigma·N(0, 1)`` elementwise on ``x`` (B, C, H, W), clamped to ``value_range``."""
    _check_images(x)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + sigma * noise).clamp(*value_range)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValidationError(f"augmentations take a float batch of images (B, C, H, W), got a {x.dtype} tensor "
                              f"of shape {tuple(x.shape)}; self-supervised mode needs image data")
