"""Batched data augmentation on the training device: one random affine transform per image (rotation, shift,
zoom, shear), optionally composed with an elastic distortion, applied to a whole batch by one ``grid_sample``
over an ``affine_grid``, and optional random erasing. No per-sample Python and no DataLoader: on CUDA a batch
costs a handful of kernel launches per step.

``strength`` (``train.augment.anneal``) scales every magnitude at once: the angles, the shift, the zoom's distance
from 1, the elastic displacement and the erasing probability; 1 is the configured augmentation, 0 none. It is a
number, or a one-element tensor on the batch's device that a captured CUDA graph reads at every replay."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import AugmentConfig

Strength = float | Tensor


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def affine_grid(pixels: Tensor, cfg: AugmentConfig, generator: torch.Generator, strength: Strength = 1.0) -> Tensor:
    """The sampling grid (B, H, W, 2) of one random rotation, shear, zoom and shift per image."""
    b, device = pixels.shape[0], pixels.device
    angle = _uniform(b, -cfg.rotation, cfg.rotation, generator, device) * (math.pi / 180)
    shear = _uniform(b, -cfg.shear, cfg.shear, generator, device) * (math.pi / 180)
    zoom = _uniform(b, cfg.scale[0], cfg.scale[1], generator, device)
    # affine_grid maps output coordinates to input coordinates in [-1, 1]: the inverse of the image transform.
    shift = _uniform(2 * b, -cfg.translate, cfg.translate, generator, device).view(b, 2) * 2
    if not _full(strength):  # the same draws, scaled towards the identity transform
        angle, shear, shift, zoom = angle * strength, shear * strength, shift * strength, (zoom - 1) * strength + 1
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    # forward transform A = zoom * R(angle) @ Shear_x(shear); theta = A^-1 (shift applied to the output).
    a = torch.stack([torch.stack([cos, cos * tan - sin], -1), torch.stack([sin, sin * tan + cos], -1)], 1)
    a = a * zoom.view(b, 1, 1)
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]  # zoom^2 > 0: rotation and shear keep area
    inverse = torch.stack([torch.stack([a[:, 1, 1], -a[:, 0, 1]], -1),
                           torch.stack([-a[:, 1, 0], a[:, 0, 0]], -1)], 1) / det.view(b, 1, 1)
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], dim=2)
    return F.affine_grid(theta, list(pixels.shape), align_corners=False)


def elastic_displacement(shape: torch.Size, alpha: float, sigma: float, generator: torch.Generator,
                         device: torch.device) -> Tensor:
    """Per-image smooth random displacements (B, H, W, 2) in ``grid_sample``'s [-1, 1] units: a uniform(-1, 1)
    field per axis, Gaussian-smoothed with std ``sigma`` pixels and scaled by ``alpha`` pixels (Simard et al.,
    2003; alpha 34, sigma 4 move the pixels of a 28x28 digit by about 1.3 px on average, bending its strokes)."""
    b, _, h, w = shape
    field = torch.rand(b, 2, h, w, generator=generator, device=device) * 2 - 1
    field = gaussian_smooth(field, sigma)
    return torch.stack([field[:, 0] * (2 * alpha / w), field[:, 1] * (2 * alpha / h)], dim=-1)  # (dx, dy)


def gaussian_smooth(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of (B, C, H, W) with std ``sigma`` px, reflect-padded, truncated at 3 sigma (or where the
    padding must stop, kernel // 2 < side): the result of torchvision's ``gaussian_blur`` with that kernel, as
    two small matrix products (rows, then columns) instead of its one 2-D convolution, whose k^2 taps per pixel
    made it the most expensive part of a CPU training step (17 ms per 128 images at sigma 5; this: under 1 ms)."""
    h, w = x.shape[-2:]
    radius = min(math.ceil(3 * sigma), (min(h, w) - 1) // 2)
    return (_blur_matrix(h, sigma, radius, x.device, x.dtype) @ x
            @ _blur_matrix(w, sigma, radius, x.device, x.dtype).T)


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma: float, radius: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n, n) matrix M with (M @ v)[i] = sum_j taps[j] * v[reflect(i + j - radius)]: 1-D Gaussian smoothing of a
    length-n signal with PyTorch's "reflect" padding (index -k reads k, index n-1+k reads n-1-k). Built once per
    size, sigma and device, not at every training step."""
    offsets = torch.arange(-radius, radius + 1, device=device)
    taps = torch.exp(-0.5 * (offsets.to(dtype) / sigma) ** 2)
    source = (torch.arange(n, device=device).unsqueeze(1) + offsets).abs()
    source = torch.where(source > n - 1, 2 * (n - 1) - source, source)
    matrix = torch.zeros(n, n, device=device, dtype=dtype)
    matrix.scatter_add_(1, source, (taps / taps.sum()).expand(n, -1).contiguous())
    if matrix.is_cuda:  # cached and shared by runs on other CUDA streams: complete before anyone reads it
        torch.cuda.current_stream(matrix.device).synchronize()
    return matrix


def _full(strength: Strength) -> bool:
    """Whether ``strength`` is the plain number 1 (nothing to scale; a tensor is scaled whatever it holds)."""
    return not isinstance(strength, Tensor) and strength == 1.0


def random_affine(pixels: Tensor, cfg: AugmentConfig, generator: torch.Generator, strength: Strength = 1.0) -> Tensor:
    """``pixels`` (B, C, H, W) in [0, 1] -> the same batch, each image rotated, sheared, zoomed and shifted by its
    own random amounts, and elastically distorted when ``cfg.elastic_alpha`` > 0, in one bilinear resampling.
    ``generator`` lives on the batch's device, so the draws are reproducible per seed."""
    grid = affine_grid(pixels, cfg, generator, strength)
    if cfg.elastic_alpha:
        field = elastic_displacement(pixels.shape, cfg.elastic_alpha, cfg.elastic_sigma, generator, pixels.device)
        grid = grid + (field if _full(strength) else field * strength)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_erasing(pixels: Tensor, probability: Strength, generator: torch.Generator,
                   area: tuple[float, float] = (0.02, 0.15)) -> Tensor:
    """Blank one random rectangle (area fraction in ``area``, aspect 1/3..3) in each image with ``probability``."""
    b, _, h, w = pixels.shape
    device = pixels.device
    frac = _uniform(b, *area, generator, device)
    aspect = torch.exp(_uniform(b, math.log(1 / 3), math.log(3), generator, device))
    eh = (torch.sqrt(frac * aspect) * h).clamp(1, h)
    ew = (torch.sqrt(frac / aspect) * w).clamp(1, w)
    top = torch.rand(b, generator=generator, device=device) * (h - eh)
    left = torch.rand(b, generator=generator, device=device) * (w - ew)
    apply = torch.rand(b, generator=generator, device=device) < probability
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
              & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1)) & apply.view(b, 1, 1))
    return pixels.masked_fill(inside.unsqueeze(1), 0.0)


def augment(pixels: Tensor, cfg: AugmentConfig, generator: torch.Generator, strength: Strength = 1.0) -> Tensor:
    """The configured augmentation of one training batch (identity when nothing is configured), at ``strength``
    (1: as configured; the random draws are the same at any strength)."""
    if not cfg.active:
        return pixels
    if cfg.resamples:
        pixels = random_affine(pixels, cfg, generator, strength)
    if cfg.erasing:
        pixels = random_erasing(pixels, cfg.erasing if _full(strength) else cfg.erasing * strength, generator)
    return pixels
