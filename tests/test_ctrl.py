"""CTRL's fair critic, its KL trust region and the per-epoch random time grid."""

import copy
import math

import pytest
import torch

from ctrldiff.errors import CtrlDiffError
from ctrldiff.rewards import make_reward
from ctrldiff.solvers import evaluate_along, jittered_grid, kl_path
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer


def _cfg(**kw):
    base = dict(model="gmm2-exact", reward="toy2d-mode-switch", beta=0.5, epochs=2, batch_size=64,
                sampler=dict(solver="em", steps=8), optim=dict(lr=1e-3, minibatch=128),
                log=dict(progress=False, tensorboard=False))
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return TrainConfig(**base)


def _advantages_with_rewards(tr, batch, rewards):
    """Advantages of ``batch`` with its rewards replaced, from the same critic state (restored afterwards)."""
    state = copy.deepcopy(tr.algo.state_dict())
    b = copy.copy(batch)
    b.rewards = rewards
    tr.algo.prepare(b)
    tr.algo.load_state_dict(copy.deepcopy(state))
    return b.advantages


@pytest.mark.parametrize("lam", [0.0, 0.9, 1.0])
def test_advantages_come_from_a_critic_not_fitted_on_the_same_samples(lam):
    """Changing one sample's reward changes the other samples' advantages only through the per-step batch mean
    (a constant shift): the critic that scores a batch has not been fitted on it. A critic fitted on the batch first
    (the old behaviour) moves every V(t_k, x_k), and with it every other sample's advantage, differently."""
    tr = Trainer(_cfg(algo="ctrl", ctrl=dict(gae_lambda=lam)))
    tr.train(epochs=2)  # the critic has been fitted on earlier batches
    assert tr.algo.critic_fitted
    batch = tr.collect()
    r = batch.rewards.clone()
    a1 = _advantages_with_rewards(tr, batch, r)
    r2 = r.clone()
    r2[0] += 5.0
    a2 = _advantages_with_rewards(tr, batch, r2)
    diff = (a2 - a1)[1:]  # the other samples
    assert float(diff.std(0).max()) < 1e-5, "other samples' advantages moved with sample 0's reward"
    # sample 0's own advantage moves by its reward change, discounted by lambda from the last step
    K = batch.traj.num_steps
    own = (a2 - a1)[0] - diff[0]
    expect = 5.0 * torch.tensor([lam ** (K - 1 - k) for k in range(K)])
    torch.testing.assert_close(own, expect.to(own.dtype), atol=1e-4, rtol=1e-4)


def test_first_epoch_uses_monte_carlo_returns_before_any_critic_fit():
    tr = Trainer(_cfg(algo="ctrl"))
    batch = tr.collect()
    assert not tr.algo.critic_fitted
    tr.algo.prepare(batch)
    assert tr.algo.critic_fitted
    kl_to_go = batch.kl_rate.flip(1).cumsum(1).flip(1)
    G = batch.rewards[:, None] - tr.cfg.beta * kl_to_go
    train = torch.ones(len(G), dtype=torch.bool)
    train[batch.extras["held_out"]] = False  # centred on the trajectories the update trains on
    assert 0 < int((~train).sum()) < len(G)
    torch.testing.assert_close(batch.advantages, G - G[train].mean(0), atol=1e-5, rtol=1e-5)


def test_critic_state_is_checkpointed():
    tr = Trainer(_cfg(algo="ctrl"))
    tr.train(epochs=1)
    st = tr.algo.state_dict()
    assert st["critic_fitted"] is True
    tr2 = Trainer(_cfg(algo="ctrl"))
    tr2.algo.load_state_dict(st)
    assert tr2.algo.critic_fitted


def test_trust_region_scales_the_epoch_update_back_to_max_update_kl():
    limit = 0.02
    tight = Trainer(_cfg(algo="ctrl", ctrl=dict(max_update_kl=limit, signal_scaled=False, held_out=0.0),
                         optim=dict(lr=3e-2, minibatch=64)))
    batch = tight.collect()
    old = copy.deepcopy(batch)
    tight.algo.prepare(batch)
    info = tight.algo.update(batch)
    assert info["train/updates"] == 8  # 64 samples x 8 steps / 64 pairs
    assert info["train/update_kl"] > limit and info["train/trust_region_scale"] < 1
    # the Girsanov KL_path between the updated and the sampling policy, on the whole batch: at the limit
    eps_new = evaluate_along(tight.policy, tight.process, old.traj)
    kl_new = float(kl_path(tight.process, old.traj, eps_new, old.traj.outputs).mean())
    assert 0.3 * limit < kl_new < 1.5 * limit, kl_new  # the limit is enforced on 512 sampled pairs
    free = Trainer(_cfg(algo="ctrl", ctrl=dict(max_update_kl=0.0), optim=dict(lr=3e-2, minibatch=64)))
    assert "train/update_kl" not in free.train(epochs=1)[0]


@pytest.mark.parametrize("lr", [1e-3, 3e-2])
def test_trust_region_holds_its_size_in_nats_whatever_the_reward_scale_and_lr(lr):
    kls = []
    for scale in (0.1, 10.0):
        tr = Trainer(_cfg(algo="ctrl", ctrl=dict(max_update_kl=0.05, signal_scaled=False, held_out=0.0),
                          reward=f"{scale}*toy2d-mode-switch",
                          optim=dict(lr=lr, minibatch=64)))
        batch = tr.collect()
        old = copy.deepcopy(batch)
        tr.algo.prepare(batch)
        tr.algo.update(batch)
        eps_new = evaluate_along(tr.policy, tr.process, old.traj)
        kls.append(float(kl_path(tr.process, old.traj, eps_new, old.traj.outputs).mean()))
    assert max(kls) < 0.05 * 1.5, kls


def test_a_step_short_of_the_trust_region_is_lengthened_to_its_edge():
    """With a small learning rate the optimiser's step stays far inside max_update_kl. On a reward with a clear signal
    the held-out test lengthens it along itself up to the edge: the Girsanov KL between the updated and the sampling
    policy, on the whole batch, is then at the limit. With ctrl.fill_trust_region=False the step is the optimiser's."""
    limit = 0.05
    for fill in (True, False):
        tr = Trainer(_cfg(algo="ctrl", seed=0, batch_size=128, ctrl=dict(max_update_kl=limit, fill_trust_region=fill,
                                                                           trust_region_growth=1.0),
                          optim=dict(lr=1e-4)))
        tr.train(epochs=1)
        batch = tr.collect()
        old = copy.deepcopy(batch)
        tr.algo.prepare(batch)
        info = tr.algo.update(batch)
        eps_new = evaluate_along(tr.policy, tr.process, old.traj)
        kl_new = float(kl_path(tr.process, old.traj, eps_new, old.traj.outputs).mean())
        assert info["train/update_kl"] < 0.2 * limit  # the optimiser's own step
        if fill:
            assert info["train/accepted"] > 2.0, info
            assert 0.5 * limit < kl_new < 1.5 * limit, kl_new  # the limit is enforced on 512 sampled pairs
        else:
            assert 0 < info["train/accepted"] <= 1.0, info
            assert kl_new < 0.25 * limit, kl_new


