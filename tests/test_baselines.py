"""Adjoint Matching, Flow-GRPO (and -Fast) and DiffusionNFT (METHODS section 9) through the one trainer.

Linear-Gaussian reference: data N(0, I) under the VP process has p_t = N(0, I) for every t, so eps_ref = sigma_t x.
The model eps_u(t, x) = sigma_t (x - alpha_t u) (one trainable vector u; u = 0 is the reference) has the score
s_u = -x + alpha_t u. With the linear reward r = w.x, V(t, x) = alpha_t w.x + sigma_t^2 ||w||^2 / (2 beta), so the
optimal control s* = s_ref + grad V / beta is u* = w / beta exactly (p* = N(w / beta, I)).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from ctrldiff.algorithms.flow_grpo import group_advantages
from ctrldiff.errors import CtrlDiffError
from ctrldiff.noise import make_process
from ctrldiff.rewards.toy2d import linear
from ctrldiff.solvers import kl_weights, model_eps
from ctrldiff.train.checkpoint import load_latest_checkpoint
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.task import Task
from ctrldiff.train.trainer import Trainer

W = (1.0, -0.5)
BETA = 0.5


class LinearGaussian(nn.Module):
    """eps_u(t, x) = sigma_t (x - alpha_t u): the exact eps of N(alpha_t u, I)-ish shifts of N(0, I) data."""

    prediction = "eps"

    def __init__(self, process, u=(0.0, 0.0), trainable: bool = True):
        super().__init__()
        self.process = process
        self.u = nn.Parameter(torch.tensor(u), requires_grad=trainable)

    def forward(self, x, t, cond=None):
        a = self.process.alpha(t.double()).to(x.dtype)[:, None]
        s = self.process.sigma(t.double()).to(x.dtype)[:, None]
        return s * (x - a * self.u)


def _lg_trainer(algo: str, steps: int = 8, batch: int = 16, **kw) -> Trainer:
    p = make_process("vp")
    model, ref = LinearGaussian(p), LinearGaussian(p, trainable=False)
    task = Task("linear-gaussian", model, ref, p, (2,), 0, [model.u])
    base = dict(algo=algo, model="gmm2-exact", reward="toy2d-quadratic", beta=BETA, epochs=1, batch_size=batch,
                sampler=dict(solver="em", steps=steps), optim=dict(minibatch=batch * steps),
                log=dict(progress=False, tensorboard=False, num_final_eval=0))
    base.update(kw)
    return Trainer(TrainConfig(**base), task=task, reward=linear(W))


def _small(algo: str, **kw) -> TrainConfig:
    base = dict(algo=algo, model="gmm2-exact", reward="toy2d-quadratic", beta=0.5, epochs=1, batch_size=16,
                sampler=dict(solver="em", steps=4), optim=dict(minibatch=32),
                log=dict(progress=False, tensorboard=False, num_eval_samples=16, num_final_eval=0, checkpoint_every=1))
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return TrainConfig(**base)


# ---- Adjoint Matching ---------------------------------------------------------------------------------------
def test_adjoint_equals_autograd_through_the_reference_flow():
    """a~_k = -grad_{x_k} r(x_K) / beta, x_K reached from x_k by the rollout's steps with the reference's eps and
    the recorded noise (autograd through that flow). The policy starts at the reference, so the rollout is a path of
    that flow (for another policy the lean adjoint linearises the reference drift along the policy's path)."""
    tr = Trainer(_small("adjoint-matching", sampler=dict(steps=3), batch_size=4))
    batch = tr.collect()
    tr.algo.prepare(batch)
    adj, traj = batch.extras["adjoint"], batch.traj
    for k in range(traj.num_steps + 1):
        x = traj.states[:, k].detach().clone().requires_grad_(True)
        y = x
        for j in range(k, traj.num_steps):
            eps = model_eps(tr.ref, tr.process, y, traj.times[j])
            y = traj.coef_a[j] * y + traj.coef_b[j] * eps + traj.std[j] * traj.noise[:, j]
        (g,) = torch.autograd.grad(tr.reward(y).sum(), x)
        torch.testing.assert_close(adj[:, k], -g / tr.cfg.beta, rtol=1e-4, atol=1e-5)


def test_adjoint_matching_loss_and_fixed_point_linear_gaussian():
    tr = _lg_trainer("adjoint-matching", steps=50)
    batch = tr.collect()
    tr.algo.prepare(batch)
    traj, p = batch.traj, tr.process
    w = torch.tensor(W)
    # the lean adjoint is deterministic here: a~_k = -(w / beta) prod_{j >= k} (A_j + B_j sigma_j) (d eps_ref / dx =
    # sigma I), the Euler discretisation of -grad V / beta = -(alpha_t / alpha_{t_min}) w / beta
    adj = batch.extras["adjoint"]
    sig = p.sigma(traj.times.double()).float()
    factor = torch.cat([torch.flip(torch.cumprod(torch.flip(traj.coef_a + traj.coef_b * sig[:-1], [0]), 0), [0]),
                        torch.ones(1)])
    torch.testing.assert_close(adj, (-factor[:, None] * w / BETA).expand_as(adj), rtol=1e-4, atol=1e-5)
    alpha = p.alpha(traj.times.double()).float()
    torch.testing.assert_close(adj[0], -alpha[:, None] / alpha[-1] * w / BETA, rtol=0, atol=0.1)
    # the loss of the shared update at u against the closed form sum_k 2 w_k ||-sigma alpha u - sigma a~_{k+1}||^2
    K = traj.num_steps
    b, k = torch.arange(16).repeat_interleave(K), torch.arange(K).repeat(16)
    wk = kl_weights(p, traj.times)
    for u in ((0.0, 0.0), (0.7, 0.1)):
        with torch.no_grad():
            tr.policy.u.copy_(torch.tensor(u))
        loss, _ = tr.algo.loss(tr.algo.make_minibatch(batch, b, k))
        a_next = batch.extras["adjoint"][0, 1:]  # [K, 2], the same for every sample
        closed = sum(2 * wk[j] * (sig[j] * (-alpha[j] * torch.tensor(u) - a_next[j])).pow(2).sum() for j in range(K))
        assert float(loss.detach()) == pytest.approx(float(closed), rel=1e-4)
    # the fixed point: training drives u to the optimal control w / beta
    with torch.no_grad():
        tr.policy.u.zero_()
    for group in tr.optimizer.param_groups:
        group["lr"] = 0.1
    for _ in range(60):
        tr.step()
    torch.testing.assert_close(tr.policy.u.detach(), w / BETA, rtol=0.03, atol=0.03)


def test_adjoint_matching_rejects_black_box_rewards_and_non_memoryless_samplers():
    with pytest.raises(CtrlDiffError, match="adjoint-matching needs a differentiable reward.*ddpo.*flow-grpo"):
        Trainer(_small("adjoint-matching", reward="jpeg-compressibility"))
    with pytest.raises(ValueError, match="memoryless"):
        _small("adjoint-matching", sampler=dict(solver="ddim", eta=0.0))


# ---- Flow-GRPO ---------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 0.0, 4.0, 10.0, 10.0])
    std = float(r.std())
    expect = torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0, 0.0]) / (std + 1e-8)
    torch.testing.assert_close(group_advantages(r, 2), expect)
    torch.testing.assert_close(group_advantages(r, 2, adv_clip=0.3), expect.clamp(-0.3, 0.3))
    with pytest.raises(CtrlDiffError, match="groups of 4"):
        group_advantages(r, 4)


