"""Image rewards that no default of ctrldiff was tuned on, for benchmarks/ctrl_promises.py: centering, crispness and
left_heavy (the grid's), and thickness, symmetry and hollow (the 60-epoch check of docs/CTRL.md section 16). Each was
written after the defaults it checks were chosen, and nothing else uses them.

Digits are [B, 1, 8, 8] in [-1, 1] (-1 = background); ink = (x + 1) / 2.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _ink(x: Tensor) -> Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def centering(x: Tensor, cond: Tensor | None = None) -> Tensor:
    """Differentiable: minus the squared distance (in pixels) of the ink's centre of mass from the image centre."""
    ink = torch.sigmoid(3 * x)  # smooth ink, so that the reward has a gradient everywhere
    h, w = x.shape[-2:]
    ys = torch.arange(h, dtype=x.dtype, device=x.device) - (h - 1) / 2
    xs = torch.arange(w, dtype=x.dtype, device=x.device) - (w - 1) / 2
    m = ink.sum((1, 2, 3)) + 1e-3
    cy = (ink.sum((1, 3)) * ys).sum(-1) / m
    cx = (ink.sum((1, 2)) * xs).sum(-1) / m
    return -(cy ** 2 + cx ** 2)


centering.differentiable = True


def crispness(x: Tensor, cond: Tensor | None = None) -> Tensor:
    """Differentiable: mean over pixels of min(x^2, 1) (1 = every pixel fully ink or fully background)."""
    return x.pow(2).clamp(max=1).flatten(1).mean(1)


crispness.differentiable = True


def left_heavy(x: Tensor, cond: Tensor | None = None) -> Tensor:
    """Black box, 0/1: 1 if the left half of the image holds more ink than the right half."""
    ink = _ink(x)[:, 0]
    w = ink.shape[-1] // 2
    return (ink[..., :w].sum((1, 2)) > ink[..., w:].sum((1, 2))).to(x.dtype)


left_heavy.differentiable = False


# ---- written on December 6, after every default of sections 1-15 of docs/CTRL.md was fixed (the 60-epoch check) ----
def thickness(x: Tensor, cond: Tensor | None = None) -> Tensor:
    """Differentiable: the mean smooth ink per pixel (thicker strokes, more ink)."""
    return torch.sigmoid(3 * x).flatten(1).mean(1)


thickness.differentiable = True


def symmetry(x: Tensor, cond: Tensor | None = None) -> Tensor:
    """Differentiable: minus the mean squared difference between the image and its left-right mirror image."""
    return -(x - x.flip(-1)).pow(2).flatten(1).mean(1)


symmetry.differentiable = True


def hollow(x: Tensor, cond: Tensor | None = None) -> Tensor:
    """Black box, 0/1: 1 if none of the four central pixels holds more than half ink."""
    h, w = x.shape[-2:]
    centre = _ink(x)[:, 0, h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1]
    return (centre.flatten(1).max(1).values <= 0.5).to(x.dtype)


hollow.differentiable = False