def test_the_trust_region_widens_while_the_held_out_half_wants_longer_steps_and_not_on_noise():
    """ctrl.trust_region_growth: on a reward with a clear signal the held-out lower confidence bound asks for steps past
    the edge, so the region doubles epoch by epoch up to growth x max_update_kl and a step moves the policy past the
    fixed region; with rewards that are pure noise the steps fall short of a widened region and it shrinks back (a
    noise step widens it only where its held-out gain is two standard errors above 0, or where it moves the policy
    back towards the reference, which does raise J)."""
    limit, growth = 0.05, 4.0
    cfg = _cfg(algo="ctrl", seed=0, batch_size=128, epochs=4, beta=0.05, reward="10*toy2d-mode-switch",
               ctrl=dict(max_update_kl=limit, trust_region_growth=growth))
    recs = Trainer(cfg).train()
    radii = [r["train/trust_radius"] for r in recs]
    assert radii[:3] == [2.0, 4.0, 4.0], radii
    assert max(r["train/update_kl_kept"] for r in recs) > 1.5 * limit, recs
    assert all(r["train/update_kl_kept"] <= growth * limit * 1.05 for r in recs), recs
    widened, last = 0, []
    # pure noise after a widened region: the steps fall short of it and it shrinks back (at accept_z = 1, where
    # widening asks for 2 standard errors; the default accept_z = 0 asks for 1 and leaves the end to ctrl.certify_z)
    for seed in range(6):
        tr = Trainer(_cfg(algo="ctrl", seed=seed, batch_size=128, epochs=4, beta=0.05, reward="10*toy2d-mode-switch",
                          ctrl=dict(max_update_kl=limit, trust_region_growth=growth, accept_z=1.0)))
        tr.algo.trust_radius = growth
        for _ in range(4):
            batch = tr.collect()
            batch.rewards = 2 * torch.randn(batch.rewards.shape, generator=tr.cpu_gen)
            tr.algo.prepare(batch)
            before = tr.algo.trust_radius
            tr.algo.update(batch)
            widened += tr.algo.trust_radius > before
        last.append(tr.algo.state_dict()["trust_radius"])
    assert widened <= 2 and max(last) <= 2.0 and last.count(1.0) >= 4, (widened, last)  # when written: 1, 5 of 6


def test_the_critic_with_the_r_term_is_chosen_where_r_of_the_tweedie_prediction_tracks_the_expected_reward():
    """ctrl.value.select: each epoch the critic without the R term scores the advantages only if it predicts the
    batch's returns better (neither was fitted on it) by value.select_z = 2 standard errors, paired per trajectory;
    otherwise the R-term critic, the prior, does. For a linear reward r(E[x0 | x_t]) = E[r(x0) | x_t] under the model,
    so the R(x0_hat) prior is exact: the free critic predicts worse in every epoch and is never chosen. For a ring
    through both modes of the data, x0_hat between the modes lands far from the ring, R(x0_hat) is several units below
    the reward that follows, and the free critic predicts better once it has been fitted on two batches (after one, its
    lead is noisy); it is chosen in the epochs where its lead reaches 2 standard errors. Measured (256 trajectories a
    batch, seeds 0-2, epochs 1-3 after the first fit, ctrl.held_out 0.25): the ring's lead -1.8, 1.9 and 2.4 at epoch
    1 and 3.9-9.3 after it; the linear reward's -4.4 to -15.1. With held_out 0.5 it was 1.2-10.5 and -1.7 to -22.6."""
    chosen_ring = 0
    for reward in ("toy2d-ring", "toy2d-linear"):
        for seed in range(3):
            recs = Trainer(_cfg(algo="ctrl", seed=seed, reward=reward, epochs=4, batch_size=256)).train()
            assert "ctrl/critic_r_term" not in recs[0]  # no critic before the first fit: Monte Carlo returns
            lead = [r["value/select_z"] for r in recs[1:]]
            chosen = [r["ctrl/critic_r_term"] == 0.0 for r in recs[1:]]
            assert chosen == [z > 2.0 for z in lead], (reward, seed, lead, chosen)
            if reward == "toy2d-ring":
                assert min(lead[1:]) > 2.0, (seed, lead)
                chosen_ring += sum(chosen)
            else:
                assert max(lead) < 0 and not any(chosen), (seed, lead)
    assert chosen_ring >= 5, chosen_ring  # of 9 epochs
    assert Trainer(_cfg(algo="ctrl", ctrl=dict(value=dict(select=False)))).algo.value_free is None
    assert Trainer(_cfg(algo="ctrl", ctrl=dict(value=dict(reward_term="none")))).algo.value_free is None


def test_a_lengthened_step_is_shortened_while_its_gain_where_it_ended_is_not_above_zero(monkeypatch):
    """verify_lengthened: the gain of a step lengthened past the optimiser's (accepted = 3) is estimated again at the
    parameters it reached; while its lower confidence bound is not above 0 the extra length is halved (3 -> 2 -> 1.5 ->
    1.25 in three tries, never below the optimiser's step), the parameters move back along the step with it and the
    reported KL shrinks as s^2. A step whose gain holds there is left as it is."""
    tr = Trainer(_cfg(algo="ctrl"))
    batch = tr.collect()
    tr.algo.prepare(batch)
    held = tr.algo.held_out(batch)
    start = [p.detach().clone() for p in tr.trainable_parameters]
    with torch.no_grad():
        for p in tr.trainable_parameters:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    moved = [p.detach().clone() for p in tr.trainable_parameters]
    n = len(held)
    for gain, want in ((-1.0, 1.25), (1.0, 3.0)):
        with torch.no_grad():
            for p, m in zip(tr.trainable_parameters, moved, strict=True):
                p.copy_(m)
        terms = (torch.full((n,), gain, dtype=torch.float64) + 0.01 * torch.arange(n), torch.zeros(n, dtype=torch.float64))
        monkeypatch.setattr(type(tr.algo), "held_out_terms", lambda self, b, h, t=terms: t)
        out = {"train/accepted": 3.0, "train/update_kl_kept": 0.45}
        assert tr.algo.verify_lengthened(batch, start, held, out) == (gain < 0)
        assert out["train/accepted"] == want
        assert abs(out["train/update_kl_kept"] - 0.45 * (want / 3.0) ** 2) < 1e-12
        for p, m, s0 in zip(tr.trainable_parameters, moved, start, strict=True):
            torch.testing.assert_close(p.detach(), s0 + (want / 3.0) * (m - s0))


def test_adapt_trust_radius_doubles_to_its_cap_and_halves_to_the_fixed_region():
    algo = Trainer(_cfg(algo="ctrl", ctrl=dict(trust_region_growth=8.0))).algo
    seen = []
    for past_edge, short in [(True, False)] * 5 + [(False, False)] + [(False, True)] * 5:
        algo.adapt_trust_radius(past_edge, short)
        seen.append(algo.trust_radius)
    assert seen == [2, 4, 8, 8, 8, 8, 4, 2, 1, 1, 1]


@pytest.mark.parametrize("narrow", ["kept", "evidence"])
def test_the_trust_region_narrows_on_a_short_step_or_only_on_evidence(monkeypatch, narrow):
    """ctrl.trust_region_start: the first epoch's region is that many times max_update_kl (at most the growth cap).
    ctrl.trust_region_narrow: with "kept" a step kept under half the edge halves the region; with "evidence" it does
    only where the held-out gain one standard error above its estimate (accept_upper) still wants under half of it."""
    cfg = _cfg(algo="ctrl", batch_size=128, ctrl=dict(trust_region_growth=16.0, trust_region_start=32.0,
                                                      trust_region_narrow=narrow))
    tr = Trainer(cfg)
    assert tr.algo.trust_radius == 16.0  # capped by the growth
    tr.train(epochs=1)
    seen = []
    for upper in (1e3, 0.0):  # the optimistic length: far past the edge (noise), then none
        tr.algo.trust_radius = 16.0
        batch = tr.collect()
        tr.algo.prepare(batch)
        monkeypatch.setattr(tr.algo, "accept_update", lambda *a, upper=upper, **k: {
            "train/accepted": 0.01, "train/accept_free": 0.0, "train/accept_upper": upper})
        tr.algo.update(batch)
        seen.append(tr.algo.trust_radius)
    assert seen == ([8.0, 8.0] if narrow == "kept" else [16.0, 8.0])


