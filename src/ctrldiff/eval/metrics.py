r"""Sample-quality and objective metrics (batched, CPU friendly, float64 inside).

Shapes: N, M sample counts, d feature dimension, C classes. Every metric returns Python floats
(or dicts of them) so that results can be logged as JSON directly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import CtrlDiffError, check


def _as2d(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x)
    check(x.ndim >= 1, f"{name} must be [N, ...], got a scalar")
    x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
    return x.detach().double()


def _cond_keys(conds: Tensor, n: int) -> Tensor:
    conds = torch.as_tensor(conds).detach().reshape(-1)
    check(conds.numel() == n, f"conds has {conds.numel()} entries for {n} samples")
    return conds


def _key(c: Tensor):
    return c.item()


# ---- rewards -------------------------------------------------------------------------------
def reward_stats(rewards: Tensor, conds: Tensor | None = None) -> dict:
    """Mean / std (population, ddof 0) of rewards [N]; with conds [N] also per condition.

    Returns {"mean", "std", "count", "per_cond": {c: {"mean", "std", "count"}}} (per_cond only with conds).
    """
    r = torch.as_tensor(rewards).detach().double().reshape(-1)
    check(r.numel() > 0, "reward_stats needs at least one reward")
    out: dict = {"mean": float(r.mean()), "std": float(r.std(unbiased=False)), "count": r.numel()}
    if conds is not None:
        c = _cond_keys(conds, r.numel())
        out["per_cond"] = {_key(v): {"mean": float(r[c == v].mean()), "std": float(r[c == v].std(unbiased=False)),
                                     "count": int((c == v).sum())} for v in torch.unique(c)}
    return out


# ---- kernel two-sample distance ------------------------------------------------------------
def median_bandwidth(x: Tensor, y: Tensor | None = None, max_points: int = 2000) -> float:
    """Median pairwise Euclidean distance of the pooled samples (first ``max_points`` of each)."""
    z = _as2d(x, "x")[:max_points]
    if y is not None:
        z = torch.cat([z, _as2d(y, "y")[:max_points]])
    d = torch.cdist(z, z)
    iu = torch.triu_indices(len(z), len(z), 1)
    med = float(d[iu[0], iu[1]].median()) if len(z) > 1 else 1.0
    return med if med > 0 else 1.0


def _rbf_mix_sum(d2: Tensor, cs: list[float]) -> float:
    """sum over entries of sum_b exp(-c_b d2) for ascending c_b. A c_b that is 2^k times the previous one
    (k <= 6) is obtained by k squarings instead of a new exp (the default bandwidths are a factor 2 apart)."""
    e = torch.exp(d2 * -cs[0])
    total, prev = float(e.sum()), cs[0]
    for c in cs[1:]:
        k = math.log2(c / prev)
        if abs(k - round(k)) < 1e-9 and 0 <= round(k) <= 6:
            for _ in range(round(k)):
                e.mul_(e)
        else:
            e = torch.exp(d2 * -c)
        total, prev = total + float(e.sum()), c
    return total


def _kernel_sum(a: Tensor, b: Tensor | None, cs: list[float], chunk: int) -> float:
    """sum_{i,j} sum_b exp(-c_b ||a_i - b_j||^2); b = None means b = a with the diagonal i = j left out."""
    total = 0.0
    if b is None:  # symmetric: diagonal blocks once, blocks right of the diagonal twice
        for i in range(0, len(a), chunk):
            blk = a[i:i + chunk]
            total += _rbf_mix_sum(torch.cdist(blk, blk).pow_(2), cs) - len(blk) * len(cs)
            if i + chunk < len(a):
                total += 2 * _rbf_mix_sum(torch.cdist(blk, a[i + chunk:]).pow_(2), cs)
        return total
    for i in range(0, len(a), chunk):
        total += _rbf_mix_sum(torch.cdist(a[i:i + chunk], b).pow_(2), cs)
    return total


def mmd(x: Tensor, y: Tensor, bandwidths: list[float] | Tensor | None = None, chunk: int = 1024) -> float:
    r"""Unbiased MMD^2 between samples x [N, d] and y [M, d] (N, M >= 2).

    k(u, v) = (1/B) sum_b exp(-||u - v||^2 / (2 h_b^2)); default h = m * {1/4, 1/2, 1, 2, 4} with m the
    median pairwise distance of the pooled sample (:func:`median_bandwidth`).
        MMD^2 = sum_{i!=j} k(x_i, x_j) / (N(N-1)) + sum_{i!=j} k(y_i, y_j) / (M(M-1)) - 2 sum_{ij} k(x_i, y_j) / (NM)
    Unbiased, so it can be slightly negative when the distributions agree. Memory O(chunk * max(N, M)).
    """
    x, y = _as2d(x, "x"), _as2d(y, "y")
    check(x.shape[1] == y.shape[1], f"mmd: feature dims differ ({x.shape[1]} vs {y.shape[1]})")
    check(len(x) >= 2 and len(y) >= 2, "mmd needs at least 2 samples on each side")
    if bandwidths is None:
        m = median_bandwidth(x, y)
        bandwidths = [m * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
    h = torch.as_tensor(bandwidths, dtype=torch.float64).reshape(-1)
    check(bool((h > 0).all()), "mmd bandwidths must be positive")
    cs = sorted((1.0 / (2 * h * h)).tolist())
    n, m_ = len(x), len(y)
    kxx = _kernel_sum(x, None, cs, chunk) / (n * (n - 1))
    kyy = _kernel_sum(y, None, cs, chunk) / (m_ * (m_ - 1))
    kxy = _kernel_sum(x, y, cs, chunk) / (n * m_)
    return (kxx + kyy - 2 * kxy) / len(cs)


# ---- sliced Wasserstein --------------------------------------------------------------------
def _quantiles(sorted_v: Tensor, levels: Tensor) -> Tensor:
    """Linear-interpolated empirical quantiles of each row of sorted_v [P, N] at levels [L] in (0, 1)."""
    n = sorted_v.shape[1]
    pos = (levels * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = pos - lo
    return sorted_v[:, lo] * (1 - w) + sorted_v[:, hi] * w


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, p: int = 2,
                       generator: torch.Generator | None = None) -> float:
    r"""Sliced Wasserstein-p distance between x [N, d] and y [M, d].

    SW_p = ( E_{theta ~ Unif(S^{d-1})} W_p^p(theta.x, theta.y) )^{1/p}, Monte Carlo over ``n_projections``
    directions. 1-D W_p^p = int_0^1 |F^{-1}(u) - G^{-1}(u)|^p du: sorted samples when N = M, otherwise
    interpolated quantiles at max(N, M) mid-point levels u = (i + 1/2) / L.
    Example: N(0, I) vs N(m, I) gives SW_2 = ||m|| / sqrt(d) and, in d = 2, SW_1 = 2 ||m|| / pi.
    """
    x, y = _as2d(x, "x"), _as2d(y, "y")
    check(x.shape[1] == y.shape[1], f"sliced_wasserstein: feature dims differ ({x.shape[1]} vs {y.shape[1]})")
    check(p >= 1, f"sliced_wasserstein needs p >= 1, got {p}")
    theta = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).T.sort(dim=1).values, (y @ theta).T.sort(dim=1).values  # [P, N], [P, M]
    if px.shape[1] != py.shape[1]:
        L = max(px.shape[1], py.shape[1])
        levels = (torch.arange(L, dtype=torch.float64) + 0.5) / L
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return float((px - py).abs().pow(p).mean()) ** (1.0 / p)


# ---- Frechet distance ----------------------------------------------------------------------
def _psd_sqrt(a: Tensor) -> Tensor:
    """Symmetric PSD square root by eigendecomposition (negative round-off eigenvalues clamped to 0)."""
    vals, vecs = torch.linalg.eigh(0.5 * (a + a.T))
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    r"""Squared Frechet (W2) distance of N(mu1, C1) and N(mu2, C2); mu [d], C [d, d].

    FD = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr( (C1^{1/2} C2 C1^{1/2})^{1/2} ).
    The inner matrix is symmetric PSD, so both roots come from ``eigh`` (stable, no complex sqrtm).
    Round-off is ~ sqrt(machine eps) * ||C|| for rank-deficient covariances; the result is clamped at 0.
    """
    mu1, mu2 = torch.as_tensor(mu1).double().reshape(-1), torch.as_tensor(mu2).double().reshape(-1)
    c1, c2 = torch.as_tensor(cov1).double(), torch.as_tensor(cov2).double()
    d = mu1.numel()
    check(mu2.numel() == d and c1.shape == (d, d) and c2.shape == (d, d),
          f"frechet_distance: shapes do not match (mu {d}, covs {tuple(c1.shape)} and {tuple(c2.shape)})")
    s1 = _psd_sqrt(c1)
    m = s1 @ c2 @ s1
    tr_sqrt = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp(min=0).sqrt().sum()
    fd = float((mu1 - mu2).pow(2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * tr_sqrt)
    return max(fd, 0.0)  # >= 0 exactly; round-off in sqrt of tiny eigenvalues can make it ~ -sqrt(eps)


def frechet_distance_from_features(f1: Tensor, f2: Tensor) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to features f1 [N, d], f2 [M, d]."""
    f1, f2 = _as2d(f1, "f1"), _as2d(f2, "f2")
    check(len(f1) >= 2 and len(f2) >= 2, "frechet_distance_from_features needs at least 2 samples each")
    return frechet_distance(f1.mean(0), torch.cov(f1.T).reshape(f1.shape[1], -1),
                            f2.mean(0), torch.cov(f2.T).reshape(f2.shape[1], -1))


