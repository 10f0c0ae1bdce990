"""The exact 2-D yardstick against closed forms.

Gaussian reference N(m, s^2 I) and linear reward r = a x_0:
    E_ref exp(r / beta) = exp(a m_0 / beta + a^2 s^2 / (2 beta^2))  =>  J* = a m_0 + a^2 s^2 / (2 beta),
    p* = N(m + (a s^2 / beta) e_0, s^2 I),  E_{p*} r = a m_0 + a^2 s^2 / beta,  KL(p* || p_ref) = a^2 s^2 / (2 beta^2).
For a mixture each component tilts the same way, with weights w_k exp(a m_k0 / beta + a^2 s_k^2 / (2 beta^2)).
"""

from __future__ import annotations

import math

import pytest
import torch

from ctrldiff.data.toy2d import GaussianMixture, gmm_preset
from ctrldiff.errors import CtrlDiffError, RewardError
from ctrldiff.eval.exact2d import TiltedTarget, sample_distance_to_target
from ctrldiff.eval.metrics import mmd
from ctrldiff.rewards.toy2d import linear, make_toy2d_reward, mode_switch, quadratic, ring


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("a, beta, s, m", [(1.0, 1.0, 1.0, (0.5, -1.0)), (2.0, 0.5, 0.7, (-1.0, 2.0)),
                                           (-1.5, 0.25, 0.4, (0.0, 0.0))])
def test_gaussian_linear_reward_closed_form(a, beta, s, m):
    T = TiltedTarget(GaussianMixture([list(m)], [s]), linear((a, 0.0)), beta, n_grid=200)
    assert T.ref_mass == pytest.approx(1.0, abs=1e-6)
    assert T.mean_reward_ref == pytest.approx(a * m[0], abs=1e-6)
    assert T.J_star == pytest.approx(a * m[0] + a * a * s * s / (2 * beta), rel=1e-6, abs=1e-6)
    assert T.mean_reward_star == pytest.approx(a * m[0] + a * a * s * s / beta, rel=1e-6, abs=1e-6)
    assert T.kl_star == pytest.approx(a * a * s * s / (2 * beta * beta), rel=1e-5)
    assert T.J_star == pytest.approx(T.mean_reward_star - beta * T.kl_star, rel=1e-9, abs=1e-9)
    assert T.edge_mass < 1e-8
    x = T.sample(20000, gen(1))
    shift = torch.tensor([m[0] + a * s * s / beta, m[1]])
    assert torch.allclose(x.mean(0).double(), shift.double(), atol=4 * s / math.sqrt(20000))
    assert torch.allclose(x.std(0).double(), torch.tensor([s, s]).double(), rtol=0.03)


def test_mixture_linear_reward_and_box_growth():
    """A strong reward pushes p* 7.5 units right of the default box: the box must grow and stay exact."""
    gmm, a, beta = gmm_preset("gmm2"), 3.0, 0.1
    T = TiltedTarget(gmm, linear((a, 0.0)), beta)
    s2 = gmm.stds**2
    logw = gmm.weights.log() + a * gmm.means[:, 0] / beta + a * a * s2 / (2 * beta**2)
    assert T.J_star == pytest.approx(float(beta * torch.logsumexp(logw, 0)), rel=1e-8)
    post = torch.softmax(logw, 0)
    assert T.mean_reward_star == pytest.approx(float((post * a * (gmm.means[:, 0] + a * s2 / beta)).sum()), rel=1e-8)
    assert float(T.hi[0]) > 2 + a * 0.25 / beta + 2.5  # grown beyond the shifted mode
    assert T.edge_mass < 1e-8


def test_fixed_bounds_too_small_warns():
    with pytest.warns(UserWarning, match="edge"):
        TiltedTarget(gmm_preset("gmm2"), linear((3.0, 0.0)), 0.1, bounds=((-4.0, 4.0), (-3.0, 3.0)), n_grid=100)


@pytest.mark.parametrize("preset, reward", [("gmm2", quadratic((1.0, 1.0), 2.0)), ("gmm2", mode_switch()),
                                            ("gmm8", ring(1.5, 0.3)), ("gmm4", quadratic((2.0, -2.0), 0.5))])
def test_variational_identities(preset, reward):
    beta = 0.5
    T = TiltedTarget(gmm_preset(preset), reward, beta, n_grid=300)
    assert T.J_star >= T.mean_reward_ref  # Jensen
    assert T.J_star <= float(T.rewards.max())
    assert T.kl_star >= 0 and T.mean_reward_star >= T.mean_reward_ref
    assert T.J_star == pytest.approx(T.mean_reward_star - beta * T.kl_star, rel=1e-9, abs=1e-9)
    # the exact density at the cell centres agrees with the grid's cell probabilities
    idx = torch.randint(0, len(T.centers), (500,), generator=gen(2))
    assert torch.allclose(T.log_prob(T.centers[idx]), T.log_star[idx] - 2 * math.log(T.h), atol=1e-6)


