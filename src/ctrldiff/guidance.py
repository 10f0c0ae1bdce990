"""Classifier-free guidance as a model wrapper usable by every solver."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import CtrlDiffError


class ClassifierFreeGuidance(nn.Module):
    """out = out_uncond + scale * (out_cond - out_uncond).

    scale = 1 is the plain conditional model, 0 the unconditional one. The wrapped model must
    provide ``null_condition(cond)`` (the "no condition" token used in condition dropout). Both
    branches run in one batched call. Every parameterisation (eps, score, x0, v) is affine in the
    output at fixed (t, x), so guiding the raw output is the same as guiding eps.
    """

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        self.prediction = getattr(model, "prediction", "eps")

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        if cond is None or self.scale == 1.0:
            return self.model(x, t, cond)
        null = self.model.null_condition(cond)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
        c, u = out.chunk(2)
        return u + self.scale * (c - u)


def with_guidance(model: nn.Module, scale: float | None) -> nn.Module:
    """Wrap ``model`` in CFG unless scale is None or 1. A model with a ``cfg_unsupported`` message (guidance-distilled
    FLUX.1) raises it as a one-line error."""
    if scale is None or float(scale) == 1.0:
        return model
    why = getattr(model, "cfg_unsupported", None)
    if why:
        raise CtrlDiffError(why)
    return ClassifierFreeGuidance(model, scale)