# ---- diversity / classification ------------------------------------------------------------
def _mean_pairwise(f: Tensor, chunk: int = 1024) -> float:
    n = len(f)
    if n < 2:
        return float("nan")
    total = sum(float(torch.cdist(f[i:i + chunk], f).sum()) for i in range(0, n, chunk))
    return total / (n * (n - 1))  # the diagonal contributes 0


def diversity(features: Tensor, conds: Tensor | None = None, max_samples: int | None = None) -> dict:
    r"""Mean pairwise Euclidean distance (1/(N(N-1))) sum_{i!=j} ||f_i - f_j|| of features [N, ...].

    Returns {"overall": float, "per_cond": {c: float}} (per_cond only with conds [N]; NaN for a
    condition with fewer than 2 samples). ``max_samples`` keeps only the first samples (cost O(N^2)).
    """
    f = _as2d(features, "features")
    c = _cond_keys(conds, len(f)) if conds is not None else None
    if max_samples is not None:
        f = f[:max_samples]
        c = c[:max_samples] if c is not None else None
    out: dict = {"overall": _mean_pairwise(f)}
    if c is not None:
        out["per_cond"] = {_key(v): _mean_pairwise(f[c == v]) for v in torch.unique(c)}
    return out


def classifier_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of argmax_c logits [N, C] equal to labels [N]."""
    logits, labels = torch.as_tensor(logits).detach(), torch.as_tensor(labels).detach().reshape(-1)
    check(logits.ndim == 2 and logits.shape[0] == labels.numel() and labels.numel() > 0,
          f"classifier_accuracy: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    return float((logits.argmax(1) == labels.to(logits.device).long()).double().mean())


# ---- the fine-tuning objective -------------------------------------------------------------
def objective(reward_mean: float | Tensor, kl_path: float | Tensor, beta: float) -> float:
    """J = E[r] - beta * KL_path (the code base's convention, METHODS section 0); KL_path a mean or [B] values."""
    r = float(torch.as_tensor(reward_mean, dtype=torch.float64).mean())
    kl = float(torch.as_tensor(kl_path, dtype=torch.float64).mean())
    return r - beta * kl


def optimality_gap(J_star: float, J: float) -> float:
    """(J* - J) / |J*|: 0 at the optimum, > 0 below it. Not invariant to shifting r by a constant.

    Raises for J* = 0 (shift the reward so that J* is away from zero).
    """
    J_star, J = float(J_star), float(J)
    if J_star == 0 or not math.isfinite(J_star):
        raise CtrlDiffError(f"optimality gap is undefined for J* = {J_star}")
    return (J_star - J) / abs(J_star)