def test_signal_fraction_tells_a_reward_from_noise_and_ignores_the_reward_scale():
    """rho (CTRL's signal fraction, the agreement of eight parts of the batch on the loss gradient, at a lower
    confidence bound): with rewards that are pure noise, independent of the samples, the parts do not agree (rho = 0
    on seeds 0-4); with the mode-switch reward they do (0, 0.53, 0.60, 0.52, 0.64); and at the sampling policy (KL 0)
    scaling the reward changes no direction, so rho is the same for the reward x 0.1 and x 10."""
    noise, signal = [], []
    for seed in range(5):
        rho = {}
        for scale in (0.1, 10.0):
            tr = Trainer(_cfg(algo="ctrl", seed=seed, reward=f"{scale}*toy2d-mode-switch"))
            b = tr.collect()
            tr.algo.prepare(b)
            rho[scale] = tr.algo.signal_fraction(b)
        assert abs(rho[0.1] - rho[10.0]) < 1e-4, rho
        signal.append(rho[10.0])
        b.rewards = 2 * torch.randn(b.rewards.shape, generator=torch.Generator().manual_seed(seed))
        tr.algo.prepare(b)
        noise.append(tr.algo.signal_fraction(b))
    assert sum(noise) / 5 < 0.05 and sum(signal) / 5 > 0.3, (noise, signal)


def test_an_update_without_signal_leaves_the_policy_where_it_was(monkeypatch):
    tr = Trainer(_cfg(algo="ctrl", ctrl=dict(signal_scaled=True), optim=dict(lr=3e-2, minibatch=64)))
    before = [p.detach().clone() for p in tr.trainable_parameters]
    monkeypatch.setattr(type(tr.algo), "signal_fraction", lambda self, *a, **k: 0.0)
    info = tr.train(epochs=1)[0]
    assert info["train/updates"] == 0 and info["train/signal_fraction"] == 0
    assert all(torch.equal(p, q) for p, q in zip(tr.trainable_parameters, before, strict=True))


def test_jittered_grid_keeps_ends_and_order():
    base = torch.linspace(1.0, 1e-3, 11)
    g = torch.Generator().manual_seed(0)
    grids = [jittered_grid(base, g) for _ in range(50)]
    for t in grids:
        assert t[0] == base[0] and t[-1] == base[-1] and len(t) == len(base)
        assert bool((t[1:] < t[:-1]).all())
        mid = 0.5 * (base[1:] + base[:-1])
        assert bool((t[1:-1] <= mid[:-1]).all() and (t[1:-1] >= mid[1:]).all())
    assert len({tuple(t.tolist()) for t in grids}) == 50


def test_jittered_grid_in_log_snr_stays_between_log_snr_midpoints_and_reaches_small_times():
    from ctrldiff.noise import VPLinear
    proc = VPLinear()
    base = proc.time_grid(20)
    g = torch.Generator().manual_seed(0)
    lam = proc.log_snr(base.double())
    mid = 0.5 * (lam[1:] + lam[:-1])
    lows = []
    for _ in range(200):
        t = jittered_grid(base, g, proc)
        assert t[0] == base[0] and t[-1] == base[-1] and len(t) == len(base)
        assert bool((t[1:] < t[:-1]).all())
        inner = proc.log_snr(t[1:-1].double())
        assert bool((inner >= mid[:-1] - 1e-4).all() and (inner <= mid[1:] + 1e-4).all())
        lows.append(float(t[-2]))
    time_low = float(0.5 * (base[-1] + base[-2]))  # where the time-space draw stops
    assert min(lows) < 0.5 * time_low and max(lows) > float(base[-2])


def test_trainer_draws_its_grid_in_log_snr_when_asked(monkeypatch):
    import ctrldiff.train.trainer as trainer_mod
    seen = []
    real = trainer_mod.jittered_grid
    monkeypatch.setattr(trainer_mod, "jittered_grid", lambda t, g, p=None: seen.append(p) or real(t, g, p))
    Trainer(_cfg(algo="ctrl")).collect()
    tr = Trainer(_cfg(algo="ctrl", sampler=dict(random_grid_space="log_snr")))
    tr.collect()
    assert seen == [None, tr.process]
    with pytest.raises(CtrlDiffError, match="random_grid_space"):
        Trainer(_cfg(algo="ctrl", sampler=dict(random_grid_space="log_snr", random_grid=False)))


def test_reference_data_end_leaves_the_training_grids_last_step_to_the_reference(tmp_path):
    import json

    from ctrldiff.eval.target import load_setup
    from ctrldiff.guidance import ReferenceBelow
    from ctrldiff.solvers import data_end_time

    tr = Trainer(_cfg(algo="ctrl", epochs=1, sampler=dict(reference_data_end=True), ctrl=dict(certify_z=0)),
                 tmp_path / "r")
    tau = data_end_time(tr.process, 8)
    assert isinstance(tr.policy, ReferenceBelow) and tr.policy.tau == tau
    t8 = tr.process.time_grid(8)
    assert float(t8[-2]) < tau < float(t8[-3])
    with torch.no_grad():  # a fine-tune that differs from its reference everywhere
        for p in tr.trainable_parameters:
            p.add_(0.1 * torch.randn_like(p))
    for _ in range(3):  # random grids: the last step always starts at or below tau, the first above it
        b = tr.collect()
        eps_ref = evaluate_along(tr.ref, tr.process, b.traj)
        low = b.traj.times[:-1] <= tau
        assert bool(low[-1]) and not bool(low[:-1].any())
        assert torch.equal(b.traj.outputs[:, low], eps_ref[:, low])
        assert not torch.allclose(b.traj.outputs[:, ~low], eps_ref[:, ~low])
    # one call with times on both sides (an update's minibatch): each sample from its own model
    x = torch.randn(6, 2)
    t = torch.tensor([0.9, tau, 0.01, 0.5, tau * 1.01, 0.02])
    above = t > tau
    with torch.no_grad():
        out = tr.policy(x, t, None)
        torch.testing.assert_close(out[above], tr.policy.model(x[above], t[above], None))
        torch.testing.assert_close(out[~above], tr.ref(x[~above], t[~above], None))
    assert not any(p is q for p in tr.policy.parameters() for q in tr.ref.parameters())  # ref is not a submodule
    # the run's final evaluation and `ctrldiff eval RUN` use the same rule
    tr.train()
    assert json.loads((tmp_path / "r" / "final_eval.json").read_text())["reference_below"] == tau
    setup = load_setup(str(tmp_path / "r"))
    assert isinstance(setup.policy, ReferenceBelow) and setup.policy.tau == tau


