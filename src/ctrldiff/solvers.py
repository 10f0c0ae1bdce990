r"""Samplers over the :class:`~ctrldiff.noise.NoiseProcess` interface.

Every solver has the signature

    solver(model, x, times, process, cond=None, *, generator=None, grad=False, policy_std=0.0)
        -> Trajectory

``model(x, t, cond)`` is any denoiser with a ``prediction`` attribute ('eps' if absent); ``times`` is
a decreasing grid from t_max to t_min (``process.time_grid(steps)``). Sampling runs in backward time
tau = 1 - t:  SDE  dY = [-f Y + g^2 s] dtau + g dB,  ODE  dY = [-f Y + (1/2) g^2 s] dtau.

Single-stage solvers (Euler-Maruyama, probability-flow Euler, DDIM(eta)) are affine in the model
output, x' = A x + B eps + std xi; the trajectory records A, B and std so that an RL algorithm can
re-evaluate any transition's log-density under a new model. ``policy_std`` > 0 adds exploration
noise to the action (the eps/score output), a = eps + policy_std * zeta, which makes ODE solvers
stochastic policies too (METHODS section 1: the Gaussian policy over the score). ``policy_std`` may
also be a sequence / tensor [K] (one std per step: a time-dependent policy). With ``record_actions=True``
the sampled action a_k = eps_k + policy_std_k zeta_k is drawn separately and kept in
``Trajectory.actions``: x' = A x + B a + std xi, and ``std`` / ``log_probs`` are then those of the state
noise given the action (q-learning needs the actions themselves).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from .errors import CtrlDiffError, choice
from .noise import NoiseProcess
from .trajectory import Trajectory


def model_eps(model, process: NoiseProcess, x: Tensor, t: Tensor | float, cond=None) -> Tensor:
    """Evaluate ``model`` at (t, x) and return its eps prediction. t: scalar or [B]."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    out = model(x, t, cond)
    pred = getattr(model, "prediction", "eps")
    return out if pred == "eps" else process.convert(out, pred, "eps", t, x)


def _check_inputs(x: Tensor, times: Tensor, cond) -> None:
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise CtrlDiffError(f"initial state must be a tensor of shape [batch, ...], got {getattr(x, 'shape', x)}")
    if times.ndim != 1 or times.numel() < 2:
        raise CtrlDiffError(f"time grid must be 1-D with at least 2 points, got shape {tuple(times.shape)}")
    if not bool((times[1:] < times[:-1]).all()):
        raise CtrlDiffError("time grid must be strictly decreasing (from noise, t_max, to data, t_min)")
    if cond is not None and isinstance(cond, Tensor) and cond.shape[0] != x.shape[0]:
        raise CtrlDiffError(f"condition batch {cond.shape[0]} does not match state batch {x.shape[0]}")


# ---- one-step coefficients: x' = A x + B eps + std xi ------------------------------------------
def _scalars(process: NoiseProcess, t: Tensor, s: Tensor):
    t, s = t.double(), s.double()
    return process.alpha(t), process.sigma(t), process.alpha(s), process.sigma(s)


def em_coeffs(process: NoiseProcess, t: Tensor, s: Tensor) -> tuple[float, float, float]:
    """Euler-Maruyama on the reverse SDE: A = 1 - f dtau, B = -g^2 dtau / sigma_t, std = g sqrt(dtau)."""
    t64, dtau = t.double(), (t - s).double()
    g2, sig = process.g2(t64), process.sigma(t64)
    return float(1 - process.f(t64) * dtau), float(-g2 * dtau / sig), float(torch.sqrt(g2 * dtau))


def ode_euler_coeffs(process: NoiseProcess, t: Tensor, s: Tensor) -> tuple[float, float, float]:
    """Euler on the probability-flow ODE: A = 1 - f dtau, B = -(1/2) g^2 dtau / sigma_t, std = 0."""
    t64, dtau = t.double(), (t - s).double()
    return float(1 - process.f(t64) * dtau), float(-0.5 * process.g2(t64) * dtau / process.sigma(t64)), 0.0


