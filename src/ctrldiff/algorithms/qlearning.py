r"""Reward-directed q-learning (Gao, Zha & Zhou 2024; METHODS section 3): train a score model from data
samples and a reward, with no pretrained score and no denoising score-matching loss.

Problem (backward time, the action a is a score): dY = [-f Y + g^2 a] dtau + g dB (SDE) or
[-f Y + (1/2) g^2 a] dtau (probability-flow ODE), a ~ pi(. | t, Y [, c]), maximise
    E[ int ( -g^2 ||grad log p_t(Y) - a||^2 + theta Entropy(pi) ) dtau + beta_q h(Y_end) ].
The optimal policy is N(grad log p_t + (1/2) grad J*, theta / (2 g^2) I): only its mean mu_psi is learned
(the trainer's model; its eps output is -sigma_t mu_psi). With it, the normalised little q-function is
    q_psi(t, y, a) dtau = -g^2 dtau ||a - mu_psi||^2 - (theta d dtau / 2) log(pi theta / g^2)   (= theta dtau log pi).

Discretisation (this module's one convention). On the rollout grid t_0 = t_max > ... > t_K = t_min, the
"g^2 dtau" of step k is taken in the exact-in-log-SNR form of :func:`ctrldiff.solvers.kl_weights`, in eps
units (a_eps = -sigma a):  g^2 dtau ||u_score||^2 -> w_k ||u_eps||^2,  w_k = 2 (lambda_{k+1} - lambda_k)
(-> g^2 dtau / sigma^2 as dtau -> 0), so the code's costs are exactly 2 x the trainer's KL_path
increments. Per step k:
    action      a_k = mu_k + sqrt(theta dtau_k / (2 w_k)) zeta_k        (eps units; recorded by the solver)
    reward      r_hat_k dtau_k = -w_k ||eps_hat_k - a_k||^2              eps_hat: ratio estimator or s_ref
    q           q_k dtau_k     = -w_k ||a_k - mu_psi(t_k, y_k)||^2 - (theta d dtau_k / 2) log(pi theta dtau_k / (sigma_k^2 w_k))
    TD error    delta_k = J(t_{k+1}, y_{k+1}) - J(t_k, y_k) + r_hat_k dtau_k - q_k dtau_k
    critic      J_Theta(t, y, c) = beta_q h(y, c) + phi(t) U_Theta(t, y, c),  phi = (t - t_min) / (t_max - t_min)
                (so J(t_min, y) = beta_q h(y) exactly; critic.reward_term=none drops h at t > t_min)

Update: minimise sum_k delta_k^2 jointly over (Theta, psi) with Adam (the critic is a parameter group of
the trainer's optimizer; the shared update loop over (sample, step) minibatches). In the TD error J(t_k, y_k)
is the free, state-dependent baseline that absorbs E[delta | y_k]; mu_psi enters only through q, so psi's
gradient -2 delta_k dq_k/dpsi is the martingale orthogonality condition with test function dq/dpsi.
For Theta, ``critic.target=td`` (default) treats J(t_{k+1}, y_{k+1}) as a fixed target (semi-gradient: the
orthogonality condition with test function dJ/dTheta); ``critic.target=residual`` differentiates through both
ends, the literal mean-square TD error, which Jia & Zhou (2022) show approximates the path's quadratic
variation: it flattens J (kept for comparison). Each step's delta is divided by its batch RMS at sampling
time (a positive constant per k: it reweights the steps and leaves each step's fixed point alone; without it
the steps at the data end, whose costs grow like 1 / sigma^2, swamp the rest early in training).
Modes: beta_q = 0 is pure score matching (mu -> grad log p_t); ``score_source=ref`` is fine-tuning (the
running reward uses the frozen pretrained score, no ratio estimator); sampler.solver=ode-euler gives the
probability-flow dynamics; a conditional task puts c in mu, J and the ratio estimator.

Weights (docs/QLEARNING.md): E over the action of -g^2 ||s - a||^2 is -g^2 ||s - mu||^2 + const, and
int g^2 ||mu - s||^2 dtau = 2 KL_path, so the paper's objective is beta_q (E h - (2 / beta_q) KL_path) +
const: the code's J = E r - beta KL_path with r = h and beta = 2 / beta_q, optimum p* ∝ p_data exp(beta_q h / 2).
theta only sets the exploration noise (it does not move the optimal mean). ``qlearning.beta_q`` unset
means beta_q = 2 / beta.
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
from ..solvers import kl_weights
from .base import Algorithm, Minibatch, RolloutBatch, register_algorithm
from .ratio import DEFAULT_FLOOR, RatioScoreEstimator
from .value import make_head


class CriticConfig(Strict):
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the critic's parameter group")
    target: Literal["td", "residual"] = Field(
        "td", description="td: J(t_{k+1}, y_{k+1}) is a fixed target (semi-gradient, martingale orthogonality); "
        "residual: differentiate sum delta^2 through both ends (the literal mean-square TD error)")
    reward_term: Literal["true", "none"] = Field(
        "true", description="true: J = beta_q h(y) + phi(t) U (h queried at every visited state, counted as "
        "value reward queries); none: J = phi(t) U before the end, h only in the terminal condition")


class QLearningConfig(Strict):
    beta_q: float | None = Field(None, ge=0, description="terminal reward weight beta_q; None: 2 / beta (the "
                                 "code's J = E r - beta KL_path); 0: pure score matching")
    theta: float = Field(1.0, gt=0, description="temperature: policy covariance theta / (2 g^2) I (score units)")
    score_source: Literal["auto", "ratio", "ref"] = Field(
        "auto", description="running-reward target: ratio estimator from the task's data, or the frozen "
        "reference score (fine-tuning). auto: ratio if the task has data")
    m: int = Field(256, ge=0, description="data points per ratio-estimator call (0: all)")
    ratio_floor: float = Field(DEFAULT_FLOOR, ge=0, description="ratio-estimator floor (see algorithms/ratio.py)")
    critic: CriticConfig = CriticConfig()


class Critic(nn.Module):
    """J(t, y, c) = beta_q h + phi(t) U(t, y, c), phi(t) = clamp((t - t_min) / (t_max - t_min), 0):
    U is a zero-initialised scalar head; ``h`` holds the reward at y (zeros where it is not used)."""

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
        self.estimator = None
        if source == "ratio":
            self.ratio_gen = torch.Generator().manual_seed(cfg.seed + 2)
            self.estimator = RatioScoreEstimator(task.data, trainer.process, a.m or None, task.data_labels,
                                                 a.ratio_floor, self.ratio_gen)
        proc = trainer.process
        self.critic = Critic(task.sample_shape, task.num_classes, proc.t_min, proc.t_max, self.beta_q).to(trainer.device)
        # (Theta, psi) are minimised jointly: the critic is one more parameter group of the trainer's Adam
        trainer.optimizer.add_param_group({"params": list(self.critic.parameters()), "lr": a.critic.lr,
                                           "weight_decay": 0.0})

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
    def eps_hat(self, batch: RolloutBatch) -> Tensor:
        """eps_hat at every visited (t_k, y_k), k < K -> [B, K, *D]."""
        if self.source == "ref":
            return batch.eps_ref
        traj = batch.traj
        B, K = traj.batch_size, traj.num_steps
        x = traj.states[:, :K].reshape(B * K, *traj.states.shape[2:])
        t = traj.times[:K].repeat(B)
        cond = traj.cond.repeat_interleave(K, 0) if isinstance(traj.cond, Tensor) else None
        out = [self.estimator.eps(x[i:i + 4096], t[i:i + 4096], None if cond is None else cond[i:i + 4096])
               for i in range(0, B * K, 4096)]
        return torch.cat(out).reshape(traj.outputs.shape)

    def _h_along(self, batch: RolloutBatch) -> Tensor:
        """h at every state [B, K+1]: the terminal rewards at k = K; before the end h(y_k) (reward_term=true,
        counted as value reward queries) or 0."""
        traj, tr = batch.traj, self.trainer
        B, K = traj.batch_size, traj.num_steps
        h = torch.zeros(B, K + 1, dtype=batch.rewards.dtype, device=batch.rewards.device)
        h[:, K] = batch.rewards
        if self.acfg.critic.reward_term == "true" and self.beta_q > 0:
            x = traj.states[:, :K].reshape(B * K, *traj.states.shape[2:])
            cond = traj.cond.repeat_interleave(K, 0) if isinstance(traj.cond, Tensor) else None
            tr.count_queries(B * K, kind="value")
            h[:, :K] = call_reward(tr.reward, x, cond).reshape(B, K).to(h.dtype)
        return h

    # ---- per-epoch preparation: the running reward and the critic's inputs ---------------------------
    def prepare(self, batch: RolloutBatch) -> dict:
        traj = batch.traj
        B, K = traj.batch_size, traj.num_steps
        c = self.step_constants(traj.times)
        w = c["w"].to(traj.outputs.dtype)
        a, mu_old = traj.actions, traj.outputs
        e_hat = self.eps_hat(batch)
        r_dt = -w * (e_hat - a).flatten(2).pow(2).sum(-1)  # [B, K]  r_hat_k dtau_k
        h = self._h_along(batch)  # [B, K + 1]
        kk = torch.arange(K, device=a.device).repeat(B)
        flat = (B * K, *a.shape[2:])
        q_dt = self.q_dtau(a.reshape(flat), mu_old.reshape(flat), kk, c).reshape(B, K)
        y = traj.states.reshape(B * (K + 1), *traj.states.shape[2:])
        t = traj.times.to(y.dtype).repeat(B)
        cond = traj.cond.repeat_interleave(K + 1, 0) if isinstance(traj.cond, Tensor) else None
        with torch.no_grad():
            J = torch.cat([self.critic(t[i:i + 4096], y[i:i + 4096], None if cond is None else cond[i:i + 4096],
                                       h.reshape(-1)[i:i + 4096]) for i in range(0, len(t), 4096)]).reshape(B, K + 1)
        delta = J[:, 1:] - J[:, :-1] + r_dt - q_dt
        batch.extras.update(r_dt=r_dt, h=h, consts=c, delta_scale=delta.pow(2).mean(0).sqrt().clamp(min=1e-8))
        metrics = {"q/delta_sq": float(delta.pow(2).sum(1).mean()), "q/J0": float(J[:, 0].mean()),
                   "q/beta_q": self.beta_q,
                   # int g^2 ||s_hat - mu||^2 dtau along the path: the paper's running cost without the action noise
                   "q/score_cost": float((w * (e_hat - mu_old).flatten(2).pow(2).sum(-1)).sum(1).mean())}
        if self.source == "ratio":  # the estimator's own error against the task's reference (the data's score)
            metrics["q/ratio_err"] = float((w * (e_hat - batch.eps_ref).flatten(2).pow(2).sum(-1)).sum(1).mean())
        return metrics

    # ---- the joint TD loss: sum_k delta_k^2 over (Theta, psi) ----------------------------------------
    def loss(self, mb: Minibatch) -> tuple[Tensor, dict]:
        batch, traj = mb.batch, mb.batch.traj
        ex = batch.extras
        cond = mb.cond if isinstance(mb.cond, Tensor) else None
        J_k = self.critic(mb.t, mb.x, cond, ex["h"][mb.b, mb.k])
        with torch.set_grad_enabled(self.acfg.critic.target == "residual"):
            J_next = self.critic(traj.times[mb.k + 1], mb.x_next, cond, ex["h"][mb.b, mb.k + 1])
        q_dt = self.q_dtau(traj.actions[mb.b, mb.k], mb.eps, mb.k, ex["consts"])
        delta = J_next - J_k + ex["r_dt"][mb.b, mb.k] - q_dt
        loss = (delta / ex["delta_scale"][mb.k]).pow(2).mean() * traj.num_steps
        return loss, {"delta_sq_step": float(delta.detach().pow(2).mean())}

    # ---- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict:  # the critic's Adam state lives in the trainer's optimizer
        st = {"critic": self.critic.state_dict()}
        if self.estimator is not None:
            st["ratio_gen"] = self.ratio_gen.get_state()
        return st

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        if self.estimator is not None:
            self.ratio_gen.set_state(state["ratio_gen"])
