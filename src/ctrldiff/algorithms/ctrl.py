r"""Score as Action (CTRL): continuous-time policy optimisation with the score as the action
(METHODS section 1). The policy is Gaussian over the score, its drift g^2 a; KL_path by Girsanov.

Critic (fitted every epoch on the fresh rollouts, Monte Carlo):
    G_{b,k} = r_b - beta * sum_{j >= k} (1/2) g_j^2 ||s_old - s_ref||^2 dtau_j        (return-to-go)
    V(t, x, c) = w(t) R(x0_hat) + (1 - w(t)) U_phi(t, x, x0_hat, c),   min (V(t_k, x_k) - G_{b,k})^2
Estimator (a), likelihood ratio with continuous-time TD advantages:
    A_k   = V(t_{k+1}, x_{k+1}) - V(t_k, x_k) - beta (1/2) g^2 ||s_old - s_ref||^2 dtau_k,  V(t_K) := r
    A_k  <- centred (or standardised) per step k across the batch; rho_k = exp(Girsanov log-ratio theta/old)
    L_a   = -mean_k min(rho_k A_k, clip(rho_k, 1 - eps, 1 + eps) A_k) + beta sum_k (1/2) g^2 ||s_theta - s_ref||^2 dtau
The last term is the running KL cost's explicit dependence on theta: the score enters the drift, not a
sampled action, so that part of grad J is pathwise, not a likelihood ratio (without it, (a) ignores beta).
Estimator (b), advantage rate q = g^2 grad_x V . (a - s_old):
    L_b   = sum_k dtau_k g_k^2 [ -grad_x V(t_k, x_k) . s_theta + (beta/2) ||s_theta - s_ref||^2 ]
          = sum_k dtau_k g_k^2 (beta/2) ||s_theta - (s_ref + grad_x V / beta)||^2 + const
(its pointwise minimiser s_ref + grad V / beta is the optimal control of the KL-regularised problem when
V is the soft value: one policy-iteration step). With noisy critics that full step can overshoot, so a
proximal term (rho beta / 2) g^2 ||s_theta - s_old||^2 dtau is added (rho = ctrl.proximal): the minimiser
becomes (s_ref + grad V / beta + rho s_old) / (1 + rho), a damped step towards the same fixed point; and a
trust region caps the per-step KL between that target and s_old (ctrl.trust_region), so one badly fitted
grad V cannot throw the policy far (the fixed point is unchanged: at convergence the step is zero).
Keeping an update (estimator (a), ctrl.held_out): the epoch's update is fitted on three quarters of the batch; the
other quarter estimates its gain in J (likelihood ratios times Monte Carlo advantages, less beta times the exact change
of the step KL to the reference) and the step is kept at the length that maximises that estimate (less accept_z
standard errors, 0 by default), or undone (:meth:`ctrldiff.algorithms.base.Algorithm.accept_update`).
That length may reach past the optimiser's own step, along it, up to the trust region's edge
(ctrl.fill_trust_region): the step's size is chosen in nats, not by the learning rate. The edge itself widens, up
to ctrl.trust_region_growth times max_update_kl, while the held-out gain asks for longer steps, and narrows back when
it does not.
Two critics (ctrl.value.select): V as above and V = U_phi alone; an epoch's advantages come from the free one only
when it predicts that batch's returns better (neither was fitted on it) by value.select_z standard errors. R(x0_hat)
is a biased prior where the reward is curved across the modes of p_t (E r(x0) != r(E x0)).
The end of a run (ctrl.certify_z): the fine-tuned weights are kept only if their J is above the start's by certify_z
standard errors, paired on fixed noises that nothing else uses, with the training solver and with certify_refine times
its steps; otherwise the run ends with the start's weights
(:meth:`ctrldiff.algorithms.base.Algorithm.certify`).
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..config import Strict
from ..errors import CtrlDiffError
from ..rewards.base import call_reward
from ..solvers import model_eps
from .base import Algorithm, Minibatch, RolloutBatch, copy_into, mean_and_se, ppo_clip_loss, register_algorithm
from .value import RewardSurrogate, StructuredValue, value_weight


class ValueConfig(Strict):
    reward_term: Literal["auto", "true", "surrogate", "none"] = Field(
        "auto", description="R in V = w R(x0_hat) + (1-w) U: the true reward (each call counts as reward "
        "queries), a learned surrogate fitted on terminal rewards, or none. auto: true if the reward is "
        "differentiable, else surrogate")
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(3, ge=0, description="passes over the epoch's (sample, step) pairs to fit U_phi")
    minibatch: int = Field(1024, ge=1)
    surrogate_steps: int = Field(20, ge=0, description="surrogate regression steps per epoch (it keeps learning across "
                                 "epochs from its replay buffer; each step sees value.minibatch pairs)")
    replay_size: int = Field(8192, ge=1, description="terminal (x, r) pairs kept for the surrogate")
    u_sees_x0: bool = Field(True, description="feed the Tweedie prediction x0_hat to U_phi as an input")
    select: bool = Field(True, description="estimator (a), with an R term: also fit a critic V = U_phi without it, and "
                         "score each batch's advantages with whichever of the two predicts that batch's returns "
                         "better (neither has been fitted on it). R(x0_hat) is a good prior where the reward of the "
                         "Tweedie prediction tracks the expected reward (images), and a biased one where it does not "
                         "(a reward curved across the modes of p_t: E r(x0) != r(E x0)); the batch decides")
    select_z: float = Field(2.0, ge=0, description="value.select: the critic without the R term is chosen only when "
                            "its squared error on the batch's returns is lower by this many standard errors (paired "
                            "per trajectory); otherwise the R-term critic, the prior, is kept")
    tweedie_jacobian: bool = Field(True, description="differentiate x0_hat(x) through the model for grad_x V")


class CTRLConfig(Strict):
    estimator: Literal["a", "b"] = Field("a", description="a: PPO-style likelihood ratio; b: advantage rate. On "
                                         "a rare 0/1 black-box reward b gains where a stays at its start, but on a "
                                         "black box scaled by 10 it overshoots (docs/CTRL.md section 17)")
    clip: float = Field(0.1, gt=0, description="ratio clip range for estimator (a)")
    gae_lambda: float = Field(0.9, ge=0, le=1, description="estimator (a): A_k = sum_j lambda^(j-k) delta_j over the "
                              "TD increments delta_j; 0 = the one-step TD advantage, 1 = Monte Carlo return minus V "
                              "(unbiased whatever the critic). Measured with 1 (docs/CTRL.md sections 13 and 15): worse "
                              "on 15-epoch runs at x10 rewards (the critic's R(x0_hat) term carries the early steps' "
                              "advantages at lambda < 1), and below 0.9 on the main job run on one machine (J 18.33 "
                              "against 18.65 at em:20)")
    gae_lambda_candidates: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=list, description="estimator (a), with held_out: further values of lambda. Each epoch (once "
        "the critic is fitted) one update is fitted with gae_lambda and one with each of these, all from the same "
        "start (weights, optimiser state, trust region), and the one whose held-out gain in J is largest where its "
        "step ended is kept: lambda chosen by the data, per epoch. Costs one policy update per value. Empty: "
        "gae_lambda alone. Measured with [1.0] (docs/CTRL.md sections 14 and 15): on the main job 0.5-0.6 J below "
        "the default at em:20 on 2 seeds, for 1.5x the wall-clock")
    max_update_kl: float = Field(0.05, ge=0, description="estimator (a): trust region in nats. After an epoch's policy "
                                 "steps the Girsanov KL_path between the updated and the sampling policy (per "
                                 "trajectory, closed form from the scores at 512 of the batch's states) is measured; "
                                 "past the limit the update is scaled back to it, so its size does not depend on the "
                                 "reward's scale or the learning rate. 0 = no limit")
    signal_scaled: bool = Field(False, description="estimator (a): scale max_update_kl by the batch's signal "
                                "fraction rho in [0, 1] (how well the loss gradients of eight disjoint parts of the "
                                "batch agree, with Monte Carlo advantages, at a lower confidence bound): an update "
                                "moves the policy by at most rho * max_update_kl nats, and not at all when the parts "
                                "do not agree on a direction. Off by default: measured, it keeps near-saturated "
                                "rewards at the start but cuts the gains of rewards with headroom ~10x (docs/CTRL.md)")
    held_out: float = Field(0.25, ge=0, lt=1, description="estimator (a): share of each batch's trajectories kept "
                            "out of the policy update to test it: on them the gain in J of the step scaled by s "
                            "(likelihood ratios times Monte Carlo advantages, less beta times the closed-form change "
                            "in KL to the reference) is estimated as s L - s^2 Q, and the step is kept at the length "
                            "that maximises its lower confidence bound, undone unless L is accept_z standard errors "
                            "above 0. 0 = no test (every update is kept). 0.25 since December 5 (0.5 before): "
                            "the update is fitted on 3/4 of the batch (docs/CTRL.md section 12)")
    accept_z: float = Field(0.0, ge=0, description="estimator (a): standard errors of the held-out gain estimate "
                            "by which it must be above 0 for an update to be kept (see held_out). 0: the step is kept "
                            "at the length that maximises the estimated gain, undone where that is not above 0; the "
                            "guarantee against ending below the start is certify_z's, at the end of the run. A "
                            "margin here shortens every step by z standard errors of a noisy estimate (z = 1 cost the "
                            "main job 1.5-2.6 J at em:20, docs/CTRL.md section 10)")
    accept_shrink: bool = Field(False, description="estimator (a), with held_out: shrink the held-out gain's "
                                "first-order term L to L (1 - se^2 / L^2)_+ before choosing the step's length "
                                "(positive-part James-Stein: a step whose evidence is at noise level moves the "
                                "policy little, a well-supported one keeps its length; the trust region's widening "
                                "still reads L unshrunk). Measured on the main job: less KL and less reward, J 16.71 "
                                "against 17.58 at em:20 (docs/CTRL.md section 13)")
    lengthen_z: float = Field(0.0, ge=0, description="estimator (a), with held_out and fill_trust_region: the part "
                              "of a step beyond the optimiser's own length (s > 1) must be supported by the held-out "
                              "gain's lower confidence bound at this many more standard errors: s = min((L - (accept_z "
                              "+ lengthen_z) se) / (2 Q), the edge), never below 1 where the plain estimate asks for "
                              "more. A step is then lengthened by its evidence, not by its noise; shortening and "
                              "undoing are unchanged. 0: lengthened to the plain estimate's optimum. Measured at 1 "
                              "on the main job (4 seeds): -0.11 ± 0.45 J at em:20, no change (docs/CTRL.md section 23)")
    shorten_z: float = Field(0.0, ge=0, description="with held_out: a step is kept shorter than the optimiser's own "
                             "(shortened to s < 1, or undone) only where the held-out estimate says that is better "
                             "than the whole step by this many standard errors: gain(s) - gain(1) = (1 - s) ((1 + s) Q "
                             "- L), its standard error (1 - s) se. Otherwise the optimiser's step is kept as the trust "
                             "region left it. 0: shortened or undone wherever the estimate prefers it. Lengthening is "
                             "unchanged. Measured, not adopted (docs/CTRL.md section 25)")
    accept_pool: int = Field(0, ge=0, description="with held_out (estimator (a), or (b) with b_step_control): "
                             "choose each step's length from its held-out gain shrunk towards the last this-many "
                             "epochs' (empirical Bayes: the prior's mean and spread are those epochs' estimates per "
                             "unit of root KL cost, before any selection), not from its own noisy estimate alone, "
                             "whose maximiser is a winner's curse wherever one epoch's signal-to-noise ratio is under "
                             "1. 0 = each epoch's own estimate. Measured at 8 on the main job (6 seeds): +0.56 ± 0.34 "
                             "J at em:20 for 10 more nats of KL_path, and heun:25 more than 5% below em:20 on 2 "
                             "seeds (docs/CTRL.md section 23)")
    epoch_momentum: float = Field(0.0, ge=0, lt=1, description="with the step control (estimator (a), or (b) with "
                                  "b_step_control): each epoch steps along an exponential average, with this decay, "
                                  "of the epochs' raw updates instead of its own update alone; the trust region and "
                                  "the held-out test size that step as any other. Where one epoch's direction is "
                                  "mostly noise (a sparse, rare-event reward) the average keeps what persists across "
                                  "epochs. 0 = each epoch's own update. Measured at 0.9, not adopted: hollow's "
                                  "trained weights gain but are not certified, left-heavy x10 loses on every seed "
                                  "(docs/CTRL.md section 18)")
    refit_all: bool = Field(False, description="with the step control (estimator (a), or (b) with b_step_control): "
                            "once the held-out test has chosen the epoch's step (its length in nats, or undone), the "
                            "update is fitted again from the same start on every trajectory of the batch, the "
                            "held-out ones included, and moved to the KL of the tested step: the direction from all "
                            "the data, the length from the held-out test (cross-validation's refit). An undone epoch "
                            "stays undone. Costs a second policy update per kept epoch. Measured, not adopted: less KL for "
                            "less reward on left-heavy x10 (J unchanged), +0.03 on the 2-D mode switch (docs/CTRL.md "
                            "section 19); on the main job +0.28 ± 0.21 J at em:20 on 6 seeds, at 1.3x the wall-clock "
                            "(section 23)")
    certify_z: float = Field(2.0, ge=0, description="the run ends with the fine-tuned weights only if their J is above "
                             "the start's by this many standard errors, paired on certify_samples fixed noises that no "
                             "rollout, update or evaluation uses (sampled with the start at the first epoch and with "
                             "the fine-tune after the last); otherwise it ends with the start's weights (the trained "
                             "ones stay in the checkpoint's algorithm state, and training further goes on from them). "
                             "Costs 2 x certify_samples reward queries and keeps a CPU copy of the start's trainable "
                             "weights (LoRA: small; a full fine-tune: one more copy of the model, in memory and in each "
                             "checkpoint). 0 = no test")
    certify_samples: int = Field(64, ge=2, description="size of the certification noise set (see certify_z)")
    certify_refine: int = Field(5, ge=1, description="certify_z tests the gain twice, each at certify_z standard "
                                "errors: with the training solver and with the same solver at this many times its "
                                "steps (the continuous-time J, which a fine-tune must not lose at finer solvers: a "
                                "gain at the training grid alone can be a fit of that grid's error). Costs "
                                "certify_samples more reward queries at each end. 1 = the training solver only")
    fill_trust_region: bool = Field(True, description="estimator (a), with held_out: a step that stopped short "
                                    "of max_update_kl may be lengthened along itself up to it, as far as the held-out "
                                    "gain's lower confidence bound supports (the step's length is chosen in nats by "
                                    "the held-out trajectories, not by the learning rate). False: never longer than "
                                    "the optimiser's own step")
    trust_region_growth: float = Field(16.0, ge=1, description="estimator (a), with held_out and fill_trust_region: "
                                       "the trust region may widen up to this many times max_update_kl. It doubles "
                                       "after an epoch whose held-out gain, at a lower confidence bound one standard "
                                       "error below the acceptance test's, wanted a longer step than its edge, and "
                                       "halves (not below max_update_kl) after one that kept under half of it. "
                                       "1 = a fixed trust region")
    trust_region_start: float = Field(1.0, ge=1, description="estimator (a), with trust_region_growth: the trust "
                                      "region's size at the first epoch, in multiples of max_update_kl (at most "
                                      "trust_region_growth); it narrows from there as the held-out test asks")
    trust_region_narrow: Literal["kept", "evidence"] = Field(
        "kept", description="estimator (a), with trust_region_growth: when the trust region halves. kept: after an "
        "epoch that kept under half of its edge; evidence: only after one whose held-out gain, one standard error "
        "above its estimate, still wanted under half of it (the mirror of the widening test, which reads one "
        "standard error below: noise alone moves the edge neither way)")
    kl_metric_power: float = Field(0.0, ge=0, le=1, description="estimator (a): weight each step's term of the "
                                   "policy loss by (w_mean / w_k)^p, w_k the step's KL_path quadrature weight: p = 1 "
                                   "is the natural gradient in the Girsanov metric (whose block for step k is w_k I "
                                   "in eps), a step whose change costs more nats (the data end) changes less per unit "
                                   "of its gradient; 0 = the plain gradient")
    advantage_norm: Literal["center", "std"] = Field(
        "center", description="estimator (a): per-step centring of A_k (keeps the reward/KL balance of J), "
        "or per-step standardisation (scale-free, but then the KL term's weight relative to A is arbitrary)")
    proximal: float = Field(1.0, ge=0, description="estimator (b): weight rho of the proximal term "
                            "(rho beta / 2) ||s_theta - s_old||^2; 0 = the full policy-iteration step")
    trust_region: float = Field(0.05, ge=0, description="estimator (b): cap on the KL (nats) between the update "
                                "target and the sampling policy at each visited (t_k, x_k); larger targets are "
                                "shrunk towards s_old. 0 = no cap")
    b_step_control: bool = Field(False, description="estimator (b): hold each epoch's update to the trust region in "
                                 "nats (max_update_kl, trust_region_growth, fill_trust_region) and keep it only as far "
                                 "as the held-out trajectories support (held_out, accept_z), as for (a). Off: (b)'s "
                                 "per-state cap (trust_region) alone, and every update is kept")
    value: ValueConfig = ValueConfig()


@register_algorithm("ctrl")
class CTRL(Algorithm):
    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        self.acfg: CTRLConfig = cfg.ctrl
        self.needs_log_prob = self.acfg.estimator == "a"
        if self.acfg.estimator == "b" and cfg.beta <= 0:
            raise CtrlDiffError("ctrl.estimator=b needs beta > 0 (its update regresses onto s_ref + grad V / beta)")
        vcfg = self.acfg.value
        term = vcfg.reward_term
        if term == "auto":
            term = "true" if trainer.reward.differentiable else "surrogate"
        if term == "true" and self.acfg.estimator == "b" and not trainer.reward.differentiable:
            raise CtrlDiffError(f"ctrl.value.reward_term=true with estimator b needs a differentiable reward; "
                                f"{trainer.reward.name!r} is not (use surrogate or none)")
        self.reward_term = term
        shape, ncls = trainer.task.sample_shape, trainer.task.num_classes
        dev = trainer.device
        self.value = StructuredValue(shape, ncls, use_tweedie_reward=term != "none", u_sees_x0=vcfg.u_sees_x0).to(dev)
        self.value_opt = trainer.make_optimizer(self.value.parameters(), lr=vcfg.lr)
        self.value_free = self.value_free_opt = None  # value.select: the critic without the R term
        if vcfg.select and term != "none" and self.acfg.estimator == "a":
            self.value_free = StructuredValue(shape, ncls, use_tweedie_reward=False, u_sees_x0=vcfg.u_sees_x0).to(dev)
            self.value_free_opt = trainer.make_optimizer(self.value_free.parameters(), lr=vcfg.lr)
        self.surrogate = self.surrogate_opt = None
        if term == "surrogate":
            self.surrogate = RewardSurrogate(shape, ncls).to(dev)
            self.surrogate_opt = trainer.make_optimizer(self.surrogate.parameters(), lr=vcfg.lr)
        self.replay: list[tuple[Tensor, Tensor | None, Tensor]] = []
        self.critic_fitted = False  # V has been fitted on at least one earlier batch
        self.trust_radius = min(self.acfg.trust_region_start, self.trust_region_growth())
        self.refitting = False  # ctrl.refit_all's second fit of an epoch's update, on every trajectory
        if self.acfg.refit_all and (self.acfg.held_out <= 0 or self.acfg.max_update_kl <= 0
                                    or self.acfg.epoch_momentum > 0 or self.acfg.gae_lambda_candidates
                                    or self.acfg.signal_scaled or not self._step_control()):
            raise CtrlDiffError("ctrl.refit_all needs the held-out test and the trust region (held_out > 0, "
                                "max_update_kl > 0) and works without epoch_momentum, gae_lambda_candidates and "
                                "signal_scaled")
        if self.acfg.gae_lambda_candidates and (self.acfg.estimator != "a" or self.acfg.held_out <= 0):
            raise CtrlDiffError("ctrl.gae_lambda_candidates needs estimator a with held_out > 0 (the held-out "
                                "trajectories choose between the updates)")

    # ---- the R term of V ---------------------------------------------------------------------------
    def _reward_fn(self, x: Tensor, cond: Tensor | None) -> Tensor:
        if self.reward_term == "surrogate":
            return self.surrogate(x, cond)
        self.trainer.count_queries(x.shape[0], kind="value")
        task, grad = self.trainer.task, torch.is_grad_enabled()  # latent models: R sees the decoded x0_hat
        return call_reward(self.trainer.reward, task.decode(x, grad=grad), task.reward_cond(cond), grad=grad)

    def _fit_surrogate(self, batch: RolloutBatch) -> dict:
        vcfg = self.acfg.value
        tr = self.trainer
        self.replay.append((batch.traj.final, batch.traj.cond, batch.rewards))
        keep = tr.dist.local_size(vcfg.replay_size)  # each process keeps its share of the replay
        while sum(len(r) for _, _, r in self.replay) - len(self.replay[0][2]) >= keep:
            self.replay.pop(0)
        xs = torch.cat([x for x, _, _ in self.replay])
        cs = torch.cat([c for _, c, _ in self.replay]) if self.replay[0][1] is not None else None
        rs = torch.cat([r for _, _, r in self.replay])
        loss = torch.zeros(())
        for _ in range(vcfg.surrogate_steps):
            n_mb = min(tr.dist.local_size(vcfg.minibatch), len(rs))
            i = torch.randint(0, len(rs), (n_mb,), generator=tr.cpu_gen, device="cpu").to(rs.device)
            loss = (self.surrogate(xs[i], None if cs is None else cs[i]) - rs[i]).pow(2).mean()
            self.surrogate_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.surrogate_opt.step()
        return {"value/surrogate_mse": float(loss.detach()), "value/surrogate_r_var": float(rs.var())}

    # ---- the critic ---------------------------------------------------------------------------------
    def _pairs(self, batch: RolloutBatch):
        """All (b, k) pairs, k < K, flattened: t [N], x [N, D], x0_hat [N, D], cond [N]."""
        tr, traj = self.trainer, batch.traj
        B, K = traj.batch_size, traj.num_steps
        x = traj.states[:, :K].reshape(B * K, *traj.states.shape[2:])
        t = traj.times[:K].repeat(B)
        cond = traj.cond.repeat_interleave(K, 0) if isinstance(traj.cond, Tensor) else None
        x0 = tr.process.tweedie_x0(x, t, tr.process.convert(traj.outputs.reshape(x.shape), "eps", "score", t, x))
        return t, x, x0, cond

    def _r_term(self, x0: Tensor, cond: Tensor | None) -> Tensor | None:
        """R(x0_hat) at every pair (no grad), or None when V = U_phi."""
        if not self.value.use_tweedie_reward:
            return None
        mb = self.acfg.value.minibatch
        with torch.no_grad():
            return torch.cat([self._reward_fn(x0[i:i + mb], None if cond is None else cond[i:i + mb])
                              for i in range(0, len(x0), mb)])

    def _fit_value(self, batch: RolloutBatch, t, x, x0, cond, r_term: Tensor | None, free: bool = False) -> dict:
        """Regress V (``free``: the critic without the R term, value.select) on the Monte Carlo return-to-go."""
        vcfg, tr = self.acfg.value, self.trainer
        value, opt = (self.value_free, self.value_free_opt) if free else (self.value, self.value_opt)
        B, K = batch.traj.batch_size, batch.traj.num_steps
        G = self._return_to_go(batch).reshape(B * K)
        loss = torch.zeros(())
        w = value_weight(t)
        for _ in range(vcfg.epochs):
            for i in tr.minibatches(B * K, vcfg.minibatch, x.device, drop_last=False):
                u = value.u(x[i], t[i], None if cond is None else cond[i], x0[i])
                v = u if r_term is None else w[i] * r_term[i] + (1 - w[i]) * u
                loss = (v - G[i]).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if free:
            return {"value/free_mse": float(loss.detach())}
        return {"value/mse": float(loss.detach()), "value/return_var": float(tr.dist.var(G, None))}

    def _value(self, t, x, x0, cond) -> Tensor:
        return self.value(t, x, x0, cond, self._reward_fn)

    # ---- per-epoch preparation ---------------------------------------------------------------------
    def prepare(self, batch: RolloutBatch) -> dict:
        """Advantages (a) or grad_x V (b) from the critic as it stands (fitted on earlier epochs only), then the
        critic (surrogate and U_phi) is fitted on this batch for the next epoch. A critic fitted on the very samples
        whose advantages it scores would fit each sample's own return and pull A_k towards zero, and V(t_k, x_k)
        would depend on the action taken at step k: that is a biased baseline. Before the first fit (epoch 0 of a
        run) V is not trusted and (a) uses the Monte Carlo return-to-go with a per-step batch baseline."""
        traj = batch.traj
        B, K = traj.batch_size, traj.num_steps
        t, x, x0, cond = self._pairs(batch)
        metrics: dict = {}
        self.held_out(batch)  # chosen before the advantages, so that no statistic of the update sees them
        r_term = self._r_term(x0, cond) if self.critic_fitted and self.acfg.estimator == "a" else None
        if self.acfg.estimator == "a":
            batch.advantages, metrics = self._advantages(batch, t, x, x0, cond, r_term)
        else:
            mb = self.acfg.value.minibatch
            gm = min(mb, self.trainer.cfg.optim.microbatch or mb)  # backprop through the model: its memory bound
            grads = [self._grad_value(t[i:i + gm], x[i:i + gm], None if cond is None else cond[i:i + gm],
                                      x0[i:i + gm]) for i in range(0, B * K, gm)]
            batch.extras["grad_v"] = torch.cat(grads).reshape(traj.outputs.shape)
            metrics["ctrl/grad_v_norm"] = float(batch.extras["grad_v"].flatten(2).norm(dim=-1).mean())
        # the critic learns from this batch only now, for the next epoch's advantages
        if self.surrogate is not None:
            metrics.update(self._fit_surrogate(batch))
        if r_term is None or self.surrogate is not None:  # the R term is fixed while U_phi is fitted: once
            r_term = self._r_term(x0, cond)
        metrics.update(self._fit_value(batch, t, x, x0, cond, r_term))
        if self.value_free is not None:
            metrics.update(self._fit_value(batch, t, x, x0, cond, None, free=True))
        self.critic_fitted = True
        return metrics

    def _advantages(self, batch: RolloutBatch, t, x, x0, cond, r_term: Tensor | None) -> tuple[Tensor, dict]:
        """GAE over the continuous-time TD increments (estimator (a)):
            delta_k = V(t_{k+1}, x_{k+1}) - V(t_k, x_k) - beta (1/2) g^2 ||s_old - s_ref||^2 dtau_k,   V(t_K) := r
            A_k = sum_{j >= k} lambda^(j - k) delta_j,   centred (or standardised) per step across the batch."""
        B, K = batch.traj.batch_size, batch.traj.num_steps
        metrics = {}
        if self.critic_fitted:
            v = self._critic_values(t, x, x0, cond, r_term).reshape(B, K)
            lam = self.acfg.gae_lambda
            if self.value_free is not None:  # value.select: the critic that predicts this batch's returns better
                v_free = self._critic_values(t, x, x0, cond, None, self.value_free).reshape(B, K)
                G, on = self._return_to_go(batch), self.trained(batch)  # (not the held-out share the test scores)
                gather = self.trainer.dist.all_gather_cat
                err, err_free = (gather((u - G)[on].pow(2).mean(1).double()) for u in (v, v_free))
                # the R-term critic unless the free one predicts better by select_z standard errors (paired per
                # trajectory): where the two fit alike, the choice does not flip from epoch to epoch on noise
                gain, se = mean_and_se(err - err_free)
                free = gain - self.acfg.value.select_z * se > 0
                metrics = {"ctrl/critic_r_term": float(not free), "value/held_mse": float(err.mean()),
                           "value/held_free_mse": float(err_free.mean()), "value/select_z": gain / max(se, 1e-30)}
                v = v_free if free else v
        else:  # no critic yet: the Monte Carlo return-to-go (lambda = 1 with V = 0)
            v, lam = torch.zeros_like(batch.kl_rate), 1.0
        batch.extras["values"] = v  # V before this batch's fit: the held-out test's baseline
        v_next = torch.cat([v[:, 1:], batch.rewards[:, None]], 1)  # V(t_K, x_K) := r exactly
        delta = v_next - v - self.cfg.beta * batch.kl_rate
        adv = self._gae(batch, delta, lam)
        metrics["ctrl/td_adv_std"] = float(self.trainer.dist.std(adv[self.trained(batch)], None))
        if self.critic_fitted and self.acfg.gae_lambda_candidates:  # one update per lambda, see policy_step
            batch.extras["advantage_candidates"] = [(lam, adv)] + [
                (c, self._gae(batch, delta, c)) for c in self.acfg.gae_lambda_candidates if c != lam]
        return adv, metrics

    def _gae(self, batch: RolloutBatch, delta: Tensor, lam: float) -> Tensor:
        """A_k = sum_{j >= k} lambda^(j - k) delta_j, centred (or standardised) per step over the trained-on part."""
        adv = torch.empty_like(delta)
        run = torch.zeros_like(delta[:, 0])
        for k in range(delta.shape[1] - 1, -1, -1):
            run = delta[:, k] + lam * run
            adv[:, k] = run
        dist = self.trainer.dist  # several processes: the statistics of the global batch
        train = self.trained(batch)
        adv = adv - dist.mean(adv[train], 0)
        if self.acfg.advantage_norm == "std":
            adv = adv / (dist.std(adv[train], 0) + 1e-6)
        return adv

    @torch.no_grad()
    def _critic_values(self, t, x, x0, cond, r_term: Tensor | None, value=None) -> Tensor:
        """V(t, x) at every pair with the current critic (no grad) -> [N]; ``r_term``: R(x0_hat) there, or None;
        ``value``: the critic (default: self.value)."""
        mb = self.acfg.value.minibatch
        value = self.value if value is None else value
        u = torch.cat([value.u(x[i:i + mb], t[i:i + mb], None if cond is None else cond[i:i + mb],
                                    x0[i:i + mb]) for i in range(0, len(x), mb)])
        if r_term is None:
            return u
        w = value_weight(t)
        return w * r_term + (1 - w) * u

    def _grad_value(self, t, x, cond, x0_fixed) -> Tensor:
        """grad_x V(t, x) for a chunk of pairs (through x0_hat(x) when tweedie_jacobian is on)."""
        tr = self.trainer
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            if self.acfg.value.tweedie_jacobian:
                eps = model_eps(tr.policy, tr.process, xg, t, cond)
                x0 = tr.process.tweedie_x0(xg, t, tr.process.convert(eps, "eps", "score", t, xg))
            else:
                a = tr.process.alpha(t.double()).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
                x0 = x0_fixed + (xg - x) / a  # d x0_hat / dx ~= I / alpha_t
            v = self._value(t, xg, x0, cond)
            (g,) = torch.autograd.grad(v.sum(), xg)
        return g.detach()

    # ---- the policy update -------------------------------------------------------------------------
    def policy_step(self, batch: RolloutBatch) -> dict:
        """With ctrl.gae_lambda_candidates: one update per lambda, each from the same start (weights, optimiser
        state, trust region, EMA), each shortened or undone by the held-out test as usual; the one kept is the one
        whose held-out gain in J, estimated again where its step ended (exact ratios and KL change, paired on the
        same held-out trajectories, whose Monte Carlo advantages do not depend on lambda), is largest."""
        cands = batch.extras.pop("advantage_candidates", None)
        if not cands:
            return self._refit_on_all(batch) if self.refits() else super().policy_step(batch)
        held = self.held_out(batch)
        start = self._snapshot()
        best = None
        for i, (lam, adv) in enumerate(cands):
            if i:
                self._restore(start)
            batch.advantages = adv
            out = super().policy_step(batch)
            lin, quad = self.gathered_held_out_terms(batch, held)
            gain = float((lin - quad).mean())
            if best is None or gain > best[1]:
                best = (lam, gain, out, self._snapshot() if i < len(cands) - 1 else None)
        lam, gain, out, state = best
        if state is not None:  # the last candidate fitted is not the one kept
            self._restore(state)
        batch.advantages = dict(cands)[lam]
        return {**out, "ctrl/gae_lambda": lam, "ctrl/lambda_gain": gain}

    def refits(self) -> bool:
        return self.acfg.refit_all  # its preconditions (the held-out test, the trust region) are checked at start

    def _refit_on_all(self, batch: RolloutBatch) -> dict:
        """ctrl.refit_all: the epoch's step as the held-out test chose it (length in nats, or undone), then the update
        fitted again from the same start (weights, optimiser state) on all of the batch's trajectories, and moved along
        itself to the tested step's KL. The trust region's radius is the one the test left."""
        snap = self._snapshot()
        out = super().policy_step(batch)
        kept = out.get("train/update_kl_kept", 0.0) if out.get("train/accepted", 0.0) > 0 else 0.0
        if not kept > 0:  # undone (or not moved): nothing to refit
            return out
        radius, history = self.trust_radius, list(self.gain_history)
        self._restore(snap)
        self.gain_history = history
        start = snap[0]  # the epoch's start, as restored
        self.refitting, self.trust_radius = True, kept / self.max_update_kl()  # the limit: the tested step's KL
        try:
            refit = super().policy_step(batch)  # held_out_fraction() is 0 while refitting: every trajectory
        finally:
            self.refitting, self.trust_radius = False, radius
        kl = refit.get("train/update_kl_kept", 0.0)
        if 0 < kl < kept:  # shorter than the tested step: lengthened along itself to its KL (quadratic along it)
            self.rescale_update(start, math.sqrt(kept / kl))
            kl = self.enforce_trust_region(batch, start, limit=kept)["train/update_kl_kept"]
        return {**out, "train/refit_update_kl": refit.get("train/update_kl", 0.0), "train/refit_kl_kept": kl}

    def _snapshot(self) -> tuple:
        tr = self.trainer
        return ([p.detach().clone() for p in tr.trainable_parameters], copy.deepcopy(tr.optimizer.state_dict()),
                self.trust_radius, None if tr.ema is None else [e.clone() for e in tr.ema], list(self.gain_history),
                None if self.momentum is None else [m.clone() for m in self.momentum])

    def _restore(self, state: tuple) -> None:
        tr = self.trainer
        params, opt, radius, ema, history, momentum = state
        self.gain_history = list(history)
        self.momentum = None if momentum is None else [m.clone() for m in momentum]
        copy_into(tr.trainable_parameters, params)
        tr.optimizer.load_state_dict(copy.deepcopy(opt))
        self.trust_radius = radius
        if ema is not None:
            copy_into(tr.ema, ema)

    def loss(self, mb: Minibatch):
        K = mb.batch.traj.num_steps
        if self.acfg.estimator == "a":
            ratio = torch.exp(mb.log_prob - mb.log_prob_old)
            adv = mb.batch.advantages[mb.b, mb.k]
            cw = None  # ctrl.kl_metric_power: each step's terms weighted by (w_mean / w_k)^p
            if self.acfg.kl_metric_power > 0:
                cw = self._metric_weights(mb.batch)[mb.k].to(adv.dtype)
                adv = adv * cw
            pg = ppo_clip_loss(ratio, adv, self.acfg.clip) * K
            kl_rate = self.step_kl_rate(mb, mb.eps)
            kl = (kl_rate if cw is None else kl_rate * cw).mean() * K  # the running cost's explicit dependence on theta
            r = ratio.detach()
            return pg + self.cfg.beta * kl, {"kl_step": float(kl.detach()), "ratio_mean": float(r.mean()),
                                             "clipfrac": float(((r - 1).abs() > self.acfg.clip).float().mean())}
        # (b): in eps units s = -eps/sigma, the target s_ref + grad V / beta is eps_ref - sigma grad V / beta
        proc = self.trainer.process
        sigma = proc.sigma(mb.t.double()).to(mb.eps.dtype).reshape(-1, *[1] * (mb.eps.ndim - 1))
        rho = self.acfg.proximal
        eps_target = mb.eps_ref - sigma * mb.batch.extras["grad_v"][mb.b, mb.k] / self.cfg.beta
        eps_target = (eps_target + rho * mb.eps_old) / (1 + rho)
        if self.acfg.trust_region > 0:  # shrink targets whose step from s_old exceeds the per-step KL cap
            step_kl = self.step_kl_rate(mb, eps_target, mb.eps_old)
            shrink = torch.sqrt(self.acfg.trust_region / step_kl.clamp_min(1e-12)).clamp(max=1.0)
            eps_target = mb.eps_old + shrink.reshape(-1, *[1] * (eps_target.ndim - 1)) * (eps_target - mb.eps_old)
        # the regression in score units, uniform in time (as Adjoint Matching's): with a velocity model's KL weights
        # its first step would ask the velocity to fit grad V's noise there scaled by 1 / (1 - t_max)
        err = self.step_kl_rate(mb, mb.eps, eps_target, prediction="eps")
        loss = (1 + rho) * self.cfg.beta * err.mean() * K
        return loss, {"kl_step": float(self.step_kl_rate(mb, mb.eps.detach()).mean() * K)}

    def _metric_weights(self, batch: RolloutBatch) -> Tensor:
        """[K] (w_mean / w_k)^p normalised to mean 1 (ctrl.kl_metric_power), from the batch's KL quadrature weights."""
        if "metric_weights" not in batch.extras:
            w = self.step_weights(batch).double()
            c = (w.mean() / w.clamp_min(1e-12 * float(w.max()))) ** self.acfg.kl_metric_power
            batch.extras["metric_weights"] = (c / c.mean()).float()
        return batch.extras["metric_weights"]

    def _step_control(self) -> bool:
        """(a)'s control of the epoch's step: the trust region in nats and the held-out test (and (b)'s with
        ctrl.b_step_control)."""
        return self.acfg.estimator == "a" or self.acfg.b_step_control

    def max_update_kl(self) -> float:
        return self.acfg.max_update_kl if self._step_control() else 0.0

    def held_out_fraction(self) -> float:
        return self.acfg.held_out if self._step_control() and not self.refitting else 0.0

    def acceptance_z(self) -> float:
        return self.acfg.accept_z

    def acceptance_shrink(self) -> bool:
        return self.acfg.accept_shrink

    def lengthening_z(self) -> float:
        return self.acfg.lengthen_z

    def shortening_z(self) -> float:
        return self.acfg.shorten_z

    def acceptance_pool(self) -> int:
        return self.acfg.accept_pool if self._step_control() else 0

    def epoch_momentum(self) -> float:
        return self.acfg.epoch_momentum if self._step_control() else 0.0

    def certify_z(self) -> float | None:
        return self.acfg.certify_z if self.acfg.certify_z > 0 else None

    def certify_samples(self) -> int:
        return self.acfg.certify_samples

    def certify_refine(self) -> int:
        return self.acfg.certify_refine

    def fills_trust_region(self) -> bool:
        return self.acfg.fill_trust_region

    def trust_region_growth(self) -> float:
        return self.acfg.trust_region_growth if self.fills_trust_region() else 1.0

    def narrows_on_evidence(self) -> bool:
        return self.acfg.trust_region_narrow == "evidence"

    def _return_to_go(self, batch: RolloutBatch) -> Tensor:
        """[B, K] the Monte Carlo return-to-go G_k = r - beta sum_{j >= k} KL_j (the critic's regression target)."""
        return batch.rewards[:, None] - self.cfg.beta * batch.kl_rate.flip(1).cumsum(1).flip(1)

    def held_out_advantages(self, batch: RolloutBatch, held: Tensor) -> Tensor:
        """Monte Carlo: the return-to-go G_k = r - beta sum_{j >= k} KL_j less the critic's V(t_k, x_k) as it stood
        before this batch (it has not seen these trajectories), less the mean of G - V over the trained-on ones."""
        G = self._return_to_go(batch)
        adv = G - batch.extras.get("values", torch.zeros_like(G))
        return adv[held] - self.trainer.dist.mean(adv[self.trained(batch)], 0)

    def signal_scaled(self) -> bool:
        return self.acfg.signal_scaled and self.acfg.estimator == "a"

    def signal_fraction(self, batch: RolloutBatch, pairs=None, n: int = 128, groups: int = 8, z: float = 1.0) -> float:
        """As :meth:`Algorithm.signal_fraction`, with the Monte Carlo advantages (return-to-go r - beta sum_{j >= k}
        KL_j, centred per step) in place of the critic's: a critic's systematic error is the same on both halves of a
        batch and would pass for signal; the Monte Carlo return is unbiased (and noisier: rho is conservative)."""
        adv = batch.advantages
        run = self._return_to_go(batch)
        batch.advantages = run - self.trainer.dist.mean(run, 0)
        try:
            return super().signal_fraction(batch, pairs, n, groups, z)
        finally:
            batch.advantages = adv

    # ---- checkpointing -----------------------------------------------------------------------------
    def state_dict(self):
        st = {**super().state_dict(), "value": self.value.state_dict(), "value_opt": self.value_opt.state_dict(),
              "replay": self.replay, "critic_fitted": self.critic_fitted}
        if self.surrogate is not None:
            st.update(surrogate=self.surrogate.state_dict(), surrogate_opt=self.surrogate_opt.state_dict())
        if self.value_free is not None:
            st.update(value_free=self.value_free.state_dict(), value_free_opt=self.value_free_opt.state_dict())
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.value.load_state_dict(state["value"])
        self.value_opt.load_state_dict(state["value_opt"])
        self.replay = state["replay"]
        self.critic_fitted = state.get("critic_fitted", True)
        if self.surrogate is not None:
            self.surrogate.load_state_dict(state["surrogate"])
            self.surrogate_opt.load_state_dict(state["surrogate_opt"])
        if self.value_free is not None and "value_free" in state:
            self.value_free.load_state_dict(state["value_free"])
            self.value_free_opt.load_state_dict(state["value_free_opt"])
