"""Differentiable batched augmentation, done with tensor ops on the batch's device.

Every random number is drawn with an explicit ``torch.Generator`` on the device of the
batch and nothing is read back to the host, so these run inside a GPU step (and a CUDA
graph) without synchronising. Gradients flow to the input images (``grid_sample``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(n: int, low, high, generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


@dataclass(frozen=True)
class Augment:
    """Random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``), random
    translation by up to ``shift`` of the image side (the border shows zeros, i.e. the mean
    colour in normalised space), and horizontal flip — one affine warp per image; then, with
    ``jitter`` > 0, the whole batch rolled by (0..jitter, 0..jitter) pixels with wrap-around
    (``torch.roll`` semantics: the authors' release's jitter).

    ``aug(x, generator)``: x (n, c, h, w) float -> (n, c, h, w), same dtype and device.
    """

    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    shift: float = 0.0
    flip: bool = True
    jitter: int = 0

    def theta(self, n: int, generator, device, dtype=torch.float32) -> torch.Tensor:
        """(n, 2, 3) affine matrices mapping output to input coordinates in [-1, 1]."""
        area = _uniform(n, self.scale[0], self.scale[1], generator, device)
        log_ratio = _uniform(n, math.log(self.ratio[0]), math.log(self.ratio[1]), generator, device)
        aspect = torch.exp(log_ratio)
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # half-widths in units of the half-side
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (2 * torch.rand(n, generator=generator, device=device) - 1) * (1 - w)
        cy = (2 * torch.rand(n, generator=generator, device=device) - 1) * (1 - h)
        if self.shift > 0:
            cx = cx + _uniform(n, -2 * self.shift, 2 * self.shift, generator, device)
            cy = cy + _uniform(n, -2 * self.shift, 2 * self.shift, generator, device)
        sign = torch.ones(n, device=device)
        if self.flip:
            sign = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
        zero = torch.zeros(n, device=device)
        theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        return theta.to(dtype)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, draws: int | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """``draws``/``rows``: draw the warps of a batch of ``draws`` images and apply rows
        ``rows`` (n,) of them to x (a rank's part of a global batch, torchrun)."""
        theta = self.theta(draws or x.shape[0], generator, x.device, x.dtype)
        x = warp(x, theta if rows is None else theta[rows])
        if self.jitter > 0:  # index arithmetic on the device: no host sync, unlike torch.roll with drawn ints
            off = torch.randint(0, self.jitter + 1, (2,), generator=generator, device=x.device)
            height, width = x.shape[-2:]
            ys = (torch.arange(height, device=x.device) - off[0]) % height
            xs = (torch.arange(width, device=x.device) - off[1]) % width
            x = x.index_select(-2, ys).index_select(-1, xs)
        return x


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x (n, c, h, w) resampled through the affine matrices theta (n, 2, 3) (zeros outside)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def make_augment(kind: str, crop_min: float = 0.08, shift: float = 0.125, flip: bool = True,
                 jitter: int = 0) -> Augment:
    """"crop": translation by up to ``shift`` (CIFAR's pad-and-crop); "rrc": random resized
    crop with area in [crop_min, 1]; "recover": both (the synthetic batch), then a roll by up
    to ``jitter`` px. Each with a horizontal flip unless ``flip`` is False (data whose labels
    a mirror changes: digits)."""
    if kind == "crop":
        return Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), shift=shift, flip=flip)
    if kind == "rrc":
        return Augment(scale=(crop_min, 1.0), flip=flip)
    if kind == "recover":
        return Augment(scale=(crop_min, 1.0), shift=shift, flip=flip, jitter=jitter)
    raise ValueError(f"unknown augmentation {kind!r}")


def cutmix(x: torch.Tensor, prob: float, generator: torch.Generator | None = None, draws: int | None = None,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """CutMix without labels (the teacher labels the mixed image): with probability ``prob``
    per image, paste a random box (area fraction uniform in [0, 1]) from the next image of
    the batch. x (n, c, h, w) -> same shape. ``draws``/``rows`` as for ``Augment``."""
    if prob <= 0:
        return x
    boxes = cutmix_boxes(draws or x.shape[0], prob, generator, x.device)
    return apply_cutmix(x, boxes if rows is None else boxes[rows])


def cutmix_boxes(n: int, prob: float, generator, device) -> torch.Tensor:
    """(n, 4) float32 boxes of ``cutmix``: (side, centre y, centre x) as fractions of the image
    side, and 1.0 where the box is pasted (probability ``prob``) else 0.0."""
    side = torch.sqrt(torch.rand(n, generator=generator, device=device))  # box side / image side
    cy, cx = (torch.rand(n, generator=generator, device=device) for _ in range(2))
    apply = torch.rand(n, generator=generator, device=device) < prob
    return torch.stack([side, cy, cx, apply.float()], 1)


def apply_cutmix(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Paste, where ``boxes`` (from ``cutmix_boxes``) says so, the box of the next image of the batch."""
    height, width = x.shape[-2:]
    device = x.device
    side, cy, cx, apply = boxes.to(device).unbind(1)
    apply = apply > 0
    ys = (torch.arange(height, device=device) + 0.5) / height
    xs = (torch.arange(width, device=device) + 0.5) / width
    inside_y = (ys[None] - cy[:, None]).abs() <= side[:, None] / 2
    inside_x = (xs[None] - cx[:, None]).abs() <= side[:, None] / 2
    mask = (inside_y[:, :, None] & inside_x[:, None, :] & apply[:, None, None])[:, None]
    return torch.where(mask, x.roll(1, 0), x)