def eta_coeffs(process: NoiseProcess, t: Tensor, s: Tensor, eta: float = 1.0) -> tuple[float, float, float]:
    """Euler on the eta-family sampler (METHODS section 8)
        dY = [-f Y + ((1 + eta^2) / 2) g^2 s] dtau + eta g dB,   s = -eps / sigma_t:
    A = 1 - f dtau, B = -((1 + eta^2) / 2) g^2 dtau / sigma_t, std = eta g sqrt(dtau).
    eta = 1 is :func:`em_coeffs` (the reverse SDE), eta = 0 :func:`ode_euler_coeffs` (the probability-flow ODE)."""
    t64, dtau = t.double(), (t - s).double()
    g2, sig = process.g2(t64), process.sigma(t64)
    return (float(1 - process.f(t64) * dtau), float(-0.5 * (1 + eta * eta) * g2 * dtau / sig),
            float(eta * torch.sqrt(g2 * dtau)))


def ddim_coeffs(process: NoiseProcess, t: Tensor, s: Tensor, eta: float = 0.0) -> tuple[float, float, float]:
    """DDIM(eta) (Song et al. 2021) for a general (alpha, sigma) process.

    std = eta * sigma_s / sigma_t * sqrt(sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2)  (the DDPM posterior
    std for eta = 1); x' = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps + std xi.
    """
    a_t, s_t, a_s, s_s = _scalars(process, t, s)
    var_ts = torch.clamp(s_t**2 - (a_t / a_s) ** 2 * s_s**2, min=0.0)
    std = eta * s_s / s_t * torch.sqrt(var_ts)
    c = torch.sqrt(torch.clamp(s_s**2 - std**2, min=0.0))
    return float(a_s / a_t), float(c - a_s * s_t / a_t), float(std)


def _step_policy_std(policy_std, k: int, K: int) -> float:
    """policy_std as a float for step k: a number, or a sequence / tensor with one value per step."""
    if isinstance(policy_std, int | float):
        return float(policy_std)
    if len(policy_std) != K:
        raise CtrlDiffError(f"a per-step policy_std needs {K} values (one per step), got {len(policy_std)}")
    return float(policy_std[k])


def _affine_solver(coeffs: Callable | list, name: str, model, x: Tensor, times: Tensor, process: NoiseProcess,
                   cond=None, *, generator: torch.Generator | None = None, grad: bool = False,
                   policy_std=0.0, record_actions: bool = False, detach_states: bool = False,
                   eta: Tensor | None = None) -> Trajectory:
    """``coeffs(process, t, s) -> (A, B, std)``, or a list of K such triples (one per step). ``eta`` [K]: the
    eta-family noise level of each step, kept on the trajectory (for the Girsanov KL weights).

    Some steps deterministic, some not (a per-step eta with zeros): ``noise`` and ``log_probs`` are recorded for
    every step, 0 at the deterministic ones (those steps have no density; algorithms train on the others only)."""
    _check_inputs(x, times, cond)
    K = times.numel() - 1
    if isinstance(coeffs, list) and len(coeffs) != K:
        raise CtrlDiffError(f"{name}: {len(coeffs)} step coefficients for {K} steps")
    states, outputs, noises, log_probs, actions = [x], [], [], [], []
    ca, cb, cs = [], [], []
    d = x[0].numel()
    with torch.set_grad_enabled(grad):
        for k in range(K):
            a, b, std = coeffs[k] if isinstance(coeffs, list) else coeffs(process, times[k], times[k + 1])
            ps = _step_policy_std(policy_std, k, K)
            eps = model_eps(model, process, x, times[k], cond)
            if record_actions:  # a = eps + ps zeta, kept; the state noise std stays the solver's own
                act = eps + ps * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) \
                    if ps > 0 else eps
                actions.append(act)
                mean = a * x + b * act
            else:
                std = math.sqrt(std * std + (b * ps) ** 2)  # exploration on the action adds |B| policy_std
                mean = a * x + b * eps
            if std > 0:
                xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = mean + std * xi
                noises.append(xi)
                log_probs.append(-0.5 * xi.flatten(1).pow(2).sum(1) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi))
            else:
                x = mean
                noises.append(None)
                log_probs.append(None)
            if detach_states:  # grad=True, detach_states=True: the outputs keep their graph, the states are samples
                x = x.detach()
            states.append(x)
            outputs.append(eps)
            ca.append(a)
            cb.append(b)
            cs.append(std)
    stochastic = any(n is not None for n in noises)  # some step injected noise
    if stochastic:
        noises = [torch.zeros_like(x) if n is None else n for n in noises]
        log_probs = [torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) if lp is None else lp for lp in log_probs]
    kw = dict(dtype=x.dtype, device=x.device)
    return Trajectory(
        times=times, states=torch.stack(states, 1), outputs=torch.stack(outputs, 1), solver=name,
        noise=torch.stack(noises, 1) if stochastic else None,
        log_probs=torch.stack(log_probs, 1) if stochastic else None,
        coef_a=torch.tensor(ca, **kw), coef_b=torch.tensor(cb, **kw), std=torch.tensor(cs, **kw), cond=cond,
        actions=torch.stack(actions, 1) if record_actions else None,
        eta=None if eta is None else eta.to(**kw),
    )


