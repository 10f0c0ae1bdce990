"""The RL update rules: on-policy ratios, the CTRL(b) gradient against a closed form, and short runs."""

import math

import pytest
import torch
from torch import nn

from ctrldiff.algorithms.base import RolloutBatch
from ctrldiff.data.toy2d import gmm_preset
from ctrldiff.eval.evaluate import evaluate_policy
from ctrldiff.eval.exact2d import TiltedTarget
from ctrldiff.noise import make_process
from ctrldiff.rewards.toy2d import mode_switch
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.task import Task, build_task
from ctrldiff.train.trainer import Trainer


def _cfg(**kw):
    base = dict(model="gmm2-exact", reward="toy2d-mode-switch", beta=0.5, epochs=2, batch_size=64,
                sampler=dict(solver="em", steps=10), optim=dict(lr=1e-3, minibatch=128),
                log=dict(progress=False, tensorboard=False))
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("algo,est", [("ddpo", "b"), ("dpok", "b"), ("ctrl", "a")])
def test_ratio_is_one_on_policy(algo, est):
    tr = Trainer(_cfg(algo=algo, ctrl=dict(estimator=est)))
    batch = tr.collect()
    tr.algo.prepare(batch)
    B, K = batch.traj.batch_size, batch.traj.num_steps
    idx = torch.arange(B * K)
    mb = tr.algo.make_minibatch(batch, idx // K, idx % K)
    ratio = torch.exp(mb.log_prob - mb.log_prob_old)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)


def test_kl_path_is_zero_before_training():
    tr = Trainer(_cfg(algo="ctrl"))
    batch = tr.collect()
    assert float(batch.kl_path.abs().max()) == 0.0  # zero-initialised residual: the policy is the reference


class ShiftedScore(nn.Module):
    """eps of s(t, x) = s_ref(t, x) + theta with p_ref = N(0, 1) under VP, i.e. s_ref = -x."""

    prediction = "eps"

    def __init__(self, process):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.process = process

    def forward(self, x, t, cond=None):
        sigma = self.process.sigma(t.double())[:, None].to(x.dtype)
        return -sigma * (-x + self.theta)


