r"""Value networks with the diffusion model's structure (METHODS section 1).

    V(t, x, c) = w(t) R(x0_hat(t, x), c) + (1 - w(t)) U_phi(t, x, x0_hat, c),   w(t) = cos(pi t / 2)

w(0) = 1 makes V(0, x) = R(x) exactly at the clean end; R is the true reward (when it is cheap and
differentiable) or a learned surrogate R_psi fitted to observed (x_final, r) pairs. U_phi sees the
Tweedie prediction x0_hat as an input too. The same small networks serve as the reward surrogate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..models.base import TimeEmbedding


def value_weight(t: Tensor) -> Tensor:
    """w(t) = cos(pi t / 2): 1 at the data end (t = 0), 0 at the noise end (t = 1)."""
    return torch.cos(0.5 * math.pi * t.clamp(0, 1))


class VectorHead(nn.Module):
    """Scalar network f(x [, x0_hat], t, c) for x of shape [B, dim]."""

    def __init__(self, dim: int, hidden: int = 128, num_classes: int = 0, with_x0: bool = True,
                 use_time: bool = True):
        super().__init__()
        self.with_x0, self.use_time = with_x0, use_time
        self.inp = nn.Linear(dim * (2 if with_x0 else 1), hidden)
        self.temb = TimeEmbedding(hidden) if use_time else None
        self.cemb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor, t: Tensor | None = None, cond: Tensor | None = None,
                x0: Tensor | None = None) -> Tensor:
        h = self.inp(torch.cat([x, x0], 1) if self.with_x0 else x)
        if self.temb is not None:
            h = h + self.temb(t)
        if self.cemb is not None and cond is not None:
            h = h + self.cemb(cond.long())
        return self.net(h)[:, 0]


class ImageHead(nn.Module):
    """Scalar network f(x [, x0_hat], t, c) for images [B, C, H, W]: a small CNN + pooled MLP."""

    def __init__(self, channels: int, hidden: int = 32, num_classes: int = 0, with_x0: bool = True,
                 use_time: bool = True):
        super().__init__()
        self.with_x0, self.use_time = with_x0, use_time
        c_in = channels * (2 if with_x0 else 1)
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(hidden, 2 * hidden, 3, padding=1), nn.SiLU(),
        )
        self.temb = TimeEmbedding(2 * hidden) if use_time else None
        self.cemb = nn.Embedding(num_classes + 1, 2 * hidden) if num_classes else None
        self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, 1))

    def forward(self, x: Tensor, t: Tensor | None = None, cond: Tensor | None = None,
                x0: Tensor | None = None) -> Tensor:
        h = self.conv(torch.cat([x, x0], 1) if self.with_x0 else x).mean((2, 3))
        if self.temb is not None:
            h = h + self.temb(t)
        if self.cemb is not None and cond is not None:
            h = h + self.cemb(cond.long())
        return self.head(h)[:, 0]


def make_head(sample_shape: tuple[int, ...], num_classes: int = 0, with_x0: bool = True, use_time: bool = True,
              hidden: int | None = None) -> nn.Module:
    """A scalar head for data of ``sample_shape`` (vectors -> MLP, images -> CNN).

    The last layer starts at zero: an unfitted head has grad_x = 0 (no random push on the policy)."""
    if len(sample_shape) == 1:
        head = VectorHead(sample_shape[0], hidden or 128, num_classes, with_x0, use_time)
        last = head.net[-1]
    else:
        head = ImageHead(sample_shape[0], hidden or 32, num_classes, with_x0, use_time)
        last = head.head[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return head


class RewardSurrogate(nn.Module):
    """R_psi(x, c): a learned, differentiable stand-in for the reward, fitted by regression on observed
    (x_final, r) pairs. Used inside V when the true reward is expensive, rationed or not differentiable."""

    differentiable = True

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        self.net = make_head(sample_shape, num_classes, with_x0=False, use_time=False)
        self.name = "surrogate"

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.net(x, None, cond)


class StructuredValue(nn.Module):
    """V(t, x, c) = w(t) R(x0_hat) + (1 - w(t)) U_phi(t, x, x0_hat, c)  (see module docstring).

    ``reward_fn`` is the R term (a differentiable callable ``(x, cond) -> [B]``, or None for V = U_phi).
    """

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int = 0, use_tweedie_reward: bool = True,
                 u_sees_x0: bool = True):
        super().__init__()
        self.u = make_head(sample_shape, num_classes, with_x0=u_sees_x0)
        self.use_tweedie_reward = use_tweedie_reward

    def forward(self, t: Tensor, x: Tensor, x0_hat: Tensor, cond: Tensor | None, reward_fn) -> Tensor:
        u = self.u(x, t, cond, x0_hat)
        if not self.use_tweedie_reward or reward_fn is None:
            return u
        w = value_weight(t)
        return w * reward_fn(x0_hat, cond) + (1 - w) * u