def test_flow_grpo_groups_share_conditions():
    tr = Trainer(_small("flow-grpo", model="scratch-gmm2-cond", flow_grpo=dict(group_size=4)))
    c = tr.algo.sample_conditions(16, torch.Generator().manual_seed(0))
    assert c.shape == (16,) and all(len(set(g.tolist())) == 1 for g in c.reshape(4, 4))
    with pytest.raises(ValueError, match="multiple of flow_grpo.group_size"):
        _small("flow-grpo", batch_size=12)


@pytest.mark.parametrize("window", [None, 2])
def test_flow_grpo_ratio_is_one_on_policy(window):
    extra = {} if window is None else dict(flow_grpo=dict(window=window), sampler=dict(solver="eta", eta=0.7, steps=6))
    tr = Trainer(_small("flow-grpo", flow_grpo=dict(group_size=4, **(extra.pop("flow_grpo", {}))), **extra))
    batch = tr.collect()
    tr.algo.prepare(batch)
    pairs = tr.algo.train_pairs(batch)
    K = batch.traj.num_steps
    if window is None:
        assert pairs is None
        pairs = torch.arange(16 * K)
    else:  # ODE steps outside one window of SDE steps; only the window is trained on
        sde = torch.nonzero(batch.traj.std > 0).flatten()
        assert len(sde) == window and int(sde[-1] - sde[0]) == window - 1
        assert torch.equal(pairs % K, sde.repeat(16)) and torch.equal(batch.traj.eta > 0, batch.traj.std > 0)
    mb = tr.algo.make_minibatch(batch, pairs // K, pairs % K)
    torch.testing.assert_close(mb.log_prob, mb.log_prob_old, rtol=0, atol=1e-4)
    loss, info = tr.algo.loss(mb)
    assert info["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and info["clipfrac"] == 0.0
    rec = tr.algo.update(batch)
    assert rec["train/updates"] == len(pairs) // 32


def test_flow_grpo_kl_is_the_mean_difference_form():
    """B_k^2 ||eps_theta - eps_ref||^2 / (2 std_k^2) equals the Girsanov increment (1/2) c(eta) g^2 ||ds||^2 dtau
    (left Riemann) of the eta sampler."""
    tr = Trainer(_small("flow-grpo", flow_grpo=dict(group_size=4, kl_coef=1.0), sampler=dict(solver="eta", eta=0.5)))
    with torch.no_grad():
        for p in tr.trainable_parameters:
            p.add_(0.1)
    batch = tr.collect()
    tr.algo.prepare(batch)
    K = batch.traj.num_steps
    b, k = torch.arange(16).repeat_interleave(K), torch.arange(K).repeat(16)
    mb = tr.algo.make_minibatch(batch, b, k)
    _, info = tr.algo.loss(mb)
    t = batch.traj.times.double()
    g2, sig, dtau = tr.process.g2(t[:-1]), tr.process.sigma(t[:-1]), t[:-1] - t[1:]
    rate = (1 + 0.25) ** 2 / (4 * 0.25) * 0.5 * g2 * dtau / sig**2  # per ||d eps||^2
    expect = (rate[k].float() * (mb.eps - mb.eps_ref).pow(2).sum(1)).mean() * K
    assert info["kl_step"] == pytest.approx(float(expect.detach()), rel=1e-4)


# ---- DiffusionNFT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("units", ["eps", "v", "x0"])
def test_diffusion_nft_loss_closed_form_linear_gaussian(units):
    tr = _lg_trainer("diffusion-nft", batch=8, diffusion_nft=dict(group_size=4, draws=3, units=units, b=0.7),
                     sampler=dict(solver="ddim", eta=0.0, steps=6))
    u_old, u = torch.tensor([0.2, -0.1]), torch.tensor([0.5, 0.3])
    tr.algo.old[0].copy_(u_old)
    with torch.no_grad():
        tr.policy.u.copy_(u)
    batch = tr.collect()
    assert not batch.traj.stochastic  # an ODE sampler: no log-densities needed
    tr.algo.prepare(batch)
    n = 8 * 3
    t = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    eps = torch.randn(n, 2, generator=torch.Generator().manual_seed(2))
    batch.extras["nft"].update(t=t, eps=eps)
    sub = torch.arange(n)
    loss, _ = tr.algo.pair_loss(batch, sub)
    # closed form: every prediction is sigma (x_t - alpha u_mix) with u_mix the mixed weights
    p, bb = tr.process, 0.7
    x0 = batch.traj.final[sub // 3]
    a, s = p.alpha(t.double()).float()[:, None], p.sigma(t.double()).float()[:, None]
    xt = a * x0 + s * eps
    pos = s * (xt - a * ((1 - bb) * u_old + bb * u)) - eps
    neg = s * (xt - a * ((1 + bb) * u_old - bb * u)) - eps
    if units == "eps":
        ep, en = pos.pow(2).sum(1), neg.pow(2).sum(1)
    elif units == "v":  # v = alpha eps - sigma x0 = (eps - sigma x_t) / alpha for alpha^2 + sigma^2 = 1
        ep, en = (pos / a).pow(2).sum(1), (neg / a).pow(2).sum(1)
    else:  # x0 = (x_t - sigma eps) / alpha, adaptive: / (2 mean |x0_hat - x0|)
        dp, dn = s / a * pos, s / a * neg
        ep = dp.pow(2).sum(1) / dp.abs().mean(1).clamp(min=1e-5) / 2
        en = dn.pow(2).sum(1) / dn.abs().mean(1).clamp(min=1e-5) / 2
    rr = (group_advantages(batch.rewards, 4, 5.0) / 5.0).clamp(-1, 1) / 2 + 0.5
    closed = (rr[sub // 3] * ep + (1 - rr[sub // 3]) * en).mean() / bb
    assert float(loss.detach()) == pytest.approx(float(closed), rel=1e-4)
    # the old policy is an EMA of the trained weights, updated after every epoch's update
    tr.algo.update(batch)
    d = tr.cfg.diffusion_nft.old_decay
    torch.testing.assert_close(tr.algo.old[0], d * u_old + (1 - d) * tr.policy.u.detach())


def test_diffusion_nft_learns_towards_high_reward_with_an_ode_sampler():
    tr = _lg_trainer("diffusion-nft", batch=64, diffusion_nft=dict(group_size=8, minibatch=64),
                     sampler=dict(solver="ddim", eta=0.0, steps=6), optim=dict(lr=0.05))
    r0 = [tr.step()["reward_mean"] for _ in range(3)]
    r1 = [tr.step()["reward_mean"] for _ in range(25)][-3:]
    assert sum(r1) / 3 > sum(r0) / 3 + 0.5  # r = w.x: the mean moves along w
    assert float(torch.tensor(W) @ tr.policy.u.detach()) > 0.3


# ---- one trainer: resume -------------------------------------------------------------------------------------
def _strip_s(line: str) -> str:
    return re.sub(r', "[^"]*_s": -?[0-9.eE+-]+', "", line)


RESUME_CASES = {
    "adjoint-matching": {},
    "flow-grpo-fast": dict(algo="flow-grpo", flow_grpo=dict(group_size=4, window=2),
                           sampler=dict(solver="eta", eta=0.7), optim=dict(inner_epochs=2)),
    "diffusion-nft": dict(algo="diffusion-nft", diffusion_nft=dict(group_size=4, minibatch=16),
                          sampler=dict(solver="ddim", eta=0.0)),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resumed_run_equals_uninterrupted(tmp_path, case):
    kw = dict(RESUME_CASES[case])
    cfg = _small(kw.pop("algo", case), epochs=4, **kw)
    Trainer(cfg, out=tmp_path / "full").train()
    Trainer(cfg, out=tmp_path / "part").train(epochs=2)
    Trainer(cfg, out=tmp_path / "part", resume=True).train()
    lines = [[_strip_s(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "part")]
    assert len(lines[0]) == 4 and lines[0] == lines[1]
    (_, a, _), (_, b, _) = (load_latest_checkpoint(tmp_path / d / "checkpoints") for d in ("full", "part"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key])
    if case == "diffusion-nft":  # the old policy is checkpointed
        assert all(torch.equal(x, y) for x, y in zip(a["algo"]["old"], b["algo"]["old"], strict=True))


# ---- the yardstick's discretisation floor ---------------------------------------------------------------------
def test_optimal_score_is_the_tilted_marginal_score():
    """OptimalScore = grad log p*_t: with a zero reward it is the reference mixture's exact eps; with a linear reward
    on the 2-mode mixture it is the score of the tilted mixture (each component shifted by s^2 w / beta and reweighted
    by exp(w.m / beta)), in closed form."""
    from ctrldiff.data.toy2d import GaussianMixture, gmm_preset
    from ctrldiff.eval.exact2d import OptimalScore, TiltedTarget
    from ctrldiff.models.mlp import ExactGMMScore
    from ctrldiff.rewards.toy2d import Toy2DReward

    p = make_process("vp")
    gmm = gmm_preset("gmm2")
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 2
    t = torch.full((64,), 0.3)
    zero = Toy2DReward("zero", lambda z: 0 * z[:, 0])
    torch.testing.assert_close(OptimalScore(TiltedTarget(gmm, zero, 1.0, n_grid=200), p)(x, t), ExactGMMScore(gmm, p)(x, t),
                               rtol=0, atol=2e-3)
    w, beta = torch.tensor([0.5, 0.25], dtype=torch.float64), 0.5
    s2 = gmm.stds**2
    logw = torch.log(gmm.weights) + gmm.means @ w / beta + s2 * float(w @ w) / (2 * beta**2)
    tilted = GaussianMixture((gmm.means + s2[:, None] * w / beta).tolist(), gmm.stds.tolist(),
                             torch.softmax(logw, 0).tolist())
    star = OptimalScore(TiltedTarget(gmm, linear(w.tolist()), beta, n_grid=200), p)
    torch.testing.assert_close(star(x, t), ExactGMMScore(tilted, p)(x, t), rtol=0, atol=2e-3)
