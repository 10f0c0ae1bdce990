"""Diffusion-DPO: the pairs, the loss at initialisation (log 2), the direction of its gradient, a short run and
the bad-input errors."""

import math

import pytest
import torch

from ctrldiff.algorithms.diffusion_dpo import preference_pairs, t_of_log_snr
from ctrldiff.config import build_config
from ctrldiff.errors import CtrlDiffError
from ctrldiff.noise import make_process
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer


def _cfg(**kw):
    base = dict(algo="diffusion-dpo", model="gmm2-exact", reward="toy2d-mode-switch", beta=0.5, epochs=2,
                batch_size=64, sampler=dict(solver="em", steps=10), optim=dict(lr=1e-3),
                log=dict(progress=False, tensorboard=False, num_final_eval=0))
    base.update(kw)
    return TrainConfig(**base)


def test_pairs_best_worst_and_all_ranked_within_a_condition():
    r = torch.tensor([0.0, 3.0, 1.0, 2.0, 5.0, 4.0, 4.0, 9.0])
    cond = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    w, lo = preference_pairs(r, cond, group_size=4, mode="best-worst", margin=0.0)
    pairs = sorted(zip(w.tolist(), lo.tolist(), strict=True))
    assert pairs[0] == (1, 0) and pairs[1] in [(7, 5), (7, 6)]  # condition 1's worst is a tie (4.0, 4.0)
    w, lo = preference_pairs(r, cond, group_size=4, mode="all", margin=0.0)
    pairs = set(zip(w.tolist(), lo.tolist(), strict=True))
    assert len(pairs) == 6 + 5  # condition 1 has a tie (4.0, 4.0): no pair
    assert all(r[i] > r[j] and cond[i] == cond[j] for i, j in pairs)
    w, lo = preference_pairs(r, cond, group_size=4, mode="all", margin=1.5)
    assert set(zip(w.tolist(), lo.tolist(), strict=True)) == {(1, 0), (1, 2), (3, 0), (7, 4), (7, 5), (7, 6)}
    # unconditional: random groups of 2 from the whole batch, every sample in at most one pair
    w, lo = preference_pairs(r, None, group_size=2, mode="best-worst", margin=0.0,
                             generator=torch.Generator().manual_seed(0))
    assert len(set(w.tolist()) | set(lo.tolist())) == 2 * len(w) and len(w) >= 3
    # prompts (text-to-image conditions) group by string
    w, lo = preference_pairs(r[:4], ["a", "b", "a", "b"], group_size=4, mode="all", margin=0.0)
    assert sorted(zip(w.tolist(), lo.tolist(), strict=True)) == [(1, 3), (2, 0)]


@pytest.mark.parametrize("proc", ["vp", "vp-cosine", "rf"])
def test_log_snr_inversion(proc):
    p = make_process(proc)
    t = torch.linspace(p.t_min, p.t_max, 17, dtype=torch.float64)
    torch.testing.assert_close(t_of_log_snr(p, p.log_snr(t)), t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("t_sampling,labels,draws", [("grid", "hard", 1), ("continuous", "bradley-terry", 3)])
def test_loss_is_log2_at_init_and_its_gradient_favours_the_winner(t_sampling, labels, draws):
    """policy == ref (zero residual): every DPO logit is 0, L = log 2. A few steps on the pairs lower the winners'
    denoising error relative to the reference's, more than the losers' (the likelihood proxy of the winners
    rises), on fresh (t, eps) draws."""
    tr = Trainer(_cfg(diffusion_dpo=dict(t_sampling=t_sampling, labels=labels, draws=draws), optim=dict(lr=1e-3)))
    batch = tr.collect()
    tr.algo.prepare(batch)
    w, lo = batch.extras["winners"], batch.extras["losers"]
    assert len(w) > 20
    loss, info = tr.algo.pair_loss(batch, w, lo)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-7)
    assert info["dpo_logit"] == 0.0

    def margin(n=20):  # E over (t, eps) of -[(err_w - err_ref_w) - (err_l - err_ref_l)], via the loss's logit
        with torch.no_grad():
            return sum(tr.algo.pair_loss(batch, w, lo)[1]["dpo_logit"] for _ in range(n)) / n

    for _ in range(5):
        loss, _ = tr.algo.pair_loss(batch, w, lo)
        tr.optimizer.zero_grad()
        loss.backward()
        tr.optimizer.step()
    assert margin() > 0.05
    if labels == "hard":  # (soft labels: the minimum of the loss is the labels' entropy, near log 2 here)
        assert float(tr.algo.pair_loss(batch, w, lo)[0].detach()) < math.log(2)


@pytest.mark.parametrize("sampler", [dict(solver="em", steps=20), dict(solver="ddim", eta=0.0, steps=2)])
def test_short_run_raises_the_reward(sampler):
    from ctrldiff.eval.evaluate import evaluate_policy

    tr = Trainer(_cfg(batch_size=128, epochs=5, sampler=sampler))
    s = tr.cfg.sampler

    def er():
        return evaluate_policy(tr.policy, tr.ref, tr.process, tr.reward, sample_shape=(2,), n=1000, solver=s.solver,
                               steps=s.steps, eta=s.eta)["reward_mean"]

    before = er()
    recs = tr.train()
    assert er() > before + 0.2
    assert recs[-1]["reward_queries"] == 5 * 128 and recs[-1]["value_reward_queries"] == 0  # rollouts only


def test_batch_too_small_is_a_one_line_error():
    with pytest.raises(CtrlDiffError, match="batch_size must be >= 2") as e:
        build_config(TrainConfig, {"algo": "diffusion-dpo", "batch_size": 1})
    assert "\n" not in str(e.value)
    with pytest.raises(CtrlDiffError, match="fewer than 2 samples per condition for 2 classes"):
        Trainer(_cfg(model="scratch-gmm2-cond", batch_size=3))
    with pytest.raises(CtrlDiffError, match="diffusion_dpo.beta_dpo"):
        build_config(TrainConfig, {"algo": "diffusion-dpo", "diffusion_dpo": {"beta_dpo": 0.0}})


def test_batch_too_small_on_the_cli_is_one_error_line(tmp_path, capsys):
    from ctrldiff.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main.main(args=["train", "--algo", "diffusion-dpo", "--model", "gmm2-exact", "--batch-size", "1",
                        "--out", str(tmp_path / "run"), "--quiet"], prog_name="ctrldiff")
    assert e.value.code == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "batch_size must be >= 2" in err[0], err
    assert not (tmp_path / "run").exists()
