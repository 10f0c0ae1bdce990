"""q-learning (METHODS section 3): the ratio estimator, the recorded Gaussian policy, the normalised q, the
critic's terminal condition, and short runs (pure score matching on a 1-D Gaussian, reward-directed 2-D)."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ctrldiff.algorithms.ratio import RatioScoreEstimator, ratio_score
from ctrldiff.cli import main
from ctrldiff.data.toy2d import GaussianMixture, gmm_preset
from ctrldiff.errors import CtrlDiffError
from ctrldiff.models.mlp import MLPScoreModel
from ctrldiff.noise import make_process
from ctrldiff.solvers import em_coeffs, euler_maruyama, model_eps
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.task import Task
from ctrldiff.train.trainer import Trainer

PROC = make_process("vp")


def _cfg(**kw):
    base = dict(algo="q-learning", model="scratch-gmm2", reward="toy2d-mode-switch", beta=0.5, epochs=2,
                batch_size=32, sampler=dict(solver="em", steps=8), optim=dict(lr=2e-3, minibatch=256),
                log=dict(progress=False, tensorboard=False, num_final_eval=0))
    base.update(kw)
    return TrainConfig(**base)


# ---- the ratio estimator ---------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.01, 0.1, 0.5, 0.9])
def test_ratio_estimator_is_the_exact_score_of_the_empirical_measure(t):
    """Data = the two gmm2 means repeated 7 : 3, so the empirical measure is the Dirac mixture
    0.7 delta(-2, 0) + 0.3 delta(2, 0), whose noised score is closed form (a mixture with stds 0)."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    dirac = GaussianMixture(means, [0.0], [0.7, 0.3])
    data = torch.cat([means[:1].repeat(7, 1), means[1:].repeat(3, 1)])
    x = means[torch.randint(0, 2, (500,))] * PROC.alpha(torch.tensor(t)) + PROC.sigma(torch.tensor(t)) * \
        torch.randn(500, 2, dtype=torch.float64)
    exact = dirac.score(x, t, PROC)
    scale = exact.abs().max()
    torch.testing.assert_close(ratio_score(x, t, data, PROC, floor=0.0), exact, atol=1e-9 * scale, rtol=1e-9)
    # with the default floor: the points are noised copies of the data, so the floor changes nothing visible
    torch.testing.assert_close(ratio_score(x, t, data, PROC), exact, atol=1e-6 * scale, rtol=1e-6)


