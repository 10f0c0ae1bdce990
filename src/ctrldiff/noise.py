r"""Forward noise processes on t in [0, 1] (t = 0 data, t = 1 noise).

Every process is a linear SDE  dX_t = f(t) X_t dt + g(t) dW_t  with marginals
X_t = alpha_t X_0 + sigma_t eps.  Given alpha and sigma (and their time derivatives),
    f   = d log alpha / dt,
    g^2 = d sigma^2 / dt - 2 f sigma^2.
All parameterisations of a denoiser (eps, score, x0, v) are converted here, in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import choice

PREDICTIONS = ("eps", "score", "x0", "v")


def _bcast(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or [B] time-like tensor against x of shape [B, ...]."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


class NoiseProcess:
    """Interface: subclasses define log_alpha(t), sigma(t), f(t), g2(t) (t a float or tensor)."""

    name: str = "base"
    t_min: float = 1e-3  # sampling stops here (the data end)
    t_max: float = 1.0  # sampling starts here (the noise end)

    # ---- schedule -------------------------------------------------------------------------
    def log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def f(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def g2(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.g2(t))

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda_t = log(alpha_t / sigma_t), decreasing in t."""
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def prior_std(self) -> float:
        """Std of the Gaussian that sampling starts from at t_max."""
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def time_grid(self, steps: int, device=None, dtype=torch.float32) -> Tensor:
        """Uniform grid from t_max down to t_min with ``steps`` intervals ([steps + 1])."""
        return torch.linspace(self.t_max, self.t_min, steps + 1, device=device, dtype=dtype)

    # ---- marginals --------------------------------------------------------------------------
    def marginal(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sample x_t ~ N(alpha_t x0, sigma_t^2 I); returns (x_t, eps)."""
        eps = torch.randn_like(x0) if noise is None else noise
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * eps, eps

    # ---- parameterisations ------------------------------------------------------------------
    def convert(self, pred: Tensor, kind: str, to: str, t: Tensor, x: Tensor) -> Tensor:
        """Convert a denoiser output between 'eps', 'score', 'x0' and 'v' at (t, x)."""
        choice("prediction type", kind, PREDICTIONS)
        choice("prediction type", to, PREDICTIONS)
        if kind == to:
            return pred
        a, s = _bcast(self.alpha(t), x), _bcast(self.sigma(t), x)
        # to eps
        if kind == "eps":
            eps = pred
        elif kind == "score":
            eps = -s * pred
        elif kind == "x0":
            eps = (x - a * pred) / s
        else:  # v = alpha eps - sigma x0  (for alpha^2 + sigma^2 = 1; general form below)
            # x0 = (alpha x - sigma v) / (alpha^2 + sigma^2), eps = (sigma x + alpha v) / (alpha^2+sigma^2)
            eps = (s * x + a * pred) / (a * a + s * s)
        if to == "eps":
            return eps
        if to == "score":
            return -eps / s
        x0 = (x - s * eps) / a
        if to == "x0":
            return x0
        return a * eps - s * x0

    def tweedie_x0(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """x0_hat = (x + sigma_t^2 * score) / alpha_t."""
        a, s = _bcast(self.alpha(t), x), _bcast(self.sigma(t), x)
        return (x + s * s * score) / a

    def config(self) -> dict:
        return {"name": self.name}


@dataclass
class VPLinear(NoiseProcess):
    """VP SDE with beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    name: str = "vp"
    t_min: float = 1e-3
    t_max: float = 1.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t):
        t = torch.as_tensor(t)
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def f(self, t):
        return -0.5 * self.beta(torch.as_tensor(t))

    def g2(self, t):
        return self.beta(torch.as_tensor(t))

    def config(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


@dataclass
class VPCosine(NoiseProcess):
    """Cosine VP schedule (Nichol & Dhariwal 2021): alpha_t = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s)).

    Sampling starts at t_max < 1 where alpha is small but f and g stay finite.
    """

    s: float = 0.008
    name: str = "vp-cosine"
    t_min: float = 1e-3
    t_max: float = 0.995

    def _u(self, t):
        return 0.5 * math.pi * (torch.as_tensor(t) + self.s) / (1 + self.s)

    def log_alpha(self, t):
        return torch.log(torch.cos(self._u(t))) - math.log(math.cos(0.5 * math.pi * self.s / (1 + self.s)))

    def sigma(self, t):
        return torch.sqrt(torch.clamp(-torch.expm1(2.0 * self.log_alpha(t)), min=0.0))  # log_alpha(0) can round > 0

    def f(self, t):
        return -torch.tan(self._u(t)) * 0.5 * math.pi / (1 + self.s)

    def g2(self, t):
        return -2.0 * self.f(t)  # d sigma^2/dt - 2 f sigma^2 = -2 f (alpha^2 + sigma^2) = -2 f

    def config(self):
        return {"name": self.name, "s": self.s}


@dataclass
class RectifiedFlow(NoiseProcess):
    """Linear interpolant / rectified flow: alpha_t = 1 - t, sigma_t = t."""

    name: str = "rf"
    t_min: float = 1e-3
    t_max: float = 0.999

    def log_alpha(self, t):
        return torch.log1p(-torch.as_tensor(t))

    def alpha(self, t):
        return 1.0 - torch.as_tensor(t)

    def sigma(self, t):
        return torch.as_tensor(t) * 1.0

    def f(self, t):
        return -1.0 / (1.0 - torch.as_tensor(t))

    def g2(self, t):
        t = torch.as_tensor(t)
        return 2.0 * t + 2.0 * t * t / (1.0 - t)


PROCESSES = {"vp": VPLinear, "vp-cosine": VPCosine, "rf": RectifiedFlow}


def make_process(name: str = "vp", **kwargs) -> NoiseProcess:
    """Build a noise process by name ('vp', 'vp-cosine', 'rf')."""
    return PROCESSES[choice("noise process", name, PROCESSES)](**kwargs)


def process_from_config(cfg: dict) -> NoiseProcess:
    cfg = dict(cfg)
    return make_process(cfg.pop("name"), **cfg)
