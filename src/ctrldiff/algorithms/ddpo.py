r"""DDPO (Black et al. 2023): the denoising chain as a discrete-time MDP with a terminal reward.

    A_b        = (r_b - mean_c(b)) / std_c(b)           per-condition standardised reward, every step
    rho_{b,k}  = p_theta(x_{k+1} | x_k) / p_old(x_{k+1} | x_k)
    L_PPO      = -mean min(rho A, clip(rho, 1 - eps, 1 + eps) A)         (ddpo)
    L_SF       = -mean_b A_b sum_k log p_theta(x_{k+1} | x_k)           (ddpo-sf, plain REINFORCE: one gradient
                                                                         step per batch, at theta = theta_old)
No KL term: DDPO does not regularise (KL_path is still logged, so J can be compared).

log p is the Gaussian transition's log-density summed over the D dimensions of x (``logprob_reduction: sum``,
the default: rho is the true likelihood ratio, and each pair's loss is scaled by K so a sample's loss sums its
steps). ddpo-pytorch averages over the dimensions instead, rho_mean = exp(log rho_sum / D), and averages the loss
over the (sample, step) pairs; its clip range 1e-4 on rho_mean is |log rho_sum| <~ 1e-4 D (1.6 for SD's
4 x 64 x 64 latents). ``logprob_reduction: mean`` computes exactly that loss (docs/BASELINES.md: "Reproducing
DDPO"), with clip 1e-4 as in the original.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..config import Strict
from .base import Minibatch, RolloutBatch, TerminalRewardAlgorithm, ppo_clip_loss, register_algorithm


class DDPOConfig(Strict):
    clip: float = Field(0.1, gt=0, description="PPO clip range epsilon")
    adv_clip: float = Field(5.0, gt=0, description="advantages are clipped to [-adv_clip, adv_clip]")
    stat_buffer: int = Field(64, ge=1, description="per-condition reward buffer size")
    stat_min_count: int = Field(16, ge=1, description="rewards needed before per-condition stats are used")
    logprob_reduction: Literal["sum", "mean"] = Field(
        "sum", description="log p of a transition: summed over the dimensions (the true likelihood ratio; loss "
        "summed over a sample's steps) or averaged over them with the loss averaged over the (sample, step) pairs, "
        "as ddpo-pytorch (use with clip=1e-4 to reproduce it)")


@register_algorithm("ddpo")
class DDPO(TerminalRewardAlgorithm):
    needs_reference = False  # no KL term: the reference is only evaluated to log KL_path
    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer, cfg.ddpo)

    def prepare(self, batch: RolloutBatch) -> dict:
        adv = self.stats.advantages(batch.rewards, batch.traj.cond, normalize=True)
        batch.advantages = adv.clamp(-self.acfg.adv_clip, self.acfg.adv_clip)
        return {}

    def reduce(self, mb: Minibatch, log_density: Tensor) -> tuple[Tensor, int]:
        """A per-pair log-density (summed over dimensions) -> (as configured, the per-pair loss scale): (itself, K)
        for ``sum``, (itself / D, 1) for ``mean`` (ddpo-pytorch)."""
        if self.acfg.logprob_reduction == "mean":
            return log_density / mb.x[0].numel(), 1
        return log_density, mb.batch.traj.num_steps

    def loss(self, mb: Minibatch):
        adv = mb.batch.advantages[mb.b]
        log_ratio, scale = self.reduce(mb, mb.log_prob - mb.log_prob_old)
        ratio = torch.exp(log_ratio)
        loss = ppo_clip_loss(ratio, adv, self.acfg.clip) * scale
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
        log_prob, scale = self.reduce(mb, mb.log_prob)
        return -(adv * log_prob).mean() * scale, {}
