"""Built-in, download-free rewards: digit-classifier alignment / correctness, JPEG (in)compressibility,
and the analytic 2-D rewards. Importing this module loads no model: classifiers load on first call."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import CtrlDiffError
from .base import register_reward


def to_uint8_images(x: Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 array [B, H, W, C]."""
    if x.ndim != 4:
        raise CtrlDiffError(f"image rewards expect a batch of images [B, C, H, W], got shape {tuple(x.shape)}")
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_sizes_kb(x: Tensor, quality: int = 95) -> Tensor:
    """Size in kB of each image saved as JPEG at ``quality`` -> [B]."""
    sizes = []
    for img in to_uint8_images(x):
        buf = io.BytesIO()
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        pil.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=x.device)


class JpegReward:
    """JPEG compressibility (-size in kB) or incompressibility (+size); not differentiable."""

    differentiable = False

    def __init__(self, sign: float, quality: int = 95):
        self.sign, self.quality = sign, quality
        self.name = "jpeg-compressibility" if sign < 0 else "jpeg-incompressibility"

    def __call__(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.sign * jpeg_sizes_kb(x, self.quality)


@register_reward("jpeg-compressibility")
def jpeg_compressibility(quality: int = 95, **_) -> JpegReward:
    return JpegReward(-1.0, quality)


@register_reward("jpeg-incompressibility")
def jpeg_incompressibility(quality: int = 95, **_) -> JpegReward:
    return JpegReward(+1.0, quality)


class DigitReward:
    """Rewards from the shipped digit classifier, for the conditioned label c.

    mode 'alignment': log p(c | x) (differentiable);  mode 'correct': 1[argmax p(. | x) = c] (not);
    mode 'confidence': the log-odds log p(c | x) - log(1 - p(c | x)) = logit_c - logsumexp_{c' != c} logit_c'
    (differentiable and unbounded: unlike log p(c | x), which a good sampler already saturates at 0, it keeps
    headroom in continuous time).
    """

    def __init__(self, mode: str, classifier=None):
        self.mode = mode
        self.name = f"digit-{mode}"
        self.differentiable = mode != "correct"
        self._clf = classifier

    @property
    def classifier(self):
        if self._clf is None:
            from ..assets import load_digit_classifier

            self._clf = load_digit_classifier()
            self._clf.requires_grad_(False)
        return self._clf

    def __call__(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise CtrlDiffError(f"reward {self.name!r} needs the conditioned digit label for each sample")
        if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
            raise CtrlDiffError(f"reward {self.name!r} expects digits of shape [B, 1, 8, 8], got {tuple(x.shape)}")
        clf = self.classifier.to(x.device)
        logp = torch.log_softmax(clf(x), dim=-1)
        if self.mode == "alignment":
            return logp.gather(1, cond.long()[:, None])[:, 0]
        if self.mode == "confidence":
            mine = torch.nn.functional.one_hot(cond.long(), logp.shape[-1]).bool()
            return logp[mine] - logp.masked_fill(mine, float("-inf")).logsumexp(-1)
        return (logp.argmax(-1) == cond).float()


@register_reward("digit-alignment")
def digit_alignment(classifier=None, **_) -> DigitReward:
    return DigitReward("alignment", classifier)


@register_reward("digit-confidence")
def digit_confidence(classifier=None, **_) -> DigitReward:
    return DigitReward("confidence", classifier)


@register_reward("digit-correct")
def digit_correct(classifier=None, **_) -> DigitReward:
    return DigitReward("correct", classifier)


def _register_toy2d() -> None:
    from .toy2d import TOY2D_REWARDS

    for name, factory in TOY2D_REWARDS.items():
        register_reward("toy2d-" + name.replace("_", "-"))(factory)


_register_toy2d()