def test_ctrl_b_gradient_matches_finite_difference_of_J():
    """Linear-Gaussian case: data N(0, 1), VP, score s = -x + theta, reward r = a x, beta > 0.

    Reverse dynamics dY = [-(b/2) Y + b theta] dtau + sqrt(b) dB, so E[Y_1] = int Phi(tau) b theta dtau with
    Phi(tau) = exp(-int_tau^1 b/2), grad_x V(t, x) = a Phi (exact), and
    J(theta) = a E[Y_1] - beta (1/2) theta^2 int b dtau.  -grad L_b must equal dJ/dtheta.
    """
    torch.set_default_dtype(torch.float64)
    try:
        proc = make_process("vp")
        a, beta, steps = 1.5, 0.7, 400
        model = ShiftedScore(proc)
        ref = ShiftedScore(proc).requires_grad_(False)
        task = Task("lin-gauss", model, ref, proc, (1,), 0, [model.theta])

        def reward(x, cond=None):
            return a * x[:, 0]

        reward.differentiable = True
        # the proximal term leaves the gradient at theta_old unchanged; the trust-region cap is switched off here
        cfg = _cfg(algo="ctrl", beta=beta, batch_size=8, sampler=dict(solver="em", steps=steps),
                   ctrl=dict(estimator="b", trust_region=0.0, proximal=1.0))
        tr = Trainer(cfg, task=task, reward=reward)
        with torch.no_grad():
            model.theta.fill_(0.3)
        batch = tr.collect()
        times = batch.traj.times
        t_mid = times[:-1]
        # Phi from t_k to the end, on the same grid (exact integral of beta/2)
        la = proc.log_alpha
        phi = torch.exp(la(t_mid) - la(times[-1]))  # exp(-int_{t_end}^{t_k} beta/2) = alpha_tk / alpha_tend
        batch.extras["grad_v"] = (a * phi)[None, :, None].expand(batch.traj.batch_size, -1, 1).clone()
        B, K = batch.traj.batch_size, batch.traj.num_steps
        idx = torch.arange(B * K)
        mb = tr.algo.make_minibatch(batch, idx // K, idx % K)
        loss, _ = tr.algo.loss(mb)
        (grad_loss,) = torch.autograd.grad(loss, model.theta)

        def J(theta):
            # closed form on a fine grid: E[Y_1] = sum_k Phi_k g_k^2 theta dtau_k, KL = theta^2/2 sum g^2 dtau
            fine = proc.time_grid(20000).double()
            tm, dt = fine[:-1], fine[:-1] - fine[1:]
            ph = torch.exp(la(tm) - la(fine[-1]))
            g2 = proc.g2(tm)
            return a * float((ph * g2 * theta * dt).sum()) - beta * 0.5 * theta**2 * float((g2 * dt).sum())

        h = 1e-4
        fd = (J(0.3 + h) - J(0.3 - h)) / (2 * h)
        assert math.isclose(-float(grad_loss), fd, rel_tol=0.02), (-float(grad_loss), fd)
    finally:
        torch.set_default_dtype(torch.float32)


def test_ctrl_short_run_raises_reward_and_lowers_gap():
    beta = 0.5
    reward = mode_switch(2.0)
    target = TiltedTarget(gmm_preset("gmm2"), reward, beta, n_grid=200)
    cfg = _cfg(algo="ctrl", beta=beta, batch_size=256, epochs=12, sampler=dict(solver="em", steps=20),
               ctrl=dict(value=dict(reward_term="surrogate")))
    tr = Trainer(cfg, reward=reward)

    def gap():
        ev = evaluate_policy(tr.policy, tr.ref, tr.process, reward, sample_shape=(2,), n=2000, steps=20, beta=beta)
        return (target.J_star - ev["objective"]) / abs(target.J_star), ev["reward_mean"]

    gap0, r0 = gap()
    tr.train()
    gap1, r1 = gap()
    assert r1 > r0 + 0.5, (r0, r1)
    assert gap1 < 0.5 * gap0, (gap0, gap1)


@pytest.mark.parametrize("algo", ["ddpo", "ddpo-sf", "dpok", "ctrl"])
def test_every_algorithm_runs_an_epoch(algo):
    tr = Trainer(_cfg(algo=algo, epochs=1))
    rec = tr.train()[0]
    for key in ("epoch", "reward_mean", "reward_std", "kl_path", "objective", "reward_queries", "wall_s"):
        assert key in rec and math.isfinite(rec[key])
    # 64 rollouts; CTRL also samples its start and its end on the 64 noises of ctrl.certify_z (one epoch: both), each
    # at the training grid and at ctrl.certify_refine x its steps
    assert rec["reward_queries"] - rec["value_reward_queries"] == 64 + (256 if algo == "ctrl" else 0)
    assert rec["train/updates"] > 0


def test_ode_rollouts_need_policy_noise():
    from ctrldiff.config import build_config
    from ctrldiff.errors import CtrlDiffError

    with pytest.raises(CtrlDiffError, match="stochastic"):
        build_config(TrainConfig, {"algo": "ddpo", "sampler": {"solver": "ddim", "eta": 0.0}})
    cfg = _cfg(algo="ctrl", ctrl=dict(estimator="a"), sampler=dict(solver="ddim", eta=0.0, steps=10, policy_std=0.3))
    rec = Trainer(cfg).train()[-1]
    assert math.isfinite(rec["objective"])


def test_rollout_batch_kl_matches_girsanov_sum():
    tr = Trainer(_cfg(algo="dpok"))
    with torch.no_grad():
        for p in tr.task.trainable:
            p.add_(0.05 * torch.randn_like(p))
    batch: RolloutBatch = tr.collect()
    from ctrldiff.solvers import kl_path

    torch.testing.assert_close(batch.kl_path, kl_path(tr.process, batch.traj, batch.traj.outputs, batch.eps_ref))
    assert float(batch.kl_path.mean()) > 0


def test_build_task_rejects_unknown_model():
    from ctrldiff.errors import CtrlDiffError

    with pytest.raises(CtrlDiffError, match="neither"):
        build_task("no-such-model")


@pytest.mark.parametrize("microbatch", [None, 7])
def test_ddpo_sf_takes_one_score_function_step_per_batch(microbatch):
    """DDPO_SF (Black et al. 2023): one gradient step per batch at theta = theta_old, on
    grad -(1/B) sum_b A_b sum_k log p_theta(x_{k+1} | x_k) over every (sample, step) pair, whatever optim.minibatch
    (here 5 pairs: the passes accumulate; before, each minibatch was its own off-policy step: 6 steps)."""
    tr = Trainer(_cfg(algo="ddpo-sf", batch_size=8, sampler=dict(solver="em", steps=4),
                      optim=dict(lr=1e-3, minibatch=5, microbatch=microbatch, grad_clip=1e9)))
    batch = tr.collect()
    tr.algo.prepare(batch)
    B, K = batch.traj.batch_size, batch.traj.num_steps
    idx = torch.arange(B * K)
    mb = tr.algo.make_minibatch(batch, idx // K, idx % K)
    logp = mb.log_prob.reshape(B, K).sum(1)
    want = torch.autograd.grad(-(batch.advantages * logp).mean(), tr.trainable_parameters)
    info = tr.algo.update(batch)
    assert info["train/updates"] == 1
    for p, g in zip(tr.trainable_parameters, want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_ddpo_mean_reduction_is_ddpo_pytorchs_loss():
    """``ddpo.logprob_reduction=mean`` with clip 1e-4 is the loss of ddpo-pytorch, written out here from its
    definition: per pair, log p averaged over the dimensions (Normal(mean, std).log_prob(x_next).mean(dims)),
    ratio = exp(new - old), loss = mean over pairs of max(-A ratio, -A clip(ratio, 1 - 1e-4, 1 + 1e-4))
    (the mean over a sample's steps: accelerate's accumulation over the timesteps). Same value and gradient."""
    tr = Trainer(_cfg(algo="ddpo", batch_size=16, sampler=dict(solver="em", steps=5),
                      ddpo=dict(logprob_reduction="mean", clip=1e-4)))
    batch = tr.collect()
    tr.algo.prepare(batch)
    with torch.no_grad():  # theta != theta_old: ratios off 1, some of them clipped
        for p in tr.trainable_parameters:
            p.add_(3e-4 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    traj = batch.traj
    B, K = traj.batch_size, traj.num_steps
    idx = torch.arange(B * K)
    b, k = idx // K, idx % K
    mb = tr.algo.make_minibatch(batch, b, k)
    loss, info = tr.algo.loss(mb)
    ours = torch.autograd.grad(loss, tr.trainable_parameters, retain_graph=True)

    def logp(eps):  # ddpo-pytorch's ddim_step_with_logprob: the Gaussian log-density, averaged over dims
        mean = traj.coef_a[k, None] * traj.states[b, k] + traj.coef_b[k, None] * eps
        return torch.distributions.Normal(mean, traj.std[k, None]).log_prob(traj.states[b, k + 1]).mean(1)

    adv = batch.advantages[b]
    ratio = torch.exp(logp(mb.eps) - logp(traj.outputs[b, k]))
    want = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - 1e-4, 1 + 1e-4)))
    # the loss is a small difference of terms of the advantages' size (~1): float32 rounding of the log-densities
    # differs by CPU (up to ~2e-8 on AVX-512), far below what a wrong formula would change (~1e-4 here)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    for g, w in zip(ours, torch.autograd.grad(want, tr.trainable_parameters), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-8)
    assert 0.05 < info["clipfrac"] < 0.95, info["clipfrac"]