def test_the_model_card_of_a_run_with_reference_data_end_says_where_the_base_model_takes_over():
    from ctrldiff.cli_export import model_card

    cfg = _cfg(algo="ctrl", sampler=dict(reference_data_end=True))
    card = model_card(cfg, "builtin", "digits", {"reference_below": 0.0759}, [])
    assert "times <= 0.0759" in card and "above time 0.0759 only" in card
    assert "the midpoint of the training grid's last two interior times" in model_card(cfg, "builtin", "digits", {}, [])
    assert "reference_data_end" not in model_card(_cfg(algo="ctrl"), "builtin", "digits", {}, [])


def test_trainer_draws_a_fresh_grid_every_epoch_where_the_update_allows_it():
    tr = Trainer(_cfg(algo="ctrl"))
    assert tr.random_grid
    t1, t2 = tr.collect().traj.times, tr.collect().traj.times
    assert not torch.equal(t1, t2)
    fixed = Trainer(_cfg(algo="ctrl", sampler=dict(random_grid=False)))
    assert torch.equal(fixed.collect().traj.times, fixed.times)
    assert not Trainer(_cfg(algo="q-learning", model="scratch-gmm2")).random_grid
    with pytest.raises(CtrlDiffError, match="random_grid"):
        Trainer(_cfg(algo="q-learning", model="scratch-gmm2", sampler=dict(random_grid=True)))


def test_digit_confidence_is_the_classifier_log_odds():
    r = make_reward("digit-confidence")
    x, c = torch.randn(6, 1, 8, 8), torch.arange(6)
    lp = torch.log_softmax(r.classifier(x), -1)[torch.arange(6), c]
    torch.testing.assert_close(r(x, c), lp - torch.log1p(-lp.exp()), atol=1e-4, rtol=1e-4)
    assert r.differentiable



def test_trust_region_step_back_is_seen_by_the_weight_ema():
    """The EMA's last update used the epoch's last iterate; after the step back it holds the scaled-back weights
    in that place: ema == d * ema_before_last_step + (1 - d) * theta_final."""
    d = 0.5
    tr = Trainer(_cfg(algo="ctrl", ctrl=dict(max_update_kl=0.02, signal_scaled=False),
                          optim=dict(lr=3e-2, minibatch=64, ema_decay=d)))
    pre = []
    tr.optimizer.register_step_pre_hook(lambda *_: pre.append([e.clone() for e in tr.ema]))
    batch = tr.collect()
    tr.algo.prepare(batch)
    info = tr.algo.update(batch)
    assert info["train/trust_region_scale"] < 1
    for e, e_before, p in zip(tr.ema, pre[-1], tr.trainable_parameters, strict=True):
        torch.testing.assert_close(e, d * e_before + (1 - d) * p.detach(), rtol=1e-5, atol=1e-6)


def _j(tr, policy, n=20000):
    from ctrldiff.eval.evaluate import evaluate_policy

    out = evaluate_policy(policy, tr.ref, tr.process, tr.reward, sample_shape=tr.task.sample_shape, n=n,
                          solver="em", steps=tr.cfg.sampler.steps, seed=7, chunk=5000, beta=tr.cfg.beta)
    return out["objective"]


def test_held_out_gain_estimates_the_change_in_j(monkeypatch):
    """The acceptance test's estimate of J(theta) - J(theta_old), on 2048 held-out trajectories of one epoch, against
    the change in J measured by sampling both policies (20,000 paths each, the same noises): within the estimate's
    three standard errors, and of the right sign for an update that helps and for the same update reversed."""
    tr = Trainer(_cfg(algo="ctrl", batch_size=4096, sampler=dict(random_grid=False),
                      ctrl=dict(held_out=0.5, max_update_kl=0.05, trust_region_growth=1.0),
                      optim=dict(lr=1e-2, minibatch=1024)))
    monkeypatch.setattr(type(tr.algo), "acceptance_z", lambda self: -1e9)
    tr.train(epochs=1)  # a fitted critic
    start = [p.detach().clone() for p in tr.trainable_parameters]
    j_old = _j(tr, tr.policy)
    batch = tr.collect()
    tr.algo.prepare(batch)
    held = tr.algo.held_out(batch)
    info = tr.algo.update(batch)
    assert info["train/accepted"] >= 1.0  # accept_z = -inf: every update kept (lengthened to the trust region's edge)
    for sign in (1.0, -1.0):
        if sign < 0:
            tr.algo.rescale_update(start, -1.0)  # the same step, backwards
        d = tr.algo.held_out_gain(batch, held)
        est, se = float(d.mean()), float(d.std() / len(d) ** 0.5)
        true = _j(tr, tr.policy) - j_old
        assert sign * true > 0 and sign * est > 0, (sign, est, true)
        assert abs(est - true) < 3 * se + 0.1 * abs(true), (sign, est, se, true)


def test_kl_metric_power_weights_each_steps_loss_by_the_inverse_of_its_kl_weight():
    """ctrl.kl_metric_power = 1 (the natural gradient in the Girsanov metric): on pairs that all sit at one step k the
    loss (likelihood-ratio and KL terms alike) is c_k times the plain one, c_k = (w_mean / w_k) / mean_j (w_mean / w_j),
    so the step whose change costs the most nats weighs least; per-step held-out terms sum to the per-trajectory ones."""
    losses = {}
    for p in (0.0, 1.0):
        tr = Trainer(_cfg(algo="ctrl", seed=4, sampler=dict(random_grid=False), ctrl=dict(kl_metric_power=p)))
        batch = tr.collect()  # the same batch, and the same advantages, for both
        tr.algo.prepare(batch)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the same moved policy for both: ratios != 1 and a KL to the reference
            for q in tr.trainable_parameters:
                q.add_(0.02 * torch.randn(q.shape, generator=g))
        w = tr.algo.step_weights(batch).double()
        K = batch.traj.num_steps
        b = torch.arange(8)
        for k in (0, K - 1):
            mb = tr.algo.make_minibatch(batch, b, torch.full_like(b, k))
            loss, info = tr.algo.loss(mb)
            losses[p, k] = float(loss.detach())
            assert info["kl_step"] > 0
        if p:
            c = tr.algo._metric_weights(batch).double()
            torch.testing.assert_close(c, (1 / w) / (1 / w).mean())
            assert c[K - 1] < c[0]  # the data end's step has the largest KL weight
            held = tr.algo.held_out(batch)
            lin, quad = tr.algo.held_out_terms(batch, held)
            lin_k, quad_k = tr.algo.held_out_terms(batch, held, per_step=True)
            assert lin_k.shape == (len(held), K)
            torch.testing.assert_close(lin_k.sum(1), lin)
            torch.testing.assert_close(quad_k.sum(1), quad)
    for k in (0, K - 1):
        assert losses[1.0, k] == pytest.approx(float(c[k]) * losses[0.0, k], rel=1e-4, abs=1e-7)


def test_held_out_trajectories_do_not_shape_the_update(monkeypatch):
    """The update is fitted on the other trajectories: changing the held-out ones' rewards leaves the trained
    parameters unchanged (before the acceptance test), and the held-out set is about ctrl.held_out of the batch."""
    monkeypatch.setattr(type(Trainer(_cfg(algo="ctrl")).algo), "accept_update", lambda self, *a, **k: {})
    params = []
    for bump in (0.0, 5.0):
        tr = Trainer(_cfg(algo="ctrl", seed=3, ctrl=dict(held_out=0.25), optim=dict(lr=3e-2, minibatch=64)))
        tr.train(epochs=1)
        batch = tr.collect()
        held = tr.algo.held_out(batch)
        assert len(held) == 16  # 0.25 x 64
        batch.rewards[held] += bump * torch.randn(len(held), generator=torch.Generator().manual_seed(0))
        tr.algo.prepare(batch)
        tr.algo.update(batch)
        params.append(torch.cat([p.detach().flatten() for p in tr.trainable_parameters]))
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=1e-6)


