r"""DPOK (Fan et al. 2023): online policy gradient with a KL regulariser to the pretrained model.

    A_b = r_b - mean_c(b)                                       (reward minus per-condition baseline)
    L   = -mean_k min(rho A, clip(rho) A) + beta * sum_k (1/2) g^2 ||s_theta - s_ref||^2 dtau_k
The regulariser is the per-step Gaussian KL, i.e. DPOK's weighted ||eps_theta - eps_pre||^2 bound in
Girsanov units, evaluated at the visited states (so it sums to KL_path).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..config import Strict
from .base import Minibatch, RolloutBatch, TerminalRewardAlgorithm, ppo_clip_loss, register_algorithm


class DPOKConfig(Strict):
    clip: float = Field(0.1, gt=0, description="ratio clip range")
    normalize_advantages: bool = Field(False, description="divide advantages by the per-condition std")
    stat_buffer: int = Field(64, ge=1)
    stat_min_count: int = Field(16, ge=1)


@register_algorithm("dpok")
class DPOK(TerminalRewardAlgorithm):
    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer, cfg.dpok)

    def prepare(self, batch: RolloutBatch) -> dict:
        batch.advantages = self.stats.advantages(batch.rewards, batch.traj.cond, self.acfg.normalize_advantages)
        return {}

    def loss(self, mb: Minibatch):
        K = mb.batch.traj.num_steps
        ratio = torch.exp(mb.log_prob - mb.log_prob_old)
        pg = ppo_clip_loss(ratio, mb.batch.advantages[mb.b], self.acfg.clip) * K
        kl = self.step_kl_rate(mb, mb.eps).mean() * K
        return pg + self.cfg.beta * kl, {"pg_loss": float(pg.detach()), "kl_step": float(kl.detach())}