def euler_maruyama(model, x, times, process, cond=None, **kw) -> Trajectory:
    """Euler-Maruyama on the reverse-time SDE (weak order 1)."""
    return _affine_solver(em_coeffs, "em", model, x, times, process, cond, **kw)


def ode_euler(model, x, times, process, cond=None, **kw) -> Trajectory:
    """Euler on the probability-flow ODE (order 1)."""
    return _affine_solver(ode_euler_coeffs, "ode-euler", model, x, times, process, cond, **kw)


def ddim(model, x, times, process, cond=None, *, eta: float = 0.0, **kw) -> Trajectory:
    """DDIM(eta): eta = 0 is the deterministic DDIM ODE solver, eta = 1 the DDPM ancestral sampler."""
    if eta < 0:
        raise CtrlDiffError(f"ddim eta must be >= 0, got {eta}")
    return _affine_solver(partial(ddim_coeffs, eta=eta), f"ddim(eta={eta:g})", model, x, times, process, cond, **kw)


def step_etas(eta, K: int) -> Tensor:
    """eta as a float64 [K] tensor: a number (every step), or a sequence / tensor with one value per step
    (e.g. 0 outside a window of SDE steps, Flow-GRPO-Fast)."""
    e = torch.as_tensor(eta, dtype=torch.float64).detach().cpu()
    if e.ndim == 0:
        e = e.expand(K).clone()
    if e.ndim != 1 or e.numel() != K:
        raise CtrlDiffError(f"a per-step eta needs {K} values (one per step), got shape {tuple(e.shape)}")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise CtrlDiffError(f"eta must be finite and >= 0, got {e.tolist()}")
    return e


def eta_sampler(model, x, times, process, cond=None, *, eta=1.0, **kw) -> Trajectory:
    r"""Euler on the eta-family sampler  dY = [-f Y + ((1 + eta^2)/2) g^2 s] dtau + eta g dB  (METHODS section 8),
    one family for VP and flow processes: eta = 1 is Euler-Maruyama on the reverse SDE (identical to ``em``), eta = 0
    the probability-flow ODE Euler step (``ode-euler``; for rectified flow x' = x - v dtau), Flow-GRPO's
    sigma_t = a sqrt(t / (1 - t)) is eta = a / sqrt(2). ``eta`` may be a number or one value per step ([K]); the
    trajectory keeps it (``Trajectory.eta``) so that KL_path uses the matching Girsanov weight (:func:`kl_weights`).
    Near t = 1 of rectified flow f and g^2 blow up (t_max < 1 keeps them finite; a coarse first step there is
    inaccurate for any eta > 0)."""
    _check_inputs(x, times, cond)
    K = times.numel() - 1
    etas = step_etas(eta, K)
    coeffs = [eta_coeffs(process, times[k], times[k + 1], float(etas[k])) for k in range(K)]
    label = f"eta({float(etas[0]):g})" if bool((etas == etas[0]).all()) else "eta(per-step)"
    return _affine_solver(coeffs, label, model, x, times, process, cond, eta=etas, **kw)