def test_refit_all_fits_the_kept_step_on_every_trajectory_at_the_tested_steps_kl():
    """ctrl.refit_all: the held-out test chooses the step (here kept, at some KL in nats); the update is then fitted
    again from the same start on all trajectories, so the held-out ones now shape it (changing their rewards moves
    the final step's direction; without the option only its length moves), and it ends at the tested step's KL.
    Pure-noise rewards that the test undoes (accept_z 2) leave the policy where it was."""
    def run(bump=0.0, noise=False, seed=3, refit=True):
        tr = Trainer(_cfg(algo="ctrl", seed=seed, batch_size=128, ctrl=dict(refit_all=True, accept_z=2.0)))
        tr.train(epochs=1)
        if not refit:  # the same run, this epoch's update without the option
            tr.algo.refits = lambda: False
        before = [p.detach().clone() for p in tr.trainable_parameters]
        batch = tr.collect()
        held = tr.algo.held_out(batch)
        if noise:
            batch.rewards = 2 * torch.randn(batch.rewards.shape, generator=torch.Generator().manual_seed(seed))
        batch.rewards[held] += bump * torch.randn(len(held), generator=torch.Generator().manual_seed(0))
        tr.algo.prepare(batch)
        info = tr.algo.update(batch)
        after = torch.cat([p.detach().flatten() for p in tr.trainable_parameters])
        return info, after, torch.cat([p.flatten() for p in before]), tr, batch

    info, a0, start, tr, batch = run()
    assert info["train/accepted"] > 0 and info["train/update_kl_kept"] > 0
    # the refit moved to the tested step's KL (re-measured on 512 fresh pairs: within their sampling noise)
    assert abs(info["train/refit_kl_kept"] - info["train/update_kl_kept"]) <= 0.3 * info["train/update_kl_kept"]
    def cos(u, v):
        return float(torch.nn.functional.cosine_similarity(u - start, v - start, dim=0))

    info1, a1, _, _, _ = run(bump=0.5)
    assert info1["train/accepted"] > 0
    assert cos(a0, a1) < 0.9999  # the held-out trajectories shape the refit step's direction
    (i0, b0, *_), (i1, b1, *_) = run(refit=False), run(bump=0.5, refit=False)
    assert i0["train/accepted"] > 0 and i1["train/accepted"] > 0
    assert cos(b0, b1) > 1 - 1e-5  # without the refit they set its length only
    undone = 0
    for seed in range(3):
        info, after, start, _, _ = run(noise=True, seed=seed)
        if info["train/accepted"] == 0.0:
            undone += 1
            assert torch.equal(after, start) and "train/refit_kl_kept" not in info
    assert undone >= 2


def test_refit_all_with_an_option_it_cannot_combine_with_is_a_one_line_error():
    with pytest.raises(CtrlDiffError, match="refit_all"):
        Trainer(_cfg(algo="ctrl", ctrl=dict(refit_all=True, held_out=0.0)))


def test_an_update_that_does_not_help_on_held_out_trajectories_is_undone():
    """Rewards that are pure noise (independent of the samples): the update only fits noise, the held-out estimate
    of its gain is not two standard errors above 0 (accept_z = 2; the default 0 undoes it only where the estimate is not
    above 0, and leaves the run's end to ctrl.certify_z), and the policy is left where it was; with the mode-switch
    reward the update is kept. Measured with ctrl.held_out 0.25 (32 held-out trajectories): noise undone on 5 of 5
    seeds (estimates -1.1 to 1.1 standard errors), the mode switch kept on 5 of 5 (2.6-5.2 standard errors). At z = 1
    about one noise update in six passes by chance (16%), too often for 5 seeds to test the mechanism."""
    undone, kept = 0, 0
    for seed in range(5):
        for noise in (True, False):
            tr = Trainer(_cfg(algo="ctrl", seed=seed, batch_size=128, ctrl=dict(accept_z=2.0)))
            tr.train(epochs=1)
            before = [p.detach().clone() for p in tr.trainable_parameters]
            batch = tr.collect()
            if noise:
                batch.rewards = 2 * torch.randn(batch.rewards.shape, generator=torch.Generator().manual_seed(seed))
            tr.algo.prepare(batch)
            info = tr.algo.update(batch)
            same = all(torch.equal(p, q) for p, q in zip(tr.trainable_parameters, before, strict=True))
            assert same == (info["train/accepted"] == 0.0)
            undone += noise and same
            kept += (not noise) and not same
    assert undone >= 4 and kept >= 4, (undone, kept)


def _trained_one_epoch_with_a_fresh_batch(**ctrl) -> tuple[Trainer, object]:
    """A CTRL trainer after one epoch, with a new batch collected and prepared (its held-out trajectories chosen)."""
    tr = Trainer(_cfg(algo="ctrl", ctrl=ctrl))
    tr.train(epochs=1)
    batch = tr.collect()
    tr.algo.prepare(batch)
    return tr, batch


def _accepted_length(tr, batch, start, L: float, Q: float, n: int = 32) -> float:
    """The length ``accept_update`` keeps for a small step from ``start`` whose held-out terms have mean L (standard
    error L's unit, 1 / sqrt(n - 1)) and quadratic cost Q; an undone step is exactly back at the start."""
    unit = torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)
    with torch.no_grad():  # some step to scale
        for p, p0 in zip(tr.trainable_parameters, start, strict=True):
            p.copy_(p0 + 0.01)
    tr.algo.gathered_held_out_terms = lambda b, h: (L + unit, torch.full((n,), Q, dtype=torch.float64))
    try:
        s = tr.algo.accept_update(batch, start, batch.extras["held_out"], s_max=10.0)["train/accepted"]
    finally:
        del tr.algo.gathered_held_out_terms
    moved = not all(torch.equal(p, q) for p, q in zip(tr.trainable_parameters, start, strict=True))
    assert moved == (s > 0)
    return s


def test_accept_shrink_shortens_a_step_by_its_evidence_and_undoes_one_at_noise_level(monkeypatch):
    """ctrl.accept_shrink: the held-out first-order gain L (standard error se) is shrunk to L (1 - se^2 / L^2)_+
    before the step's length L / (2 Q) is chosen: a step with L = 3 se keeps 8/9 of the length it has without the
    option, one with L = 0.8 se (kept, shortened, without it) is undone and the policy is where it started."""
    n, Q = 32, 2.0
    unit = torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)
    se1 = math.sqrt(float(unit.pow(2).mean()) / (n - 1))  # the standard error of the mean of +-1: 1 / sqrt(n - 1)
    got = {}
    for shrink in (False, True):  # one run per setting; each ratio scales the same step from the same start
        tr, batch = _trained_one_epoch_with_a_fresh_batch(accept_shrink=shrink)
        start = [p.detach().clone() for p in tr.trainable_parameters]
        for ratio in (3.0, 0.8):
            with torch.no_grad():  # some step to scale
                for p, p0 in zip(tr.trainable_parameters, start, strict=True):
                    p.copy_(p0 + 0.01)
            lin = ratio * se1 + unit  # mean ratio * se, standard error se
            monkeypatch.setattr(tr.algo, "gathered_held_out_terms",
                                lambda b, h, lin=lin: (lin, torch.full((n,), Q, dtype=torch.float64)))
            got[ratio, shrink] = tr.algo.accept_update(batch, start, batch.extras["held_out"],
                                                       s_max=4.0)["train/accepted"]
            if got[ratio, shrink] == 0.0:
                assert all(torch.equal(p, q) for p, q in zip(tr.trainable_parameters, start, strict=True))
    for ratio in (3.0, 0.8):
        L = ratio * se1
        assert got[ratio, False] == pytest.approx(L / (2 * Q), rel=1e-6)
        if ratio > 1:
            assert got[ratio, True] == pytest.approx((L - se1 ** 2 / L) / (2 * Q), rel=1e-6)
            assert got[ratio, True] / got[ratio, False] == pytest.approx(8 / 9, rel=1e-6)
        else:
            assert got[ratio, True] == 0.0 and got[ratio, False] > 0


