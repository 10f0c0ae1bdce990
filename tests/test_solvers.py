"""Solvers, Trajectory records, Girsanov / KL_path helpers, CFG, model save/load.

Reference objects: a Gaussian mixture has an exact noised score (data.toy2d), so ExactGMMScore is a
perfect "pretrained" model; for a single Gaussian the probability-flow ODE is linear and its flow
is known in closed form, which gives exact references for the convergence-order tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ctrldiff import solvers as S
from ctrldiff.data.toy2d import GaussianMixture, gmm_preset
from ctrldiff.errors import CtrlDiffError
from ctrldiff.guidance import ClassifierFreeGuidance, with_guidance
from ctrldiff.models import MLPScoreModel, load_model, save_model
from ctrldiff.models.mlp import ExactGMMScore
from ctrldiff.noise import PROCESSES, make_process
from ctrldiff.trajectory import Trajectory, gaussian_log_prob

F64 = torch.float64
NAMES = sorted(PROCESSES)
DETERMINISTIC = {"ode-euler": S.ode_euler, "ddim": S.ddim, "heun": S.heun, "dpmpp-2m": S.dpmpp_2m}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fit_order(steps, errs) -> float:
    """Slope of -log(err) against log(steps): the empirical convergence order."""
    return float(-np.polyfit(np.log(steps), np.log(errs), 1)[0])


class PlusScoreResidual(nn.Module):
    """eps = base_eps + sigma_t * scale * mlp(x, t): a score-space residual (s = s_base - scale * mlp)."""

    prediction = "eps"

    def __init__(self, base, process, scale=0.5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.base, self.process, self.scale = base, process, scale
        self.res = MLPScoreModel(dim=2, hidden=32, depth=2)

    def forward(self, x, t, cond=None):
        sig = self.process.sigma(t.double()).to(x.dtype)[:, None]
        return self.base(x, t, cond) + sig * self.scale * self.res(x, t, cond).to(x.dtype)


class Reparam(nn.Module):
    """Present an eps model as a 'score' / 'x0' / 'v' predictor (to test the solvers' conversion)."""

    def __init__(self, eps_model, process, prediction):
        super().__init__()
        self.m, self.process, self.prediction = eps_model, process, prediction

    def forward(self, x, t, cond=None):
        return self.process.convert(self.m(x, t, cond), "eps", self.prediction, t, x)


# =================================================================================================
# (1) samples match the GMM
# =================================================================================================
N_GMM = 4000
# name, kwargs, steps: step counts where the discretisation bias is below ~1 Monte-Carlo standard
# error at N = 4000 (measured with 20000 samples: e.g. DDIM(eta=0) at 25 steps still has std_y 0.45,
# DDPM at 100 steps 0.47, hence 100 / 200 steps for these first-order samplers).
GMM_CASES = [
    ("em", {}, 100),
    ("ddim", {"eta": 1.0}, 200),
    ("ode-euler", {}, 50),
    ("ddim", {}, 100),
    ("heun", {}, 25),
    ("dpmpp-2m", {}, 25),
]


def _gmm_exact_stats(gm: GaussianMixture, process):
    """Mean, std per axis and left-mode mass (P[x_0 < 0]) of p_{t_min} (the target of sampling)."""
    t = torch.tensor(process.t_min, dtype=F64)
    a, s = process.alpha(t), process.sigma(t)
    var_k = a**2 * gm.stds**2 + s**2
    mean = (gm.weights[:, None] * a * gm.means).sum(0)
    second = (gm.weights[:, None] * ((a * gm.means) ** 2 + var_k[:, None])).sum(0)
    normal = torch.distributions.Normal(a * gm.means[:, 0], var_k.sqrt())
    left = (gm.weights * normal.cdf(torch.zeros(len(gm.weights), dtype=F64))).sum()
    return mean, (second - mean**2).sqrt(), float(left)


@pytest.fixture(scope="module")
def gmm_setup():
    p = make_process("vp")
    gm = gmm_preset("gmm2")
    return p, gm, ExactGMMScore(gm, p), _gmm_exact_stats(gm, p)


@pytest.mark.parametrize("name,kw,steps", GMM_CASES, ids=[f"{n}{kw.get('eta', '')}-{k}" for n, kw, k in GMM_CASES])
def test_solver_samples_match_gmm(gmm_setup, name, kw, steps):
    p, gm, model, (mean, std, left) = gmm_setup
    traj = S.sample(model, p, (N_GMM, 2), steps, name, generator=gen(0), **kw)
    y = traj.final.double()
    assert torch.isfinite(y).all()
    n = y.shape[0]
    m, sd = y.mean(0), y.std(0)
    kurt = ((y - m) ** 4).mean(0) / sd**4
    frac = float((y[:, 0] < 0).double().mean())
    # Monte-Carlo standard errors (estimated from the sample): mean sd/sqrt(n); sample std
    # sd*sqrt((kurtosis-1)/(4n)); a fraction sqrt(p(1-p)/n). Tolerance: 4 standard errors + a small
    # allowance for the remaining discretisation bias. Typical bugs (a missing 1/2 in the drift, a
    # wrong sign, a mis-scaled noise) move these statistics by many times the tolerance.
    se_mean = sd / math.sqrt(n)
    se_std = sd * torch.sqrt((kurt - 1) / (4 * n))
    se_frac = math.sqrt(left * (1 - left) / n)
    assert ((m - mean).abs() <= 4 * se_mean + 0.02).all(), (m, mean, se_mean)
    assert ((sd - std).abs() <= 4 * se_std + 0.02).all(), (sd, std, se_std)
    assert abs(frac - left) <= 4 * se_frac + 0.01, (frac, left, se_frac)


def test_em_weak_error_falls_with_steps(gmm_setup):
    """MC check of weak convergence of Euler-Maruyama: the error of E||x||^2 at 10 steps is many
    standard errors large, at 100 steps it is within the Monte-Carlo noise."""
    p, gm, model, (mean, std, _) = gmm_setup
    exact_m2 = float((std**2 + mean**2).sum())
    errs, ses = {}, {}
    for steps in (10, 100):
        y = S.sample(model, p, (N_GMM, 2), steps, "em", generator=gen(1)).final.double()
        m2 = y.pow(2).sum(1)
        errs[steps] = abs(float(m2.mean()) - exact_m2)
        ses[steps] = float(m2.std()) / math.sqrt(N_GMM)
    # measured over 6 seeds: error +0.41..0.46 at 10 steps, -0.01..+0.13 at 100 steps (bias ~+0.04), se ~0.035
    assert errs[10] > 6 * ses[10], (errs, ses)
    assert errs[100] < 4 * ses[100] + 0.05, (errs, ses)
    assert errs[10] - errs[100] > 5 * math.hypot(ses[10], ses[100]), (errs, ses)


# =================================================================================================
# (2) convergence order
# =================================================================================================
MU = torch.tensor([0.5, -0.3], dtype=F64)
S0 = 0.6
WINDOW = (0.9, 0.1)  # away from the stiff ends, where uniform-in-t steps are in the asymptotic regime


def _gauss_model(p):
    return ExactGMMScore(GaussianMixture(MU[None], [S0]), p)


def _gauss_flow(p, x, t0, t1):
    """Exact probability-flow map for data N(mu, s0^2 I): z = (x - alpha mu) / sqrt(alpha^2 s0^2 + sigma^2) is
    conserved along the ODE."""
    t0, t1 = torch.tensor(t0, dtype=F64), torch.tensor(t1, dtype=F64)
    sd = lambda t: torch.sqrt(p.alpha(t) ** 2 * S0**2 + p.sigma(t) ** 2)  # noqa: E731
    return p.alpha(t1) * MU + sd(t1) / sd(t0) * (x - p.alpha(t0) * MU)


def _start(p, t0, n=32, seed=0):
    t = torch.tensor(t0, dtype=F64)
    sd = torch.sqrt(p.alpha(t) ** 2 * S0**2 + p.sigma(t) ** 2)
    return p.alpha(t) * MU + sd * torch.randn(n, 2, generator=gen(seed), dtype=F64)


def _grid(t0, t1, n):
    return torch.linspace(t0, t1, n + 1, dtype=F64)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("solver,order", [("ode-euler", 1), ("ddim", 1), ("heun", 2)])
def test_ode_order_against_closed_form_flow(name, solver, order):
    """Pathwise error of the terminal state vs the exact flow of a Gaussian target, steps 10..80:
    fitted log-log slope ~1 (Euler, DDIM) or ~2 (Heun). Measured: Euler 0.98 (rf) / 1.08 (vp) / 0.99 (cosine),
    DDIM 0.98-0.99, Heun 1.92 (rf) / 1.97 (vp) / 1.99 (cosine)."""
    p = make_process(name)
    model = _gauss_model(p)
    x = _start(p, WINDOW[0])
    exact = _gauss_flow(p, x, *WINDOW)
    steps = [10, 20, 40, 80]
    errs = [float((DETERMINISTIC[solver](model, x, _grid(*WINDOW, n), p).final - exact).norm(dim=1).mean())
            for n in steps]
    slope = fit_order(steps, errs)
    lo, hi = (0.85, 1.25) if order == 1 else (1.75, 2.3)
    assert lo < slope < hi, (slope, errs)
    assert errs[-1] < (2e-2 if order == 1 else 2e-4), errs  # converges to the *exact* flow


@pytest.mark.parametrize("name", NAMES)
def test_dpmpp_2m_second_order(name):
    """DPM-Solver++(2M) on a wide (overlapping, so smooth) 2-component GMM, reference = Heun with 600
    steps (its error ~1e-6, < 1% of the smallest measured error). Steps 20..160 (the multistep formula
    needs a few steps to reach its asymptotic regime on a uniform-t grid). Measured slopes 2.00 (rf),
    2.15 (vp), 2.07 (cosine)."""
    p = make_process(name)
    gm = GaussianMixture([[-1.0, 0.3], [1.0, -0.2]], [0.8, 0.7], [0.6, 0.4])
    model = ExactGMMScore(gm, p)
    x = torch.randn(32, 2, generator=gen(0), dtype=F64) * float(p.sigma(torch.tensor(WINDOW[0])))
    ref = S.heun(model, x, _grid(*WINDOW, 600), p).final
    steps = [20, 40, 80, 160]
    errs = [float((S.dpmpp_2m(model, x, _grid(*WINDOW, n), p).final - ref).norm(dim=1).mean()) for n in steps]
    slope = fit_order(steps, errs)
    assert 1.75 < slope < 2.5, (slope, errs)


@pytest.mark.parametrize("name", NAMES)
def test_dpmpp_2m_matches_reference_formula(name):
    """DPM-Solver++(2M) written out from Lu et al. 2022 (Alg. 2, data prediction), on an irregular grid.
    Order tests cannot see some errors in the multistep weights: e.g. r_i inverted (h_i / h_{i-1}) leaves
    the method 2nd order, because its local errors ~ (h_{i-1}^2 - h_i^2) telescope. The first step and the
    last step are first order (DPM-Solver++(1) = DDIM in data prediction), the rest use
        D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i,
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,  h_i = lambda_i - lambda_{i-1}."""
    p = make_process(name)
    model = ExactGMMScore(gmm_preset("gmm2"), p)
    w = torch.tensor([1.0, 3.0, 1.5, 1.0, 4.0, 2.0, 1.0, 2.5], dtype=F64)
    times = p.t_max + (p.t_min - p.t_max) * torch.cat([torch.zeros(1, dtype=F64), w.cumsum(0) / w.sum()])
    x = torch.randn(16, 2, generator=gen(30), dtype=F64) * p.prior_std()
    tr = S.dpmpp_2m(model, x, times, p)
    lam, a, s = p.log_snr(times), p.alpha(times), p.sigma(times)
    y, x0_prev = x, None
    K = len(w)
    for i in range(1, K + 1):
        t_prev = times[i - 1].expand(16)
        x0 = p.convert(model(y, t_prev), "eps", "x0", t_prev, y)
        h = lam[i] - lam[i - 1]
        if x0_prev is None or i == K:
            d = x0
        else:
            r = (lam[i - 1] - lam[i - 2]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        y = s[i] / s[i - 1] * y - a[i] * torch.expm1(-h) * d
        x0_prev = x0
        torch.testing.assert_close(tr.states[:, i], y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", sorted(DETERMINISTIC))
def test_ode_solvers_converge_over_full_range(solver):
    """From t_max to t_min (VP, stiff near both ends) every deterministic solver converges to the exact
    flow of the Gaussian target."""
    p = make_process("vp")
    model = _gauss_model(p)
    x = _start(p, p.t_max, n=16)
    exact = _gauss_flow(p, x, p.t_max, p.t_min)
    e = {n: float((DETERMINISTIC[solver](model, x, p.time_grid(n, dtype=F64), p).final - exact).norm(dim=1).mean())
         for n in (20, 160)}
    assert e[160] < e[20] / 4, e
    assert e[160] < (2e-2 if solver in ("ode-euler", "ddim") else 2e-3), e


def _em_moment_error(p, steps, solver="em"):
    """Exact weak error of EM (or DDPM) for a Gaussian target. The score is affine in x, so the
    chain x' = A x + B eps(x) + std xi stays Gaussian: propagate mean and variance exactly, with the
    coefficients the solver itself recorded in its Trajectory. Start from the exact marginal at t_max
    so that only the discretisation error remains."""
    model = _gauss_model(p)
    times = p.time_grid(steps, dtype=F64)
    kw = {"eta": 1.0} if solver == "ddim" else {}
    traj = S.get_solver(solver, **kw)(model, _start(p, p.t_max, n=2), times, p, generator=gen(0))
    v = lambda t: p.alpha(t) ** 2 * S0**2 + p.sigma(t) ** 2  # noqa: E731
    m, var = p.alpha(times[0]) * MU, v(times[0])
    for k in range(steps):
        t = times[k]
        c = traj.coef_b[k] * p.sigma(t) / v(t)  # eps(x) = sigma (x - alpha mu) / v
        m = (traj.coef_a[k] + c) * m - c * p.alpha(t) * MU
        var = (traj.coef_a[k] + c) ** 2 * var + traj.std[k] ** 2
    t = times[-1]
    return float((m - p.alpha(t) * MU).norm() + (var - v(t)).abs())


@pytest.mark.parametrize("name", ["vp", "vp-cosine"])
def test_em_weak_order_one_exact_moments(name):
    """Weak order of Euler-Maruyama from exactly propagated moments (no Monte-Carlo noise): slope ~1
    (measured 1.10 on vp, 1.03 on vp-cosine for steps 10..160)."""
    p = make_process(name)
    steps = [10, 20, 40, 80, 160]
    errs = [_em_moment_error(p, n) for n in steps]
    assert 0.85 < fit_order(steps, errs) < 1.25, errs
    # DDPM (DDIM eta=1) converges too (its order is still pre-asymptotic ~0.7-0.8 at these steps)
    e = [_em_moment_error(p, n, "ddim") for n in (10, 160)]
    assert e[1] < e[0] / 4, e


def test_em_rf_converges_exact_moments():
    p = make_process("rf")
    e = [_em_moment_error(p, n) for n in (20, 80)]
    assert e[1] < e[0] / 4 and e[1] < 1e-3, e


# =================================================================================================
# (3) Trajectory contents
# =================================================================================================
@pytest.fixture(scope="module")
def f64_setup():
    p = make_process("vp")
    gm = gmm_preset("gmm2")
    return p, ExactGMMScore(gm, p)


AFFINE = {"em": (S.euler_maruyama, {}), "ddim1": (S.ddim, {"eta": 1.0}), "ddim.5": (S.ddim, {"eta": 0.5}),
          "ode-euler-pol": (S.ode_euler, {"policy_std": 0.3}), "ddim0-pol": (S.ddim, {"policy_std": 0.3}),
          "em-pol": (S.euler_maruyama, {"policy_std": 0.3})}


@pytest.mark.parametrize("case", sorted(AFFINE))
def test_stochastic_trajectory_contents(f64_setup, case):
    p, model = f64_setup
    fn, kw = AFFINE[case]
    B, K = 16, 12
    x = torch.randn(B, 2, generator=gen(2), dtype=F64)
    times = p.time_grid(K, dtype=F64)
    tr = fn(model, x, times, p, generator=gen(3), **kw)
    assert tr.stochastic and tr.num_steps == K and tr.batch_size == B
    assert tr.states.shape == (B, K + 1, 2) and tr.outputs.shape == (B, K, 2)
    assert tr.noise.shape == (B, K, 2) and tr.log_probs.shape == (B, K)
    assert tr.coef_a.shape == tr.coef_b.shape == tr.std.shape == (K,)
    assert torch.equal(tr.times, times) and torch.equal(tr.states[:, 0], x) and torch.equal(tr.final, tr.states[:, -1])
    torch.testing.assert_close(tr.dtau, times[:-1] - times[1:])
    # outputs are the model's eps at (t_k, x_k): re-evaluating along the path reproduces them
    torch.testing.assert_close(S.evaluate_along(model, p, tr), tr.outputs, rtol=1e-12, atol=1e-12)
    for k in range(K):
        mean = tr.coef_a[k] * tr.states[:, k] + tr.coef_b[k] * tr.outputs[:, k]
        torch.testing.assert_close(tr.states[:, k + 1], mean + tr.std[k] * tr.noise[:, k], rtol=1e-12, atol=1e-12)
        lp = gaussian_log_prob(tr.states[:, k + 1], mean, tr.std[k])
        torch.testing.assert_close(tr.log_probs[:, k], lp, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(tr.step_log_prob(k, tr.outputs[:, k]), lp, rtol=1e-10, atol=1e-10)
    # batched (per-sample step index) form of step_log_prob
    kk = torch.randint(0, K, (B,), generator=gen(4))
    bi = torch.arange(B)
    lp = tr.step_log_prob(kk, tr.outputs[bi, kk], x=tr.states[bi, kk], x_next=tr.states[bi, kk + 1])
    torch.testing.assert_close(lp, tr.log_probs[bi, kk], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["em", "ode-euler", "ddim"])
def test_recorded_coefficients(f64_setup, name):
    """coef_a / coef_b / std are the documented one-step formulas."""
    p, model = f64_setup
    times = p.time_grid(8, dtype=F64)
    ps = 0.2
    kw = {"eta": 1.0} if name == "ddim" else {}
    tr = S.get_solver(name, **kw)(model, torch.zeros(2, 2, dtype=F64), times, p, generator=gen(0), policy_std=ps)
    for k in range(8):
        t, s = times[k], times[k + 1]
        dtau = t - s
        a_t, s_t, a_s, s_s = p.alpha(t), p.sigma(t), p.alpha(s), p.sigma(s)
        if name == "em":
            A, Bc, sd = 1 - p.f(t) * dtau, -p.g2(t) * dtau / s_t, torch.sqrt(p.g2(t) * dtau)
        elif name == "ode-euler":
            A, Bc, sd = 1 - p.f(t) * dtau, -0.5 * p.g2(t) * dtau / s_t, torch.tensor(0.0, dtype=F64)
        else:  # DDPM posterior
            sd = s_s / s_t * torch.sqrt(s_t**2 - (a_t / a_s) ** 2 * s_s**2)
            A, Bc = a_s / a_t, torch.sqrt(s_s**2 - sd**2) - a_s * s_t / a_t
        vals = torch.stack([A, Bc, torch.sqrt(sd**2 + (Bc * ps) ** 2)])
        torch.testing.assert_close(torch.stack([tr.coef_a[k], tr.coef_b[k], tr.std[k]]), vals, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,kw", [("ode-euler", {}), ("ddim", {}), ("heun", {}), ("dpmpp-2m", {})])
def test_deterministic_trajectories(f64_setup, name, kw):
    p, model = f64_setup
    x = torch.randn(8, 2, generator=gen(5), dtype=F64)
    times = p.time_grid(6, dtype=F64)
    tr = S.get_solver(name, **kw)(model, x, times, p, generator=gen(0))
    assert not tr.stochastic and tr.log_probs is None and tr.noise is None
    assert tr.states.shape == (8, 7, 2) and tr.outputs.shape == (8, 6, 2)
    # first-stage outputs are the model eps at (t_k, x_k)
    torch.testing.assert_close(S.evaluate_along(model, p, tr), tr.outputs, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="deterministic"):
        tr.step_log_prob(0, tr.outputs[:, 0])
    # deterministic: a different generator gives the same path
    tr2 = S.get_solver(name, **kw)(model, x, times, p, generator=gen(99))
    assert torch.equal(tr.states, tr2.states)


@pytest.mark.parametrize("name", ["ode-euler", "ddim"])
def test_policy_std_makes_ode_solvers_stochastic(f64_setup, name):
    """Exploration on the action a = eps + policy_std * zeta: x' = A x + B a, so x' has std |B| policy_std."""
    p, model = f64_setup
    ps, n = 0.3, 4000
    times = p.time_grid(5, dtype=F64)
    x = torch.randn(4, 2, generator=gen(6), dtype=F64).repeat(n // 4, 1)
    tr = S.get_solver(name)(model, x, times, p, generator=gen(7), policy_std=ps)
    det = S.get_solver(name)(model, x, times, p)
    assert tr.stochastic
    torch.testing.assert_close(tr.std, tr.coef_b.abs() * ps)
    torch.testing.assert_close(tr.std, det.coef_b.abs() * ps)
    # first step starts from the same states: its mean is the deterministic step, its spread |B| ps
    resid = tr.states[:, 1] - det.states[:, 1]
    assert float(resid.mean(0).abs().max()) < 4 * float(tr.std[0]) / math.sqrt(n)
    torch.testing.assert_close(resid.std(0), tr.std[0].expand(2), rtol=4 * math.sqrt(1 / (2 * n)), atol=0)


@pytest.mark.parametrize("name", ["heun", "dpmpp-2m"])
def test_multistage_solvers_reject_policy_noise(f64_setup, name):
    p, model = f64_setup
    with pytest.raises(CtrlDiffError, match="policy noise"):
        S.get_solver(name)(model, torch.zeros(2, 2, dtype=F64), p.time_grid(3, dtype=F64), p, policy_std=0.1)


@pytest.mark.parametrize("prediction", ["score", "x0", "v"])
@pytest.mark.parametrize("solver", ["em", "heun", "dpmpp-2m"])
def test_solvers_convert_model_parameterisation(f64_setup, prediction, solver):
    """A model predicting score / x0 / v gives the same trajectory as the eps model it represents."""
    p, model = f64_setup
    x = torch.randn(8, 2, generator=gen(8), dtype=F64)
    times = p.time_grid(6, dtype=F64)
    a = S.get_solver(solver)(model, x, times, p, generator=gen(9))
    b = S.get_solver(solver)(Reparam(model, p, prediction), x, times, p, generator=gen(9))
    torch.testing.assert_close(b.states, a.states, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.outputs, a.outputs, rtol=1e-9, atol=1e-9)


# =================================================================================================
# (4) Girsanov increment and (5) KL_path
# =================================================================================================
def test_em_log_ratio_is_discretised_girsanov_increment():
    p = make_process("vp")
    gm = gmm_preset("gmm2")
    old = ExactGMMScore(gm, p)
    torch.manual_seed(11)
    new = ExactGMMScore(gm, p, residual=MLPScoreModel(dim=2, hidden=32, depth=2).double())
    B, K = 64, 20
    x = torch.randn(B, 2, generator=gen(12), dtype=F64)
    tr = S.euler_maruyama(old, x, p.time_grid(K, dtype=F64), p, generator=gen(13))
    eps_new = S.evaluate_along(new, p, tr)
    assert (eps_new - tr.outputs).abs().max() > 1e-2  # the two models really differ
    for k in range(K):
        t = tr.times[k]
        sig = p.sigma(t)
        log_ratio = tr.step_log_prob(k, eps_new[:, k]) - tr.log_probs[:, k]
        gir = S.girsanov_increment(float(p.g(t)), float(tr.dtau[k]), tr.noise[:, k], -eps_new[:, k] / sig,
                                   -tr.outputs[:, k] / sig)
        torch.testing.assert_close(log_ratio, gir, rtol=1e-9, atol=1e-10)


def test_kl_path_of_model_with_itself_is_zero(f64_setup):
    p, model = f64_setup
    tr = S.sample(model, p, (64, 2), 20, "em", generator=gen(14))
    eps = S.evaluate_along(model, p, tr)
    kl = S.kl_path(p, tr, eps, eps)
    assert kl.shape == (64,) and bool((kl == 0).all())
    assert bool((S.kl_path(p, tr, tr.outputs, eps) == 0).all())


def test_kl_path_positive_and_step_invariant():
    """Two models that differ by a bounded score residual: KL_path > 0 and the Girsanov estimate does
    not depend on the discretisation: 50 vs 200 steps within 10%. Measured over 8 seeds: KL ~0.18 at
    50 steps, ~0.17 at 200 (relative difference 4.8-8.1%, mostly the EM sampling bias at 50 steps, ~2%
    from the quadrature); Monte-Carlo standard error ~0.0024 each at 2000 samples."""
    p = make_process("vp")
    ref = ExactGMMScore(gmm_preset("gmm2"), p)
    # residual in score space (bounded |s_theta - s_ref|); an O(1) residual in eps space makes the true
    # KL_path grow like log(1 / t_min) (the rate ~ g^2 / sigma^2 ~ 1 / t), see the quadrature test below
    theta = PlusScoreResidual(ref, p, scale=0.5, seed=0)
    kl = {}
    with torch.no_grad():
        for steps in (50, 200):
            tr = S.sample(theta, p, (2000, 2), steps, "em", generator=gen(15))
            per = S.kl_path(p, tr, S.evaluate_along(theta, p, tr), S.evaluate_along(ref, p, tr))
            assert bool((per >= 0).all()) and float(per.mean()) > 0.05
            kl[steps] = float(per.mean())
    assert abs(kl[50] - kl[200]) < 0.1 * kl[200], kl


def _int_half_g2(p, n=200001):
    """int_{t_min}^{t_max} (1/2) g(t)^2 dt by composite Simpson on a fine grid."""
    t = torch.linspace(p.t_min, p.t_max, n, dtype=F64)
    y = 0.5 * p.g2(t)
    h = (p.t_max - p.t_min) / (n - 1)
    return float(h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


@pytest.mark.parametrize("name,space", [
    ("vp", "score"),
    ("vp-cosine", "score"),
    ("rf", "score"),
    ("vp", "eps"),
    ("vp-cosine", "eps"),
    ("rf", "eps"),
    ("vp", "v"),
    ("rf", "v"),
])
def test_kl_path_quadrature_is_step_invariant(name, space):
    """Deterministic check of the KL_path quadrature: two models whose outputs (of type ``space``) differ by a
    constant c have an exact KL_path, (1/2)|c|^2 int g^2 dt for score models, |c|^2 (lambda(t_min) - lambda(t_max))
    for eps models (because (1/2) g^2 / sigma^2 dt = -d lambda) and |c|^2 int alpha^2 (-d lambda) for velocity
    models (rectified flow: log(t_max / t_min) - (t_max - t_min)). kl_path must match it within 10% at 50 and at
    200 steps (METHODS 0: KL_path must not change with the number of steps), given the models' output type."""
    p = make_process(name)
    c = torch.tensor([0.6, -0.8], dtype=F64)  # |c| = 1
    for steps in (50, 200):
        times = p.time_grid(steps, dtype=F64)
        zeros = torch.zeros(1, steps, 2, dtype=F64)
        tr = Trajectory(times=times, states=torch.zeros(1, steps + 1, 2, dtype=F64), outputs=zeros, solver="none")
        d_eps = c * S.output_factor(p, times[:-1], space)[None, :, None]
        kl = float(S.kl_path(p, tr, zeros, d_eps, prediction=space)[0])
        lam = lambda t: float(p.log_snr(torch.tensor(t, dtype=F64)))  # noqa: E731
        if space == "score":
            exact = _int_half_g2(p)
        elif space == "eps":
            exact = lam(p.t_min) - lam(p.t_max)
        elif name == "rf":
            exact = math.log(p.t_max / p.t_min) - (p.t_max - p.t_min)
        else:  # vp, v: int alpha^2 (1/2) g^2 / sigma^2 dt by Simpson
            t = torch.linspace(p.t_min, p.t_max, 200001, dtype=F64)
            y = 0.5 * p.alpha(t) ** 2 * p.g2(t) / p.sigma(t) ** 2
            h = (p.t_max - p.t_min) / 200000
            exact = float(h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))
        assert abs(kl - exact) < 0.1 * exact, (steps, kl, exact)


# =================================================================================================
# (6) gradients through the sampler
# =================================================================================================
@pytest.mark.parametrize("solver,kw", [("em", {}), ("ddim", {"eta": 1.0}), ("ode-euler", {}), ("heun", {}),
                                       ("dpmpp-2m", {})])
def test_grad_flows_from_final_state_to_parameters(solver, kw):
    torch.manual_seed(16)
    p = make_process("vp")
    model = MLPScoreModel(dim=2, hidden=16, depth=1).double()
    x = torch.randn(8, 2, generator=gen(17), dtype=F64)
    times = p.time_grid(4, dtype=F64)
    fn = S.get_solver(solver, **kw)

    def loss(grad):
        tr = fn(model, x, times, p, generator=gen(18), grad=grad)
        return tr.final.pow(2).sum()

    L = loss(True)
    L.backward()
    grads = {n: q.grad for n, q in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["out.1.weight"].abs().sum() > 0 and grads["inp.weight"].abs().sum() > 0
    # directional derivative along the output bias matches a central finite difference
    w = model.out[1].bias
    d = torch.tensor([0.3, -0.7], dtype=F64)
    h = 1e-6
    with torch.no_grad():
        w += h * d
        lp = loss(False)
        w -= 2 * h * d
        lm = loss(False)
        w += h * d
    fd = (lp - lm) / (2 * h)
    torch.testing.assert_close(fd, (grads["out.1.bias"] * d).sum(), rtol=1e-5, atol=1e-7)
    # grad=False: no graph
    model.zero_grad()
    assert not loss(False).requires_grad


# =================================================================================================
# (7) classifier-free guidance
# =================================================================================================
@pytest.fixture(scope="module")
def cond_model():
    torch.manual_seed(19)
    return MLPScoreModel(dim=2, hidden=32, depth=2, num_classes=3)


def test_cfg_scales(cond_model):
    m = cond_model
    x = torch.randn(6, 2, generator=gen(20))
    t = torch.rand(6, generator=gen(21))
    c = torch.tensor([0, 1, 2, 0, 1, 2])
    null = m.null_condition(c)
    out_c, out_u = m(x, t, c), m(x, t, null)
    assert not torch.allclose(out_c, out_u, atol=1e-4)  # the condition matters
    assert torch.equal(ClassifierFreeGuidance(m, 1.0)(x, t, c), out_c)
    torch.testing.assert_close(ClassifierFreeGuidance(m, 0.0)(x, t, c), out_u)
    torch.testing.assert_close(ClassifierFreeGuidance(m, 3.0)(x, t, c), out_u + 3.0 * (out_c - out_u))
    torch.testing.assert_close(m(x, t, None), out_u)  # no condition = the null token
    assert with_guidance(m, None) is m and with_guidance(m, 1.0) is m
    assert isinstance(with_guidance(m, 2.0), ClassifierFreeGuidance)
    v_model = MLPScoreModel(dim=2, hidden=8, depth=1, num_classes=2, prediction="v")
    assert ClassifierFreeGuidance(v_model, 2.0).prediction == "v"


@pytest.mark.parametrize("solver,kw", [("em", {}), ("ddim", {"eta": 1.0}), ("ddim", {}), ("ode-euler", {}), ("heun", {}),
                                       ("dpmpp-2m", {})])
def test_cfg_with_every_solver(cond_model, solver, kw):
    m = cond_model
    p = make_process("vp")
    c = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        def run(model, cond):
            return S.sample(model, p, (4, 2), 6, solver, cond=cond, generator=gen(22), **kw)

        base_c, base_u = run(m, c), run(m, None)
        g1 = run(ClassifierFreeGuidance(m, 1.0), c)
        g0 = run(ClassifierFreeGuidance(m, 0.0), c)
        g3 = run(ClassifierFreeGuidance(m, 3.0), c)
    assert torch.equal(g1.states, base_c.states)
    torch.testing.assert_close(g0.states, base_u.states, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(g3.states).all() and not torch.allclose(g3.final, base_c.final)
    assert torch.equal(g3.cond, c)
    # re-evaluating the guided model along its own path reproduces its recorded (first-stage) outputs
    with torch.no_grad():
        torch.testing.assert_close(S.evaluate_along(ClassifierFreeGuidance(m, 3.0), p, g3), g3.outputs,
                                   rtol=1e-4, atol=1e-5)


# =================================================================================================
# (8) bad input
# =================================================================================================
def test_unknown_solver_name(f64_setup):
    p, model = f64_setup
    with pytest.raises(CtrlDiffError) as ei:
        S.sample(model, p, (4, 2), 5, "rk45")
    msg = str(ei.value)
    assert "'rk45'" in msg and all(n in msg for n in ("em", "ddim", "ode-euler", "heun", "dpmpp-2m"))
    with pytest.raises(CtrlDiffError, match="unknown solver 'euler'"):
        S.get_solver("euler")


@pytest.mark.parametrize("solver", sorted(S.SOLVERS))
def test_bad_time_grids(f64_setup, solver):
    p, model = f64_setup
    x = torch.zeros(4, 2, dtype=F64)
    fn = S.get_solver(solver)
    for times in (torch.linspace(p.t_min, p.t_max, 5, dtype=F64),  # increasing
                  torch.tensor([0.9, 0.5, 0.5, 0.1], dtype=F64)):  # not strictly decreasing
        with pytest.raises(CtrlDiffError, match="strictly decreasing"):
            fn(model, x, times, p)
    with pytest.raises(CtrlDiffError, match="at least 2 points"):
        fn(model, x, torch.tensor([0.5], dtype=F64), p)
    with pytest.raises(CtrlDiffError, match="time grid must be 1-D"):
        fn(model, x, torch.ones(2, 3, dtype=F64), p)
    with pytest.raises(CtrlDiffError, match=r"shape \[batch, \.\.\.\]"):
        fn(model, torch.zeros(2, dtype=F64), p.time_grid(3, dtype=F64), p)


@pytest.mark.parametrize("solver", sorted(S.SOLVERS))
def test_condition_batch_mismatch(cond_model, solver):
    p = make_process("vp")
    with pytest.raises(CtrlDiffError, match="condition batch 3 does not match state batch 4"):
        S.sample(cond_model, p, (4, 2), 3, solver, cond=torch.tensor([0, 1, 2]))


def test_bad_steps_eta_and_labels(f64_setup, cond_model):
    p, model = f64_setup
    for steps in (0, -3):
        with pytest.raises(CtrlDiffError, match=f"steps must be >= 1, got {steps}"):
            S.sample(model, p, (4, 2), steps, "em")
    with pytest.raises(CtrlDiffError, match="eta must be >= 0"):
        S.sample(model, p, (4, 2), 3, "ddim", eta=-0.5)
    with pytest.raises(CtrlDiffError, match=r"condition labels must lie in 0\.\.2"):
        S.sample(cond_model, p, (2, 2), 3, "em", cond=torch.tensor([0, 7]))


def test_mlp_wrong_input_shape():
    m = MLPScoreModel(dim=2, hidden=8, depth=1)
    t = torch.full((4,), 0.5)
    for bad in (torch.zeros(4, 3), torch.zeros(4), torch.zeros(4, 2, 1)):
        with pytest.raises(CtrlDiffError, match=r"expects input of shape \[batch, 2\]"):
            m(bad, t)
    with pytest.raises(CtrlDiffError, match=r"got \(4, 3\)"):
        S.sample(m, make_process("vp"), (4, 3), 2, "em")


# =================================================================================================
# (9) save / load
# =================================================================================================
@pytest.mark.parametrize("kw", [dict(dim=2, hidden=32, depth=2),
                                dict(dim=3, hidden=16, depth=1, num_classes=4, prediction="v")])
def test_save_load_roundtrip(tmp_path, kw):
    torch.manual_seed(23)
    m = MLPScoreModel(**kw).eval()
    wpath = save_model(m, tmp_path / "sub" / "model", metadata={"note": "x", "step": 3})
    assert wpath.exists() and wpath.suffix == ".safetensors" and wpath.with_suffix(".json").exists()
    x = torch.randn(5, kw["dim"], generator=gen(24))
    t = torch.rand(5, generator=gen(25))
    c = torch.tensor([0, 1, 2, 3, 4]) if kw.get("num_classes") else None
    for path in (tmp_path / "sub" / "model", wpath, wpath.with_suffix(".json"), str(wpath)):
        m2 = load_model(path)
        assert type(m2) is MLPScoreModel and m2.config == m.config and m2.prediction == m.prediction
        assert m2.metadata == {"note": "x", "step": 3}
        assert torch.equal(m2(x, t, c), m(x, t, c))
        for (n1, p1), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
            assert n1 == n2 and torch.equal(p1, p2)


def test_load_missing_or_corrupt_model(tmp_path):
    with pytest.raises(CtrlDiffError, match="model file not found"):
        load_model(tmp_path / "nope")
    m = MLPScoreModel(dim=2, hidden=8, depth=1)
    save_model(m, tmp_path / "m")
    (tmp_path / "m.safetensors").unlink()
    with pytest.raises(CtrlDiffError, match=r"not found: .*m\.safetensors"):
        load_model(tmp_path / "m")
    save_model(m, tmp_path / "m")
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(CtrlDiffError, match="not a ctrldiff model config"):
        load_model(tmp_path / "m")
    save_model(m, tmp_path / "m")
    save_model(MLPScoreModel(dim=2, hidden=16, depth=1), tmp_path / "other")
    (tmp_path / "other.safetensors").replace(tmp_path / "m.safetensors")
    with pytest.raises(CtrlDiffError, match="do not fit"):
        load_model(tmp_path / "m")
    with pytest.raises(CtrlDiffError, match="only registered models"):
        save_model(nn.Linear(2, 2), tmp_path / "lin")


# =================================================================================================
# (9) the eta-family sampler (METHODS section 8)
# =================================================================================================
@pytest.mark.parametrize("name", NAMES)
def test_eta_sampler_is_em_at_one_and_ode_euler_at_zero(name):
    p = make_process(name)
    model = PlusScoreResidual(ExactGMMScore(gmm_preset("gmm2"), p), p).double()
    x = torch.randn(16, 2, generator=gen(0), dtype=F64) * p.prior_std()
    times = p.time_grid(8, dtype=F64)
    with torch.no_grad():
        em, e1 = (fn(model, x, times, p, generator=gen(1)) for fn in (S.euler_maruyama, S.get_solver("eta", eta=1.0)))
        ode, e0 = (fn(model, x, times, p, generator=gen(1)) for fn in (S.ode_euler, S.get_solver("eta", eta=0.0)))
    for a, b in ((em, e1), (ode, e0)):
        assert torch.equal(a.states, b.states) and torch.equal(a.coef_a, b.coef_a)
        assert torch.equal(a.coef_b, b.coef_b) and torch.equal(a.std, b.std)
    assert torch.equal(em.log_probs, e1.log_probs) and e0.noise is None and torch.equal(e1.eta, torch.ones(8, dtype=F64))
    # eta = 0.5: the drift's score term is (1 + eta^2) / 2 of the SDE's, the noise eta of it
    tr = S.eta_sampler(model, x, times, p, eta=0.5, generator=gen(1))
    torch.testing.assert_close(tr.coef_b, 0.625 * em.coef_b)
    torch.testing.assert_close(tr.std, 0.5 * em.std)


def test_eta_sampler_rectified_flow_ode_step_is_x_minus_v_dtau():
    """On rectified flow, eta = 0 is the flow-matching Euler step x' = x - v dtau with v = eps - x0."""
    p = make_process("rf")
    model = PlusScoreResidual(ExactGMMScore(gmm_preset("gmm2"), p), p).double()
    x = torch.randn(8, 2, generator=gen(0), dtype=F64)
    times = p.time_grid(5, dtype=F64)
    tr = S.eta_sampler(model, x, times, p, eta=0.0)
    for k in range(5):
        t = times[k].expand(8)
        eps = model(tr.states[:, k], t).detach()
        x0 = (tr.states[:, k] - t[:, None] * eps) / (1 - t[:, None])
        torch.testing.assert_close(tr.states[:, k + 1], tr.states[:, k] - (eps - x0) * (times[k] - times[k + 1]))


def test_eta_sampler_per_step_window():
    p = make_process("vp")
    model = ExactGMMScore(gmm_preset("gmm2"), p)
    x = torch.randn(6, 2, generator=gen(0))
    eta = torch.tensor([0.0, 0.0, 0.7, 0.7, 0.0])
    tr = S.eta_sampler(model, x, p.time_grid(5), p, eta=eta, generator=gen(2))
    assert tr.stochastic and tr.solver == "eta(per-step)"
    assert torch.equal(tr.std > 0, eta > 0) and torch.equal(tr.eta, eta.to(tr.eta.dtype))
    assert float(tr.noise[:, [0, 1, 4]].abs().max()) == 0 and float(tr.log_probs[:, [0, 1, 4]].abs().max()) == 0
    for k in (2, 3):  # the window's steps have their Gaussian densities
        torch.testing.assert_close(tr.log_probs[:, k], tr.step_log_prob(k, tr.outputs[:, k]))
    with pytest.raises(CtrlDiffError, match="per-step eta needs 5"):
        S.eta_sampler(model, x, p.time_grid(5), p, eta=[1.0, 1.0])


@pytest.mark.parametrize("name", ["vp", "rf"])
@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
def test_eta_kl_path_matches_gaussian_transition_kl(name, eta):
    """Linear-Gaussian case: two models whose eps differ by a constant d. Their eta-sampler transitions are Gaussians
    with the same std and means B_k d apart, so the exact KL of the discretised path laws is
    sum_k ||B_k d||^2 / (2 std_k^2); the Girsanov KL_path with the factor (1 + eta^2)^2 / (4 eta^2) must match it
    (up to the quadrature of the time integral: 1% on 400 steps, away from the ends where 1 / sigma^2 or, for
    rectified flow, g^2 is singular and a Riemann sum of the transitions under-resolves the integral)."""
    p = make_process(name)
    d = torch.tensor([0.3, -0.2], dtype=F64)
    times = torch.linspace(0.9, 0.05, 401, dtype=F64)
    coeffs = [S.eta_coeffs(p, times[k], times[k + 1], eta) for k in range(400)]
    exact = sum(b * b * float(d @ d) / (2 * std * std) for _, b, std in coeffs)
    eps_a = torch.zeros(1, 400, 2, dtype=F64)
    kl = float(S.kl_increments(p, times, eps_a + d, eps_a, eta=torch.full((400,), eta)).sum())
    assert kl == pytest.approx(exact, rel=1e-2)
    assert float(S.eta_kl_factor(eta)) == pytest.approx((1 + eta**2) ** 2 / (4 * eta**2))
    assert float(S.eta_kl_factor(0.0)) == 1.0  # no path KL for an ODE: the reverse-SDE integral is logged
