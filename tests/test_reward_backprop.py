"""Reward backprop (DRaFT-K / AlignProp): the pathwise gradient against finite differences and a hand-computed
truncated gradient, the differentiable replay of the sampler, a short run, and the bad-input errors."""

import math

import pytest
import torch
from torch import nn

from ctrldiff.cli import main
from ctrldiff.errors import CtrlDiffError
from ctrldiff.noise import make_process
from ctrldiff.solvers import replay_steps
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.task import Task
from ctrldiff.train.trainer import Trainer


class ShiftedScore(nn.Module):
    """Data N(0, 1) under VP: s_ref(t, x) = -x; the policy's score is s = -x + theta (eps = -sigma s)."""

    prediction = "eps"

    def __init__(self, process, theta: float = 0.0):
        super().__init__()
        self.theta = nn.Parameter(torch.full((1,), theta, dtype=torch.float64))
        self.process = process

    def forward(self, x, t, cond=None):
        sigma = self.process.sigma(t.double())[:, None].to(x.dtype)
        return -sigma * (-x + self.theta)


def _cfg(**kw):
    base = dict(algo="reward-backprop", model="gmm2-exact", reward="toy2d-quadratic", beta=0.5, epochs=2,
                batch_size=16, sampler=dict(solver="em", steps=8), optim=dict(lr=1e-3),
                log=dict(progress=False, tensorboard=False, num_final_eval=0))
    base.update(kw)
    return TrainConfig(**base)


def _lin_gauss_trainer(reward, theta=0.3, **kw):
    proc = make_process("vp")
    model, ref = ShiftedScore(proc, theta), ShiftedScore(proc).requires_grad_(False)
    task = Task("lin-gauss", model, ref, proc, (1,), 0, [model.theta])
    reward.differentiable = True
    tr = Trainer(_cfg(**kw), task=task, reward=reward)
    return tr, model, proc


def _loss_grad(tr, model):
    batch = tr.collect()
    loss, _ = tr.algo.sample_loss(batch, torch.arange(batch.traj.batch_size))
    (g,) = torch.autograd.grad(loss, model.theta)
    return float(g), batch


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_gradient_matches_finite_difference_of_the_objective(float64):
    """K = all: -dL/dtheta is the derivative of the sampled J_hat = mean r(x_K) - beta KL_path with the noise
    held fixed, J_hat re-simulated here from the EM recursion of the reverse SDE (not the library's replay)."""
    beta = 0.7

    def reward(x, cond=None):
        return -(x[:, 0] - 1.0).pow(2)

    tr, model, proc = _lin_gauss_trainer(reward, beta=beta, sampler=dict(solver="em", steps=8))
    g, batch = _loss_grad(tr, model)
    traj = batch.traj
    times = traj.times
    lam = proc.log_snr(times)

    def J_hat(theta):
        x = traj.states[:, 0, 0].clone()
        kl = 0.0
        for k in range(traj.num_steps):
            t, dtau = times[k], times[k] - times[k + 1]
            f, g2 = proc.f(t), proc.g2(t)
            x = x + (-f * x + g2 * (-x + theta)) * dtau + torch.sqrt(g2 * dtau) * traj.noise[:, k, 0]
            kl += float(lam[k + 1] - lam[k]) * float(proc.sigma(t)) ** 2 * theta**2  # ||eps - eps_ref||^2
        return float(reward(x[:, None]).mean()) - beta * kl

    h = 1e-5
    fd = (J_hat(0.3 + h) - J_hat(0.3 - h)) / (2 * h)
    assert math.isclose(-g, fd, rel_tol=1e-6), (-g, fd)