def test_lengthen_z_lengthens_a_step_by_its_evidence_and_leaves_shortening_and_undoing_alone():
    """ctrl.lengthen_z: beyond the optimiser's own step (s > 1) the length is the lower confidence bound's,
    (L - lengthen_z se) / (2 Q), never below 1 where the plain estimate L / (2 Q) asks for more than 1. A step whose
    L is under one standard error stays at its own length (it is lengthened 3x without the option); one at 4 se is
    lengthened to 3/4 of its plain length; a step the estimate shortens or undoes is shortened or undone alike."""
    se1 = 1 / math.sqrt(31)  # the standard error of the mean of 32 values +-1
    cases = {"weak": (0.8, 3.0), "strong": (4.0, 3.0), "short": (0.8, 0.5), "negative": (-0.5, 1.0)}  # L/se, s_plain
    got = {}
    for lz in (0.0, 1.0):
        tr, batch = _trained_one_epoch_with_a_fresh_batch(lengthen_z=lz)
        start = [p.detach().clone() for p in tr.trainable_parameters]
        for name, (ratio, plain) in cases.items():
            L = ratio * se1
            got[name, lz] = _accepted_length(tr, batch, start, L, abs(L) / (2 * plain))
    assert got["weak", 0.0] == pytest.approx(3.0) and got["weak", 1.0] == 1.0
    assert got["strong", 0.0] == pytest.approx(3.0) and got["strong", 1.0] == pytest.approx(3.0 * 3 / 4)
    assert got["short", 0.0] == got["short", 1.0] == pytest.approx(0.5)
    assert got["negative", 0.0] == got["negative", 1.0] == 0.0


def test_shorten_z_keeps_the_optimisers_step_unless_the_held_out_estimate_prefers_a_shorter_one_by_its_evidence():
    """ctrl.shorten_z: a step is shortened or undone only where the held-out estimate prefers that to the whole step
    by shorten_z standard errors. A step whose L is half a standard error below 0 (undone without the option) is kept
    whole at 2; one 3 standard errors below 0 is undone either way; one the plain estimate halves (L = 0.8 se) is kept
    whole; lengthening is unchanged."""
    se1 = 1 / math.sqrt(31)  # the standard error of the mean of 32 values +-1
    cases = {"noise": (-0.5, 1e-6), "harmful": (-3.0, 1e-6), "short": (0.8, None), "long": (4.0, None)}
    plain_s = {"short": 0.5, "long": 3.0}
    got = {}
    for sz in (0.0, 2.0):
        tr, batch = _trained_one_epoch_with_a_fresh_batch(shorten_z=sz)
        start = [p.detach().clone() for p in tr.trainable_parameters]
        for name, (ratio, q) in cases.items():
            L = ratio * se1
            got[name, sz] = _accepted_length(tr, batch, start, L, q if q is not None else L / (2 * plain_s[name]))
    assert got["noise", 0.0] == 0.0 and got["noise", 2.0] == 1.0
    assert got["harmful", 0.0] == got["harmful", 2.0] == 0.0
    assert got["short", 0.0] == pytest.approx(0.5) and got["short", 2.0] == 1.0
    assert got["long", 0.0] == got["long", 2.0] == pytest.approx(3.0)


def test_accept_pool_shrinks_an_epochs_gain_towards_the_last_epochs_by_their_spread():
    """ctrl.accept_pool (empirical Bayes): per unit of root cost, l = L / sqrt(Q). Under 3 earlier epochs, an epoch's
    own estimate is used as it is. After 8 epochs that agree (the same l, each with standard error 0.5), a ninth of
    the same standard error counts as one of nine: the posterior mean is the mean of all nine. After 8 epochs whose
    gains differ far more than their noise, an epoch's own estimate is kept (almost) as it is. Each estimate enters
    the history before any selection, and the history is in the checkpoint."""
    tr = Trainer(_cfg(algo="ctrl", ctrl=dict(accept_pool=8)))
    algo, Q = tr.algo, 4.0  # root cost 2: L = 2 l
    assert algo.pooled_gain(2.0, 1.0, Q) == (2.0, 1.0)  # no history yet
    assert algo.gain_history == [(1.0, 0.5)]
    algo.gain_history = [(1.0, 0.5)] * 8
    L, se = algo.pooled_gain(-2.0, 1.0, Q)  # l_hat = -1, se 0.5
    assert L / 2 == pytest.approx((8 * 1.0 - 1.0) / 9, rel=1e-9)
    assert se == pytest.approx(1.0 / 3, rel=1e-9)  # sqrt(k) se, k = 1/9
    assert len(algo.gain_history) == 8 and algo.gain_history[-1] == (-1.0, 0.5)  # the window keeps the last 8
    algo.gain_history = [(5.0 * (-1) ** j, 0.01) for j in range(8)]
    L, _ = algo.pooled_gain(6.0, 0.02, Q)  # l_hat = 3
    assert L / 2 == pytest.approx(3.0, abs=1e-3)
    again = Trainer(_cfg(algo="ctrl", ctrl=dict(accept_pool=8)))
    again.algo.load_state_dict(copy.deepcopy(algo.state_dict()))
    assert again.algo.gain_history == algo.gain_history


def test_accept_pool_keeps_a_step_whose_own_estimate_is_noise_where_the_last_epochs_gained(monkeypatch):
    """Where the last epochs' held-out gains agree on a positive l, a step whose own estimate is slightly negative (at
    noise level) is kept at about the length the pooled evidence supports, not undone as it is without the option."""
    n, Q = 32, 0.01
    unit = torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)
    got = {}
    for pool in (0, 8):
        tr, batch = _trained_one_epoch_with_a_fresh_batch(accept_pool=pool)
        tr.algo.gain_history = [(0.2, 0.05)] * 8  # l = 0.2 per root cost, well measured
        start = [p.detach().clone() for p in tr.trainable_parameters]
        with torch.no_grad():
            for p, p0 in zip(tr.trainable_parameters, start, strict=True):
                p.copy_(p0 + 0.01)
        lin = -0.002 + 0.05 * unit  # L = -0.002 (l = -0.02), se 0.009
        monkeypatch.setattr(tr.algo, "gathered_held_out_terms",
                            lambda b, h, lin=lin: (lin, torch.full((n,), Q, dtype=torch.float64)))
        got[pool] = tr.algo.accept_update(batch, start, batch.extras["held_out"], s_max=4.0)["train/accepted"]
    assert got[0] == 0.0
    assert 0.5 < got[8] < 1.0  # about l / (2 sqrt(Q)) = 1, pulled a little towards its own estimate


