"""The shared trainer: run-directory outputs, checkpoints and resume, reward checking, config errors."""

import json
import math

import pytest
import torch

from ctrldiff.config import build_config
from ctrldiff.errors import CtrlDiffError, RewardError
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer


def _cfg(**kw):
    base = dict(algo="ctrl", model="gmm2-exact", reward="toy2d-mode-switch", beta=0.5, epochs=3, batch_size=32,
                sampler=dict(solver="em", steps=8), optim=dict(lr=1e-3, minibatch=64),
                log=dict(progress=False, tensorboard=False, checkpoint_every=1, num_eval_samples=64))
    base.update(kw)
    return TrainConfig(**base)


def test_run_directory_contents(tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(), out).train()
    assert (out / "config.yaml").exists()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    for r in recs:
        assert math.isclose(r["objective"], r["reward_mean"] - 0.5 * r["kl_path"], rel_tol=1e-9, abs_tol=1e-12)
    # terminal queries are 3 x 32 and the 2 x 2 x 64 of ctrl.certify_z (the start and the end on the certification
    # noise, at the training grid and at ctrl.certify_refine x its steps); the reward inside V is counted separately
    assert recs[-1]["reward_queries"] - recs[-1]["value_reward_queries"] == 3 * 32 + 4 * 64
    assert recs[-1]["value_reward_queries"] == 3 * 32 * 8  # CTRL(a): R(x0_hat) once per visited state
    assert (out / "samples" / "before_after.png").exists() and (out / "reward_curve.png").exists()
    assert (out / "samples" / "epoch_00000.png").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["epoch_00002.pt", "epoch_00003.pt"]


def test_existing_run_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(epochs=1), out).train()
    with pytest.raises(CtrlDiffError, match="--resume"):
        Trainer(_cfg(epochs=1), out)
    Trainer(_cfg(epochs=1), out, overwrite=True).train()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("algo", ["ctrl", "ddpo"])
def test_resume_matches_uninterrupted_run(tmp_path, algo):
    full = Trainer(_cfg(algo=algo, epochs=4), tmp_path / "full")
    full.train()
    part = Trainer(_cfg(algo=algo, epochs=4), tmp_path / "part")
    part.train(epochs=2)
    del part
    resumed = Trainer(_cfg(algo=algo, epochs=4), tmp_path / "part", resume=True)
    assert resumed.epoch == 2
    resumed.train()
    a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if not k.endswith("_s")} for x in lines]  # noqa: E731
    assert strip(a) == strip(b)
    for p, q in zip(full.task.model.parameters(), resumed.task.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_same_seed_same_metrics():
    a = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in Trainer(_cfg(epochs=2)).train()]
    b = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in Trainer(_cfg(epochs=2)).train()]
    assert a == b


def _bad(kind):
    def reward(x, cond=None):
        if kind == "nan":
            r = x[:, 0].clone()
            r[0] = float("nan")
            return r
        if kind == "shape":
            return x
        if kind == "raise":
            raise ValueError("scorer crashed")
        if kind == "dtype":
            return ["a"] * len(x)
        return x[:, 0]

    reward.__name__ = f"bad_{kind}"
    return reward


@pytest.mark.parametrize("kind,msg", [("nan", "non-finite"), ("shape", "shape"), ("raise", "raised ValueError"),
                                      ("dtype", "expected")])
def test_bad_reward_stops_with_a_clear_error(kind, msg, tmp_path):
    tr = Trainer(_cfg(epochs=2), tmp_path / "run", reward=_bad(kind))
    with pytest.raises(RewardError, match=msg) as e:
        tr.train()
    assert f"bad_{kind}" in str(e.value) and "batch" in str(e.value)
    assert not any(torch.isnan(p).any() for p in tr.task.model.parameters())


def test_bad_reward_batches_can_be_skipped_and_counted():
    calls = {"n": 0}

    def flaky(x, cond=None):
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            return torch.full((len(x),), float("nan"))
        return -x.pow(2).sum(1)

    tr = Trainer(_cfg(epochs=2, batch_size=32, rollout_chunk=16, reward_errors="skip"), reward=flaky)
    recs = tr.train()
    assert recs[-1]["reward_skipped"] == 32  # one chunk of 16 per epoch
    assert all(math.isfinite(r["reward_mean"]) for r in recs)


@pytest.mark.parametrize("data,field", [
    ({"algo": "ctrl", "bogus": 1}, "bogus"),
    ({"algo": "ctrl", "beta": -1.0}, "beta"),
    ({"algo": "ctrl", "sampler": {"steps": -3}}, "sampler.steps"),
    ({"algo": "ctrl", "epochs": "many"}, "epochs"),
    ({"algo": "nope"}, "algo"),
    ({"algo": "ctrl", "ctrl": {"estimator": "c"}}, "ctrl.estimator"),
])
def test_config_errors_name_the_field(data, field):
    with pytest.raises(CtrlDiffError) as e:
        build_config(TrainConfig, data)
    assert field in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_reward_lists_choices():
    with pytest.raises(CtrlDiffError, match="digit-alignment"):
        Trainer(_cfg(reward="no-such-reward"))


