"""The scikit-learn 8x8 digits (1,797 images, shipped inside scikit-learn: no download).

Pixels 0..16 are scaled to [-1, 1]:  x = v / 8 - 1.  Images have shape [N, 1, R, R] with R = 8
(native, the default: the data hold 64 pixels of information, so upsampling only adds compute)
or R = 16 (bilinear upsampling, for users who want a larger canvas). Labels are long [N].

One fixed, seeded, stratified split (1,497 train / 300 held out) is shared by the pretraining,
the classifier and every metric, so no model is ever scored on images it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CtrlDiffError, check

NUM_CLASSES = 10
NATIVE_RESOLUTION = 8
RESOLUTIONS = (8, 16)
HELD_OUT = 300
SPLIT_SEED = 0
SPLITS = ("train", "test", "all")


@dataclass
class DigitsData:
    """images [N, 1, R, R] in [-1, 1] (float32) and labels [N] (long, 0..9)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=1)
def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train_idx [1497], test_idx [300]): a stratified split with a fixed seed."""
    from sklearn.model_selection import train_test_split

    _, y = _raw()
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=HELD_OUT, random_state=SPLIT_SEED, stratify=y)
    return np.sort(tr), np.sort(te)


def to_model_space(pixels: Tensor) -> Tensor:
    """Pixel values 0..16 -> [-1, 1]."""
    return pixels / 8.0 - 1.0


def upsample(x: Tensor, resolution: int) -> Tensor:
    """Bilinear resize of [N, C, H, W] to resolution x resolution (identity if already there)."""
    if x.shape[-1] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)


def load_digits(split: str = "train", resolution: int = NATIVE_RESOLUTION) -> DigitsData:
    """The digits of ``split`` ('train' 1,497, 'test' 300 held out, 'all' 1,797) at ``resolution``."""
    if split not in SPLITS:
        raise CtrlDiffError(f"unknown digits split {split!r}; choose one of: {', '.join(SPLITS)}")
    check(resolution in RESOLUTIONS, f"digits resolution must be one of {RESOLUTIONS}, got {resolution}")
    imgs, y = _raw()
    tr, te = split_indices()
    idx = {"train": tr, "test": te, "all": np.arange(len(y))}[split]
    x = to_model_space(torch.from_numpy(imgs[idx]))[:, None]
    return DigitsData(upsample(x, resolution).contiguous(), torch.from_numpy(y[idx]))


def to_native(x: Tensor) -> Tensor:
    """Model samples [N, 1, R, R] (any R) -> [N, 1, 8, 8] (area downsampling), clamped to [-1, 1]."""
    check(x.ndim == 4 and x.shape[1] == 1, f"digit samples must have shape [N, 1, H, W], got {tuple(x.shape)}")
    if x.shape[-1] != NATIVE_RESOLUTION:
        x = F.adaptive_avg_pool2d(x, NATIVE_RESOLUTION)
    return x.clamp(-1.0, 1.0)


def to_uint8(x: Tensor) -> Tensor:
    """Model-space images [N, C, H, W] in [-1, 1] -> uint8 [N, C, H, W] in 0..255 (clamped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pixels(x: Tensor) -> Tensor:
    """Model-space images -> the data set's own pixel scale 0..16 (float, clamped)."""
    return (x.detach().float().clamp(-1, 1) + 1.0) * 8.0


def make_grid(x: Tensor, nrow: int = 10, pad: int = 1, upscale: int = 4) -> Tensor:
    """Tile [N, C, H, W] images in [-1, 1] into one uint8 image [H', W'] (C = 1) for viewing.

    Each image is enlarged ``upscale`` times with nearest-neighbour (8x8 digits are tiny)."""
    check(x.ndim == 4 and x.shape[1] == 1, f"grid expects images of shape [N, 1, H, W], got {tuple(x.shape)}")
    img = to_uint8(x)[:, 0]
    n, h, w = img.shape
    nrow = max(1, min(nrow, n))
    ncol = (n + nrow - 1) // nrow
    grid = torch.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=torch.uint8)
    grid.fill_(64)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img[i]
    if upscale > 1:
        grid = grid.repeat_interleave(upscale, 0).repeat_interleave(upscale, 1)
    return grid


def save_grid(x: Tensor, path: str | Path, nrow: int = 10, upscale: int = 4) -> Path:
    """Write :func:`make_grid` of ``x`` [N, 1, H, W] as a PNG; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(x, nrow, upscale=upscale).numpy()).save(path)
    return path