def _deterministic(name: str, model, x, times, process, cond, stage: Callable, grad: bool, **unused) -> Trajectory:
    _check_inputs(x, times, cond)
    ps = unused.get("policy_std", 0.0)
    if (ps if isinstance(ps, int | float) else any(float(v) for v in ps)) or unused.get("record_actions"):
        raise CtrlDiffError(f"solver {name!r} is a multi-stage ODE solver and takes no policy noise; "
                            "use em, ddim or ode-euler for RL rollouts")
    states, outputs, ctx = [x], [], {}
    with torch.set_grad_enabled(grad):
        for k in range(times.numel() - 1):
            x, eps = stage(model, process, x, times, k, cond, ctx)
            states.append(x)
            outputs.append(eps)
    return Trajectory(times=times, states=torch.stack(states, 1), outputs=torch.stack(outputs, 1),
                      solver=name, cond=cond)


def _pf_drift(process, x, t, eps):
    """dx/dt of the probability-flow ODE: f x - (1/2) g^2 score = f x + (1/2) g^2 eps / sigma."""
    t64 = torch.as_tensor(t).double()
    return float(process.f(t64)) * x + float(0.5 * process.g2(t64) / process.sigma(t64)) * eps


def _heun_stage(model, process, x, times, k, cond, ctx):
    t, s = times[k], times[k + 1]
    h = float(s - t)
    eps = model_eps(model, process, x, t, cond)
    d1 = _pf_drift(process, x, t, eps)
    x_e = x + h * d1
    d2 = _pf_drift(process, x_e, s, model_eps(model, process, x_e, s, cond))
    return x + 0.5 * h * (d1 + d2), eps


def heun(model, x, times, process, cond=None, *, generator=None, grad=False, **kw) -> Trajectory:
    """Heun's 2nd-order method on the probability-flow ODE (2 model calls per step)."""
    return _deterministic("heun", model, x, times, process, cond, _heun_stage, grad, **kw)


def _dpmpp_2m_stage(model, process, x, times, k, cond, ctx):
    t, s = times[k].double(), times[k + 1].double()
    a_t, s_t, a_s, s_s = process.alpha(t), process.sigma(t), process.alpha(s), process.sigma(s)
    h = float(process.log_snr(s) - process.log_snr(t))
    eps = model_eps(model, process, x, times[k], cond)
    x0 = (x - float(s_t) * eps) / float(a_t)
    last = k == times.numel() - 2
    if "x0" in ctx and not last:
        r = ctx["h"] / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * ctx["x0"]
    else:
        d = x0
    ctx.update(x0=x0, h=h)
    return float(s_s / s_t) * x - float(a_s * math.expm1(-h)) * d, eps


def dpmpp_2m(model, x, times, process, cond=None, *, generator=None, grad=False, **kw) -> Trajectory:
    """DPM-Solver++(2M) (Lu et al. 2022): 2nd-order multistep exponential integrator in log-SNR,
    data prediction. One model call per step."""
    return _deterministic("dpmpp-2m", model, x, times, process, cond, _dpmpp_2m_stage, grad, **kw)


SOLVERS: dict[str, Callable] = {
    "em": euler_maruyama,
    "ddim": ddim,
    "ode-euler": ode_euler,
    "eta": eta_sampler,
    "heun": heun,
    "dpmpp-2m": dpmpp_2m,
}
STOCHASTIC = {"em"}  # ddim and eta are stochastic when eta > 0


def get_solver(name: str, **kwargs) -> Callable:
    """Look up a solver by name; ``kwargs`` (e.g. eta for ddim) are bound into it."""
    fn = SOLVERS[choice("solver", name, SOLVERS)]
    return partial(fn, **kwargs) if kwargs else fn


def sample(model, process: NoiseProcess, shape, steps: int, solver: str = "em", cond=None, *,
           generator=None, device=None, grad=False, policy_std=0.0, **solver_kw) -> Trajectory:
    """Draw x_T ~ N(0, sigma(t_max)^2 I) of ``shape`` and integrate with ``solver`` over ``steps`` steps."""
    if steps < 1:
        raise CtrlDiffError(f"steps must be >= 1, got {steps}")
    x = torch.randn(shape, generator=generator, device=device) * process.prior_std()
    times = process.time_grid(steps, device=device)
    return get_solver(solver, **solver_kw)(model, x, times, process, cond, generator=generator, grad=grad,
                                           policy_std=policy_std)