def test_lr_warmup_is_linear_and_resumes_from_the_optimizer_state(tmp_path):
    from ctrldiff.train.trainer import add_warmup

    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w], lr=0.4)
    add_warmup(opt, 0.4, 4)
    used = []
    opt.register_step_post_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    for _ in range(6):
        w.grad = torch.ones(3)
        opt.step()
    assert used == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    # a fresh optimizer loading the state after 2 steps continues at step 3
    w2 = torch.nn.Parameter(torch.zeros(3))
    opt2 = torch.optim.AdamW([w2], lr=0.4)
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.4)
    add_warmup(ref, 0.4, 4)
    for _ in range(2):
        ref.param_groups[0]["params"][0].grad = torch.ones(3)
        ref.step()
    opt2.load_state_dict(ref.state_dict())
    add_warmup(opt2, 0.4, 4)
    w2.grad = torch.ones(3)
    opt2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.3)
    # through the trainer: a resumed run with warmup equals an uninterrupted one
    # 4 policy steps per epoch (every pair trained on: CTRL's held-out half off)
    cfg = dict(optim=dict(lr=1e-3, minibatch=64, warmup_steps=10), epochs=3, ctrl=dict(held_out=0.0))
    full = Trainer(_cfg(**cfg), tmp_path / "full")
    full.train()
    assert full.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    part = Trainer(_cfg(**cfg), tmp_path / "part")
    part.train(epochs=1)
    assert part.optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)  # still warming up after 4 steps
    resumed = Trainer(_cfg(**cfg), tmp_path / "part", resume=True)
    resumed.train()
    for p, q in zip(full.task.model.parameters(), resumed.task.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_ema_of_the_weights_is_kept_checkpointed_resumed_and_used_for_the_final_model(tmp_path):
    d = 0.6
    # (CTRL's trust region, acceptance test and end-of-run certification off: they move the weights after the last
    # step; tests/test_ctrl.py covers the EMA there)
    cfg = dict(optim=dict(lr=1e-2, minibatch=64, ema_decay=d), epochs=3,
               ctrl=dict(max_update_kl=0.0, held_out=0.0, certify_z=0.0))
    tr = Trainer(_cfg(**cfg), tmp_path / "full")
    expected = [p.detach().clone() for p in tr.trainable_parameters]
    snaps = []
    tr.optimizer.register_step_post_hook(lambda *_: snaps.append([p.detach().clone() for p in tr.trainable_parameters]))
    tr.train()
    assert len(snaps) == 12  # 4 policy steps per epoch
    for snap in snaps:
        expected = [d * e + (1 - d) * s for e, s in zip(expected, snap, strict=True)]
    for e, got in zip(expected, tr.ema, strict=True):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-7)
    # the trained weights are back after the final evaluation / save, which used the EMA
    for p, s in zip(tr.trainable_parameters, snaps[-1], strict=True):
        assert torch.equal(p.detach(), s)
    assert any(not torch.equal(e, s) for e, s in zip(tr.ema, snaps[-1], strict=True))
    # resume: the EMA continues exactly
    part = Trainer(_cfg(**cfg), tmp_path / "part")
    part.train(epochs=1)
    resumed = Trainer(_cfg(**cfg), tmp_path / "part", resume=True)
    resumed.train()
    for a, b in zip(tr.ema, resumed.ema, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ctrldiff eval of the run (a '*-exact' model: from its checkpoint) evaluates the EMA weights
    from ctrldiff.eval.target import load_setup

    setup = load_setup(str(tmp_path / "full"))
    trained = list(setup.policy.parameters())
    assert len(trained) == len(tr.ema) and all(torch.equal(p, e) for p, e in zip(trained, tr.ema, strict=True))
    # a run without EMA cannot be resumed as one with it
    plain = Trainer(_cfg(epochs=2), tmp_path / "plain")
    plain.train(epochs=1)
    st = plain.state_dict()
    with pytest.raises(CtrlDiffError, match="holds no EMA weights"):
        Trainer(_cfg(optim=dict(lr=1e-3, minibatch=64, ema_decay=0.9), epochs=2)).load_state_dict(st)


def test_the_saved_final_model_holds_the_ema_weights(tmp_path):
    from ctrldiff.models.base import load_model

    # (ctrl.certify_z=0: two epochs seldom certify a gain, and a run that ends at its start has EMA = weights = start)
    tr = Trainer(_cfg(model="scratch-gmm2", epochs=2, optim=dict(lr=1e-2, minibatch=64, ema_decay=0.5),
                      ctrl=dict(certify_z=0)), tmp_path / "r")
    tr.train()
    saved = list(load_model(tmp_path / "r" / "final_model.safetensors").parameters())
    assert len(saved) == len(tr.ema) and all(torch.equal(p, e) for p, e in zip(saved, tr.ema, strict=True))
    assert not all(torch.equal(p, e) for p, e in zip(tr.trainable_parameters, tr.ema, strict=True))
