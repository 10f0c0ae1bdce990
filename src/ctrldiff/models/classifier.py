"""A small CNN classifier for the 8x8 digits (rewards: log p(c | x); metrics: its features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CtrlDiffError
from .base import register_model


@register_model("digit-classifier")
class DigitClassifier(nn.Module):
    """logits = head(features(x)) for x [B, 1, R, R] in [-1, 1] (R = 8 native; other R are resized).

    conv(1->c) 8x8 -> conv(c->2c) -> maxpool 4x4 -> conv(2c->2c) -> global avg+max pool ->
    Linear(4c -> feature_dim) = the penultimate features -> Linear(feature_dim -> 10).
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.2,
                 resolution: int = 8):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim, num_classes=num_classes, dropout=dropout,
                           resolution=resolution)
        self.resolution, self.num_classes, self.feature_dim = resolution, num_classes, feature_dim
        c = width
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.SiLU(),
        )
        self.proj = nn.Sequential(nn.Linear(4 * c, feature_dim), nn.SiLU())
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def _prep(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise CtrlDiffError(f"digit classifier expects images of shape [batch, 1, H, W], got {tuple(x.shape)}")
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.resolution)
        return x

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [B, feature_dim] (for Frechet distance / diversity metrics)."""
        h = self.body(self._prep(x))
        h = torch.cat([h.mean((-2, -1)), h.amax((-2, -1))], 1)
        return self.proj(h)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, num_classes]."""
        return self.head(self.drop(self.features(x)))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """Predicted labels [B] (eval mode, batched)."""
        was = self.training
        self.eval()
        out = torch.cat([self(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])
        self.train(was)
        return out


def accuracy(classifier: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of images [N, 1, H, W] that ``classifier`` labels as ``labels`` [N]."""
    return float((classifier.predict(images) == labels.to(images.device)).float().mean())


@torch.no_grad()
def conditional_sample_accuracy(model: nn.Module, classifier: DigitClassifier, *, per_class: int = 100,
                                guidance: float = 2.0, solver: str = "em", steps: int = 50, seed: int = 0,
                                process=None, batch_size: int = 500, **solver_kw) -> float:
    """Sample ``per_class`` digits of each class from a class-conditional ``model`` (CFG ``guidance``)
    and return the fraction the classifier labels as the requested class."""
    from ..guidance import with_guidance
    from ..noise import make_process, process_from_config
    from ..solvers import sample

    if process is None:
        meta = getattr(model, "metadata", {}) or {}
        process = process_from_config(meta["process"]) if "process" in meta else make_process("vp")
    num_classes = int(getattr(model, "num_classes", 10))
    shape = (model.in_channels, model.resolution, model.resolution)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    guided = with_guidance(model.eval(), guidance)
    correct = 0
    for i in range(0, labels.numel(), batch_size):
        c = labels[i:i + batch_size]
        x = sample(guided, process, (c.numel(), *shape), steps, solver, cond=c, generator=gen, **solver_kw).final
        correct += int((classifier.predict(x.clamp(-1, 1)) == c).sum())
    return correct / labels.numel()
