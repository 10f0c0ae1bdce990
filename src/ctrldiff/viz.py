"""Pictures: image grids, 2-D scatter plots and training curves (matplotlib's Agg backend, no display)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def image_grid(x: Tensor, nrow: int | None = None, pad: int = 1, scale: int = 4) -> Image.Image:
    """[N, C, H, W] in [-1, 1] -> a PIL grid image (nearest-neighbour upscaled by ``scale``)."""
    x = x.detach().float().clamp(-1, 1).cpu()
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad, device="cpu")
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_image_grid(x: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(x, nrow).save(path)
    return path


def save_samples_figure(x: Tensor, path: str | Path, nrow: int | None = None, title: str | None = None) -> Path:
    """Image grid for image data, scatter plot for 2-D data."""
    if x.ndim == 4:
        return save_image_grid(x, path, nrow)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    pts = x.detach().cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def side_by_side(before: Tensor, after: Tensor, path: str | Path, nrow: int | None = None,
                 labels=("before", "after")) -> Path:
    """Before/after figure: two grids (images) or two scatter panels (2-D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, x, lab in zip(axes, (before, after), labels, strict=True):
        if x.ndim == 4:
            ax.imshow(np.asarray(image_grid(x, nrow, scale=1)), cmap="gray", interpolation="nearest")
            ax.axis("off")
        else:
            pts = x.detach().cpu().numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
            ax.set_aspect("equal")
        ax.set_title(lab)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_curves(records: list[dict], keys: list[str], path: str | Path, x_key: str = "epoch",
                title: str | None = None) -> Path:
    """One panel per key from a list of metric records (e.g. metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=False):
        xs = [r[x_key] for r in records if k in r]
        ax.plot(xs, [r[k] for r in records if k in r], marker=".")
        ax.set_xlabel(x_key)
        ax.set_title(k)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