def select_cond(cond, index: Tensor | None):
    """The conditions of samples ``index`` [N]: a label / embedding tensor, a list of prompts, or None."""
    if cond is None or index is None:
        return cond
    if isinstance(cond, Tensor):
        return cond[index.to(cond.device)]
    return [cond[i] for i in index.tolist()]


def repeat_cond(cond, n: int):
    """Each sample's condition repeated ``n`` times in a row (for [B * n] flattened (sample, step) pairs)."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.repeat_interleave(n, 0)
    return [c for c in cond for _ in range(n)]


# ---- differentiable replay of recorded affine steps ---------------------------------------------
def replay_steps(model, process: NoiseProcess, traj: Trajectory, start: int, index: Tensor | None = None, *,
                 checkpoint: bool = False) -> tuple[Tensor, Tensor]:
    """Re-run steps ``start .. K-1`` of an affine-solver trajectory (em, ddim, ode-euler) under grad, with the
    noise it recorded:  x_{k+1} = A_k x_k + B_k eps_model(t_k, x_k) + std_k xi_k,  from x_start = traj.states
    [:, start] (detached: no gradient flows into the steps before ``start``). With the model that sampled
    ``traj`` this reproduces its states; with another it is the reparameterised sample of that model's last
    K - start steps given x_start (the pathwise / reward-backprop gradient). ``index`` [N] selects samples;
    ``checkpoint`` recomputes each step's activations in the backward pass (memory O(1) in the steps).
    Returns (states [N, K - start + 1, D] including x_start, eps [N, K - start, D])."""
    if traj.coef_a is None or traj.actions is not None:
        raise CtrlDiffError(f"solver {traj.solver!r}: only single-stage solvers without recorded actions "
                            "(em, ddim, ode-euler) can be replayed differentiably")
    K = traj.num_steps
    if traj.noise is None and bool((traj.std > 0).any()):
        raise CtrlDiffError(f"trajectory of solver {traj.solver!r} has stochastic steps but no recorded noise: "
                            "it cannot be replayed")
    if not 0 <= start < K:
        raise CtrlDiffError(f"replay start must lie in [0, {K - 1}], got {start}")
    sel = slice(None) if index is None else index
    x = traj.states[sel, start].detach()
    cond = select_cond(traj.cond, index)
    states, outs = [x], []
    for k in range(start, K):
        noise = None if traj.noise is None else traj.noise[sel, k]
        a, b, std, t = float(traj.coef_a[k]), float(traj.coef_b[k]), float(traj.std[k]), traj.times[k]

        def step(x_k, a=a, b=b, std=std, t=t, noise=noise):
            eps = model_eps(model, process, x_k, t, cond)
            x_next = a * x_k + b * eps
            return (x_next + std * noise if noise is not None and std > 0 else x_next), eps

        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as ckpt

            x, eps = ckpt(step, x, use_reentrant=False)
        else:
            x, eps = step(x)
        states.append(x)
        outs.append(eps)
    return torch.stack(states, 1), torch.stack(outs, 1)


# ---- Girsanov helpers (METHODS section 0) ---------------------------------------------------
def evaluate_along(model, process: NoiseProcess, traj: Trajectory, chunk: int = 4096,
                   grad: bool = False) -> Tensor:
    """eps predictions of ``model`` at every (t_k, x_k), k < K, of ``traj`` -> [B, K, D]."""
    B, K = traj.batch_size, traj.num_steps
    xs = traj.states[:, :K].reshape(B * K, *traj.states.shape[2:])
    ts = traj.times[:K].to(xs.dtype).repeat(B)
    cond = None
    if traj.cond is not None:
        cond = traj.cond.repeat_interleave(K, 0) if isinstance(traj.cond, Tensor) else traj.cond
    outs = []
    with torch.set_grad_enabled(grad):
        for i in range(0, B * K, chunk):
            c = cond[i:i + chunk] if isinstance(cond, Tensor) else cond
            outs.append(model_eps(model, process, xs[i:i + chunk], ts[i:i + chunk], c))
    return torch.cat(outs).reshape(B, K, *traj.states.shape[2:])


def jittered_grid(times: Tensor, generator: torch.Generator | None = None, process: NoiseProcess | None = None) -> Tensor:
    """A random grid around ``times`` [K+1] (decreasing): the end points stay, each interior time is uniform
    between the midpoints to its neighbours, so the grid stays strictly decreasing with the same step count.
    With ``process``, the midpoints and the uniform draw are in log-SNR instead of time (and mapped back by bisection):
    the grid's last interior time then reaches down to about where the log-SNR is halfway between it and the data
    end's, so that training visits the small times that finer solvers step through (where the KL weight
    d lambda is largest) and not only those above the midpoint of the last step."""
    if times.numel() <= 2:
        return times
    t = times.double().cpu()
    z = t if process is None else process.log_snr(t)
    mid = 0.5 * (z[1:] + z[:-1])  # [K] midpoints
    u = torch.rand(len(t) - 2, generator=generator, dtype=torch.float64, device="cpu")
    inner = mid[1:] + u * (mid[:-1] - mid[1:])
    if process is not None:
        inner = _time_of_log_snr(process, inner, float(t[-1]), float(t[0]))
    return torch.cat([t[:1], inner, t[-1:]]).to(times.device, times.dtype)


def _time_of_log_snr(process: NoiseProcess, lam: Tensor, t_lo: float, t_hi: float, iters: int = 60) -> Tensor:
    """t in [t_lo, t_hi] with process.log_snr(t) = lam (log-SNR decreases in t), by bisection. [n] float64"""
    lo = torch.full_like(lam, t_lo)
    hi = torch.full_like(lam, t_hi)
    for _ in range(iters):
        m = 0.5 * (lo + hi)
        above = process.log_snr(m).double() > lam  # still too close to the data end: t must grow
        lo, hi = torch.where(above, m, lo), torch.where(above, hi, m)
    return 0.5 * (lo + hi)


def data_end_time(process: NoiseProcess, steps: int) -> float:
    """The time at and below which ``sampler.reference_data_end`` leaves the model to its reference: the midpoint of
    the last two interior times of the ``steps``-step training grid, the highest time that the random grid
    (:func:`jittered_grid`) can draw for its last interior point. So the training grid's last step is always the
    reference's. On the shipped 20-step VP grid: 0.076. Fewer than 3 steps: the data end itself (no gate)."""
    t = process.time_grid(steps).double()
    if len(t) < 4:
        return float(t[-1])
    return float(0.5 * (t[-2] + t[-3]))


