"""MLP denoiser for low-dimensional data (2-D benchmarks), optionally class-conditional."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import CtrlDiffError
from .base import ConditionalMixin, TimeEmbedding, register_model


@register_model("mlp")
class MLPScoreModel(ConditionalMixin, nn.Module):
    """eps_theta(x, t, c) for x of shape [B, dim].

    ``zero_init`` makes the output layer zero, so the model starts at eps = 0 (used for the
    residual on top of an exact score in the 2-D yardstick).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_classes: int = 0,
                 prediction: str = "eps", zero_init: bool = False):
        super().__init__()
        self.config = dict(dim=dim, hidden=hidden, depth=depth, num_classes=num_classes,
                           prediction=prediction, zero_init=zero_init)
        self.dim, self.num_classes, self.prediction = dim, num_classes, prediction
        self.temb = TimeEmbedding(hidden)
        self.cemb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))
        if zero_init:
            nn.init.zeros_(self.out[1].weight)
            nn.init.zeros_(self.out[1].bias)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise CtrlDiffError(f"MLP model expects input of shape [batch, {self.dim}], got {tuple(x.shape)}")
        h = self.inp(x) + self.temb(t)
        c = self._cond_or_null(cond, x.shape[0], x.device)
        if c is not None:
            h = h + self.cemb(c)
        for blk in self.blocks:
            h = h + blk(h)
        return self.out(h)


class ExactGMMScore(nn.Module):
    """The exact eps (or flow velocity) of a Gaussian mixture's noised marginal, plus an optional trainable residual.

    prediction 'eps': eps(x, t) = -sigma_t * grad log p_t(x) + residual(x, t);
    prediction 'v' (rectified flow): v(x, t) = E[eps - x0 | x_t = x] + residual(x, t) (closed form, finite at t = 1).
    With a zero-initialised residual this is the 'pretrained model' of the exact 2-D yardstick (METHODS section 7):
    fine-tuning starts at the true score, so p_ref = the mixture and p*, J* are exact by quadrature.
    """

    def __init__(self, gmm, process, residual: nn.Module | None = None, prediction: str = "eps"):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise CtrlDiffError(f"exact GMM model predicts 'eps' or 'v', got {prediction!r}")
        self.gmm, self.process, self.residual, self.prediction = gmm, process, residual, prediction

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        if self.prediction == "v":
            out = self.gmm.velocity(x, t, self.process)
        else:
            out = -self.process.sigma(t.double())[:, None].to(x.dtype) * self.gmm.score(x, t, self.process)
        if self.residual is not None:
            out = out + self.residual(x, t, cond)
        return out
