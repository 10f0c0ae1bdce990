"""LaSRO: the Bradley-Terry loss, ranking accuracy, the replay buffer, gradients through both sampler steps, a
short run that raises a black-box reward, checkpoint/resume of the algorithm's state, config validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ctrldiff.algorithms.lasro import ReplayBuffer, RunningNorm, bradley_terry_loss, ranking_accuracy
from ctrldiff.models.unet import UNet
from ctrldiff.noise import make_process
from ctrldiff.rewards.base import FunctionReward
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.task import Task, _freeze
from ctrldiff.train.trainer import Trainer

TINY = dict(channels=(8, 16), emb_dim=32, groups=4)


def tiny_task(seed: int = 0) -> Task:
    """A tiny x0-prediction UNet starting at x0 = 0 (a stable 2-step generator: outputs ~ 0.014 x_T)."""
    torch.manual_seed(seed)
    net = UNet(prediction="x0", **TINY)
    return Task("tiny", net, _freeze(net), make_process("vp"), (1, 8, 8), 10, list(net.parameters()))


def brightness_reward() -> FunctionReward:
    """A black-box (declared non-differentiable, computed without autograd) reward: mean pixel value."""
    return FunctionReward(lambda x, c=None: x.detach().flatten(1).mean(1), "brightness", differentiable=False)


def lasro_config(**lasro) -> TrainConfig:
    kw = dict(gen_batch=16, initial_surrogate_steps=40, surrogate_steps=5, pairs=64, gen_steps=2) | lasro
    return TrainConfig(algo="lasro", epochs=2, batch_size=32, sampler=dict(solver="ddim", steps=2, eta=0.0),
                       optim=dict(lr=3e-3), lasro=kw, log=dict(progress=False, num_final_eval=0, tensorboard=False,
                                                               checkpoint_every=1))


def test_bradley_terry_loss_and_gradient_closed_form():
    r_w = torch.tensor([1.0, -0.5, 2.0], requires_grad=True)
    r_l = torch.tensor([0.2, 0.3, 2.5], requires_grad=True)
    loss = bradley_terry_loss(r_w, r_l)
    d = torch.tensor([0.8, -0.8, -0.5])
    assert torch.allclose(loss, torch.log1p(torch.exp(-d)).mean())
    loss.backward()
    expected = -torch.sigmoid(-d) / 3  # dL/dr_w = -(1 - sigmoid(d)) / N
    assert torch.allclose(r_w.grad, expected) and torch.allclose(r_l.grad, -expected)


def test_ranking_accuracy_counts_same_condition_untied_pairs():
    pred = torch.tensor([0.0, 1.0, 2.0, 5.0])
    true = torch.tensor([0.0, 2.0, 1.0, 1.0])
    assert ranking_accuracy(pred, true) == (pytest.approx(3 / 5), 5)  # (1, 2), (1, 3) wrong; (2, 3) a tie
    cond = torch.tensor([0, 0, 1, 1])
    assert ranking_accuracy(pred, true, cond) == (1.0, 1)  # only (0, 1); (2, 3) tied
    assert ranking_accuracy(torch.zeros(2), torch.tensor([0.0, 1.0]))[0] == 0.5  # predicted ties count 1/2


def test_replay_buffer_is_bounded_and_pairs_share_a_condition():
    buf = ReplayBuffer(10)
    for e in range(3):
        buf.add(torch.full((6, 2), float(e)), torch.arange(6) % 2, torch.arange(6).float() + e, e)
    assert len(buf) == 10 and int(buf.epoch.min()) == 1  # FIFO: the oldest rows went first
    w, lo = buf.sample_pairs(50, torch.Generator().manual_seed(0))
    assert len(w) > 10 and bool((buf.cond[w] == buf.cond[lo]).all()) and bool((buf.r[w] > buf.r[lo]).all())


def test_running_norm_standardises_and_clips():
    n = RunningNorm(0.0, 2.0)
    n.update(torch.tensor([1.0, 3.0]))
    assert n.mean == 2.0 and n.var == pytest.approx(2.0)
    assert torch.allclose(n(torch.tensor([2.0, 2.0 + 2 ** 0.5, 100.0])), torch.tensor([0.0, 1.0, 2.0]), atol=1e-5)


def test_config_rejects_many_step_sampler():
    with pytest.raises(ValidationError, match="sampler.steps"):
        TrainConfig(algo="lasro", sampler=dict(solver="ddim", steps=10, eta=0.0))


def test_gradient_reaches_the_generator_through_both_steps():
    tr = Trainer(lasro_config(c0=0.0, c1=0.0, c2=1.0), task=tiny_task(), reward=brightness_reward())
    for p in tr.algo.surrogate.head.parameters():  # a non-trivial surrogate
        torch.nn.init.normal_(p, std=0.3)
    for p in tr.task.model.parameters():  # a non-trivial generator
        torch.nn.init.normal_(p, std=0.1)
    algo, proc = tr.algo, tr.process
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(8, 1, 8, 8, generator=g)
    cond = torch.arange(8)
    params = tr.trainable_parameters

    def grads(detach_step1: bool):
        times = proc.time_grid(2)
        traj1 = tr.solver(tr.policy, x_T, times[:2], proc, cond, grad=True)
        x1 = traj1.final.detach() if detach_step1 else traj1.final
        z2 = tr.solver(tr.policy, x1, times[1:], proc, cond, grad=True).final
        gs = torch.autograd.grad(algo.surrogate(z2, cond).sum(), params, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if gr is None else gr).flatten() for gr, p in zip(gs, params, strict=True)])

    full, step1_const = grads(False), grads(True)
    z2 = algo.outputs(tr.policy, x_T, cond, grad=True)[2]  # the algorithm's own 2-step output = the full path
    assert torch.allclose(z2, tr.solver(tr.policy, x_T, proc.time_grid(2), proc, cond).final, atol=1e-6)
    through_step1 = full - step1_const
    assert through_step1.norm() > 1e-3 * full.norm() > 0  # step 1's network evaluation contributes
    # and the loss the algorithm optimises has exactly this gradient (c2 = 1, S linear inside the clip)
    algo.norms[2].update(torch.tensor([-1e3, 1e3]))  # a huge running variance: no clipping, S = R / sd
    loss, _ = algo.generator_loss(x_T, cond)
    gl = torch.autograd.grad(loss, params, allow_unused=True)
    gl = torch.cat([(torch.zeros_like(p) if gr is None else gr).flatten() for gr, p in zip(gl, params, strict=True)])
    sd = algo.norms[2].var ** 0.5
    assert torch.allclose(-gl * sd * 8, full, rtol=1e-3, atol=1e-6)


def test_short_run_raises_a_black_box_reward():
    cfg = lasro_config()
    cfg.epochs = 6
    tr = Trainer(cfg, task=tiny_task(), reward=brightness_reward())
    before = float(brightness_reward()(tr.eval_samples(n=64)).mean())
    recs = tr.train()
    after = float(brightness_reward()(tr.eval_samples(n=64)).mean())
    assert after > before + 0.05, (before, after)
    assert recs[-1]["lasro/surrogate_acc_fresh"] > 0.7  # the surrogate ranks fresh samples it never saw
    assert recs[-1]["reward_queries"] == 6 * 2 * 32  # 2-step rollouts + their 1-step outputs, all counted


def test_checkpoint_resume_restores_surrogate_optimizer_buffer_and_normaliser(tmp_path):
    cfg = lasro_config()
    cfg.epochs = 3
    straight = Trainer(cfg, tmp_path / "a", task=tiny_task(), reward=brightness_reward())
    straight.train()
    part = Trainer(cfg, tmp_path / "b", task=tiny_task(), reward=brightness_reward())
    part.train(epochs=2)
    resumed = Trainer(cfg, tmp_path / "b", task=tiny_task(), reward=brightness_reward(), resume=True)
    a0, a1 = part.algo, resumed.algo
    assert resumed.epoch == 2 and len(a1.buffer) == len(a0.buffer) == 2 * 64
    assert torch.equal(a1.buffer.z, a0.buffer.z) and torch.equal(a1.buffer.r, a0.buffer.r)
    assert a1.norms[2].state_dict() == a0.norms[2].state_dict() and a1.surrogate_updates == a0.surrogate_updates
    for (k, v), v1 in zip(a0.surrogate.head.state_dict().items(), a1.surrogate.head.state_dict().values(), strict=True):
        assert torch.equal(v, v1), k
    opt0, opt1 = a0.surrogate_opt.state_dict()["state"][0], a1.surrogate_opt.state_dict()["state"][0]
    assert opt1["exp_avg"].equal(opt0["exp_avg"]) and opt1["step"] == opt0["step"]
    resumed.train()
    for p, q in zip(straight.task.model.parameters(), resumed.task.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)  # resuming is the same run as never stopping


def test_frozen_surrogate_trains_only_on_the_initial_buffer():
    cfg = lasro_config(freeze_surrogate=True)
    cfg.epochs = 3
    tr = Trainer(cfg, task=tiny_task(), reward=brightness_reward())
    recs = tr.train()
    assert tr.algo.surrogate_updates == 40 and "lasro/bt_loss" not in recs[-1]
    assert len(tr.algo.buffer) == 3 * 64 and all("lasro/surrogate_acc_fresh" in r for r in recs)


def test_cli_rejects_lasro_on_a_many_step_sampler(tmp_path):
    from click.testing import CliRunner

    from ctrldiff.cli import main

    r = CliRunner().invoke(main, ["train", "--algo", "lasro", "--model", "digits-2step", "--solver", "ddim",
                                  "--steps", "10", "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "sampler.steps" in r.output and "1 or 2" in r.output
