r"""Reward-directed q-learning (Gao, Zha & Zhou 2024; METHODS section 3): train a score model from data samples
and a reward, with no pretrained score and no denoising score-matching loss. Derivations: docs/QLEARNING.md.

Problem (backward time; the action a is a score): dY = [-f Y + g^2 a] dtau + g dB (SDE; sampler em / ddim) or
[-f Y + (1/2) g^2 a] dtau (probability-flow ODE; sampler ode-euler), a ~ pi(. | t, Y [, c]), maximise
    E[ int ( -g^2 ||grad log p_t(Y) - a||^2 + theta Entropy(pi) ) dtau + beta_q h(Y_end) ].
The optimal policy is N(grad log p_t + (1/2) grad J*, theta / (2 g^2) I): only its mean mu_psi is learned (the
trainer's model, eps = -sigma_t mu_psi), and the normalised little q-function is known in closed form:
    q_psi(t, y, a) = -g^2 ||a - mu_psi||^2 - (theta d / 2) log(pi theta / g^2)        (= theta log pi(a)).

Discretisation. On the rollout grid t_0 = t_max > ... > t_K = t_min, everything is written in eps units
(u_eps = -sigma_k u_score) with the step's "g^2 dtau / sigma^2" taken in the exact-in-log-SNR form of
:func:`ctrldiff.solvers.kl_weights`, w_k = 2 (lambda_{k+1} - lambda_k), so the costs below are exactly twice the
trainer's KL_path increments:
    action    a_k = mu_k + sqrt(theta dtau_k / (2 w_k)) zeta_k                     (recorded by the solver)
    reward    r_hat_k dtau_k = -w_k ||eps_hat_k - a_k||^2                          (running_reward=square)
                             = -w_k (eps_hat1_k - a_k).(eps_hat2_k - a_k)          (running_reward=cross)
    q         q_k dtau_k = -w_k ||a_k - mu_psi||^2 - (theta d dtau_k / 2) log(pi theta dtau_k / (sigma_k^2 w_k))
    TD error  delta_k = J(t_{k+1}, y_{k+1}) - J(t_k, y_k) + r_hat_k dtau_k - q_k dtau_k
    critic    J(t, y, c) = beta_q H + phi(t) U_Theta(t, y, c),  phi = (t - t_min) / (t_max - t_min),
              H = h(y) at t_min (so J(t_min, y) = beta_q h(y) exactly); before the end H = h(x0_hat(t, y)) at the
              sampling policy's Tweedie prediction (critic.reward_term=tweedie, the default) or 0 (none).
eps_hat is the ratio estimator (:mod:`ctrldiff.algorithms.ratio`) from the task's data, or the frozen reference
score when fine-tuning (score_source=ref). 'cross' uses two estimates from disjoint data subsets: the literal
square carries the estimator's variance Var(eps_hat)(t, y) as a state-dependent cost, which J learns and whose
gradient then pulls samples towards where the estimator is precise (the data points). With m = 0 (all the data)
the estimator is deterministic (the noised empirical score) and has no variance, so 'auto' uses the square then,
'cross' otherwise.

Updates, each epoch on fresh rollouts: the martingale orthogonality conditions of Jia & Zhou (2023),
E[delta dJ/dTheta] = 0 and E[delta dq/dpsi] = 0 (the stationarity conditions of sum_k delta_k^2):
  critic (prepare)  ``critic.epochs`` passes regressing J(t_k, y_k) on the TD(lambda) target
                    G_k = (r_hat - q)_k dtau_k + (1 - lam) J_{k+1} + lam G_{k+1},  G_K = beta_q h(y_K).
  actor (loss)      dq/dpsi = 2 w (a - mu) dmu/dpsi, so at the sampling policy the condition is E[delta_k u_k] = 0,
                    u_k = a_k - mu_old. As E[delta u] = theta dtau (mu* - mu_old) for the policy-improvement target
                    mu* = eps_hat + (the grad J term), mu_tilde = mu_old + delta u / (theta dtau) is a one-sample
                    unbiased estimate of mu*, and the actor regresses on it:
                        L = sum_k w_k ||mu_psi(t_k, y_k) - mu_tilde_k||^2.
                    Its gradient at psi_old is -(2 / (theta dtau)) sum_k delta_k dq_k/dpsi, the orthogonality update,
                    and it remains a convex regression over the inner loop. delta is taken minus its running part
                    at a = mu_old (a function of the state only, like J(t_k, y_k)): the expected update is the same
                    (E[u | y] = 0) and the variance orders of magnitude lower.
  ``actor=delta-sq`` minimises sum_k delta_k^2 over psi literally (J fixed). Its curvature term
  E[delta | y] (mu_old - mu_psi) pushes the mean away from the actions wherever the critic lags; it diverges on the
  2-D benchmark (kept for comparison).
Modes: beta_q = 0 is pure score matching (mu -> grad log p_t); score_source=ref fine-tunes a pretrained model
(known running reward, no ratio estimator); ode-euler gives the probability-flow dynamics; a conditional task
puts the label in mu, J and the ratio estimator (data with that label only).

Weights. E_a[-g^2 ||s - a||^2] = -g^2 ||s - mu||^2 + const and int g^2 ||mu - s||^2 dtau = 2 KL_path, so the
paper's objective is beta_q (E h - (2 / beta_q) KL_path) + const: the code's J = E r - beta KL_path with r = h and
beta = 2 / beta_q, optimum p* ∝ p_data exp(beta_q h / 2). theta only sets the exploration (the optimal mean does
not depend on it). qlearning.beta_q unset means beta_q = 2 / beta.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import Strict
from ..errors import CtrlDiffError
from ..rewards.base import call_reward
from ..solvers import kl_weights, model_eps
from .base import Algorithm, Minibatch, RolloutBatch, register_algorithm
from .ratio import DEFAULT_FLOOR, RatioScoreEstimator
from .value import make_head


class CriticConfig(Strict):
    lr: float = Field(1e-4, gt=0, description="critic Adam learning rate; slower than the actor's (two time scales): "
                      "early on J learns the current policy's large cost-to-go, and a fast critic's gradient then "
                      "throws the policy around (50-step rollouts diverge at 1e-3 on the 2-D benchmark)")
    epochs: int = Field(4, ge=0, description="passes over the epoch's (sample, step) pairs per critic fit")
    minibatch: int = Field(1024, ge=1)
    lam: float = Field(0.9, ge=0, le=1, description="lambda of the TD(lambda) target (1: Monte Carlo, the "
                       "martingale loss)")
    reward_term: Literal["tweedie", "none"] = Field(
        "tweedie", description="tweedie: J = beta_q h(x0_hat) + phi(t) U before the end (h queried at every "
        "visited state's Tweedie prediction and at the actor's control-variate states, counted as value reward "
        "queries: 2 K per trajectory); none: J = phi(t) U before the end (1 value query per trajectory; the "
        "reward propagates back more slowly). Either way J(t_min, y) = beta_q h(y)")


class QLearningConfig(Strict):
    beta_q: float | None = Field(None, ge=0, description="terminal reward weight beta_q; None: 2 / beta (the "
                                 "code's J = E r - beta KL_path); 0: pure score matching")
    theta: float = Field(1.0, gt=0, description="temperature: policy covariance theta / (2 g^2) I (score units)")
    score_source: Literal["auto", "ratio", "ref"] = Field(
        "auto", description="running-reward target: ratio estimator from the task's data, or the frozen "
        "reference score (fine-tuning). auto: ratio if the task has data")
    m: int = Field(1024, ge=0, description="data points per ratio-estimator call (0: all; with running_reward="
                   "cross each of the two estimates uses m, at most half the data)")
    ratio_floor: float = Field(DEFAULT_FLOOR, ge=0, description="ratio-estimator floor (see algorithms/ratio.py)")
    running_reward: Literal["auto", "cross", "square"] = Field(
        "auto", description="cross: -g^2 (s_hat1 - a).(s_hat2 - a), two ratio estimates from disjoint subsets "
        "of m points (no estimator-variance term); square: -g^2 ||s_hat - a||^2 (the paper's literal form). "
        "auto: square when the estimator uses all the data (m = 0: deterministic, no variance), else cross")
    actor: Literal["regression", "delta-sq"] = Field(
        "regression", description="regression: regress mu on mu_old + delta u / (theta dtau) (martingale "
        "orthogonality, baseline-corrected); delta-sq: minimise sum delta^2 over psi literally (unstable)")
    critic: CriticConfig = CriticConfig()


class Critic(nn.Module):
    """J(t, y, c) = beta_q H + phi(t) U(t, y, c), phi(t) = clamp((t - t_min) / (t_max - t_min), 0):
    U is a zero-initialised scalar head; ``h`` holds H, the reward term at (t, y) (module docstring)."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, t_min: float, t_max: float,
                 beta_q: float):
        super().__init__()
        self.u = make_head(sample_shape, num_classes, with_x0=False, use_time=True)
        self.t_min, self.t_max, self.beta_q = t_min, t_max, beta_q

    def phi(self, t: Tensor) -> Tensor:
        return ((t - self.t_min) / (self.t_max - self.t_min)).clamp(min=0)

    def forward(self, t: Tensor, y: Tensor, cond: Tensor | None, h: Tensor) -> Tensor:
        return self.beta_q * h + self.phi(t) * self.u(y, t, cond)


