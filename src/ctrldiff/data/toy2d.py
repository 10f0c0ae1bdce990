r"""2-D data sets. Gaussian mixtures come with the exact score of every noised marginal.

For p_0 = sum_k w_k N(mu_k, Sigma_k) and X_t = alpha_t X_0 + sigma_t eps,
p_t = sum_k w_k N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I), whose score is closed form:
    grad log p_t(x) = sum_k r_k(x) C_k^{-1} (alpha_t mu_k - x),  r_k = posterior responsibility.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import CtrlDiffError, choice
from ..noise import NoiseProcess


class GaussianMixture:
    """A mixture of Gaussians in d dimensions with isotropic components (std per component)."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k, _ = self.means.shape
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise CtrlDiffError("mixture weights must be non-negative and not all zero")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[idx] + self.stds[idx, None] * z).float()

    def _components(self, x: Tensor, t, process: NoiseProcess | None):
        """diff [N, K, d] = alpha_t mu_k - x, var [N|1, K] = alpha_t^2 s_k^2 + sigma_t^2, log w [K] (float64)."""
        x64 = x.double()
        if process is None or t is None:
            a, s = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        else:
            t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
            a, s = process.alpha(t), process.sigma(t)
        a, s = a.to(x.device).reshape(-1, 1), s.to(x.device).reshape(-1, 1)  # [N|1, 1]
        means, stds = self.means.to(x.device), self.stds.to(x.device)
        var = a**2 * stds**2 + s**2
        diff = a[..., None] * means[None] - x64[:, None, :]
        return diff, var, torch.log(self.weights.to(x.device))

    def log_prob(self, x: Tensor, t=None, process: NoiseProcess | None = None) -> Tensor:
        """log p_t(x) for x [N, d]; t scalar or [N] (None: the data distribution)."""
        diff, var, logw = self._components(x, t, process)
        lp = -0.5 * diff.pow(2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.logsumexp(lp + logw, dim=1).to(x.dtype)

    def score(self, x: Tensor, t=None, process: NoiseProcess | None = None) -> Tensor:
        """Exact grad_x log p_t(x) for x [N, d] (t scalar or [N]), closed form and differentiable in x:
        sum_k r_k(x) (alpha_t mu_k - x) / v_k,  v_k = alpha_t^2 s_k^2 + sigma_t^2,  r = responsibilities."""
        diff, var, logw = self._components(x, t, process)
        logits = -0.5 * diff.pow(2).sum(-1) / var - 0.5 * self.dim * torch.log(var) + logw
        resp = torch.softmax(logits, dim=1)
        return (resp[..., None] * diff / var[..., None]).sum(1).to(x.dtype)


    def velocity(self, x: Tensor, t, process: NoiseProcess) -> Tensor:
        """Exact flow velocity E[eps - x0 | x_t = x] for x [N, d] (t scalar or [N]), closed form at every t in
        [0, 1] (no division by alpha or sigma): per component E[eps | x, k] = sigma (x - alpha mu_k) / v_k and
        E[x0 | x, k] = mu_k + alpha s_k^2 (x - alpha mu_k) / v_k, so
            v(x, t) = sum_k r_k(x) [ (sigma - alpha s_k^2) (x - alpha mu_k) / v_k - mu_k ]."""
        diff, var, logw = self._components(x, t, process)
        logits = -0.5 * diff.pow(2).sum(-1) / var - 0.5 * self.dim * torch.log(var) + logw
        resp = torch.softmax(logits, dim=1)
        tt = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        a, s = process.alpha(tt).reshape(-1, 1), process.sigma(tt).reshape(-1, 1)  # [N|1, 1]
        coef = (s - a * self.stds.to(x.device) ** 2) / var  # [N|1, K]
        per = -coef[..., None] * diff - self.means.to(x.device)[None]  # [N, K, d]
        return (resp[..., None] * per).sum(1).to(x.dtype)


EXACT_FLOW_TAG = "-rf"


def parse_exact_spec(spec: str) -> tuple[str, bool] | None:
    """'<preset>-exact' -> (preset, False); '<preset>-rf-exact' (the rectified-flow yardstick: exact velocity, process
    'rf') -> (preset, True); anything else -> None."""
    if not spec.endswith("-exact"):
        return None
    name = spec.removesuffix("-exact")
    flow = name.endswith(EXACT_FLOW_TAG)
    return name.removesuffix(EXACT_FLOW_TAG) if flow else name, flow


def _ring_means(k: int, radius: float) -> list[list[float]]:
    return [[radius * math.cos(2 * math.pi * i / k), radius * math.sin(2 * math.pi * i / k)] for i in range(k)]


def gmm_preset(name: str) -> GaussianMixture:
    """Named mixtures used by tests and benchmarks."""
    presets = {
        # two unequal modes: the yardstick's default (a reward can move mass between them)
        "gmm2": lambda: GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], [0.7, 0.3]),
        "gmm8": lambda: GaussianMixture(_ring_means(8, 3.0), [0.3]),
        "gmm4": lambda: GaussianMixture([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]], [0.4]),
    }
    return presets[choice("mixture", name, presets)]()


def checkerboard(n: int, generator: torch.Generator | None = None, cells: int = 4, size: float = 4.0) -> Tensor:
    """Uniform on the black squares of a cells x cells board spanning [-size/2, size/2]^2."""
    u = torch.rand(n, 2, generator=generator)
    i = torch.randint(0, cells, (n,), generator=generator)
    j = torch.randint(0, cells // 2, (n,), generator=generator) * 2 + (i % 2)
    cell = size / cells
    return torch.stack([(i + u[:, 0]) * cell, (j + u[:, 1]) * cell], 1) - size / 2


def rings(n: int, generator: torch.Generator | None = None, radii=(1.0, 2.0, 3.0), std: float = 0.08) -> Tensor:
    """Points on concentric circles with Gaussian radial noise."""
    r = torch.tensor(radii)[torch.randint(0, len(radii), (n,), generator=generator)]
    th = 2 * math.pi * torch.rand(n, generator=generator)
    r = r + std * torch.randn(n, generator=generator)
    return torch.stack([r * torch.cos(th), r * torch.sin(th)], 1)


TOY2D = ("gmm2", "gmm4", "gmm8", "checkerboard", "rings")


def sample_toy2d(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    choice("2-D data set", name, TOY2D)
    if name == "checkerboard":
        return checkerboard(n, generator)
    if name == "rings":
        return rings(n, generator)
    return gmm_preset(name).sample(n, generator)