def test_ratio_estimator_on_the_component_means_tends_to_the_mixture_score():
    """Data = the gmm2 component means with the mixture's weights (7 : 3). For a mixture with component std s the
    estimator is the score of its s -> 0 limit, so its error against the mixture's exact noised score vanishes
    like s^4 (squared score error; the noised component variances alpha^2 s^2 + sigma^2 -> sigma^2)."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    data = torch.cat([means[:1].repeat(7, 1), means[1:].repeat(3, 1)])
    t, gen = 0.3, torch.Generator().manual_seed(0)
    rel = []
    for s in (0.2, 0.1, 0.05, 0.025):
        gmm = GaussianMixture(means, [s], [0.7, 0.3])
        xt, _ = PROC.marginal(gmm.sample(2000, gen).double(), torch.tensor(t))
        exact = gmm.score(xt, t, PROC)
        rel.append(float((ratio_score(xt, t, data, PROC, floor=0.0) - exact).pow(2).sum(1).mean()
                         / exact.pow(2).sum(1).mean()))
    assert all(a / b > 10 for a, b in zip(rel, rel[1:], strict=False)), rel  # ~ 16 per halving of s
    assert rel[-1] < 1e-5, rel


def test_ratio_estimator_error_vs_true_gmm_score_falls_with_m():
    g, gen = gmm_preset("gmm2"), torch.Generator().manual_seed(0)
    for t in (0.3, 0.6):
        mse = []
        for m in (16, 256, 4096):
            errs = []
            for _ in range(4):
                data = g.sample(m, gen)
                xt, _ = PROC.marginal(g.sample(1000, gen), torch.tensor(t))
                errs.append(float((ratio_score(xt, t, data, PROC) - g.score(xt, t, PROC)).pow(2).sum(1).mean()))
            mse.append(sum(errs) / len(errs))
        assert mse[0] > mse[1] > mse[2] and mse[2] < 0.05 * mse[0], (t, mse)


def test_ratio_floor_falls_back_to_the_gaussian_score():
    data = torch.tensor([[1.0, 1.0], [1.2, 0.8]])
    t = torch.tensor(0.05)
    s2 = float(PROC.sigma(t)) ** 2
    far = torch.tensor([[40.0, -30.0]])  # hundreds of sigma_t from both noised data points
    torch.testing.assert_close(ratio_score(far, t, data, PROC), -far / s2, rtol=1e-6, atol=0)
    # without the floor the softmax picks the nearest point instead
    near = (float(PROC.alpha(t)) * data[1] - far[0]) / s2
    torch.testing.assert_close(ratio_score(far, t, data, PROC, floor=0.0), near[None], rtol=1e-4, atol=0)
    with pytest.raises(CtrlDiffError):
        ratio_score(far, t, data, PROC, floor=-1.0)


def test_conditional_estimator_uses_only_the_label_data_and_disjoint_subsets():
    data = torch.tensor([[-3.0, 0.0]] * 50 + [[3.0, 0.0]] * 50)
    labels = torch.tensor([0] * 50 + [1] * 50)
    est = RatioScoreEstimator(data, PROC, m=10, labels=labels, generator=torch.Generator().manual_seed(0))
    x, t = torch.zeros(6, 2), torch.full((6,), 0.3)
    cond = torch.tensor([0, 1, 0, 1, 1, 0])
    a, s2 = float(PROC.alpha(torch.tensor(0.3))), float(PROC.sigma(torch.tensor(0.3))) ** 2
    expect = (a * data[torch.where(cond == 0, 0, 99)] - x) / s2  # each label's own (single) data location
    for s in est.scores(x, t, cond, copies=2):
        torch.testing.assert_close(s, expect, rtol=1e-5, atol=1e-5)
    parts = est._subsets(torch.arange(100), 2)
    assert len(parts[0]) == len(parts[1]) == 10 and not set(parts[0].tolist()) & set(parts[1].tolist())
    with pytest.raises(CtrlDiffError, match="pass cond"):
        est.score(x, t)


# ---- the Gaussian policy over the score, recorded by the solver --------------------------------------
def test_solver_records_actions_with_per_step_policy_std():
    model = MLPScoreModel(dim=2, hidden=16, depth=1)
    times = PROC.time_grid(5)
    stds = [0.5, 0.4, 0.3, 0.2, 0.1]
    x0 = torch.randn(4000, 2)
    traj = euler_maruyama(model, x0, times, PROC, generator=torch.Generator().manual_seed(0), policy_std=stds,
                          record_actions=True)
    assert traj.actions.shape == traj.outputs.shape
    for k in range(5):
        a, b, std = em_coeffs(PROC, times[k], times[k + 1])
        assert math.isclose(float(traj.std[k]), std, rel_tol=1e-6)  # the state noise only
        xk, ak = traj.states[:, k], traj.actions[:, k]
        torch.testing.assert_close(traj.states[:, k + 1], a * xk + b * ak + std * traj.noise[:, k], rtol=1e-5,
                                   atol=1e-5)
        assert abs(float((ak - traj.outputs[:, k]).std()) / stds[k] - 1) < 0.05
    # without record_actions a per-step std is folded into the transition noise, as a scalar one always was
    plain = euler_maruyama(model, x0, times, PROC, generator=torch.Generator().manual_seed(0), policy_std=stds)
    assert plain.actions is None
    b1 = em_coeffs(PROC, times[1], times[2])
    assert math.isclose(float(plain.std[1]), math.sqrt(b1[2] ** 2 + (b1[1] * 0.4) ** 2), rel_tol=1e-6)


def test_q_is_theta_times_the_log_density_of_the_policy():
    """q_k dtau_k = theta dtau_k log pi(a) for pi = N(mu, theta / (2 g^2)) in score units, with g^2 dtau_k the
    step's log-SNR weight sigma_k^2 w_k: the normalisation makes int exp(q / theta) da = 1."""
    tr = Trainer(_cfg(qlearning=dict(theta=0.7)))
    c = tr.algo.step_constants(tr.times)
    k = torch.tensor([0, 3, 7])
    mu_e, a_e = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    q_dt = tr.algo.q_dtau(a_e, mu_e, k, c)
    sig, dtau, w = c["sigma"][k], c["dtau"][k], c["w"][k]
    var = 0.7 * dtau / (2 * sig**2 * w)  # theta / (2 g^2) with g^2 = sigma^2 w / dtau
    mu_s, a_s = -mu_e / sig[:, None], -a_e / sig[:, None]
    logp = torch.distributions.Normal(mu_s, var.sqrt()[:, None]).log_prob(a_s).sum(1)
    torch.testing.assert_close(q_dt, 0.7 * dtau * logp, rtol=1e-10, atol=1e-12)
    # the rollout's action noise (eps units) is that variance: sigma^2 var
    torch.testing.assert_close(c["action_std"][k], sig * var.sqrt())


def test_critic_terminal_condition_is_exact():
    tr = Trainer(_cfg())
    critic = tr.algo.critic
    with torch.no_grad():
        for p in critic.parameters():
            p.normal_()
    y = torch.randn(64, 2)
    h = tr.reward(y)
    t_end = torch.full((64,), tr.process.t_min)
    J = critic(t_end, y, None, h)
    torch.testing.assert_close(J, tr.algo.beta_q * h, rtol=0, atol=0)
    assert not torch.allclose(critic(torch.full((64,), 0.5), y, None, h), tr.algo.beta_q * h)
    # the grid really ends there, and the rollouts' last state is where the reward is taken
    assert float(tr.times[-1]) == pytest.approx(tr.process.t_min)


