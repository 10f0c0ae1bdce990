r"""The ratio estimator: a noisy observation of the unknown score grad log p_t from m data samples
(METHODS section 3), used by q-learning as the running reward's target when no pretrained model exists.

For X_t = alpha_t X_0 + sigma_t eps,  p_t(x) = E_{x0 ~ p_data} N(x; alpha_t x0, sigma_t^2 I), so
    grad log p_t(x) = E[ grad N(x; alpha x0, s^2) ] / E[ N(x; alpha x0, s^2) ]
                    = sigma_t^-2 ( -x + alpha_t E_post[x0 | x] ).
Replacing both expectations by averages over m data points x0^1..x0^m gives self-normalised importance
sampling (bias and variance O(1/m)):

    s_hat(t, x) = sigma_t^-2 ( -x + alpha_t sum_j w_j x0^j ),

    l_j  = -( ||x - alpha_t x0^j||^2 - d sigma_t^2 ) / (2 sigma_t^2)      (log-kernel; 0 for a typical
                                                                            noised copy of x0^j)
    w_j  = exp(l_j) / ( sum_k exp(l_k) + floor ).

**The floor.** ``floor`` >= 0 is the weight of a pseudo data point at x0 = 0 on the same kernel scale.
While some x0^j explains x (sum_k exp(l_k) >> floor) it changes nothing measurable (relative bias
floor / sum_k exp(l_k)). When every kernel weight is tiny, i.e. x lies farther than about
sqrt(d + 2 log(1 / floor)) sigma_t from every alpha_t x0^j (a typical noised copy lies sqrt(d) sigma_t away;
with the default floor 1e-12 the cut-off is 7.6 sigma_t in 2-D and 10.9 sigma_t for 64-pixel digits), the
estimate would be the pull of one arbitrary nearest point; instead w -> 0 and

    s_hat -> -x / sigma_t^2,   the score of N(0, sigma_t^2 I)   (the p_t of data concentrated at 0).

floor = 0 is the plain softmax, exact for the empirical distribution: with all n data points, s_hat is the
score of the noised empirical measure (1/n) sum_j N(alpha_t x0^j, sigma_t^2 I), exactly.

**Conditional.** With labels, x with label c uses only the data with label c (grad log p_t(x | c)).
Everything is computed in float64 with ||x - a y||^2 = ||x||^2 - 2 a x.y + a^2 ||y||^2 (no [N, m, D] tensor).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import CtrlDiffError
from ..noise import NoiseProcess

DEFAULT_FLOOR = 1e-12


def _per_row(v: Tensor, n: int) -> Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    return v.expand(n) if v.ndim == 0 else v.reshape(n)


def ratio_score(x: Tensor, t: Tensor | float, data: Tensor, process: NoiseProcess, *,
                floor: float = DEFAULT_FLOOR) -> Tensor:
    """s_hat(t, x) from the data points ``data`` [m, *D] for states x [N, *D] (t scalar or [N]) -> [N, *D].

    The formula and the floor are in the module docstring. float64 inside, returned in x's dtype."""
    if floor < 0:
        raise CtrlDiffError(f"ratio estimator floor must be >= 0, got {floor}")
    n, m = x.shape[0], data.shape[0]
    if m == 0:
        raise CtrlDiffError("the ratio estimator needs at least one data point")
    if data.shape[1:] != x.shape[1:]:
        raise CtrlDiffError(f"data points {tuple(data.shape[1:])} and states {tuple(x.shape[1:])} differ in shape")
    xf = x.reshape(n, -1).double()
    y = data.reshape(m, -1).to(device=x.device, dtype=torch.float64)
    d = xf.shape[1]
    t64 = _per_row(torch.as_tensor(t, dtype=torch.float64, device=x.device), n).to(x.device)
    a, s2 = process.alpha(t64)[:, None], process.sigma(t64)[:, None] ** 2  # [N, 1]
    dist2 = (xf.pow(2).sum(1, keepdim=True) - 2 * a * (xf @ y.T) + a * a * y.pow(2).sum(1)[None]).clamp(min=0)
    logits = -(dist2 - d * s2) / (2 * s2)  # [N, m]
    if floor > 0:  # w_j = exp(l_j) / (sum_k exp(l_k) + floor): a pseudo point at x0 = 0 with weight floor
        floor_col = torch.full((n, 1), math.log(floor),
                               dtype=torch.float64, device=x.device)
        w = torch.softmax(torch.cat([logits, floor_col], 1), 1)[:, :m]
    else:
        w = torch.softmax(logits, 1)
    score = (-xf + a * (w @ y)) / s2
    return score.reshape(x.shape).to(x.dtype)