def test_last_step_truncation_against_a_manual_gradient(float64):
    """Linear reward r = a x, beta = 0: dE r / dtheta = a dx_K/dtheta. With EM, x_{k+1} = x_k + (-f x_k
    + g^2 (-x_k + theta)) dtau + noise, so  d_{k+1} = (1 - (f + g^2) dtau_k) d_k + g_k^2 dtau_k  (d_0 = 0).
    last_steps = 1 keeps only the last step's g^2 dtau; last_steps = 0 (all) the full recursion."""
    a = 1.7

    def reward(x, cond=None):
        return a * x[:, 0]

    grads = {}
    for n in (1, 3, 0):
        tr, model, proc = _lin_gauss_trainer(reward, beta=0.0, sampler=dict(solver="em", steps=6),
                                             reward_backprop=dict(last_steps=n))
        grads[n], batch = _loss_grad(tr, model)
    times = batch.traj.times
    K = len(times) - 1
    coef = [(1 - (proc.f(times[k]) + proc.g2(times[k])) * (times[k] - times[k + 1]),
             proc.g2(times[k]) * (times[k] - times[k + 1])) for k in range(K)]

    def manual(n):
        d = 0.0
        for k in range(K - n, K):
            d = float(coef[k][0]) * d + float(coef[k][1])
        return -a * d  # loss = -E r

    assert math.isclose(grads[1], -a * float(coef[-1][1]), rel_tol=1e-6)
    for n in (1, 3):
        assert math.isclose(grads[n], manual(n), rel_tol=1e-6), (n, grads[n], manual(n))
    assert math.isclose(grads[0], manual(K), rel_tol=1e-6)
    assert abs(grads[0]) > abs(grads[3]) > abs(grads[1])


@pytest.mark.parametrize("solver", [dict(solver="em", steps=5), dict(solver="ddim", eta=0.0, steps=2),
                                    dict(solver="ddim", eta=0.5, steps=3), dict(solver="ode-euler", steps=1)])
def test_replay_reproduces_the_rollout_and_checkpointing_keeps_the_gradient(solver):
    tr = Trainer(_cfg(sampler=solver))
    with torch.no_grad():
        for p in tr.task.trainable:
            p.add_(0.05 * torch.randn_like(p))
    batch = tr.collect()
    traj = batch.traj
    for start in range(traj.num_steps):
        states, eps = replay_steps(tr.policy, tr.process, traj, start)
        torch.testing.assert_close(states, traj.states[:, start:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eps, traj.outputs[:, start:], rtol=1e-5, atol=1e-5)
    grads = []
    for ck in (False, True):
        tr.algo.acfg.checkpoint = ck
        loss, _ = tr.algo.sample_loss(batch, torch.arange(8))
        grads.append(torch.autograd.grad(loss, tr.task.trainable))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sampler", [dict(solver="em", steps=20), dict(solver="ddim", eta=0.0, steps=2)])
def test_short_run_raises_the_reward(sampler):
    from ctrldiff.eval.evaluate import evaluate_policy
    from ctrldiff.rewards.toy2d import quadratic

    reward = quadratic((0.0, 2.0), 4.0)
    tr = Trainer(_cfg(batch_size=128, epochs=6, sampler=sampler, optim=dict(lr=3e-3)), reward=reward)
    s = tr.cfg.sampler

    def er():
        return evaluate_policy(tr.policy, tr.ref, tr.process, reward, sample_shape=(2,), n=1000, solver=s.solver,
                               steps=s.steps, eta=s.eta, beta=0.5)

    before = er()
    recs = tr.train()
    after = er()
    assert after["reward_mean"] > before["reward_mean"] + 0.3, (before, after)
    assert after["objective"] > before["objective"], (before, after)
    # rollout rewards + one gradient call per sample and epoch
    assert recs[-1]["reward_queries"] == 2 * 6 * 128 and recs[-1]["value_reward_queries"] == 6 * 128


def test_non_differentiable_reward_is_rejected_before_compute():
    def black_box(x, cond=None):
        return x[:, 0].round()

    with pytest.raises(CtrlDiffError, match="reward-backprop needs a differentiable reward; 'black_box'.*--algo"):
        Trainer(_cfg(), reward=black_box)


def test_non_differentiable_reward_is_one_error_line_on_the_cli(tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main.main(args=["train", "--algo", "reward-backprop", "--model", "gmm2-exact", "--reward",
                        "jpeg-compressibility", "--out", str(tmp_path / "run"), "--quiet"], prog_name="ctrldiff")
    assert e.value.code == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "jpeg-compressibility" in err[0], err
