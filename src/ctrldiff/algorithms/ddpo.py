r"""DDPO (Black et al. 2023): the denoising chain as a discrete-time MDP with a terminal reward.

    A_b        = (r_b - mean_c(b)) / std_c(b)           per-condition standardised reward, every step
    rho_{b,k}  = p_theta(x_{k+1} | x_k) / p_old(x_{k+1} | x_k)
    L_PPO      = -mean min(rho A, clip(rho, 1 - eps, 1 + eps) A)         (ddpo)
    L_SF       = -mean_b A_b sum_k log p_theta(x_{k+1} | x_k)           (ddpo-sf, plain REINFORCE: one gradient
                                                                         step per batch, at theta = theta_old)
No KL term: DDPO does not regularise (KL_path is still logged, so J can be compared).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..config import Strict
from .base import Minibatch, RolloutBatch, TerminalRewardAlgorithm, ppo_clip_loss, register_algorithm


class DDPOConfig(Strict):
    clip: float = Field(0.1, gt=0, description="PPO clip range epsilon")
    adv_clip: float = Field(5.0, gt=0, description="advantages are clipped to [-adv_clip, adv_clip]")
    stat_buffer: int = Field(64, ge=1, description="per-condition reward buffer size")
    stat_min_count: int = Field(16, ge=1, description="rewards needed before per-condition stats are used")


@register_algorithm("ddpo")
class DDPO(TerminalRewardAlgorithm):
    needs_reference = False  # no KL term: the reference is only evaluated to log KL_path
    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer, cfg.ddpo)

    def prepare(self, batch: RolloutBatch) -> dict:
        adv = self.stats.advantages(batch.rewards, batch.traj.cond, normalize=True)
        batch.advantages = adv.clamp(-self.acfg.adv_clip, self.acfg.adv_clip)
        return {}

    def loss(self, mb: Minibatch):
        adv = mb.batch.advantages[mb.b]
        ratio = torch.exp(mb.log_prob - mb.log_prob_old)
        loss = ppo_clip_loss(ratio, adv, self.acfg.clip) * mb.batch.traj.num_steps
        clipfrac = ((ratio.detach() - 1).abs() > self.acfg.clip).float().mean()
        return loss, {"ratio_mean": float(ratio.detach().mean()), "clipfrac": float(clipfrac)}


@register_algorithm("ddpo-sf")
class DDPOScoreFunction(DDPO):
    """Plain REINFORCE (DDPO_SF): exactly one gradient step per batch of rollouts, over all its B x K pairs (in
    passes of optim.minibatch / optim.microbatch pairs whose gradients are accumulated). Only at theta = theta_old is
    grad log p_theta an unbiased score-function estimate: a second step on the same samples would need the
    importance weight that PPO (``ddpo``) has."""

    def inner_epochs(self) -> int:
        return 1

    def minibatch_size(self, n_pairs: int) -> int:
        return n_pairs

    def loss(self, mb: Minibatch):
        adv = mb.batch.advantages[mb.b]
        return -(adv * mb.log_prob).mean() * mb.batch.traj.num_steps, {}