def test_beta_limits():
    gmm, r = gmm_preset("gmm2"), mode_switch(2.0)
    hot, cold = TiltedTarget(gmm, r, 1e3, n_grid=200), TiltedTarget(gmm, r, 1e-3, n_grid=200)
    assert hot.J_star == pytest.approx(hot.mean_reward_ref, rel=1e-3)  # beta -> inf: J* -> E_ref r
    assert cold.J_star == pytest.approx(float(cold.rewards.max()), rel=2e-2)  # beta -> 0: J* -> max r


def test_mode_switch_moves_mass_to_the_small_mode():
    T = TiltedTarget(gmm_preset("gmm2"), mode_switch(2.0), 1.0, n_grid=200)
    right = float(T.log_star.exp()[T.centers[:, 0] > 0].sum())
    assert right > 0.7 > float(gmm_preset("gmm2").weights[1])


def test_samples_and_sample_distance():
    gmm = gmm_preset("gmm2")
    T = TiltedTarget(gmm, mode_switch(2.0), 1.0, n_grid=200)
    g = gen(3)
    grid, rej = T.sample(1000, g), T.sample(1000, g, method="rejection")
    assert abs(mmd(grid, rej)) < 3e-3
    assert float((rej[:, 0] > 0).double().mean()) == pytest.approx(0.739, abs=0.04)
    good = sample_distance_to_target(rej, T, baseline=True, generator=g)
    bad = T.sample_distance(gmm.sample(1000, g), generator=g)
    assert good["outside_frac"] == 0.0
    assert abs(good["mmd"]) < 3e-3 and bad["mmd"] > 0.05
    assert good["hist_kl"] < 2 * good["hist_kl_baseline"] + 0.02 and bad["hist_kl"] > 3 * good["hist_kl"]
    far = T.sample_distance(torch.full((100, 2), 50.0), generator=g)
    assert far["outside_frac"] == 1.0 and far["hist_kl"] > 10


def test_rejection_refuses_unbounded_or_out_of_box_rewards():
    T = TiltedTarget(GaussianMixture([[0.0, 0.0]], [1.0]), linear((1.0, 0.0)), 1.0, n_grid=100)
    with pytest.raises(CtrlDiffError, match="accept only"):  # r = x_0 is unbounded: r_max is the box edge
        T.sample(100, gen(4), method="rejection")
    with pytest.warns(UserWarning, match="edge"):
        T = TiltedTarget(gmm_preset("gmm2"), mode_switch(), 1.0, bounds=((-4.0, 0.0), (-3.0, 3.0)), n_grid=100)
    with pytest.raises(CtrlDiffError, match="grid maximum"):  # the right mode lies outside the box
        T.sample(100, gen(4), method="rejection")


def test_rewards_protocol_and_gradients():
    x = torch.randn(7, 2, requires_grad=True)
    for name, kw in [("linear", {}), ("quadratic", {}), ("mode_switch", {}), ("ring", {"radius": 1.0})]:
        r = make_toy2d_reward(name, **kw)
        assert r.name == name and r.differentiable and r.config["name"] == name
        out = r(x, None)
        assert out.shape == (7,) and out.dtype == x.dtype
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.allclose(ring(2.0, 0.5)(torch.tensor([[2.0, 0.0], [0.0, -2.0]])), torch.zeros(2))
    assert quadratic((1.0, 1.0), 2.0)(torch.tensor([[1.0, 3.0]])).item() == pytest.approx(-2.0)
    with pytest.raises(CtrlDiffError):
        make_toy2d_reward("nope")
    with pytest.raises(CtrlDiffError):
        linear()(torch.zeros(3, 3))


def test_bad_reward_output_raises():
    gmm = gmm_preset("gmm2")
    with pytest.raises(RewardError, match="shape"):
        TiltedTarget(gmm, lambda x, cond=None: x, 1.0, n_grid=50)
    with pytest.raises(RewardError, match="finite"):
        TiltedTarget(gmm, lambda x, cond=None: torch.log(x[:, 0]), 1.0, n_grid=50)
    with pytest.raises(CtrlDiffError):
        TiltedTarget(gmm, linear(), 0.0)


def test_condition_and_reward_dtype_are_passed_to_the_reward():
    seen = {}

    def reward(x, cond=None):
        seen.update(dtype=x.dtype, cond=None if cond is None else set(cond.tolist()))
        return x[:, 0] * (1.0 if cond is None else float(cond[0]))

    T = TiltedTarget(GaussianMixture([[0.0, 0.0]], [1.0]), reward, 1.0, n_grid=100, cond=2, reward_dtype=torch.float32)
    assert seen == {"dtype": torch.float32, "cond": {2}}
    assert T.J_star == pytest.approx(2.0, rel=1e-4)  # a = 2, s = 1, beta = 1: a^2 s^2 / (2 beta)
