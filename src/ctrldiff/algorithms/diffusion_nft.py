r"""DiffusionNFT (Zheng et al. 2025), METHODS section 9: forward-process, likelihood-free, negative-aware fine-tuning.

Only the rollouts' clean samples x_0 (the final states) and rewards are used, so any solver (ODE included) can
produce them. Rewards become optimality weights in [0, 1] from the group advantage (flow-grpo's
:func:`~ctrldiff.algorithms.flow_grpo.group_advantages`; groups of ``group_size`` consecutive rollouts share their
condition):
    rr_b = clip(A_b / adv_clip, -1, 1) / 2 + 1/2.
Each clean sample is noised to a random time, t ~ U(t_min, t_max), x_t = alpha_t x_0 + sigma_t eps, and with the
frozen old policy v_old (an exponential moving average of the trained weights, kept by this algorithm and
checkpointed: old <- d old + (1 - d) theta after every epoch's update) and the trained v_theta
    v+ = (1 - b) v_old + b v_theta,     v- = (1 + b) v_old - b v_theta,
    L  = mean_b [ rr_b ||v+ - v_target||^2 + (1 - rr_b) ||v- - v_target||^2 ] / b   (+ kl_coef ||v_theta - v_ref||^2).
Every prediction is affine in the model's eps at (t, x_t), so the loss is computed in eps units with the target
eps and weighted per ``units``: 'eps' (weight 1), 'v' (1 / alpha_t^2: velocity units, the flow-matching loss
||v - (eps - x0)||^2 for rectified flow, alpha = 1 - t; the v-prediction loss for VP), 'x0' (sigma_t^2 / alpha_t^2,
divided by the detached per-sample mean |x0+ - x0| as DiffusionNFT's adaptive x0 weighting). 'auto' is 'v' for
the rectified-flow process and velocity-predicting models, else 'eps'.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..config import Strict
from ..errors import CtrlDiffError
from ..noise import RectifiedFlow
from ..solvers import model_eps, select_cond
from .base import Algorithm, RolloutBatch, gradient_step, register_algorithm
from .flow_grpo import group_advantages


class DiffusionNFTConfig(Strict):
    b: float = Field(1.0, gt=0, description="b in v+ = (1 - b) v_old + b v_theta, v- = (1 + b) v_old - b v_theta")
    group_size: int = Field(8, ge=2, description="rollouts per condition (batch_size must be a multiple)")
    adv_clip: float = Field(5.0, gt=0, description="advantages are clipped to +-adv_clip, then mapped to [0, 1]")
    old_decay: float = Field(0.5, ge=0, lt=1, description="d of the old policy's EMA, updated after every epoch "
                             "(0: the old policy is the current one at the start of each epoch)")
    draws: int = Field(4, ge=1, description="noise levels t drawn per clean sample per inner epoch")
    minibatch: int = Field(256, ge=1, description="(sample, t) pairs per gradient step")
    units: Literal["auto", "eps", "v", "x0"] = Field("auto", description="loss units (module docstring)")
    kl_coef: float = Field(0.0, ge=0, description="weight of ||v_theta - v_ref||^2 (same units) at the noised points")


@register_algorithm("diffusion-nft")
class DiffusionNFT(Algorithm):
    needs_log_prob = False
    needs_reference = False  # the reference is used only with kl_coef > 0 (and to log KL_path)

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        self.acfg: DiffusionNFTConfig = cfg.diffusion_nft
        self.old = [p.detach().clone() for p in trainer.trainable_parameters]
        units = self.acfg.units
        if units == "auto":
            velocity = isinstance(trainer.process, RectifiedFlow) or getattr(trainer.policy, "prediction", "") == "v"
            units = "v" if velocity else "eps"
        self.units = units

    # ---- the old policy ------------------------------------------------------------------------------
    @contextmanager
    def old_policy(self):
        """The policy with the old (EMA) weights in place of the trained ones (restored afterwards)."""
        params = self.trainer.trainable_parameters
        with torch.no_grad():
            cur = [p.detach().clone() for p in params]
            for p, o in zip(params, self.old, strict=True):
                p.copy_(o)
        try:
            yield self.trainer.policy
        finally:
            with torch.no_grad():
                for p, c in zip(params, cur, strict=True):
                    p.copy_(c)

    @torch.no_grad()
    def update_old(self) -> None:
        torch._foreach_lerp_(self.old, [p.detach() for p in self.trainer.trainable_parameters],
                             1 - self.acfg.old_decay)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "old": [o.clone() for o in self.old]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for o, v in zip(self.old, state["old"], strict=True):
            o.copy_(v)

    # ---- the loss --------------------------------------------------------------------------------------
    def unit_weight(self, t: Tensor) -> Tensor:
        """||pred - target||^2 in the chosen units = weight(t) ||eps_pred - eps||^2 ('x0': before the adaptive
        normalisation)."""
        a, s = self.trainer.process.alpha(t.double()), self.trainer.process.sigma(t.double())
        w = {"eps": torch.ones_like(a), "v": 1 / (a * a), "x0": (s * s) / (a * a)}[self.units]
        return w.to(t.dtype)

    def pair_loss(self, batch: RolloutBatch, sub: Tensor) -> tuple[Tensor, dict]:
        """The NFT loss on pairs ``sub`` (flat index b * draws + j into this epoch's noised samples)."""
        tr = self.trainer
        nb = batch.extras["nft"]
        b_idx = sub // self.acfg.draws
        x0, t, eps = batch.traj.final[b_idx], nb["t"][sub], nb["eps"][sub]
        cond = select_cond(batch.traj.cond, b_idx)
        xt, _ = tr.process.marginal(x0, t, eps)
        with torch.no_grad(), self.old_policy() as old:
            eps_old = model_eps(old, tr.process, xt, t, cond)
        eps_theta = model_eps(tr.policy, tr.process, xt, t, cond)
        bb = self.acfg.b
        pos = (1 - bb) * eps_old + bb * eps_theta
        neg = (1 + bb) * eps_old - bb * eps_theta
        w = self.unit_weight(t)
        err_pos = w * (pos - eps).flatten(1).pow(2).sum(1)
        err_neg = w * (neg - eps).flatten(1).pow(2).sum(1)
        if self.units == "x0":  # adaptive: divide by the detached mean |x0_hat - x0| of each prediction
            sa = (tr.process.sigma(t.double()) / tr.process.alpha(t.double())).to(t.dtype)
            d = x0[0].numel()
            err_pos = err_pos / (sa * (pos - eps).detach().flatten(1).abs().mean(1)).clamp(min=1e-5) / d
            err_neg = err_neg / (sa * (neg - eps).detach().flatten(1).abs().mean(1)).clamp(min=1e-5) / d
        rr = nb["rr"][b_idx]
        loss = (rr * err_pos + (1 - rr) * err_neg).mean() / bb
        info = {"nft/pos": float(err_pos.detach().mean()), "nft/neg": float(err_neg.detach().mean())}
        if self.acfg.kl_coef > 0:
            with torch.no_grad():
                eps_ref = model_eps(tr.ref, tr.process, xt, t, cond)
            kl = (w * (eps_theta - eps_ref).flatten(1).pow(2).sum(1)).mean()
            loss = loss + self.acfg.kl_coef * kl
            info["nft/kl"] = float(kl.detach())
        return loss, info

    def prepare(self, batch: RolloutBatch) -> dict:
        tr, dist, G = self.trainer, self.trainer.dist, self.acfg.group_size
        r_all = dist.all_gather_cat(batch.rewards)
        if r_all.numel() != tr.cfg.batch_size:
            raise CtrlDiffError("diffusion-nft: the epoch's batch is incomplete (reward_errors=skip dropped rollouts) "
                                "and its groups no longer line up; use reward_errors=raise")
        adv = group_advantages(r_all, G, self.acfg.adv_clip)
        n = batch.rewards.numel()
        adv = adv[dist.rank * n:(dist.rank + 1) * n].to(batch.rewards.device)
        batch.advantages = adv
        rr = (adv / self.acfg.adv_clip).clamp(-1, 1) / 2 + 0.5
        batch.extras["nft"] = {"rr": rr}
        return {"nft/r_norm_mean": float(rr.mean())}

    def sample_conditions(self, n: int, generator: torch.Generator):
        G = self.acfg.group_size
        cond = self.trainer.task.sample_conditions(n // G, generator)
        return None if cond is None else cond.repeat_interleave(G, 0)

    def update(self, batch: RolloutBatch) -> dict:
        tr, proc = self.trainer, self.trainer.process
        x0 = batch.traj.final
        n = x0.shape[0] * self.acfg.draws
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(self.inner_epochs()):
            # noise levels and noises from this process's own generator (checkpointed with the trainer's RNGs)
            u = torch.rand(n, generator=tr.gen, device=x0.device, dtype=x0.dtype)
            batch.extras["nft"]["t"] = proc.t_min + (proc.t_max - proc.t_min) * u
            batch.extras["nft"]["eps"] = torch.randn((n, *x0.shape[1:]), generator=tr.gen, device=x0.device,
                                                     dtype=x0.dtype)
            for idx in tr.minibatches(n, self.acfg.minibatch, x0.device):
                info = gradient_step(self, lambda sub: self.pair_loss(batch, sub), idx)
                for key, v in info.items():
                    sums[key] = sums.get(key, 0.0) + v
                n_updates += 1
        self.update_old()
        out = {f"train/{k}": v / max(n_updates, 1) for k, v in sums.items()}
        out["train/updates"] = n_updates
        return out

