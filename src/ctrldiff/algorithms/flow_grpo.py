r"""Flow-GRPO (Liu et al. 2025) and Flow-GRPO-Fast, METHODS section 9.

Group sampling: each epoch draws batch_size / G conditions and repeats each G times (G = ``group_size``), so the
G consecutive rollouts of a group share their condition. With the rewards r_b of the whole (global) batch,
    A_b   = (r_b - mean_{group(b)} r) / (std_batch r + 1e-8),     clipped to [-adv_clip, adv_clip]
    rho   = p_theta(x_{k+1} | x_k) / p_old(x_{k+1} | x_k)       (the per-step Gaussian of the eta-family sampler)
    L     = K mean_{(b,k)} [ -min(rho A_b, clip(rho, 1 - eps, 1 + eps) A_b) + kl_coef KL_k ],
    KL_k  = || mean_theta - mean_ref ||^2 / (2 std_k^2) = B_k^2 ||eps_theta - eps_ref||^2 / (2 std_k^2)
(the mean-difference form of the per-step KL to the reference; for the eta-family sampler it equals
(1/2) c(eta) g^2 ||s_theta - s_ref||^2 dtau_k, the Girsanov KL_path increment). kl_coef defaults to the run's beta.

Log-densities are summed over the data dimensions here (Flow-GRPO's code averages them, hence its clip 1e-4):
see docs/BASELINES.md for the mapping of the clip range.

Fast variant (``window = w``): each epoch one random window of w consecutive steps (the same for every rollout and
every process, from the shared generator; within ``window_range``, by default the first half of the steps) runs the
SDE with the sampler's eta, every other step is an ODE step (eta = 0); only the window's (sample, step) pairs are
trained on.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..config import Strict
from ..errors import CtrlDiffError
from ..noise import RectifiedFlow
from .base import Algorithm, Minibatch, RolloutBatch, ppo_clip_loss, register_algorithm


class FlowGRPOConfig(Strict):
    group_size: int = Field(8, ge=2, description="G: rollouts per condition (batch_size must be a multiple of G)")
    clip: float = Field(0.1, gt=0, description="PPO clip range on the ratio of summed per-step log-densities "
                        "(Flow-GRPO's 1e-4 is on per-dimension-averaged ones: docs/BASELINES.md)")
    adv_clip: float = Field(5.0, gt=0, description="advantages are clipped to [-adv_clip, adv_clip]")
    kl_coef: float | None = Field(None, ge=0, description="beta_fg, the weight of the per-step KL to the reference "
                                  "(None: the run's beta)")
    window: int | None = Field(None, ge=1, description="Flow-GRPO-Fast: SDE steps in one random window per epoch, "
                               "ODE steps elsewhere, training on the window only (None: SDE at every step)")
    window_range: tuple[int, int] | None = Field(None, description="[lo, hi): the window lies within steps lo .. hi - 1 "
                                                 "(None: the first half of the steps, [0, ceil(K / 2)), as Flow-GRPO-"
                                                 "Fast's sde_window_range: noise where the sample is still undecided; "
                                                 "from step 1 on rectified flow, whose first step from t ~ 1 is "
                                                 "singular for eta > 0)")


def group_advantages(rewards: Tensor, group_size: int, adv_clip: float | None = None) -> Tensor:
    """(r - mean of its group) / (std of the batch + 1e-8) for rewards [B] in groups of ``group_size`` consecutive
    entries -> [B], clipped to [-adv_clip, adv_clip]."""
    if rewards.numel() % group_size:
        raise CtrlDiffError(f"flow-grpo: {rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    adv = ((groups - groups.mean(1, keepdim=True)) / (rewards.std() + 1e-8)).reshape(-1)
    return adv if adv_clip is None else adv.clamp(-adv_clip, adv_clip)


@register_algorithm("flow-grpo")
class FlowGRPO(Algorithm):
    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        self.acfg: FlowGRPOConfig = cfg.flow_grpo
        self._window: tuple[int, int] | None = None  # (epoch, first step) of the current window

    # ---- rollouts --------------------------------------------------------------------------------------
    def sample_conditions(self, n: int, generator: torch.Generator):
        G = self.acfg.group_size
        cond = self.trainer.task.sample_conditions(n // G, generator)
        return None if cond is None else cond.repeat_interleave(G, 0)

    def window_bounds(self, K: int) -> tuple[int, int]:
        # rectified flow: the first step from t_max ~ 1 has g^2 ~ 2 / (1 - t_max) and is no place for SDE noise
        first = 1 if isinstance(self.trainer.process, RectifiedFlow) and K > 1 else 0
        lo, hi = self.acfg.window_range or (first, max(-(-K // 2), first + self.acfg.window))
        if not 0 <= lo < hi <= K or hi - lo < self.acfg.window:
            raise CtrlDiffError(f"flow_grpo.window_range [{lo}, {hi}) must lie in [0, {K}] (the steps) and hold the "
                                f"window of {self.acfg.window} steps")
        return lo, hi

    def window_start(self) -> int:
        """First step of this epoch's SDE window (drawn once per epoch from the shared generator)."""
        tr = self.trainer
        if self._window is None or self._window[0] != tr.epoch:
            lo, hi = self.window_bounds(tr.cfg.sampler.steps)
            start = int(torch.randint(lo, hi - self.acfg.window + 1, (1,), generator=tr.cpu_gen))
            self._window = (tr.epoch, start)
        return self._window[1]

    def rollout_kwargs(self) -> dict:
        kw = super().rollout_kwargs()
        if self.acfg.window is not None:
            K, s = self.trainer.cfg.sampler.steps, self.window_start()
            eta = torch.zeros(K, dtype=torch.float64)
            eta[s:s + self.acfg.window] = self.trainer.cfg.sampler.eta
            kw["eta"] = eta
        return kw

    def train_pairs(self, batch: RolloutBatch) -> Tensor | None:
        if self.acfg.window is None:
            return None
        traj = batch.traj
        B, K = traj.batch_size, traj.num_steps
        steps = torch.nonzero(traj.std > 0).flatten().to(traj.states.device)
        return (torch.arange(B, device=steps.device)[:, None] * K + steps[None]).flatten()

    # ---- update ----------------------------------------------------------------------------------------
    def prepare(self, batch: RolloutBatch) -> dict:
        dist = self.trainer.dist
        r_all = dist.all_gather_cat(batch.rewards)
        if r_all.numel() != self.trainer.cfg.batch_size:
            raise CtrlDiffError("flow-grpo: the epoch's batch is incomplete (reward_errors=skip dropped rollouts) and "
                                "its groups no longer line up; use reward_errors=raise")
        adv = group_advantages(r_all, self.acfg.group_size, self.acfg.adv_clip)
        n = batch.rewards.numel()
        batch.advantages = adv[dist.rank * n:(dist.rank + 1) * n].to(batch.rewards.device)
        return {"grpo/group_std": float(r_all.reshape(-1, self.acfg.group_size).std(1).mean())}

    def loss(self, mb: Minibatch) -> tuple[Tensor, dict]:
        traj = mb.batch.traj
        K = traj.num_steps
        adv = mb.batch.advantages[mb.b]
        ratio = torch.exp(mb.log_prob - mb.log_prob_old)
        pg = ppo_clip_loss(ratio, adv, self.acfg.clip) * K
        b, std = traj.coef_b[mb.k], traj.std[mb.k]
        kl_step = (b * b / (2 * std * std)) * (mb.eps - mb.eps_ref).flatten(1).pow(2).sum(1)  # mean-difference form
        kl_coef = self.cfg.beta if self.acfg.kl_coef is None else self.acfg.kl_coef
        kl = kl_step.mean() * K
        clipfrac = ((ratio.detach() - 1).abs() > self.acfg.clip).float().mean()
        return pg + kl_coef * kl, {"pg_loss": float(pg.detach()), "kl_step": float(kl.detach()),
                                   "ratio_mean": float(ratio.detach().mean()), "clipfrac": float(clipfrac)}