class RatioScoreEstimator:
    """s_hat from a data set: each call uses ``m`` points drawn without replacement (all of them when m is
    None or >= the data set), the same draw for every row with the same label.

    data [n, *D]; labels [n] (long) for the conditional estimator, else None."""

    def __init__(self, data: Tensor, process: NoiseProcess, m: int | None = None, labels: Tensor | None = None,
                 floor: float = DEFAULT_FLOOR, generator: torch.Generator | None = None):
        if m is not None and m < 1:
            raise CtrlDiffError(f"ratio estimator m must be >= 1 (or None for all data), got {m}")
        if labels is not None and labels.shape[0] != data.shape[0]:
            raise CtrlDiffError(f"{labels.shape[0]} labels for {data.shape[0]} data points")
        self.data, self.labels, self.process = data, labels, process
        self.m, self.floor, self.generator = m, float(floor), generator
        self._by_label = {} if labels is None else {int(c): torch.nonzero(labels == c)[:, 0]
                                                    for c in torch.unique(labels)}

    def _subsets(self, idx: Tensor, copies: int) -> list[Tensor]:
        """``copies`` disjoint random subsets of idx, each of m points (or of len(idx) // copies when the
        data are too few; all of idx when copies = 1 and m is None or >= len(idx))."""
        n = idx.numel()
        if copies == 1 and (self.m is None or self.m >= n):
            return [idx]
        size = n // copies if self.m is None else min(self.m, n // copies)
        if size < 1:
            raise CtrlDiffError(f"{n} data points cannot give {copies} disjoint ratio-estimator subsets")
        perm = idx[torch.randperm(n, generator=self.generator, device=idx.device)]
        return [perm[i * size:(i + 1) * size] for i in range(copies)]

    def scores(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None, copies: int = 1) -> list[Tensor]:
        """``copies`` independent estimates s_hat(t, x [| c]) from disjoint data subsets, each [N, *D]."""
        if self.labels is None:
            return [ratio_score(x, t, self.data[i], self.process, floor=self.floor)
                    for i in self._subsets(torch.arange(self.data.shape[0], device="cpu"), copies)]
        if cond is None:
            raise CtrlDiffError("this ratio estimator is conditional (its data carry labels): pass cond")
        t = _per_row(torch.as_tensor(t, dtype=torch.float64, device=x.device), x.shape[0]).to(x.device)
        outs = [torch.empty_like(x) for _ in range(copies)]
        cond = cond.to(x.device)
        for c in torch.unique(cond).tolist():
            rows = cond == c
            if c not in self._by_label:
                raise CtrlDiffError(f"no data with label {c} for the conditional ratio estimator")
            for out, i in zip(outs, self._subsets(self._by_label[c], copies), strict=True):
                out[rows] = ratio_score(x[rows], t[rows], self.data[i], self.process, floor=self.floor)
        return outs

    def score(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """s_hat(t, x [| c]) for x [N, *D] -> [N, *D]."""
        return self.scores(x, t, cond)[0]

    def to_eps(self, score: Tensor, t: Tensor | float) -> Tensor:
        """eps units: eps_hat = -sigma_t s_hat."""
        sig = _per_row(torch.as_tensor(t, dtype=torch.float64, device=score.device), score.shape[0]).to(score.device)
        return -self.process.sigma(sig).to(score.dtype).reshape(-1, *[1] * (score.ndim - 1)) * score

    def eps(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """The same estimate in eps units, eps_hat = -sigma_t s_hat."""
        return self.to_eps(self.score(x, t, cond), t)


class EmpiricalScore(nn.Module):
    """The exact eps of the noised empirical distribution of a data set (the ratio estimator with all the
    data and no floor), as a model ``(x, t, cond) -> eps``. The reference model of the from-scratch tasks
    whose data distribution has no closed-form score (checkerboard, rings, digits)."""

    prediction = "eps"

    def __init__(self, data: Tensor, process: NoiseProcess, labels: Tensor | None = None, chunk: int = 512):
        super().__init__()
        self.est = RatioScoreEstimator(data, process, None, labels, floor=0.0)
        self.chunk = chunk

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        outs = []
        for i in range(0, x.shape[0], self.chunk):
            c = None if cond is None else cond[i:i + self.chunk]
            outs.append(self.est.eps(x[i:i + self.chunk], t[i:i + self.chunk], c))
        return torch.cat(outs)