@register_algorithm("q-learning")
class QLearning(Algorithm):
    any_grid = False  # its policy noise is set per step of the fixed grid
    needs_log_prob = False

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        self.acfg: QLearningConfig = cfg.qlearning
        a, task = self.acfg, trainer.task
        if a.beta_q is None and cfg.beta <= 0:
            raise CtrlDiffError("q-learning with qlearning.beta_q unset uses beta_q = 2 / beta: set beta > 0 or "
                                "qlearning.beta_q")
        self.beta_q = a.beta_q if a.beta_q is not None else 2.0 / cfg.beta
        source = a.score_source
        if source == "auto":
            source = "ratio" if task.data is not None else "ref"
        if source == "ratio" and task.data is None:
            raise CtrlDiffError(f"q-learning's ratio estimator needs data samples, and model {cfg.model!r} has none: "
                                "train from scratch with model=scratch-<data set> or use qlearning.score_source=ref")
        self.source = source
        self.running_reward = a.running_reward
        if self.running_reward == "auto":
            self.running_reward = "square" if a.m == 0 else "cross"
        self.estimator = None
        if source == "ratio":
            self.ratio_gen = torch.Generator().manual_seed(trainer.process_seed(cfg.seed + 2))
            self.estimator = RatioScoreEstimator(task.data, trainer.process, a.m or None, task.data_labels,
                                                 a.ratio_floor, self.ratio_gen)
        proc = trainer.process
        self.critic = Critic(task.sample_shape, task.num_classes, proc.t_min, proc.t_max, self.beta_q).to(trainer.device)
        self.critic_opt = trainer.make_optimizer(self.critic.parameters(), lr=a.critic.lr)

    # ---- the per-step constants of the discretisation (module docstring) --------------------------
    def step_constants(self, times: Tensor) -> dict[str, Tensor]:
        """w [K] (g^2 dtau / sigma^2, log-SNR form), dtau [K], sigma [K] (at t_k), action std [K] (eps units),
        q_const [K] = (theta d dtau / 2) log(pi theta dtau / (sigma^2 w))."""
        proc, theta = self.trainer.process, self.acfg.theta
        t64 = times.double()
        w = 2.0 * kl_weights(proc, t64)
        dtau = t64[:-1] - t64[1:]
        sigma = proc.sigma(t64[:-1])
        d = math.prod(self.trainer.task.sample_shape)
        q_const = 0.5 * theta * d * dtau * torch.log(math.pi * theta * dtau / (sigma**2 * w))
        return {"w": w, "dtau": dtau, "sigma": sigma, "action_std": torch.sqrt(theta * dtau / (2 * w)),
                "q_const": q_const}

    def rollout_kwargs(self) -> dict:
        """The policy's Gaussian noise, theta / (2 g^2) in score units, per step; actions are recorded."""
        return {"policy_std": self.step_constants(self.trainer.times)["action_std"].tolist(), "record_actions": True}

    def q_dtau(self, a: Tensor, mu: Tensor, k: Tensor, c: dict) -> Tensor:
        """q_psi(t_k, y_k, a) dtau_k = -w_k ||a - mu||^2 - q_const_k for pairs (a, mu [N, *D], k [N]) -> [N]."""
        w, q0 = c["w"].to(mu.dtype)[k], c["q_const"].to(mu.dtype)[k]
        return -w * (a - mu).flatten(1).pow(2).sum(1) - q0

    # ---- the running reward's target: the ratio estimator or the frozen pretrained score ------------
    def eps_hats(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """Two estimates of eps at every visited (t_k, y_k), k < K, each [B, K, *D]: independent ratio estimates
        (running_reward=cross), the same one twice (square), or the frozen reference twice (score_source=ref)."""
        if self.source == "ref":
            return batch.eps_ref, batch.eps_ref
        traj = batch.traj
        B, K = traj.batch_size, traj.num_steps
        x = traj.states[:, :K].reshape(B * K, *traj.states.shape[2:])
        t = traj.times[:K].repeat(B)
        cond = traj.cond.repeat_interleave(K, 0) if isinstance(traj.cond, Tensor) else None
        copies = 2 if self.running_reward == "cross" else 1
        est, outs = self.estimator, [[] for _ in range(copies)]
        for i in range(0, B * K, 4096):
            c = None if cond is None else cond[i:i + 4096]
            for out, sc in zip(outs, est.scores(x[i:i + 4096], t[i:i + 4096], c, copies), strict=True):
                out.append(est.to_eps(sc, t[i:i + 4096]))
        e = [torch.cat(o).reshape(traj.outputs.shape) for o in outs]
        return (e[0], e[-1])

    def _reward_term(self, x: Tensor, t: Tensor, cond: Tensor | None, eps: Tensor | None) -> Tensor:
        """H at states x [N, *D], times t [N] (module docstring): h(x) where t = t_min, else h(x0_hat) with the
        sampling policy's Tweedie prediction (its eps at x: ``eps``, evaluated here if None) for
        reward_term=tweedie, or 0. Reward calls are counted as value reward queries. -> [N]"""
        tr = self.trainer
        out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if self.beta_q == 0:
            return out
        end = t <= tr.process.t_min
        todo = torch.ones_like(end) if self.acfg.critic.reward_term == "tweedie" else end
        if not todo.any():
            return out
        xs, ts = x[todo], t[todo]
        cs = None if cond is None else cond[todo]
        if not bool(end[todo].all()):
            if eps is None:
                with torch.no_grad():
                    eps = torch.cat([model_eps(tr.policy, tr.process, xs[i:i + 4096], ts[i:i + 4096],
                                               None if cs is None else cs[i:i + 4096]) for i in range(0, len(xs), 4096)])
            else:
                eps = eps[todo]
            x0 = tr.process.convert(eps, "eps", "x0", ts, xs)
            xs = torch.where(end[todo].reshape(-1, *[1] * (xs.ndim - 1)), xs, x0)
        tr.count_queries(xs.shape[0], kind="value")
        out[todo] = call_reward(tr.reward, xs, cs).to(out.dtype)
        return out

    # ---- per-epoch preparation: running reward, critic fit, TD errors ----------------------------------
    def _critic_values(self, t: Tensor, y: Tensor, cond: Tensor | None, h: Tensor, chunk: int = 4096) -> Tensor:
        with torch.no_grad():
            return torch.cat([self.critic(t[i:i + chunk], y[i:i + chunk], None if cond is None else cond[i:i + chunk],
                                          h[i:i + chunk]) for i in range(0, len(t), chunk)])

    def _fit_critic(self, t, y, cond, h, run: Tensor) -> float:
        """TD(lambda) regression of J(t_k, y_k) (all states flattened b (K + 1) + k) on fixed targets."""
        tr, ccfg = self.trainer, self.acfg.critic
        B, K = run.shape
        src = (torch.arange(B, device=y.device)[:, None] * (K + 1) + torch.arange(K, device=y.device)[None]).reshape(-1)
        loss = torch.zeros((), device=y.device)
        for _ in range(ccfg.epochs):
            J = self._critic_values(t, y, cond, h).reshape(B, K + 1)
            G, nxt = torch.empty_like(run), J[:, K]  # G_K = J_K = beta_q h(y_K), exact
            for k in range(K - 1, -1, -1):
                nxt = run[:, k] + (1 - ccfg.lam) * J[:, k + 1] + ccfg.lam * nxt
                G[:, k] = nxt
            G = G.reshape(-1)
            for i in tr.minibatches(B * K, ccfg.minibatch, y.device):
                j = src[i]
                loss = (G[i] - self.critic(t[j], y[j], None if cond is None else cond[j], h[j])).pow(2).mean()
                self.critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.critic_opt.step()
        return float(loss.detach())

    def prepare(self, batch: RolloutBatch) -> dict:
        traj = batch.traj
        B, K = traj.batch_size, traj.num_steps
        c = self.step_constants(traj.times)
        dt = traj.outputs.dtype
        w, dtau, q0 = c["w"].to(dt), c["dtau"].to(dt), c["q_const"].to(dt)
        a, mu_old = traj.actions, traj.outputs
        u = a - mu_old
        e1, e2 = self.eps_hats(batch)
        e_hat = 0.5 * (e1 + e2)
        r_dt = -w * ((e1 - a) * (e2 - a)).flatten(2).sum(-1)  # [B, K]  r_hat_k dtau_k
        q_dt = -w * u.flatten(2).pow(2).sum(-1) - q0  # q_old(a_k) dtau_k
        y = traj.states.reshape(B * (K + 1), *traj.states.shape[2:])
        t = traj.times.to(y.dtype).repeat(B)
        cond = traj.cond.repeat_interleave(K + 1, 0) if isinstance(traj.cond, Tensor) else None
        h = torch.zeros(B, K + 1, dtype=y.dtype, device=y.device)
        h[:, K] = batch.rewards.to(y.dtype)  # the terminal rewards, already queried by the trainer
        nt = torch.arange(K, device=y.device)
        sel = (torch.arange(B, device=y.device)[:, None] * (K + 1) + nt[None]).reshape(-1)  # states k < K
        h[:, :K] = self._reward_term(y[sel], t[sel], None if cond is None else cond[sel],
                                     traj.outputs.reshape(B * K, *u.shape[2:])).reshape(B, K)
        h = h.reshape(-1)  # [B (K + 1)]
        critic_loss = self._fit_critic(t, y, cond, h, r_dt - q_dt)
        J = self._critic_values(t, y, cond, h).reshape(B, K + 1)
        delta = J[:, 1:] - J[:, :-1] + r_dt - q_dt
        if self.acfg.actor == "regression":
            # control variates, functions of (y_k, xi_k) only, so E[. u_k] = 0 and the expected update is unchanged:
            # the running part of delta at a = mu_old, and J at the next state reached with the same noise xi_k but
            # the mean action, y0_{k+1} = y_{k+1} - B_k u_k (cancels the Brownian part of J_{k+1} - J_k)
            base = -w * ((e1 - mu_old) * (e2 - mu_old)).flatten(2).sum(-1) + q0
            bk = traj.coef_b.to(dt).reshape(1, K, *[1] * (u.ndim - 2))
            y0 = (traj.states[:, 1:] - bk * u).reshape(B * K, *u.shape[2:])
            i_next = (torch.arange(B, device=y.device)[:, None] * (K + 1)
                      + torch.arange(1, K + 1, device=y.device)[None]).reshape(-1)
            c0 = None if cond is None else cond[i_next]
            h0 = self._reward_term(y0, t[i_next], c0, None)
            j0 = self._critic_values(t[i_next], y0, c0, h0).reshape(B, K)
            # (J_{k+1} - J(y0_{k+1}) + 2 w u.(eps_hat - mu_old)) / (theta dtau)
            coef = (delta - base + J[:, :-1] - j0) / (self.acfg.theta * dtau)
            batch.extras["mu_target"] = mu_old + coef.reshape(B, K, *[1] * (u.ndim - 2)) * u
        else:
            batch.extras["q_target"] = J[:, 1:] - J[:, :-1] + r_dt  # delta = q_target - q_psi dtau
        batch.extras["consts"] = c
        metrics = {"q/critic_loss": critic_loss, "q/delta_sq": float(delta.pow(2).sum(1).mean()),
                   "q/J0": float(J[:, 0].mean()), "q/beta_q": self.beta_q,
                   # int g^2 ||s_hat - mu||^2 dtau along the path: the paper's running cost without the action noise
                   "q/score_cost": float((w * (e_hat - mu_old).flatten(2).pow(2).sum(-1)).sum(1).mean())}
        if self.source == "ratio":  # the estimator's own error against the task's reference (the data's score)
            metrics["q/ratio_err"] = float((w * (e_hat - batch.eps_ref).flatten(2).pow(2).sum(-1)).sum(1).mean())
        return metrics

    # ---- the actor -----------------------------------------------------------------------------------
    def loss(self, mb: Minibatch) -> tuple[Tensor, dict]:
        batch = mb.batch
        ex, K = batch.extras, batch.traj.num_steps
        w = ex["consts"]["w"].to(mb.eps.dtype)[mb.k]
        if self.acfg.actor == "regression":  # sum_k w_k ||mu_psi - mu_tilde_k||^2
            err = (mb.eps - ex["mu_target"][mb.b, mb.k]).flatten(1).pow(2).sum(1)
            return (w * err).mean() * K, {}
        q_dt = self.q_dtau(batch.traj.actions[mb.b, mb.k], mb.eps, mb.k, ex["consts"])
        delta = ex["q_target"][mb.b, mb.k] - q_dt  # the literal sum_k delta_k^2 over psi, J fixed
        return delta.pow(2).mean() * K, {}

    # ---- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = {**super().state_dict(), "critic": self.critic.state_dict(), "critic_opt": self.critic_opt.state_dict()}
        if self.estimator is not None:
            st["ratio_gen"] = self.ratio_gen.get_state()
        return st

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.critic.load_state_dict(state["critic"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        if self.estimator is not None:
            self.ratio_gen.set_state(state["ratio_gen"])
