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

from .errors import CtrlDiffError, choice

PREDICTIONS = ("eps", "score", "x0", "v")


def _as_t(t, dtype: torch.dtype | None = None) -> Tensor:
    """A time argument as a tensor: a tensor stays where it is, a Python number becomes a CPU scalar (never a tensor
    on the default device: a run's tensors are placed explicitly)."""
    return torch.as_tensor(t, dtype=dtype, device=t.device if isinstance(t, Tensor) else "cpu")


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
    continuous_time: bool = True  # the model takes any t in [t_min, t_max] (a random time grid is meaningful)

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
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64, device="cpu")))

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
        else:
            eps = self._eps_from_v(pred, a, s, x)
        if to == "eps":
            return eps
        if to == "score":
            return -eps / s
        x0 = (x - s * eps) / a
        if to == "x0":
            return x0
        return self.velocity(x0, eps, t)

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The 'v' target of this process at x_t = alpha_t x0 + sigma_t eps. VP processes: v = alpha eps - sigma x0
        (Salimans & Ho 2022: the velocity of the angle parameterisation, alpha^2 + sigma^2 = 1)."""
        return _bcast(self.alpha(t), x0) * eps - _bcast(self.sigma(t), x0) * x0

    def _eps_from_v(self, v: Tensor, a: Tensor, s: Tensor, x: Tensor) -> Tensor:
        """eps from v = alpha eps - sigma x0 at x = alpha x0 + sigma eps: eps = (sigma x + alpha v) / (alpha^2 + sigma^2)."""
        return (s * x + a * v) / (a * a + s * s)

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
        t = _as_t(t)
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def f(self, t):
        return -0.5 * self.beta(_as_t(t))

    def g2(self, t):
        return self.beta(_as_t(t))

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
        return 0.5 * math.pi * (_as_t(t) + self.s) / (1 + self.s)

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
    r"""Linear interpolant / rectified flow (METHODS section 8): alpha_t = 1 - t, sigma_t = t,
        f = -1 / (1 - t),  g^2 = 2t / (1 - t)  (infinite at t = 1).

    'v' here is the flow-matching velocity v = dx_t/dt = eps - x0 (what SD3 / FLUX transformers predict):
        eps_hat = x + (1 - t) v,  x0_hat = x - t v,  score = -(x + (1 - t) v) / t,
    and the probability-flow ODE is dY = -v dtau (``ode-euler`` on it is the Euler flow sampler).

    Grid: because g^2 diverges at t = 1, sampling starts at t_max = 0.999 < 1 from N(0, t_max^2 I) and
    ``time_grid`` is uniform from t_max to t_min (the ODE solvers, ddim(eta) and the Girsanov KL need nothing
    more; the start is not treated apart). Euler-Maruyama's first step is stiff there: its effective state
    coefficient is 1 - dtau / (1 - t), so with dtau >> 1 - t_max the first EM step over-shoots; use ddim
    (eta = 1: the exact Gaussian posterior step) or the eta-family sampler for stochastic rollouts on flows.
    """

    name: str = "rf"
    t_min: float = 1e-3
    t_max: float = 0.999

    def __post_init__(self):
        if not 0 < self.t_min < self.t_max < 1:
            raise CtrlDiffError(f"rectified flow needs 0 < t_min < t_max < 1 (g^2 diverges at t = 1), got "
                                f"t_min={self.t_min}, t_max={self.t_max}")

    def velocity(self, x0, eps, t):
        """v = eps - x0 (independent of t)."""
        return eps - x0

    def _eps_from_v(self, v, a, s, x):
        """eps = x + (1 - t) v = x + alpha_t v."""
        return x + a * v

    def config(self):
        cfg = {"name": self.name}
        if (self.t_min, self.t_max) != (1e-3, 0.999):
            cfg |= {"t_min": self.t_min, "t_max": self.t_max}
        return cfg

    def log_alpha(self, t):
        return torch.log1p(-_as_t(t))

    def alpha(self, t):
        return 1.0 - _as_t(t)

    def sigma(self, t):
        return _as_t(t) * 1.0

    def f(self, t):
        return -1.0 / (1.0 - _as_t(t))

    def g2(self, t):
        t = _as_t(t)
        return 2.0 * t + 2.0 * t * t / (1.0 - t)


@dataclass
class FlowMatch(RectifiedFlow):
    r"""A flow-matching pipeline's scheduler (diffusers ``FlowMatchEulerDiscreteScheduler``: SD3 / SD3.5 / FLUX.1) as
    a continuous-time process: the rectified flow x_t = (1 - t) x0 + t eps of :class:`RectifiedFlow`, with the
    scheduler's timestep shift on the time grid. The scheduler maps a uniform u in (0, 1] to the noise level
        t = shift u / (1 + (shift - 1) u)
    (FLUX's resolution-dependent "exponential" shift exp(mu) / (exp(mu) + 1/u - 1) is the same map with shift =
    exp(mu)), and steps Euler on the velocity: x <- x + (t_next - t) v(x, t), with the network's timestep N t.

    ``time_grid(K)``: u uniform from shift^{-1}(t_max) to shift^{-1}(t_min), mapped by the shift, so the grid runs from
    t_max = 0.995 (< 1: g^2 = 2t / (1 - t) diverges at 1; and the solvers' step x' = A x + B eps_hat with
    eps_hat = x + (1 - t) v has A = 1 + dtau / (1 - t), which amplifies float32 rounding by ~dtau / (1 - t_max):
    0.995 keeps a 4-step Euler rollout within 1e-5 of the pipeline's) to t_min. Passing u[:K] to the scheduler as
    ``sigmas`` gives its sigmas = this grid's first K points (the scheduler appends 0 as its last point; ctrldiff's
    last step ends at t_min, and the Tweedie x0_hat(t_{K-1}, x_{K-1}) = x_{K-1} - t_{K-1} v is the scheduler's final
    Euler step to 0).
    """

    shift: float = 1.0
    num_train_timesteps: int = 1000
    name: str = "flow-match"
    t_min: float = 1e-3
    t_max: float = 0.995

    def __post_init__(self):
        super().__post_init__()
        if not self.shift > 0:
            raise CtrlDiffError(f"flow-match shift must be > 0, got {self.shift}")

    @classmethod
    def from_scheduler_config(cls, config, image_seq_len: int | None = None) -> FlowMatch:
        """From a ``FlowMatchEulerDiscreteScheduler`` config; with ``use_dynamic_shifting`` (FLUX.1-dev) the shift is
        exp(mu) (or mu for time_shift_type 'linear'), mu interpolated linearly in ``image_seq_len`` between
        (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as the pipelines compute it."""
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                    "stochastic_sampling"):
            if get(key, False):
                raise CtrlDiffError(f"flow-match schedulers with {key}=True are not supported")
        if get("shift_terminal", None):
            raise CtrlDiffError("flow-match schedulers with shift_terminal are not supported")
        shift = float(get("shift", 1.0))
        if get("use_dynamic_shifting", False):
            if image_seq_len is None:
                raise CtrlDiffError("a dynamically shifted flow-match scheduler needs the image sequence length")
            b_len, m_len = float(get("base_image_seq_len", 256)), float(get("max_image_seq_len", 4096))
            b_shift, m_shift = float(get("base_shift", 0.5)), float(get("max_shift", 1.15))
            mu = b_shift + (m_shift - b_shift) / (m_len - b_len) * (image_seq_len - b_len)
            shift = math.exp(mu) if get("time_shift_type", "exponential") == "exponential" else mu
        return cls(shift=shift, num_train_timesteps=int(get("num_train_timesteps", 1000)))

    def shift_time(self, u: Tensor) -> Tensor:
        """t = shift u / (1 + (shift - 1) u)."""
        u = torch.as_tensor(u)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def unshift_time(self, t: Tensor) -> Tensor:
        """u = t / (shift - (shift - 1) t), the inverse of :meth:`shift_time`."""
        t = torch.as_tensor(t)
        return t / (self.shift - (self.shift - 1) * t)

    def time_grid(self, steps: int, device=None, dtype=torch.float32) -> Tensor:
        if steps < 1:
            raise CtrlDiffError(f"steps must be >= 1, got {steps}")
        u0, u1 = (t / (self.shift - (self.shift - 1) * t) for t in (self.t_max, self.t_min))  # unshift_time
        u = torch.linspace(u0, u1, steps + 1, dtype=torch.float64, device="cpu")
        return (self.shift * u / (1 + (self.shift - 1) * u)).to(device=device, dtype=dtype)

    def timestep(self, t: Tensor) -> Tensor:
        """The network's timestep argument N t (SD3; FLUX's transformer takes t itself)."""
        return torch.as_tensor(t) * self.num_train_timesteps

    def config(self):
        return {"name": self.name, "shift": self.shift, "num_train_timesteps": self.num_train_timesteps,
                "t_min": self.t_min, "t_max": self.t_max}


def discrete_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                   beta_schedule: str = "scaled_linear") -> Tensor:
    """The discrete training betas beta_1..beta_N of DDPM / Stable Diffusion schedulers (float64 [N]).

    linear: linspace(beta_start, beta_end, N); scaled_linear (SD 1.5 / SDXL): linspace(sqrt(beta_start),
    sqrt(beta_end), N)^2; squaredcos_cap_v2: the cosine schedule's betas capped at 0.999."""
    choice("beta schedule", beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
    n = int(num_train_timesteps)
    if n < 2:
        raise CtrlDiffError(f"a discrete schedule needs num_train_timesteps >= 2, got {n}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64, device="cpu")
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64, device="cpu") ** 2
    ab = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - ab((i + 1) / n) / ab(i / n), 0.999) for i in range(n)], dtype=torch.float64,
                        device="cpu")


