"""Noise processes: schedules, SDE coefficients, marginals, parameterisation conversions, Tweedie."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ctrldiff.data.toy2d import GaussianMixture, gmm_preset
from ctrldiff.errors import CtrlDiffError
from ctrldiff.models.mlp import ExactGMMScore
from ctrldiff.noise import PREDICTIONS, PROCESSES, RectifiedFlow, VPCosine, VPLinear, make_process, process_from_config

F64 = torch.float64
NAMES = sorted(PROCESSES)


def _times(p, n=13):
    """Interior times in [t_min, t_max] (double)."""
    return torch.linspace(p.t_min, p.t_max, n, dtype=F64)


# ---- schedule and SDE coefficients ---------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_f_is_dlogalpha_dt_and_g2_from_sigma(name):
    """f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2, checked by autograd."""
    p = make_process(name)
    t = _times(p).requires_grad_(True)
    (dlog_alpha,) = torch.autograd.grad(p.log_alpha(t).sum(), t)
    (dsig2,) = torch.autograd.grad(p.sigma(t).pow(2).sum(), t)
    t = t.detach()
    f, g2, sig2 = p.f(t), p.g2(t), p.sigma(t) ** 2
    torch.testing.assert_close(f, dlog_alpha, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g2, dsig2 - 2 * f * sig2, rtol=1e-8, atol=1e-9)
    assert (g2 > 0).all()
    torch.testing.assert_close(p.g(t), g2.sqrt())


@pytest.mark.parametrize("name", NAMES)
def test_schedule_boundaries_and_monotonicity(name):
    p = make_process(name)
    zero = torch.tensor(0.0, dtype=F64)
    torch.testing.assert_close(p.alpha(zero), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(p.sigma(zero), torch.tensor(0.0, dtype=F64))
    t = _times(p, 101)
    a, s = p.alpha(t), p.sigma(t)
    torch.testing.assert_close(a, torch.exp(p.log_alpha(t)))
    assert (a[1:] < a[:-1]).all() and (s[1:] > s[:-1]).all()
    lam = p.log_snr(t)
    torch.testing.assert_close(lam, torch.log(a / s))
    assert (lam[1:] < lam[:-1]).all()
    # sampling starts from (nearly) pure noise: alpha(t_max) is small (Stable Diffusion's discrete schedule,
    # vp-discrete, ends at alpha = 0.068: its terminal SNR is not zero)
    assert float(p.alpha(torch.tensor(p.t_max, dtype=F64))) < 0.07
    # (vp-discrete starts from N(0, I), diffusers' init_noise_sigma; the others from N(0, sigma(t_max)^2 I))
    std = 1.0 if p.name == "vp-discrete" else float(p.sigma(torch.tensor(p.t_max, dtype=F64)))
    assert p.prior_std() == pytest.approx(std)


def test_schedule_closed_forms():
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    vp = VPLinear(beta_min=0.1, beta_max=20.0)
    # log alpha = -1/2 int_0^t beta
    torch.testing.assert_close(vp.log_alpha(t), -0.5 * (0.1 * t + 0.5 * 19.9 * t**2))
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t))
    cos = VPCosine()
    tc = t.clamp(max=cos.t_max)
    torch.testing.assert_close(cos.alpha(tc) ** 2 + cos.sigma(tc) ** 2, torch.ones_like(tc))
    u = lambda x: torch.cos(0.5 * math.pi * (x + cos.s) / (1 + cos.s))  # noqa: E731
    torch.testing.assert_close(cos.alpha(tc), u(tc) / u(torch.zeros_like(tc)))
    rf = RectifiedFlow()
    tr = t.clamp(max=rf.t_max)
    torch.testing.assert_close(rf.alpha(tr), 1 - tr)
    torch.testing.assert_close(rf.sigma(tr), tr)


@pytest.mark.parametrize("name", NAMES)
def test_time_grid(name):
    p = make_process(name)
    g = p.time_grid(7, dtype=F64)
    assert g.shape == (8,)
    assert g[0].item() == pytest.approx(p.t_max) and g[-1].item() == pytest.approx(p.t_min)
    assert (g[1:] < g[:-1]).all()
    assert p.time_grid(3).dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_config_roundtrip(name):
    p = make_process(name)
    q = process_from_config(p.config())
    assert type(q) is type(p) and q.config() == p.config()
    t = _times(p)
    torch.testing.assert_close(q.alpha(t), p.alpha(t))
    vp = process_from_config({"name": "vp", "beta_min": 0.2, "beta_max": 10.0})
    assert (vp.beta_min, vp.beta_max) == (0.2, 10.0)


def test_make_process_unknown_name():
    with pytest.raises(CtrlDiffError) as ei:
        make_process("ve")
    msg = str(ei.value)
    assert "'ve'" in msg
    for allowed in ("vp", "vp-cosine", "rf"):
        assert allowed in msg


# ---- marginals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_marginal_sampling_moments(name):
    p = make_process(name)
    gen = torch.Generator().manual_seed(0)
    n = 10000
    x0 = torch.tensor([1.5, -0.5, 0.0], dtype=F64).expand(n, 3).clone()
    for t in (0.05, 0.5, 0.9):
        torch.manual_seed(1)
        xt, eps = p.marginal(x0, torch.tensor(t, dtype=F64))
        a, s = float(p.alpha(torch.tensor(t, dtype=F64))), float(p.sigma(torch.tensor(t, dtype=F64)))
        torch.testing.assert_close(xt, a * x0 + s * eps)
        # mean: standard error s / sqrt(n); std: standard error ~ s / sqrt(2 n); 5 standard errors
        assert (xt.mean(0) - a * x0[0]).abs().max() < 5 * s / math.sqrt(n)
        assert (xt.std(0) - s).abs().max() < 5 * s / math.sqrt(2 * n)
    # per-sample times and given noise: exact formula
    t = torch.rand(64, generator=gen, dtype=F64) * (p.t_max - p.t_min) + p.t_min
    noise = torch.randn(64, 3, generator=gen, dtype=F64)
    xt, eps = p.marginal(x0[:64], t, noise)
    assert eps is noise
    torch.testing.assert_close(xt, p.alpha(t)[:, None] * x0[:64] + p.sigma(t)[:, None] * noise)


# ---- parameterisations --------------------------------------------------------------------------------
def _truths(p, t, x0, eps):
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
    x = a * x0 + s * eps
    # v: alpha eps - sigma x0 on VP processes; the flow velocity eps - x0 on the rectified flows (rf, flow-match)
    v = eps - x0 if isinstance(p, RectifiedFlow) else a * eps - s * x0
    return x, {"eps": eps, "score": -eps / s, "x0": x0, "v": v}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind,to", list(itertools.product(PREDICTIONS, PREDICTIONS)))
def test_conversions_every_pair(name, kind, to):
    p = make_process(name)
    gen = torch.Generator().manual_seed(4 * PREDICTIONS.index(kind) + PREDICTIONS.index(to))
    n = 257
    t = torch.rand(n, generator=gen, dtype=F64) * (p.t_max - p.t_min) + p.t_min
    x0 = torch.randn(n, 2, generator=gen, dtype=F64) * 2
    eps = torch.randn(n, 2, generator=gen, dtype=F64)
    x, truth = _truths(p, t, x0, eps)
    out = p.convert(truth[kind], kind, to, t, x)
    torch.testing.assert_close(out, truth[to], rtol=1e-8, atol=1e-8)
    back = p.convert(out, to, kind, t, x)
    torch.testing.assert_close(back, truth[kind], rtol=1e-8, atol=1e-8)


def test_conversion_with_scalar_time_and_image_shapes():
    p = make_process("vp")
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 1, 5, 5, generator=gen, dtype=F64)
    eps = torch.randn(4, 1, 5, 5, generator=gen, dtype=F64)
    for t in (torch.tensor(0.3, dtype=F64), torch.full((4,), 0.3, dtype=F64)):
        a, s = p.alpha(torch.tensor(0.3, dtype=F64)), p.sigma(torch.tensor(0.3, dtype=F64))
        x = a * x0 + s * eps
        torch.testing.assert_close(p.convert(eps, "eps", "x0", t, x), x0)
        torch.testing.assert_close(p.convert(a * eps - s * x0, "v", "eps", t, x), eps)


def test_conversion_unknown_kind():
    p = make_process("vp")
    x = torch.zeros(2, 2)
    t = torch.full((2,), 0.5)
    with pytest.raises(CtrlDiffError, match="prediction type 'noise'.*eps.*score.*v.*x0"):
        p.convert(x, "noise", "eps", t, x)
    with pytest.raises(CtrlDiffError, match="'velocity'"):
        p.convert(x, "eps", "velocity", t, x)


# ---- Tweedie -------------------------------------------------------------------------------------------
def _posterior_mean(gm: GaussianMixture, p, x, t):
    """Closed-form E[x0 | x_t = x] for an isotropic Gaussian mixture (x [N, d], t [N])."""
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]  # [N, 1]
    var = a**2 * gm.stds[None] ** 2 + s**2  # [N, K] marginal variance of component k
    diff = x[:, None, :] - a[:, :, None] * gm.means[None]  # [N, K, d]
    logr = torch.log(gm.weights) - 0.5 * diff.pow(2).sum(-1) / var - 0.5 * gm.dim * torch.log(var)
    r = torch.softmax(logr, dim=1)  # responsibilities
    gain = (a * gm.stds[None] ** 2 / var)[..., None]  # Cov(x0, x_t) / Var(x_t) per component
    post = gm.means[None] + gain * diff  # [N, K, d]
    return (r[..., None] * post).sum(1)


@pytest.mark.parametrize("name", NAMES)
def test_tweedie_single_gaussian_is_posterior_mean(name):
    p = make_process(name)
    mu, s0 = torch.tensor([0.7, -1.2], dtype=F64), 0.6
    gm = GaussianMixture(mu[None], [s0])
    gen = torch.Generator().manual_seed(5)
    n = 400
    t = torch.rand(n, generator=gen, dtype=F64) * (p.t_max - p.t_min) + p.t_min
    x = torch.randn(n, 2, generator=gen, dtype=F64) * 2
    score = gm.score(x, t, p)
    x0_hat = p.tweedie_x0(x, t, score)
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
    exact = mu + a * s0**2 / (a**2 * s0**2 + s**2) * (x - a * mu)  # E[x0 | x_t] for a Gaussian prior
    torch.testing.assert_close(x0_hat, exact, rtol=1e-9, atol=1e-9)
    # the same through the eps parameterisation and convert()
    torch.testing.assert_close(p.convert(score, "score", "x0", t, x), exact, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_tweedie_gmm_is_posterior_mean(name):
    p = make_process(name)
    gm = gmm_preset("gmm2")
    gen = torch.Generator().manual_seed(6)
    n = 400
    t = torch.rand(n, generator=gen, dtype=F64) * (p.t_max - p.t_min) + p.t_min
    x = torch.randn(n, 2, generator=gen, dtype=F64) * 2
    exact = _posterior_mean(gm, p, x, t)
    torch.testing.assert_close(p.tweedie_x0(x, t, gm.score(x, t, p)), exact, rtol=1e-8, atol=1e-8)
    # ExactGMMScore (eps prediction) + convert(eps -> x0) gives the same posterior mean
    model = ExactGMMScore(gm, p)
    eps = model(x, t)
    torch.testing.assert_close(p.convert(eps, "eps", "x0", t, x), exact, rtol=1e-5, atol=1e-5)


def test_gmm_score_matches_finite_differences_of_log_prob():
    p = make_process("vp")
    gm = gmm_preset("gmm8")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(50, 2, generator=gen, dtype=F64) * 3
    t = torch.full((50,), 0.2, dtype=F64)
    h = 1e-5
    fd = torch.stack([(gm.log_prob(x + h * e, t, p) - gm.log_prob(x - h * e, t, p)) / (2 * h)
                      for e in torch.eye(2, dtype=F64)], 1)
    torch.testing.assert_close(gm.score(x, t, p), fd, rtol=1e-6, atol=1e-6)


def test_gmm_score_accepts_scalar_time():
    p = make_process("vp")
    gm = gmm_preset("gmm2")
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    torch.testing.assert_close(gm.score(x, 0.3, p), gm.score(x, torch.full((5,), 0.3, dtype=F64), p))
    torch.testing.assert_close(gm.log_prob(x, torch.tensor(0.3), p), gm.log_prob(x, torch.full((5,), 0.3), p))
