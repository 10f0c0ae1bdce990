"""Model wrappers usable by every solver: classifier-free guidance, and a fine-tune that leaves the data end to its
reference."""

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


class ReferenceBelow(nn.Module):
    """The fine-tuned model at times above ``tau`` and its reference at and below it (``sampler.reference_data_end``):
    the fine-tune cannot change the last, largest step of its training grid, whose change a finer solver does not
    reward (docs/CTRL.md section 21). Times may differ per sample: each model is evaluated on its own samples (on the
    whole batch, then chosen per sample, where the condition is not a tensor)."""

    def __init__(self, model: nn.Module, ref: nn.Module, tau: float):
        super().__init__()
        self.model, self.tau = model, float(tau)
        self.__dict__["ref"] = ref  # not a submodule: its weights are not the fine-tune's
        self.prediction = getattr(model, "prediction", "eps")

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        above = t > self.tau
        n_above = int(above.sum())  # one device sync per call (a sampling step: all above or all below)
        if n_above == len(above):
            return self.model(x, t, cond)
        if n_above == 0:
            return self.ref(x, t, cond)
        if cond is None or isinstance(cond, Tensor):  # each model on its own samples
            pick = (lambda m: None) if cond is None else (lambda m: cond[m])
            out_model = self.model(x[above], t[above], pick(above))
            out = torch.empty((x.shape[0], *out_model.shape[1:]), dtype=out_model.dtype, device=out_model.device)
            out[above] = out_model
            out[~above] = self.ref(x[~above], t[~above], pick(~above)).to(out.dtype)
            return out
        out, out_ref = self.model(x, t, cond), self.ref(x, t, cond)
        return torch.where(above.reshape(-1, *([1] * (out.ndim - 1))), out, out_ref.to(out.dtype))


def with_reference_below(model: nn.Module, ref: nn.Module, tau: float | None) -> nn.Module:
    """``model`` used above time ``tau`` and ``ref`` at and below it (:class:`ReferenceBelow`); None: ``model``."""
    return model if tau is None else ReferenceBelow(model, ref, tau)