def test_epoch_momentum_steps_along_the_average_of_the_epochs_raw_updates():
    """ctrl.epoch_momentum: theta - start becomes m = mu m + d (d: the epoch's own update), the average is kept for
    the next epoch whatever the trust region and the held-out test then do to the step, and it is checkpointed."""
    tr = Trainer(_cfg(algo="ctrl", ctrl=dict(epoch_momentum=0.5)))
    assert tr.algo.epoch_momentum() == 0.5
    params = tr.trainable_parameters
    start = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    d1 = [torch.randn(p.shape, generator=g) for p in params]
    d2 = [torch.randn(p.shape, generator=g) for p in params]
    with torch.no_grad():
        for p, p0, a in zip(params, start, d1, strict=True):
            p.copy_(p0 + a)
    assert tr.algo.apply_momentum(start, 0.5) == 0.0  # the first epoch: its own update
    for p, p0, a in zip(params, start, d1, strict=True):
        torch.testing.assert_close(p.detach(), p0 + a)
    with torch.no_grad():
        for p, p0, b in zip(params, start, d2, strict=True):
            p.copy_(p0 + b)
    cos = tr.algo.apply_momentum(start, 0.5)
    flat1, flat2 = torch.cat([a.flatten() for a in d1]), torch.cat([b.flatten() for b in d2])
    assert cos == pytest.approx(float(flat1 @ flat2 / (flat1.norm() * flat2.norm())), abs=1e-5)
    for p, p0, a, b, m in zip(params, start, d1, d2, tr.algo.momentum, strict=True):
        torch.testing.assert_close(p.detach(), p0 + 0.5 * a + b)
        torch.testing.assert_close(m, 0.5 * a + b)
    st = tr.algo.state_dict()
    tr2 = Trainer(_cfg(algo="ctrl", ctrl=dict(epoch_momentum=0.5)))
    tr2.algo.load_state_dict(st)
    assert all(torch.equal(a, b) for a, b in zip(tr2.algo.momentum, tr.algo.momentum, strict=True))
    assert Trainer(_cfg(algo="ctrl")).algo.epoch_momentum() == 0.0  # off by default


