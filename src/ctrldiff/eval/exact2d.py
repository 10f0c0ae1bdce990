r"""The exact 2-D yardstick (METHODS section 7): the tilted target p* and J* by quadrature.

For a reference density p_ref on R^2 (a :class:`~ctrldiff.data.toy2d.GaussianMixture` at t = 0), a
reward r and beta > 0, the optimum of J = E[r] - beta KL over distributions is
    p*(x) = p_ref(x) exp(r(x) / beta) / Z,   Z = E_ref[exp(r / beta)],   J* = beta log Z,
and J* = E_{p*}[r] - beta KL(p* || p_ref).  Everything is computed with the mid-point rule on a uniform
grid of cells of side h (float64, log-space); the box covers the mixture +- ``n_std`` component stds
and grows on any side where p* still has mass at the edge, so strong rewards that move p* away from
p_ref stay inside it. Grid quantities are cell probabilities (they sum to 1).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..errors import CtrlDiffError, RewardError, check
from .metrics import median_bandwidth, mmd


def _eval_reward(reward, pts: Tensor, cond=None, dtype: torch.dtype = torch.float64, chunk: int = 65536) -> Tensor:
    """r at pts [N, 2] (cast to ``dtype``) -> [N] float64, in chunks; raises RewardError on bad output."""
    out = []
    for i in range(0, len(pts), chunk):
        p = pts[i:i + chunk].to(dtype)
        c = None if cond is None else torch.full((len(p),), int(cond), dtype=torch.long)
        with torch.no_grad():
            r = reward(p, c) if c is not None else reward(p)
        r = torch.as_tensor(r)
        if r.shape != (len(p),):
            raise RewardError(f"reward {getattr(reward, 'name', reward)!r} returned shape {tuple(r.shape)} "
                              f"for {len(p)} points; expected [{len(p)}]")
        out.append(r.double())
    r = torch.cat(out)
    if not torch.isfinite(r).all():
        raise RewardError(f"reward {getattr(reward, 'name', reward)!r} is not finite on the quadrature grid")
    return r


class TiltedTarget:
    """p* ∝ p_ref exp(r / beta) for a 2-D GaussianMixture p_ref, computed exactly on a grid.

    ``reward(x [N, 2], cond [N] or None) -> [N]`` is called on ``reward_dtype`` points (float64 by
    default; pass torch.float32 for a float32 network); ``cond`` is one label for the whole target.

    Attributes (floats): ``J_star``, ``mean_reward_ref`` (E_ref r), ``mean_reward_star`` (E_{p*} r),
    ``kl_star`` (KL(p* || p_ref)), ``ref_mass`` (quadrature of p_ref over the box, ~1) and ``edge_mass``
    (p* mass in the outermost cells, ~0). Grid: ``centers`` [G, 2], ``log_ref`` and ``log_star`` [G]
    (log cell probabilities), ``rewards`` [G], cell side ``h``, box ``lo``, ``hi`` [2].
    """

    def __init__(self, gmm, reward, beta: float, n_grid: int = 400, n_std: float = 6.0,
                 bounds: tuple[tuple[float, float], tuple[float, float]] | None = None, cond=None,
                 edge_tol: float = 1e-8, max_cells: int = 4_000_000, reward_dtype: torch.dtype = torch.float64):
        check(beta > 0, f"beta must be > 0, got {beta}")
        check(gmm.dim == 2, f"TiltedTarget needs a 2-D mixture, got dimension {gmm.dim}")
        check(n_grid >= 10, f"n_grid must be >= 10, got {n_grid}")
        self.gmm, self.reward, self.beta, self.cond, self.reward_dtype = gmm, reward, float(beta), cond, reward_dtype
        if bounds is None:
            lo = (gmm.means - n_std * gmm.stds[:, None]).min(0).values
            hi = (gmm.means + n_std * gmm.stds[:, None]).max(0).values
        else:
            lo, hi = torch.tensor([b[0] for b in bounds]), torch.tensor([b[1] for b in bounds])
        self.lo, self.hi = lo.double(), hi.double()
        check(bool((self.hi > self.lo).all()), f"empty box {self.lo.tolist()} .. {self.hi.tolist()}")
        self.h = float((self.hi - self.lo).max()) / n_grid
        while True:
            self._build()
            grow = self._edges() > edge_tol  # [lo_x, hi_x, lo_y, hi_y]
            if not grow.any():
                break
            if bounds is not None or self.shape[0] * self.shape[1] * 2.25 > max_cells:
                warnings.warn(f"p* has mass {self.edge_mass:.2e} in the edge cells of the grid box; J* and p* "
                              "may be inaccurate (pass larger bounds= or max_cells=)", stacklevel=2)
                break
            span = self.hi - self.lo
            self.lo = self.lo - 0.5 * span * grow[0::2]
            self.hi = self.hi + 0.5 * span * grow[1::2]

    # ---- grid -------------------------------------------------------------------------------
    def _build(self) -> None:
        n = ((self.hi - self.lo) / self.h).ceil().long().tolist()
        self.shape = (n[0], n[1])
        self.hi = self.lo + self.h * torch.tensor(n, dtype=torch.float64)
        ax = [self.lo[d] + self.h * (torch.arange(n[d], dtype=torch.float64) + 0.5) for d in range(2)]
        gx, gy = torch.meshgrid(ax[0], ax[1], indexing="ij")
        self.centers = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)  # [G, 2], x-major
        log_cell = self.gmm.log_prob(self.centers) + 2 * math.log(self.h)  # log p_ref(c) h^2
        log_mass = torch.logsumexp(log_cell, 0)
        self.ref_mass = float(log_mass.exp())
        self.log_ref = log_cell - log_mass
        self.rewards = self._r(self.centers)
        logits = self.log_ref + self.rewards / self.beta
        log_z = torch.logsumexp(logits, 0)
        self.log_star = logits - log_z
        p = self.log_star.exp()
        self.J_star = float(self.beta * log_z)
        self.mean_reward_ref = float((self.log_ref.exp() * self.rewards).sum())
        self.mean_reward_star = float((p * self.rewards).sum())
        self.kl_star = float((p * (self.log_star - self.log_ref)).sum())

    def _r(self, x: Tensor) -> Tensor:
        return _eval_reward(self.reward, x, self.cond, self.reward_dtype)

    def _edges(self) -> Tensor:
        p = self.log_star.exp().reshape(self.shape)
        e = torch.stack([p[0].sum(), p[-1].sum(), p[:, 0].sum(), p[:, -1].sum()])
        self.edge_mass = float(e.sum())
        return e

    def summary(self) -> dict:
        """The yardstick numbers as floats (JSON-ready)."""
        return {"beta": self.beta, "J_star": self.J_star, "mean_reward_ref": self.mean_reward_ref,
                "mean_reward_star": self.mean_reward_star, "kl_star": self.kl_star, "ref_mass": self.ref_mass,
                "edge_mass": self.edge_mass, "cell": self.h, "box": [self.lo.tolist(), self.hi.tolist()]}

    def log_prob(self, x: Tensor) -> Tensor:
        """log p*(x) = log p_ref(x) + (r(x) - J*) / beta for any points x [N, 2] -> [N] float64."""
        return self.gmm.log_prob(x.double()) + (self._r(x) - self.J_star) / self.beta

    # ---- exact samples ----------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, method: str = "grid") -> Tensor:
        """n samples [n, 2] (float32) from p*.

        'grid': pick a cell with its p* probability, then a uniform point in it (exact for the
        piecewise-constant p*; error O(h)). 'rejection': p_ref proposals accepted with probability
        exp((r - r_max) / beta), r_max = the grid maximum of r; exact for rewards bounded by r_max
        (raises if a proposal exceeds it), cost 1 / E_ref[exp((r - r_max) / beta)] proposals per sample.
        """
        if method == "grid":
            idx = torch.multinomial(self.log_star.exp(), n, replacement=True, generator=generator)
            u = torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5
            return (self.centers[idx] + self.h * u).float()
        check(method == "rejection", f"unknown sampling method {method!r}; choose grid or rejection")
        r_max, out, got = float(self.rewards.max()), [], 0
        accept = math.exp((self.J_star - r_max) / self.beta)  # = E_ref exp((r - r_max) / beta)
        if accept < 1e-3:
            raise CtrlDiffError(f"rejection sampling would accept only {accept:.1e} of the proposals "
                                "(is the reward unbounded?); use method='grid'")
        batch = int(min(max(2 * n / max(accept, 1e-12), 1024), 1e6))
        while got < n:
            x = self.gmm.sample(batch, generator).double()
            r = self._r(x)
            if (r > r_max + 1e-9 * max(1.0, abs(r_max))).any():
                raise CtrlDiffError("reward exceeds its grid maximum: rejection sampling is not exact, use method='grid'")
            keep = torch.rand(batch, generator=generator, dtype=torch.float64) < torch.exp((r - r_max) / self.beta)
            out.append(x[keep])
            got += int(keep.sum())
        return torch.cat(out)[:n].float()

    # ---- distance of model samples to p* ----------------------------------------------------
    def histogram_kl(self, samples: Tensor, bins: int = 32) -> float:
        """KL(p_hat || p*) over a bins x bins histogram of the box (samples outside go to the edge bins).

        Biased upwards by about (occupied bins - 1) / (2 N) for N samples: compare with ``baseline``."""
        x = samples.detach().double()
        width = (self.hi - self.lo) / bins

        def bin_index(pts: Tensor) -> Tensor:
            ij = ((pts - self.lo) / width).floor().long().clamp(0, bins - 1)
            return ij[:, 0] * bins + ij[:, 1]

        p_star = torch.zeros(bins * bins, dtype=torch.float64).index_add_(0, bin_index(self.centers), self.log_star.exp())
        counts = torch.bincount(bin_index(x), minlength=bins * bins).double()
        p_hat = counts / counts.sum()
        m = p_hat > 0
        return float((p_hat[m] * (p_hat[m].log() - p_star[m].clamp(min=1e-300).log())).sum())

    def sample_distance(self, samples: Tensor, n_ref: int | None = None, bins: int = 32, baseline: bool = False,
                        generator: torch.Generator | None = None) -> dict:
        """MMD^2 to ``n_ref`` (default len(samples), at most 5000) exact p* samples and histogram KL.

        The MMD bandwidths are fixed per target (median heuristic on exact samples), so numbers are
        comparable across algorithms. ``baseline`` adds the same statistics for a fresh exact sample
        of the same size: the noise floor that a perfect sampler would reach.
        """
        x = samples.detach().reshape(len(samples), -1).double()
        check(x.shape[1] == 2 and len(x) >= 2, f"samples must be [N >= 2, 2], got {tuple(samples.shape)}")
        n_ref = n_ref or min(len(x), 5000)
        ref = self.sample(n_ref, generator).double()
        if not hasattr(self, "_bandwidths"):
            m = median_bandwidth(ref)
            self._bandwidths = [m * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
        out = {"mmd": mmd(x, ref, self._bandwidths), "hist_kl": self.histogram_kl(x, bins),
               "outside_frac": float(((x < self.lo) | (x > self.hi)).any(1).double().mean())}
        if baseline:
            fresh = self.sample(len(x), generator).double()
            out["mmd_baseline"] = mmd(fresh, ref, self._bandwidths)
            out["hist_kl_baseline"] = self.histogram_kl(fresh, bins)
        return out


class OptimalScore(torch.nn.Module):
    r"""The exact optimal control of J = E r - beta KL_path for a :class:`TiltedTarget`, as an eps model.

    With the memoryless sampler the optimal score is that of the tilted target noised by the forward process,
        s*(t, x) = grad log p*_t(x),   p*_t(x) = int p*(x0) N(x; alpha_t x0, sigma_t^2 I) dx0
                 = s_ref(t, x) + grad_x V(t, x) / beta,   V = beta log E_ref[exp(r(X_0) / beta) | X_t = x],
    computed from the target's grid (cells with p* mass above ``mass_tol``: a mixture of Gaussians centred at
    alpha_t c with the cells' p* probabilities; smooth while the cell side h is well below sigma_t, which holds at
    every time a solver evaluates on the usual grids). Sampled with a solver on a grid, it gives the
    *discretisation floor*: the gap (J* - J) / |J*| that the exact optimal control itself leaves on that grid.
    eps(t, x) = -sigma_t s*(t, x); t [B] may differ per row. ``prediction``: the output type (that of the model it is
    compared with, so that KL_path uses the same quadrature, see :func:`ctrldiff.solvers.kl_weights`)."""

    def __init__(self, target: TiltedTarget, process, mass_tol: float = 1e-12, chunk: int = 512,
                 prediction: str = "eps"):
        super().__init__()
        self.prediction = prediction
        p = target.log_star.exp()
        keep = p > mass_tol * p.max()
        self.process, self.chunk = process, chunk
        self.register_buffer("centers", target.centers[keep].double())
        self.register_buffer("log_w", target.log_star[keep].double())

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        out = []
        c, c2 = self.centers, self.centers.pow(2).sum(1)
        for i in range(0, x.shape[0], self.chunk):
            xi, ti = x[i:i + self.chunk].double(), t[i:i + self.chunk]
            a, s = self.process.alpha(ti)[:, None], self.process.sigma(ti)[:, None]
            d2 = xi.pow(2).sum(1, keepdim=True) - 2 * a * (xi @ c.T) + a * a * c2[None]  # ||x - a c||^2
            post = torch.softmax(self.log_w[None] - d2 / (2 * s * s), dim=1)  # [n, G]
            mean = a * (post @ c)  # E[alpha_t X_0 | X_t = x] under p*
            out.append(((xi - mean) / s).to(x.dtype))  # eps = -sigma s* = (x - alpha E[x0 | x]) / sigma
        eps = torch.cat(out)
        return eps if self.prediction == "eps" else self.process.convert(eps, "eps", self.prediction, t.to(x.dtype), x)


def sample_distance_to_target(samples: Tensor, target: TiltedTarget, **kwargs) -> dict:
    """Distance of samples [N, 2] to the exact tilted target: see :meth:`TiltedTarget.sample_distance`."""
    return target.sample_distance(samples, **kwargs)
