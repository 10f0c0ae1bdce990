"""The record every solver returns, and the transition densities the RL algorithms need."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


def _bdims(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


@dataclass
class Trajectory:
    """A sampled path  t_0 = t_max > t_1 > ... > t_K = t_min.

    Shapes (B batch, K steps, D data shape):
      times     [K+1]        the time grid, decreasing
      states    [B, K+1, D]  x_k; ``final`` is states[:, -1]
      outputs   [B, K, D]    the model's eps prediction at (t_k, x_k) (first stage for 2-stage solvers)
      noise     [B, K, D]    standard normal xi_k injected in step k (None for deterministic solvers)
      log_probs [B, K]       log N(x_{k+1}; mean_k, std_k^2 I) under the policy that sampled it
      coef_a, coef_b, std [K]  stochastic steps are affine in the model output:
                               x_{k+1} = coef_a x_k + coef_b eps_k + std_k xi_k
      actions   [B, K, D]    only with ``record_actions``: the sampled action a_k = eps_k + policy noise
                             (eps units); then x_{k+1} = coef_a x_k + coef_b a_k + std_k xi_k
      eta       [K]          only for the eta-family sampler (``solvers.eta_sampler``): each step's noise level
                             (KL_path weights use it); None for every other solver (em is eta = 1)
    A trajectory whose steps are partly deterministic (a per-step eta with zeros) has ``noise`` and ``log_probs``
    for every step, 0 where std_k = 0 (those steps have no density).
    """

    times: Tensor
    states: Tensor
    outputs: Tensor
    solver: str
    noise: Tensor | None = None
    log_probs: Tensor | None = None
    coef_a: Tensor | None = None
    coef_b: Tensor | None = None
    std: Tensor | None = None
    cond: Tensor | None = None
    actions: Tensor | None = None
    eta: Tensor | None = None

    @property
    def final(self) -> Tensor:
        return self.states[:, -1]

    @property
    def num_steps(self) -> int:
        return self.times.numel() - 1

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    @property
    def stochastic(self) -> bool:
        return self.log_probs is not None

    @property
    def dtau(self) -> Tensor:
        """Step sizes in backward time, dtau_k = t_k - t_{k+1} > 0, shape [K]."""
        return self.times[:-1] - self.times[1:]

    def step_mean(self, k: int | Tensor, eps: Tensor, x: Tensor | None = None) -> Tensor:
        """Mean of transition k (or of steps ``k`` [N] for a batch of states) for model output eps."""
        x = self.states[:, k] if x is None else x
        a, b = self.coef_a[k], self.coef_b[k]
        if isinstance(k, Tensor) and k.ndim > 0:
            a, b = _bdims(a, x), _bdims(b, x)
        return a * x + b * eps

    def step_log_prob(self, k, eps: Tensor, x: Tensor | None = None, x_next: Tensor | None = None) -> Tensor:
        """log N(x_{k+1}; mean_k(eps), std_k^2 I) summed over data dims -> [B].

        ``k`` may be an int (one step for the whole batch, states taken from this trajectory) or a
        [N] tensor of step indices together with explicit ``x`` and ``x_next`` [N, D].
        """
        if not self.stochastic:
            raise ValueError(f"solver {self.solver!r} produced a deterministic trajectory: no log-density")
        x = self.states[:, k] if x is None else x
        x_next = self.states[:, k + 1] if x_next is None else x_next
        return gaussian_log_prob(x_next, self.step_mean(k, eps, x), self.std[k])

    def detach(self) -> Trajectory:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, v in kw.items():
            if isinstance(v, Tensor):
                kw[name] = v.detach()
        return Trajectory(**kw)

    def to(self, device) -> Trajectory:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, v in kw.items():
            if isinstance(v, Tensor):
                kw[name] = v.to(device)
        return Trajectory(**kw)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """log N(x; mean, std^2 I) summed over all but the batch dimension -> [B]. std: scalar or [B]."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if std.ndim > 0:
        std = _bdims(std, x)
    d = x[0].numel()
    z = (x - mean) / std
    log_std = torch.log(std).expand_as(x) if std.ndim > 0 else torch.log(std) * torch.ones_like(x)
    return -0.5 * z.pow(2).flatten(1).sum(1) - log_std.flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi)


def cat_trajectories(trajs: list[Trajectory]) -> Trajectory:
    """Concatenate trajectories sampled on the same grid with the same solver along the batch."""
    if len(trajs) == 1:
        return trajs[0]
    first = trajs[0]

    def cat(name):
        vals = [getattr(t, name) for t in trajs]
        return None if vals[0] is None else torch.cat(vals, 0)

    return Trajectory(times=first.times, states=cat("states"), outputs=cat("outputs"), solver=first.solver,
                      noise=cat("noise"), log_probs=cat("log_probs"), coef_a=first.coef_a, coef_b=first.coef_b,
                      std=first.std, cond=cat("cond") if isinstance(first.cond, Tensor) else first.cond,
                      actions=cat("actions"), eta=first.eta)
