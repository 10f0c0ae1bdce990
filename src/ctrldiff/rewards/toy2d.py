r"""Analytic, differentiable rewards on R^2 for the exact 2-D yardstick (METHODS sections 6 and 7).

Each factory returns a batched callable ``reward(x [N, 2], cond=None) -> [N]`` (same dtype as x) with
attributes ``name``, ``differentiable = True`` and ``config`` (the factory's arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import CtrlDiffError, check, choice


class Toy2DReward:
    """A closed-form reward r(x) on points x [N, 2]; the condition is ignored."""

    differentiable = True

    def __init__(self, name: str, fn: Callable[[Tensor], Tensor], **config):
        self.name, self._fn, self.config = name, fn, {"name": name, **config}

    def __call__(self, x: Tensor, cond=None) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != 2:
            raise CtrlDiffError(f"reward {self.name!r} expects points of shape [N, 2], got {tuple(getattr(x, 'shape', ()))}")
        return self._fn(x)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "name")
        return f"{self.name}({args})"


def _vec(v: Sequence[float], x: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=x.dtype, device=x.device)


def linear(weights: Sequence[float] = (1.0, 0.0)) -> Toy2DReward:
    """r(x) = w . x (unbounded). For a Gaussian p_ref = N(m, s^2 I) the target is closed form:
    p* = N(m + s^2 w / beta, s^2 I) and J* = w.m + s^2 ||w||^2 / (2 beta)."""
    w = [float(v) for v in weights]
    check(len(w) == 2, f"linear reward needs 2 weights, got {len(w)}")
    return Toy2DReward("linear", lambda x: x @ _vec(w, x), weights=w)


def quadratic(center: Sequence[float] = (0.0, 2.0), scale: float = 1.0) -> Toy2DReward:
    """r(x) = -||x - c||^2 / scale: unimodal, pulls mass towards the point c."""
    c = [float(v) for v in center]
    check(len(c) == 2 and scale > 0, f"quadratic reward needs a 2-D center and scale > 0, got {c}, {scale}")
    return Toy2DReward("quadratic", lambda x: -(x - _vec(c, x)).pow(2).sum(1) / scale, center=c, scale=float(scale))


def mode_switch(strength: float = 2.0, sharpness: float = 1.0) -> Toy2DReward:
    """r(x) = strength * sigmoid(2 sharpness x_0) = strength (1 + tanh(sharpness x_0)) / 2, in [0, strength].

    A logistic step that favours the right half plane. On the 'gmm2' preset (weight 0.7 at x_0 = -2, 0.3
    at x_0 = +2) p* puts more mass on the smaller right mode once strength / beta > ~0.9 (about 74% at
    strength / beta = 2): mass moves between modes. r >= 0, so J* >= E_ref r > 0 and the relative
    optimality gap is well defined.
    """
    check(sharpness > 0, f"mode_switch sharpness must be > 0, got {sharpness}")
    return Toy2DReward("mode_switch", lambda x: strength * torch.sigmoid(2 * sharpness * x[:, 0]),
                       strength=float(strength), sharpness=float(sharpness))


def ring(radius: float = 2.0, width: float = 0.5, center: Sequence[float] = (0.0, 0.0)) -> Toy2DReward:
    """r(x) = -(||x - c|| - radius)^2 / (2 width^2): favours a circle of the given radius."""
    c = [float(v) for v in center]
    check(radius >= 0 and width > 0, f"ring reward needs radius >= 0 and width > 0, got {radius}, {width}")

    def fn(x: Tensor) -> Tensor:
        rad = (x - _vec(c, x)).pow(2).sum(1).add(1e-12).sqrt()  # eps keeps the gradient finite at the center
        return -(rad - radius).pow(2) / (2 * width * width)

    return Toy2DReward("ring", fn, radius=float(radius), width=float(width), center=c)


TOY2D_REWARDS: dict[str, Callable[..., Toy2DReward]] = {
    "linear": linear, "quadratic": quadratic, "mode_switch": mode_switch, "ring": ring,
}


def make_toy2d_reward(name: str, **kwargs) -> Toy2DReward:
    """Build a 2-D analytic reward by name ('linear', 'quadratic', 'mode_switch', 'ring')."""
    return TOY2D_REWARDS[choice("2-D reward", name, TOY2D_REWARDS)](**kwargs)