def test_weight_mapping_and_config_errors():
    assert Trainer(_cfg(beta=0.5)).algo.beta_q == pytest.approx(4.0)  # beta_q = 2 / beta
    assert Trainer(_cfg(qlearning=dict(beta_q=1.5))).algo.beta_q == 1.5
    with pytest.raises(CtrlDiffError, match="beta_q"):
        Trainer(_cfg(beta=0.0))
    with pytest.raises(CtrlDiffError, match="data samples"):
        Trainer(_cfg(model="gmm2-exact", qlearning=dict(score_source="ratio")))
    with pytest.raises(Exception, match="policy noise"):
        _cfg(sampler=dict(solver="em", steps=8, policy_std=0.1))


def test_fine_tuning_mode_uses_the_reference_score():
    """score_source=ref (auto for a model without data): the running reward's target is s_pre. The exact
    yardstick model starts at s_pre, so the running cost of the mean is 0 and only the action noise costs."""
    tr = Trainer(_cfg(model="gmm2-exact", qlearning=dict(beta_q=0.0)))
    assert tr.algo.source == "ref"
    batch = tr.collect()
    m = tr.algo.prepare(batch)
    assert m["q/score_cost"] < 1e-8


# ---- short runs ------------------------------------------------------------------------------------
class GaussianEps(nn.Module):
    """Exact eps of N(m0, s0^2) data under the process."""

    prediction = "eps"

    def __init__(self, m0, s0):
        super().__init__()
        self.m0, self.s0 = m0, s0

    def forward(self, x, t, cond=None):
        a, s = PROC.alpha(t.double())[:, None], PROC.sigma(t.double())[:, None]
        return (s * (x.double() - a * self.m0) / (a**2 * self.s0**2 + s**2)).to(x.dtype)


def test_pure_score_matching_learns_a_1d_gaussian_score():
    """beta_q = 0, data N(1, 0.5^2), ratio estimator on 4000 points: the policy mean -> the true score."""
    m0, s0 = 1.0, 0.5
    data = m0 + s0 * torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))
    net = MLPScoreModel(dim=1, hidden=64, depth=2, prediction="v", zero_init=True)
    ref = GaussianEps(m0, s0)
    task = Task("gauss1d", net, ref, PROC, (1,), 0, list(net.parameters()), data=data)
    cfg = _cfg(model="gauss1d", epochs=25, batch_size=48, qlearning=dict(beta_q=0.0, m=0))

    def err():  # E ||eps_mu - eps_true||^2 over x_t ~ p_t, t ~ U[0.02, 0.98]
        g = torch.Generator().manual_seed(5)
        t = 0.02 + 0.96 * torch.rand(4000, generator=g)
        xt, _ = PROC.marginal(m0 + s0 * torch.randn(4000, 1, generator=g), t, torch.randn(4000, 1, generator=g))
        with torch.no_grad():
            return float((model_eps(net, PROC, xt, t) - ref(xt, t)).pow(2).mean())

    before = err()
    Trainer(cfg, task=task, reward=lambda x, cond=None: torch.zeros(x.shape[0])).train()
    after = err()
    assert after < 0.15 * before and after < 0.02, (before, after)


def test_reward_directed_run_from_scratch_raises_the_reward():
    from ctrldiff.eval.evaluate import evaluate_policy

    tr = Trainer(_cfg(epochs=25, batch_size=64, sampler=dict(solver="em", steps=10)))
    kw = dict(sample_shape=(2,), n=1000, steps=10)
    data_r = evaluate_policy(tr.ref, tr.ref, tr.process, tr.reward, **kw)["reward_mean"]  # E_data h ~ 0.62
    start_r = evaluate_policy(tr.policy, tr.ref, tr.process, tr.reward, **kw)["reward_mean"]  # N(0, I): ~ 0.96
    tr.train()
    ev = evaluate_policy(tr.policy, tr.ref, tr.process, tr.reward, **kw)
    # the exact target p* ∝ p_data exp(beta_q h / 2) has E h = 1.85
    assert ev["reward_mean"] > max(data_r, start_r) + 0.3, (data_r, start_r, ev)
    assert ev["kl_path"] < 5.0


def test_cli_train_q_learning_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--algo", "q-learning", "--model", "scratch-gmm2", "--reward", "toy2d-mode-switch",
            "--beta", "0.5", "--epochs", "2", "--batch-size", "32", "--steps", "6", "--out", str(out), "--quiet",
            "--set", "log.tensorboard=false", "--set", "log.num_final_eval=0", "--set", "log.checkpoint_every=1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and "q/score_cost" in recs[-1] and (out / "final_model.safetensors").exists()
    # value queries: H at every visited state before the end (Tweedie) and at every mean-action next state y0
    assert recs[-1]["value_reward_queries"] == 2 * (32 * 6 + 32 * 6)
    full = Trainer(_cfg(epochs=3), tmp_path / "full")
    full.train()
    part = Trainer(_cfg(epochs=3), tmp_path / "part")
    part.train(epochs=1)
    resumed = Trainer(_cfg(epochs=3), tmp_path / "part", resume=True)
    resumed.train()
    for p, q in zip(full.task.model.parameters(), resumed.task.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
