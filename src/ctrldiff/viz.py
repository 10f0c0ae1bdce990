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


def _columns(conditions: list[str] | None, n: int, max_columns: int, per_column: int) -> list[tuple[str, list[int]]]:
    """Sample indices grouped into columns: one per condition (first ``max_columns`` in order of appearance), or
    for unconditional samples ``max_columns`` columns filled in turn; at most ``per_column`` samples each."""
    cols: dict[str, list[int]] = {}
    for i in range(n):
        key = conditions[i] if conditions is not None else str(i % max_columns)
        if key not in cols and len(cols) >= max_columns:
            continue
        if len(cols.setdefault(key, [])) < per_column:
            cols[key].append(i)
    return list(cols.items())


def _nanmean(a) -> float:
    """Mean of the finite entries (NaN, and no warning, when there are none: a skipped reward batch)."""
    a = np.asarray(a, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _fmt_r(v: float) -> str:
    """A reward as shown under a sample (2 decimals, no '-0.00')."""
    if not np.isfinite(v):
        return "n/a"
    text = f"{v:.2f}"
    return "0.00" if text == "-0.00" else text


def _to_image(x: Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> [H, W] (gray) or [H, W, 3] in [0, 1]."""
    a = ((x.detach().float().clamp(-1, 1) + 1) / 2).cpu().numpy()
    return a[0] if a.shape[0] == 1 else np.transpose(a[:3], (1, 2, 0))


def before_after_figure(before: Tensor, after: Tensor, r_before: Tensor, r_after: Tensor, path: str | Path, *,
                        conditions: list[str] | None = None, reward_name: str = "reward",
                        after_label: str = "after fine-tuning", max_columns: int = 10, per_column: int = 4) -> Path:
    """The picture of a fine-tuning run: samples of the reference (top block) and of the tuned model (bottom block)
    drawn from the SAME noise, so each after-sample sits below its own before-sample position; one column per
    condition (class label / prompt), labelled; under every sample its reward, the after-reward in green when it is
    higher than the same noise's before-reward, red when lower. 2-D data: two scatter panels coloured by reward.
    Also writes ``path`` with suffix .json: the conditions and per-sample rewards (read by ``ctrldiff report``).

    before, after: [N, C, H, W] in [-1, 1] or [N, 2]; r_before, r_after: [N]; conditions: N labels or None."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rb, ra = r_before.detach().float().cpu().numpy(), r_after.detach().float().cpu().numpy()
    n = len(rb)
    better = int(sum(_fmt_r(a) != _fmt_r(b) and a > b for a, b in zip(ra, rb, strict=True)))
    summary = (f"reward {reward_name}: mean {_nanmean(rb):.3f} before -> {_nanmean(ra):.3f} after; "
               f"higher after for {better} of {n} noise draws")
    if before.ndim == 4:
        cols = _columns(conditions, n, max_columns, per_column)
        nrows = max(len(ix) for _, ix in cols)
        ncol = len(cols)
        cell = 1.25 if before.shape[-1] <= 64 else 1.9
        fig = plt.figure(figsize=(1.2 + cell * ncol, 1.3 + 2 * nrows * cell + 0.35))
        gs = fig.add_gridspec(2 * nrows + 1, ncol, height_ratios=[1] * nrows + [0.05] + [1] * nrows, hspace=0.45,
                              wspace=0.08, left=1.1 / (1.2 + cell * ncol), right=0.99, top=1 - 1.05 / fig.get_figheight(),
                              bottom=0.02)
        for j, (name, ix) in enumerate(cols):
            for row in range(nrows):
                for block, (x, r) in enumerate(((before, rb), (after, ra))):
                    ax = fig.add_subplot(gs[row + block * (nrows + 1), j])
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if row >= len(ix):
                        ax.axis("off")
                        continue
                    i = ix[row]
                    img = _to_image(x[i])
                    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
                    color = "black"
                    if block == 1 and _fmt_r(ra[i]) != _fmt_r(rb[i]) and np.isfinite(ra[i]) and np.isfinite(rb[i]):
                        color = "#1a7f37" if ra[i] > rb[i] else "#cf222e"
                        for sp in ax.spines.values():
                            sp.set_edgecolor(color)
                            sp.set_linewidth(2)
                    ax.set_xlabel(f"r {_fmt_r(r[i])}", fontsize=9, color=color, labelpad=1)
                    if row == 0 and block == 0:
                        label = name if len(name) <= 22 else name[:20] + "..."
                        ax.set_title(label if conditions is not None else "", fontsize=10, fontweight="bold")
        top = 1 - 1.05 / fig.get_figheight()
        mid = 0.02 + (top - 0.02) * (nrows + 0.025) / (2 * nrows + 0.05)  # between the blocks
        fig.text(0.01, (top + mid) / 2 + 0.0, "before\n(reference)", fontsize=11, fontweight="bold", va="center")
        words, lines = after_label.split(), [""]
        for w in words:  # wrap the row label into the left margin
            lines[-1:] = [f"{lines[-1]} {w}".strip()] if len(lines[-1]) + len(w) < 11 else [lines[-1], w]
        fig.text(0.01, (mid + 0.02) / 2, "\n".join(lines), fontsize=11, fontweight="bold", va="center")
        fig.suptitle("Same noise, before and after fine-tuning" + (" (columns: condition)" if conditions else "")
                     + f"\n{summary}\nunder each sample: its reward; after: green = higher, red = lower than before",
                     fontsize=10, y=1 - 0.08 / fig.get_figheight(), va="top")
        fig.savefig(path, dpi=100)
        shown = [(name, ix) for name, ix in cols]
    else:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), sharex=True, sharey=True)
        pts = [before.detach().cpu().numpy(), after.detach().cpu().numpy()]
        finite = np.concatenate([rb, ra])[np.isfinite(np.concatenate([rb, ra]))]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (None, None)
        for ax, p, r, lab in zip(axes, pts, (rb, ra), ("before (reference)", after_label), strict=True):
            sc = ax.scatter(p[:, 0], p[:, 1], c=r, s=5, cmap="viridis", vmin=lo, vmax=hi)
            ax.set_aspect("equal")
            ax.set_title(f"{lab}\nmean reward {_nanmean(r):.3f}", fontsize=10)
        fig.colorbar(sc, ax=list(axes), label=f"reward {reward_name}", shrink=0.85)
        fig.suptitle(f"Same noise, before and after fine-tuning; colour: reward per sample\n{summary}", fontsize=10)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        shown = [("all", list(range(n)))]
    plt.close(fig)

    def num(v) -> float | None:
        return float(v) if np.isfinite(v) else None

    doc = {"reward": reward_name, "n": n, "higher_after": better, "reward_before": [num(v) for v in rb],
           "reward_after": [num(v) for v in ra], "conditions": conditions,
           "columns": [{"condition": name, "samples": ix, "mean_before": num(_nanmean(rb[ix])),
                        "mean_after": num(_nanmean(ra[ix]))} for name, ix in shown]}
    path.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    return path


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