def test_a_resumed_run_with_epoch_momentum_equals_an_uninterrupted_one(tmp_path):
    import re
    cfg = _cfg(algo="ctrl", epochs=4, ctrl=dict(epoch_momentum=0.9))
    Trainer(cfg, out=tmp_path / "full").train()
    Trainer(cfg, out=tmp_path / "part").train(epochs=2)
    Trainer(cfg, out=tmp_path / "part", resume=True).train()
    strip = lambda line: re.sub(r', "[^"]*_s": -?[0-9.eE+-]+', "", line)  # noqa: E731 (wall-clock fields)
    lines = [[strip(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "part")]
    assert len(lines[0]) == 4 and lines[0] == lines[1]
    assert "train/momentum_cos" in lines[0][-1]


def test_b_step_control_holds_estimator_b_to_the_trust_region_and_the_held_out_test():
    """ctrl.b_step_control: estimator (b)'s epoch update is fitted on the trained-on trajectories, scaled back to
    max_update_kl nats and kept only as far as the held-out ones support; without it every (b) update is kept whole."""
    limit = 0.01
    for on in (False, True):
        cfg = _cfg(algo="ctrl", epochs=3, ctrl=dict(estimator="b", b_step_control=on, max_update_kl=limit,
                                                   trust_region_growth=1.0, fill_trust_region=False))
        recs = Trainer(cfg).train()
        later = recs[1:]  # the first epoch's grad V is that of an unfitted critic
        if on:
            assert all("train/accepted" in r and r["train/update_kl_kept"] <= 1.05 * limit for r in later), later
        else:
            assert not any("train/accepted" in r or "train/update_kl" in r for r in recs)


def test_a_run_ends_with_its_start_unless_its_gain_over_the_start_is_certified():
    """ctrl.certify_z: at the last epoch the fine-tune is sampled from the same 64 fixed noises as the start was at the
    first (a set no rollout or evaluation uses) and kept only if the paired difference of r - beta KL_path is 2
    standard errors above 0. With rewards that are pure noise, independent of the samples, no seed certifies a gain and
    every run ends with the start's weights exactly, the trained ones kept in the algorithm's state (and training
    further goes on from them); with the mode-switch reward every seed certifies and ends where it trained to (gains of
    3.2-4.5 standard errors, seeds 0-4, when this was written)."""
    from ctrldiff.rewards.base import FunctionReward

    gen = torch.Generator().manual_seed(0)
    noise = FunctionReward(lambda x, cond=None: 2 * torch.randn(len(x), generator=gen), "pure-noise")
    for seed in range(3):
        for reward in (noise, None):
            tr = Trainer(_cfg(algo="ctrl", seed=seed, batch_size=128, epochs=6), reward=reward)
            start = [p.detach().clone() for p in tr.trainable_parameters]
            recs = tr.train()
            assert all("train/certified" not in r for r in recs[:-1])
            same = all(torch.equal(p, q) for p, q in zip(tr.trainable_parameters, start, strict=True))
            if reward is noise:
                assert recs[-1]["train/certified"] == 0.0 and same, (seed, recs[-1])
                kept = tr.algo.state_dict()["uncertified_params"]
                assert [p.shape for p in kept] == [p.shape for p in start]  # the trained weights (often the start's:
                # the acceptance test undoes most noise steps)
                tr.algo.continue_training()  # trained further (train() calls it): from where it had trained to
                assert all(torch.equal(p, q) for p, q in zip(tr.trainable_parameters, kept, strict=True))
                assert tr.algo.uncertified_params is None
            else:
                assert recs[-1]["train/certified"] == 1.0 and not same, (seed, recs[-1])
                assert recs[-1]["train/certified_gain"] > 2 * recs[-1]["train/certified_gain_se"]
            assert recs[-1]["reward_queries"] - recs[-2]["reward_queries"] >= 128 + 2 * 64  # the batch, and 64
            # certification queries at each of the two grids (the training one and ctrl.certify_refine = 5 x finer)
            assert recs[-1]["train/certified_steps_fine"] == 5 * 8 and "train/certified_gain_fine_se" in recs[-1]
    tr = Trainer(_cfg(algo="ctrl", epochs=2, ctrl=dict(certify_z=0)))
    assert "train/certified" not in tr.train()[-1] and tr.algo.start_params is None


def test_a_run_that_ends_with_its_start_keeps_its_weight_ema_for_training_further():
    """With optim.ema_decay, a run the test does not certify (here: a bar no gain can clear) ends with the start's
    weights and EMA; the trained EMA is kept in the checkpoint's state beside the trained weights, and training further
    goes on from both. A run that raises leaves no last epoch behind (Trainer.end_epoch), so an update outside
    train() certifies nothing."""
    cfg = _cfg(algo="ctrl", seed=0, batch_size=64, epochs=3, ctrl=dict(certify_z=1e9), optim=dict(ema_decay=0.5))
    tr = Trainer(cfg)
    start = [p.detach().clone() for p in tr.trainable_parameters]
    assert tr.train()[-1]["train/certified"] == 0.0
    assert all(torch.equal(e, p) for e, p in zip(tr.ema, start, strict=True))
    st = tr.algo.state_dict()
    trained, trained_ema = st["uncertified_params"], st["uncertified_ema"]
    assert any(not torch.equal(e, p) for e, p in zip(trained_ema, start, strict=True))
    again = Trainer(cfg)
    again.algo.load_state_dict(st)  # what a resumed run reads from the checkpoint
    again.algo.continue_training()
    assert all(torch.equal(p, q) for p, q in zip(again.trainable_parameters, trained, strict=True))
    assert all(torch.equal(e, q) for e, q in zip(again.ema, trained_ema, strict=True))
    assert again.algo.uncertified_ema is None

    def fail():
        raise RuntimeError("boom")

    tr.step = fail
    with pytest.raises(RuntimeError):
        tr.train(epochs=1)
    assert tr.end_epoch is None


def test_with_a_weight_ema_the_certification_tests_the_weights_the_run_ends_with(monkeypatch):
    """With optim.ema_decay the run's final model is its weight EMA (Trainer.finish), so the end of the certification
    samples the EMA weights, not the last trained ones; the trained weights are back in the policy afterwards."""
    tr = Trainer(_cfg(algo="ctrl", seed=0, batch_size=64, epochs=3, optim=dict(ema_decay=0.5)))
    seen, real = [], tr.certification_terms

    def terms(m, n, k=1):
        seen.append([p.detach().clone() for p in tr.trainable_parameters])
        return real(m, n, k)

    def certify(real_certify=tr.algo.certify):  # what the policy and the EMA hold when the test begins
        trained.extend(p.detach().clone() for p in tr.trainable_parameters)
        ema.extend(e.clone() for e in tr.ema)
        return real_certify()

    trained, ema = [], []
    monkeypatch.setattr(tr, "certification_terms", terms)
    monkeypatch.setattr(tr.algo, "certify", certify)
    tr.train()
    assert len(seen) == 2 and any(not torch.equal(e, p) for e, p in zip(ema, trained, strict=True))
    assert all(torch.equal(s, e) for s, e in zip(seen[1], ema, strict=True))
    if tr.algo.uncertified_params is None:  # certified: the trained weights are back
        assert all(torch.equal(p, q) for p, q in zip(tr.trainable_parameters, trained, strict=True))


def test_a_gain_at_the_training_grid_that_is_lost_at_a_finer_one_is_not_certified(monkeypatch):
    """ctrl.certify_refine: the gain must pass the test at the training solver and at certify_refine times its steps.
    Terms (r - beta KL_path per certification sample) that rise at the training grid and fall at the finer one -- a
    fine-tune that fitted its grid's error -- end the run at its start; with certify_refine = 1 the same run keeps
    them."""
    gen = torch.Generator().manual_seed(0)

    def terms(m, n, k=1):  # start: zeros; end: +1 at the training grid, -0.1 at the finer one (noise 0.01)
        base = torch.zeros(n, 2 if k > 1 else 1, dtype=torch.float64)
        if len(calls) == 0:
            calls.append(k)
            return base
        calls.append(k)
        return base + torch.tensor([1.0, -0.1][: base.shape[1]], dtype=torch.float64) + 0.01 * torch.randn(
            base.shape, generator=gen, dtype=torch.float64)

    for refine, want in ((5, 0.0), (1, 1.0)):
        calls = []
        tr = Trainer(_cfg(algo="ctrl", seed=0, epochs=2, ctrl=dict(certify_refine=refine)))
        monkeypatch.setattr(tr, "certification_terms", terms)
        last = tr.train()[-1]
        assert calls == [refine, refine] and last["train/certified"] == want, (refine, last)
        assert last["train/certified_gain"] > 0.9 and ("train/certified_gain_fine" in last) == (refine > 1)
        if refine > 1:
            assert last["train/certified_gain_fine"] < 0 and tr.algo.uncertified_params is not None


def test_a_certification_the_reward_failed_on_keeps_the_fine_tune(monkeypatch):
    """reward_errors=skip: where the reward fails on the certification noise (Trainer.certification_terms -> None)
    at the end, the run keeps its fine-tuned weights and reports certified = NaN; at the start, there is no test."""
    import math

    tr = Trainer(_cfg(algo="ctrl", seed=0, epochs=3, reward_errors="skip"))
    calls = []
    real = tr.certification_terms
    monkeypatch.setattr(tr, "certification_terms", lambda m, n, k=1: calls.append(n) or (real(m, n, k) if len(calls) == 1
                                                                                            else None))
    recs = tr.train()
    assert calls == [64, 64] and math.isnan(recs[-1]["train/certified"]) and tr.algo.uncertified_params is None
    tr = Trainer(_cfg(algo="ctrl", seed=0, epochs=3, reward_errors="skip"))
    monkeypatch.setattr(tr, "certification_terms", lambda m, n, k=1: None)
    assert "train/certified" not in tr.train()[-1] and tr.algo.start_terms is None


@pytest.mark.parametrize("lams", [(0.0, 1.0), (1.0, 0.0)])
def test_lambda_candidates_start_from_one_state_and_the_larger_held_out_gain_is_kept(monkeypatch, lams):
    """ctrl.gae_lambda_candidates: each lambda's update starts from the same weights, optimiser state and trust
    region; the weights and optimiser state kept are those of the update whose held-out gain, where its step ended,
    is the larger (both orders: the kept one is fitted first or last)."""
    from ctrldiff.algorithms.base import Algorithm

    seen = []
    orig = Algorithm.policy_step

    def moments(opt):
        return torch.cat([s["exp_avg"].flatten() for s in opt.state.values()]) if opt.state else None

    def spy(self, batch):
        entry = ([p.detach().clone() for p in self.trainer.trainable_parameters], moments(self.trainer.optimizer),
                 self.trust_radius)
        out = orig(self, batch)
        lin, quad = self.gathered_held_out_terms(batch, batch.extras["held_out"])
        seen.append(dict(adv=batch.advantages.clone(), entry=entry, gain=float((lin - quad).mean()),
                         exit=[p.detach().clone() for p in self.trainer.trainable_parameters],
                         opt=moments(self.trainer.optimizer)))
        return out

    monkeypatch.setattr(Algorithm, "policy_step", spy)
    tr = Trainer(_cfg(algo="ctrl", seed=1, ctrl=dict(gae_lambda=lams[0], gae_lambda_candidates=[lams[1]]),
                      optim=dict(lr=3e-2, minibatch=64)))
    tr.train(epochs=1)
    seen.clear()
    batch = tr.collect()
    tr.algo.prepare(batch)
    info = tr.algo.update(batch)
    assert len(seen) == 2 and not torch.equal(seen[0]["adv"], seen[1]["adv"])
    for a, b in zip(seen[0]["entry"][0], seen[1]["entry"][0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(seen[0]["entry"][1], seen[1]["entry"][1]) and seen[0]["entry"][2] == seen[1]["entry"][2]
    best = max(range(2), key=lambda i: seen[i]["gain"])
    assert info["ctrl/gae_lambda"] == lams[best] and info["ctrl/lambda_gain"] == pytest.approx(seen[best]["gain"])
    for p, q in zip(tr.trainable_parameters, seen[best]["exit"], strict=True):
        assert torch.equal(p.detach(), q)
    assert torch.equal(moments(tr.optimizer), seen[best]["opt"])
    assert torch.equal(batch.advantages, seen[best]["adv"])


def test_lambda_candidates_need_the_held_out_test():
    with pytest.raises(CtrlDiffError, match="gae_lambda_candidates needs estimator a with held_out"):
        Trainer(_cfg(algo="ctrl", ctrl=dict(held_out=0.0, gae_lambda_candidates=[1.0])))