@dataclass
class DiscreteVP(NoiseProcess):
    r"""A discrete-time DDPM schedule (Stable Diffusion's ``alphas_cumprod``) as a continuous-time VP SDE.

    Training timestep n = 0..N-1 of the scheduler sits at continuous time t_n = (n + 1) / N, and t = 0 is the
    clean data (alpha_bar = 1): the model's timestep argument is ``timestep(t) = N t - 1``. Between the nodes
    log alpha_bar(t) is the C^1 cubic Hermite interpolant of the node values (slopes by central differences, so
    beta(t) = -d log alpha_bar / dt ~ -N log(1 - beta_n) near t_n, and continuous):
        alpha_t^2 = alpha_bar(t),  sigma_t^2 = 1 - alpha_bar(t),  f = (1/2) d log alpha_bar / dt,  g^2 = -2 f.
    So alpha_t^2 equals the scheduler's alphas_cumprod[n] exactly at t_n, and every solver (2nd-order ones
    keep their order: f is continuous) and the Girsanov KL work unchanged. ``time_grid(K)`` (K = 1..N) is
    diffusers' "trailing" spacing, t_k = (n_k + 1) / N with n_k = round(N - k N / K) - 1 for k < K, ending at
    t_min = 1 / N (timestep 0, alphas_cumprod[0]). Sampling starts from N(0, I) (``prior_std() = 1``: diffusers'
    init_noise_sigma, and the std of x_1 for unit-variance data, alpha^2 + sigma^2 = 1).

    DDIM(eta = 0) on this grid is diffusers' DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False) step
    for step when K divides N. Limits: (i) for other K, diffusers steps from timestep n_k to n_k - N // K, which is not
    the next timestep n_{k+1} it evaluates (for K = 3: 666 -> 333, then it evaluates 332); ctrldiff's step k goes
    to t_{k+1}, so the two differ by one timestep in some steps' targets. (ii) For K > 2N / 3 the last trailing
    timestep is already 0 and diffusers' last step, to alphas_cumprod[0], is the identity; here the grid then ends at
    t = 1 / (2N) (between timestep 0 and the data) so that all K steps have positive length.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    name: str = "vp-discrete"
    t_max: float = 1.0
    continuous_time: bool = False  # a diffusers UNet saw integer timesteps only: keep its grids

    def __post_init__(self):
        betas = discrete_betas(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise CtrlDiffError("discrete betas must lie in (0, 1) (a zero-terminal-SNR schedule has no Gaussian "
                                "prior to start sampling from)")
        self.N = int(self.num_train_timesteps)
        # log alpha_bar at t = 0, 1/N, ..., 1 (the node t = 0 is the data: alpha_bar = 1)
        self._log_ab = torch.cat([torch.zeros(1, dtype=torch.float64, device="cpu"), torch.cumsum(torch.log1p(-betas), 0)])
        lab = self._log_ab
        self._slope = torch.cat([lab[1:2] - lab[:1], 0.5 * (lab[2:] - lab[:-2]), lab[-1:] - lab[-2:-1]])
        self.t_min = 1.0 / self.N

    @classmethod
    def from_scheduler_config(cls, config) -> DiscreteVP:
        """From a diffusers scheduler config (``scheduler.config``: num_train_timesteps, beta_start, ...)."""
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        if get("trained_betas", None) is not None:
            raise CtrlDiffError("schedulers with explicit trained_betas are not supported; use beta_schedule")
        if get("rescale_betas_zero_snr", False):
            raise CtrlDiffError("zero-terminal-SNR schedules (rescale_betas_zero_snr) are not supported")
        return cls(int(get("num_train_timesteps", 1000)), float(get("beta_start", 0.00085)),
                   float(get("beta_end", 0.012)), str(get("beta_schedule", "scaled_linear")))

    @property
    def alphas_cumprod(self) -> Tensor:
        """alpha_bar_n for n = 0..N-1 (float64), as the diffusers scheduler has it."""
        return torch.exp(self._log_ab[1:])

    def timestep(self, t: Tensor) -> Tensor:
        """The model's (continuous) timestep argument  N t - 1  for t in [0, 1]."""
        return _as_t(t) * self.N - 1.0

    def time_of_timestep(self, n) -> Tensor:
        """Continuous time of training timestep n: (n + 1) / N."""
        return (_as_t(n, torch.float64) + 1.0) / self.N

    def _hermite(self, t, deriv: bool):
        """The C^1 cubic Hermite interpolant of log alpha_bar through the nodes (slopes by central differences):
        exact at every node, and f is continuous, so 2nd-order solvers keep their order."""
        t = _as_t(t)
        out_dtype = t.dtype if t.dtype.is_floating_point else torch.float32
        u = t.double() * self.N
        i = torch.clamp(torch.floor(u.detach()), 0, self.N - 1).long()
        s = u - i
        L, D = self._log_ab.to(u.device), self._slope.to(u.device)  # D: d log alpha_bar / du at the nodes
        l0, l1, d0, d1 = L[i], L[i + 1], D[i], D[i + 1]
        if deriv:  # d/du of the Hermite cubic, times du/dt = N
            val = ((6 * s * s - 6 * s) * (l0 - l1) + (3 * s * s - 4 * s + 1) * d0 + (3 * s * s - 2 * s) * d1) * self.N
        else:
            val = ((2 * s**3 - 3 * s * s + 1) * l0 + (s**3 - 2 * s * s + s) * d0 + (-2 * s**3 + 3 * s * s) * l1
                   + (s**3 - s * s) * d1)
        return val.to(out_dtype)

    def log_alpha(self, t):
        return 0.5 * self._hermite(t, deriv=False)

    def sigma(self, t):
        return torch.sqrt(torch.clamp(-torch.expm1(2.0 * self.log_alpha(t)), min=0.0))

    def f(self, t):
        return 0.5 * self._hermite(t, deriv=True)

    def g2(self, t):
        return -2.0 * self.f(t)

    def prior_std(self) -> float:
        """1, as diffusers' init_noise_sigma (sigma(1) = sqrt(1 - alphas_cumprod[N-1]) is 0.99785 for SD)."""
        return 1.0

    def time_grid(self, steps: int, device=None, dtype=torch.float32) -> Tensor:
        """The trailing timesteps (class docstring) and the end point -> [steps + 1], strictly decreasing."""
        if not 1 <= steps <= self.N:
            raise CtrlDiffError(f"a discrete schedule with {self.N} training timesteps takes 1..{self.N} "
                                f"sampling steps, got {steps}")
        import numpy as np  # numpy's arange and round-half-to-even, as diffusers: the same timesteps for every K

        n = torch.from_numpy(np.round(np.arange(self.N, 0, -self.N / steps))[:steps] - 1).to(torch.float64)
        end = self.t_min if n[-1] > 0 else 0.5 / self.N  # timestep 0 is already the last start: end below it
        times = torch.cat([self.time_of_timestep(n), torch.tensor([end], dtype=torch.float64, device="cpu")])
        return times.to(device=device, dtype=dtype)

    def config(self):
        return {"name": self.name, "num_train_timesteps": self.N, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": self.beta_schedule}


PROCESSES = {"vp": VPLinear, "vp-cosine": VPCosine, "rf": RectifiedFlow, "vp-discrete": DiscreteVP,
             "flow-match": FlowMatch}


def make_process(name: str = "vp", **kwargs) -> NoiseProcess:
    """Build a noise process by name ('vp', 'vp-cosine', 'rf', 'vp-discrete', 'flow-match')."""
    return PROCESSES[choice("noise process", name, PROCESSES)](**kwargs)


def process_from_config(cfg: dict) -> NoiseProcess:
    cfg = dict(cfg)
    return make_process(cfg.pop("name"), **cfg)