def eta_kl_factor(eta) -> Tensor:
    """c(eta) = (1 + eta^2)^2 / (4 eta^2): the Girsanov path KL between two score models driving the eta-family
    sampler is  int (1/2) c(eta) g^2 ||s_a - s_b||^2 dtau  (c(1) = 1, the reverse SDE; c >= 1). An ODE step
    (eta = 0) has no path KL (the path measures are deterministic): c(0) is taken as 1, i.e. the reverse-SDE
    integral along the ODE path, as for every ODE solver's logged KL_path (see reward_backprop)."""
    e = torch.as_tensor(eta, dtype=torch.float64)
    return torch.where(e > 0, (1 + e * e) ** 2 / (4 * e * e).clamp(min=1e-300), torch.ones_like(e))


def output_factor(process: NoiseProcess, t: Tensor, prediction: str = "eps") -> Tensor:
    """c(t) with  eps_a - eps_b = c(t) (out_a - out_b)  for two outputs of the type ``prediction`` at the same (t, x)
    (eps: 1, score: -sigma, x0: -alpha / sigma, v: alpha on VP and rectified flows). [len(t)]"""
    t = torch.as_tensor(t)
    one = torch.ones(t.numel(), 1, dtype=t.dtype, device=t.device)
    return process.convert(one, prediction, "eps", t.reshape(-1), torch.zeros_like(one)).reshape(t.shape)


def kl_weights(process: NoiseProcess, times: Tensor, eta=None, prediction: str = "eps", substeps: int = 32) -> Tensor:
    """Per-step weights w_k with  sum_k w_k ||eps_a - eps_b||^2 ~ int (1/2) g^2 ||s_a - s_b||^2 dtau
    (``eta``: a number or [K], the eta-family sampler's noise level: each w_k times :func:`eta_kl_factor`).

    Uses the identity (1/2) g^2 / sigma^2 dt = -d lambda (lambda = log-SNR). The eps difference is known at t_k only;
    over the step it is taken to change as the difference of two outputs of the model's own type (``prediction``)
    that stays constant: eps_a - eps_b = c(t) (out_a - out_b) (:func:`output_factor`), so
        w_k = int_{t_{k+1}}^{t_k} c(t)^2 (-d lambda) / c(t_k)^2.
    For eps models (c = 1) that is lambda(t_{k+1}) - lambda(t_k) exactly. For a velocity model of a rectified flow,
    c = 1 - t: a constant velocity difference makes the eps difference vanish at t_max ~ 1, and the eps rule would
    count the first step ~1/(1 - t_max)^2 times too little. The integral is a midpoint rule in c^2 over ``substeps``
    geometric sub-intervals with exact log-SNR increments (exact for eps). A left Riemann sum of
    (1/2) g^2 / sigma^2 dtau under-resolves the integrand where it blows up (1/sigma^2 at the data end, g^2 at the
    noise end of cosine / rectified-flow schedules) and changes with the step count. [K]
    """
    t64 = times.double()
    if prediction == "eps":
        lam = process.log_snr(t64)
        w = lam[1:] - lam[:-1]
    else:
        frac = torch.linspace(0, 1, substeps + 1, dtype=torch.float64, device=t64.device)
        hi, lo = t64[:-1, None], t64[1:, None]
        sub = hi * (lo / hi) ** frac  # [K, n + 1] from t_k down to t_{k+1}, geometric
        dlam = process.log_snr(sub[:, 1:]) - process.log_snr(sub[:, :-1])
        c2 = output_factor(process, (sub[:, 1:] * sub[:, :-1]).sqrt(), prediction).pow(2)
        w = (c2 * dlam).sum(1) / output_factor(process, t64[:-1], prediction).pow(2)
    if eta is not None:
        w = w * eta_kl_factor(torch.as_tensor(eta, dtype=torch.float64).to(w.device))
    return w.to(times.dtype)


def prediction_of(model) -> str:
    """The output type of ``model`` ('eps' when it does not say): what the KL_path quadrature holds constant."""
    return getattr(model, "prediction", "eps")


def kl_increments(process: NoiseProcess, times: Tensor, eps_a: Tensor, eps_b: Tensor, eta=None,
                  prediction: str = "eps") -> Tensor:
    """Per-step Girsanov KL increments (1/2) c(eta) g^2 ||s_a - s_b||^2 dtau, integrated per step -> [B, K]
    (``eta``: the rollout's eta-family noise level, ``Trajectory.eta``; None: the reverse SDE, c = 1; ``prediction``:
    the models' output type, see :func:`kl_weights`)."""
    K = eps_a.shape[1]
    w = kl_weights(process, times[: K + 1], None if eta is None else torch.as_tensor(eta)[:K], prediction)
    return w.to(eps_a.dtype) * (eps_a - eps_b).flatten(2).pow(2).sum(-1)


def kl_path(process: NoiseProcess, traj: Trajectory, eps_theta: Tensor, eps_ref: Tensor,
            prediction: str = "eps") -> Tensor:
    """Girsanov KL_path estimate per sample [B]:  int (1/2) g^2 ||s_theta - s_ref||^2 dtau along the path.

    The quadrature (see :func:`kl_weights`) does not depend on the discretisation to first order; an eta-family
    trajectory is weighted with its own eta; ``prediction`` is the models' output type."""
    return kl_increments(process, traj.times, eps_theta, eps_ref, traj.eta, prediction).sum(1)


def girsanov_increment(g: float, dtau: float, xi: Tensor, s_new: Tensor, s_old: Tensor) -> Tensor:
    """Discretised Girsanov increment  g sqrt(dtau) xi.(s_new - s_old) - (1/2) g^2 ||s_new - s_old||^2 dtau."""
    ds = (s_new - s_old).flatten(1)
    return g * math.sqrt(dtau) * (xi.flatten(1) * ds).sum(1) - 0.5 * g * g * dtau * ds.pow(2).sum(1)
