r"""LaSRO: a learned, differentiable latent-space surrogate reward for <= 2-step generators (METHODS section 4).

Surrogate  R_psi(z, c) = head_psi( E(z, t_feat, c) , c ),  E = the frozen pretrained diffusion network's encoder
(down path + middle: ``UNet.encoder_features``) evaluated on the generator's state z at a small time t_feat,
no decoding (for the digits models the state is the image; in a latent model it is the latent). Trained by a
Bradley-Terry ranking loss on pairs of the replay buffer with the same condition, ranked by the TRUE reward r
(which may be non-differentiable or a black box):
    L_BT(psi) = -mean log sigmoid( R_psi(z_w, c) - R_psi(z_l, c) ),   r(z_w, c) > r(z_l, c).
Exploration (off-policy data for the surrogate): every epoch's rollouts (several noises per condition), their
1-step outputs too (``explore_one_step``), and a bounded FIFO replay buffer of earlier generators' samples.

Generator update (deterministic policy gradient through the sampler; z_k = the k-step output of the generator
G_theta from the same initial noise x_T, k = 1, 2, both differentiable in theta, z_2 through both steps):
    L(theta) = c0 L_reg - c1 S_1[R_psi(z_1, c)] - c2 S_2[R_psi(z_2, c)],
    S_k[R]   = clip((R - m_k) / sqrt(v_k + 1e-8), -clip, clip)     (m_k, v_k running mean / variance of R(z_k))
    L_reg    = sum_k w_k mean_pixels || z_k - z_k^ref ||^2          (z_k^ref: the frozen initial generator on the
                                                                   same noise, a distillation loss to the teacher;
                                                                   w_2 = 1, w_1 = reg_1step)
Online alternation per trainer epoch: fresh rollouts scored by r -> (log the surrogate's ranking accuracy on
them BEFORE it sees them) -> buffer -> N_sur surrogate steps -> N_gen generator steps. ``freeze_surrogate``:
the surrogate is trained only on the first epoch's (initial) buffer and then frozen (the reward-hacking ablation).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import Strict
from ..errors import CtrlDiffError
from ..rewards.base import call_reward
from .base import Algorithm, RolloutBatch, gradient_step, register_algorithm


class LaSROConfig(Strict):
    c0: float = Field(15.0, ge=0, description="weight of L_reg (distillation to the frozen initial generator); "
                      "trades reward for sample quality (benchmarks/lasro_2step.py --sweep: c0 = 10 / 15 / 20)")
    c1: float = Field(0.02, ge=0, description="weight of the normalised surrogate reward of the 1-step output (small: "
                      "an eps-model's 1-step output from t = 1 moves ~1/alpha_1 times as much as eps, so this term "
                      "dominates the update otherwise)")
    c2: float = Field(1.0, ge=0, description="weight of the normalised surrogate reward of the 2-step output")
    reg_1step: float = Field(0.01, ge=0, description="relative weight of the 1-step output in L_reg (its output "
                             "is ~1/alpha_1 times as sensitive to the network as the 2-step one)")
    gen_steps: int = Field(4, ge=1, le=100, description="N_gen: generator steps per epoch (paper: 1-10)")
    gen_batch: int = Field(32, ge=1, description="initial noises per generator step (no true-reward queries)")
    surrogate_steps: int = Field(10, ge=0, description="N_sur: surrogate steps per epoch (paper: 1-50)")
    initial_surrogate_steps: int = Field(100, ge=0, description="surrogate steps on the first epoch's buffer")
    surrogate_lr: float = Field(1e-3, gt=0)
    surrogate_weight_decay: float = Field(1e-4, ge=0)
    pairs: int = Field(64, ge=1, description="Bradley-Terry pairs per surrogate step")
    buffer_size: int = Field(4096, ge=2, description="replay buffer capacity (samples; FIFO)")
    explore_one_step: bool = Field(True, description="also score the rollouts' 1-step outputs (counted queries) "
                                   "and put them in the buffer (2-step generators only)")
    feature_t: float = Field(0.02, gt=0, lt=1, description="time at which the frozen encoder sees z")
    backbone: Literal["teacher", "ref"] = Field(
        "teacher", description="encoder of the surrogate: the generator's teacher named in its metadata (the "
        "pretrained diffusion model; falls back to ref if none), or the frozen initial generator itself")
    head_hidden: int = Field(32, ge=4)
    norm_momentum: float = Field(0.95, ge=0, lt=1, description="EMA momentum of the running mean/var in S")
    clip: float = Field(3.0, gt=0, description="S clips the normalised surrogate output to [-clip, clip]")
    freeze_surrogate: bool = Field(False, description="ablation: train the surrogate on the initial buffer only")


# ---- the surrogate --------------------------------------------------------------------------------------------
def bradley_terry_loss(r_w: Tensor, r_l: Tensor) -> Tensor:
    """-mean log sigmoid(r_w - r_l) = mean softplus(r_l - r_w); r_w, r_l [N]."""
    return F.softplus(r_l - r_w).mean()


def ranking_accuracy(pred: Tensor, true: Tensor, cond: Tensor | None = None) -> tuple[float, int]:
    """Fraction of pairs (i < j, same condition, r_i != r_j) whose predicted order matches the true reward's
    (a predicted tie counts 1/2) and the number of such pairs. pred, true [N]; cond [N] or None."""
    dp = pred[:, None] - pred[None, :]
    dt = true[:, None] - true[None, :]
    mask = torch.triu(torch.ones_like(dt, dtype=torch.bool), 1) & (dt != 0)
    if cond is not None:
        mask &= cond[:, None] == cond[None, :]
    n = int(mask.sum())
    if n == 0:
        return float("nan"), 0
    agree = (torch.sign(dp) == torch.sign(dt)).float() + 0.5 * (dp == 0).float()
    return float(agree[mask].mean()), n


class FeatureHead(nn.Module):
    """Scalar head on a list of feature maps [B, C_l, H_l, W_l] (or vectors [B, C_l]):
    per level 1x1 conv -> SiLU -> 3x3 conv -> SiLU -> global mean pool; concat + label embedding -> MLP -> [B]."""

    def __init__(self, channels: list[int], hidden: int = 32, num_classes: int = 0):
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU())
            for c in channels)
        width = hidden * len(channels)
        self.cemb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, feats: list[Tensor], cond: Tensor | None) -> Tensor:
        h = torch.cat([lvl(f).mean((-2, -1)) for lvl, f in zip(self.levels, feats, strict=True)], 1)
        if self.cemb is not None and cond is not None:
            h = h + self.cemb(cond.long())
        return self.mlp(F.silu(h))[:, 0]


class LatentSurrogate(nn.Module):
    """R_psi(z, c) = head(encoder_features(z, t_feat, c), c) with a frozen backbone (any model with
    ``encoder_features(x, t, cond) -> list of [B, C_l, H_l, W_l]``); z [B, *state_shape], cond [B] labels or None."""

    differentiable = True

    def __init__(self, backbone: nn.Module, sample_shape: tuple[int, ...], num_classes: int = 0,
                 feature_t: float = 0.02, hidden: int = 32):
        super().__init__()
        if not hasattr(backbone, "encoder_features"):
            raise CtrlDiffError(f"the lasro surrogate needs a backbone with encoder_features (a UNet); "
                                f"{type(backbone).__name__} has none")
        self.backbone = copy.deepcopy(backbone).eval().requires_grad_(False)
        self.feature_t = feature_t
        self.name = "lasro-surrogate"
        with torch.no_grad():
            probe = torch.zeros((2, *sample_shape), device=next(self.backbone.parameters()).device)
            chans = [f.shape[1] for f in self.backbone.encoder_features(probe, feature_t, None)]
        self.head = FeatureHead(chans, hidden, num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # the backbone stays frozen (and in eval mode)
        return self

    def forward(self, z: Tensor, cond=None) -> Tensor:
        if cond is not None and not isinstance(cond, Tensor):
            raise CtrlDiffError("the built-in lasro surrogate takes class-label conditions (a Tensor) or None, got "
                                f"{type(cond).__name__}")
        feats = self.backbone.encoder_features(z, self.feature_t, cond)
        return self.head(feats, cond)


class RunningNorm:
    """S[R] = clip((R - m) / sqrt(v + 1e-8), -clip, clip) with EMA mean m and variance v of the observed R."""

    def __init__(self, momentum: float, clip: float):
        self.momentum, self.clip = momentum, clip
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, r: Tensor) -> None:
        m, v = float(r.mean()), float(r.var()) if r.numel() > 1 else 0.0
        if self.count == 0:
            self.mean, self.var = m, max(v, 1e-8)
        else:
            a = self.momentum
            self.var = a * self.var + (1 - a) * v + a * (1 - a) * (m - self.mean) ** 2
            self.mean = a * self.mean + (1 - a) * m
        self.count += 1

    def __call__(self, r: Tensor) -> Tensor:
        return ((r - self.mean) / (self.var + 1e-8) ** 0.5).clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, st: dict) -> None:
        self.mean, self.var, self.count = st["mean"], st["var"], st["count"]


class ReplayBuffer:
    """Bounded FIFO of (z [D...], cond, r, epoch) rows; samples Bradley-Terry pairs with the same condition."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.z: Tensor | None = None
        self.cond: Tensor | None = None
        self.r: Tensor | None = None
        self.epoch: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.r is None else self.r.numel()

    def add(self, z: Tensor, cond: Tensor | None, r: Tensor, epoch: int) -> None:
        z, r = z.detach(), r.detach().float()
        c = (torch.zeros(len(r), dtype=torch.long, device=r.device) if cond is None
             else torch.as_tensor(cond, device=r.device).long())
        e = torch.full((len(r),), epoch, dtype=torch.long, device=r.device)
        if self.r is None:
            self.z, self.cond, self.r, self.epoch = z, c, r, e
        else:
            self.z, self.cond = torch.cat([self.z, z]), torch.cat([self.cond, c])
            self.r, self.epoch = torch.cat([self.r, r]), torch.cat([self.epoch, e])
        if len(self) > self.capacity:
            keep = slice(len(self) - self.capacity, None)
            self.z, self.cond, self.r, self.epoch = self.z[keep], self.cond[keep], self.r[keep], self.epoch[keep]

    def sample_pairs(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Up to n index pairs (winner, loser) with equal conditions and r_w > r_l (ties dropped)."""
        N = len(self)
        order = torch.argsort(self.cond.cpu(), stable=True)
        cs = self.cond.cpu()[order]
        _, counts = torch.unique_consecutive(cs, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(len(counts), device="cpu"), counts)  # group of sorted position
        pos_i = torch.randint(0, N, (4 * n,), generator=generator, device="cpu")
        g = group[pos_i]
        pos_j = starts[g] + (torch.rand(4 * n, generator=generator, device="cpu") * counts[g]).long().clamp(max=N - 1)
        i, j = order[pos_i].to(self.r.device), order[pos_j].to(self.r.device)
        ri, rj = self.r[i], self.r[j]
        keep = ri != rj
        i, j, ri, rj = i[keep][:n], j[keep][:n], ri[keep][:n], rj[keep][:n]
        w = torch.where(ri > rj, i, j)
        lo = torch.where(ri > rj, j, i)
        return w, lo

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "z": self.z, "cond": self.cond, "r": self.r, "epoch": self.epoch}

    def load_state_dict(self, st: dict) -> None:
        self.capacity = st["capacity"]
        self.z, self.cond, self.r, self.epoch = st["z"], st["cond"], st["r"], st["epoch"]


def _teacher_backbone(trainer) -> nn.Module:
    """The pretrained diffusion network behind the generator (metadata 'teacher'), else the frozen reference."""
    meta = getattr(trainer.task.ref, "metadata", None) or getattr(trainer.task.model, "metadata", {}) or {}
    name = meta.get("teacher")
    if name == "digits":
        from ..assets import load_digits_model

        return load_digits_model(device=str(trainer.device))
    if name:
        from pathlib import Path

        from ..models import load_model

        if Path(name).with_suffix(".json").exists():
            return load_model(name, device=trainer.device)
    return trainer.task.ref


# ---- the algorithm --------------------------------------------------------------------------------------------
@register_algorithm("lasro")
class LaSRO(Algorithm):
    any_grid = False  # a distilled 1-2-step generator: its grid is part of the model
    needs_log_prob = False

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        self.acfg: LaSROConfig = cfg.lasro
        a = self.acfg
        task = trainer.task
        backbone = _teacher_backbone(trainer) if a.backbone == "teacher" else task.ref
        self.surrogate = LatentSurrogate(backbone, task.sample_shape, task.num_classes, a.feature_t,
                                         a.head_hidden).to(trainer.device)
        self.surrogate_opt = trainer.make_optimizer(self.surrogate.head.parameters(), lr=a.surrogate_lr,
                                                    weight_decay=a.surrogate_weight_decay)
        self.buffer = ReplayBuffer(a.buffer_size)
        self.norms = {k: RunningNorm(a.norm_momentum, a.clip) for k in (1, 2)}
        self.surrogate_updates = 0
        K = cfg.sampler.steps
        self.out_steps = [k for k in (1, 2) if k <= K]
        self.weights = {1: a.c1, 2: a.c2} if K == 2 else {1: a.c1 + a.c2}
        self.grids = {k: trainer.process.time_grid(k, device=trainer.device) for k in self.out_steps}

    # ---- sampling the generator's k-step outputs ---------------------------------------------------------
    def outputs(self, model, x_T: Tensor, cond, grad: bool, generator: torch.Generator | None = None) -> dict:
        """{k: z_k} the k-step outputs (k = 1, 2) of ``model`` from the same initial noise x_T; with ``grad`` the
        graph runs through every network evaluation (z_2 through both steps)."""
        tr = self.trainer
        return {k: tr.solver(model, x_T, self.grids[k], tr.process, cond, generator=generator, grad=grad).final
                for k in self.out_steps}

    # ---- the surrogate's epoch: score fresh samples, log ranking accuracy, train by Bradley-Terry ------------
    def prepare(self, batch: RolloutBatch) -> dict:
        tr, a = self.trainer, self.acfg
        traj = batch.traj
        cond = traj.cond if isinstance(traj.cond, Tensor) else None
        fresh = [(traj.final, cond, batch.rewards)]
        if a.explore_one_step and self.out_steps == [1, 2]:
            with torch.no_grad():
                z1 = tr.solver(tr.policy, traj.states[:, 0], self.grids[1], tr.process, traj.cond).final
            tr.count_queries(z1.shape[0])
            r1 = call_reward(tr.reward, tr.task.decode(z1), tr.task.reward_cond(traj.cond))  # latents: decoded
            fresh.append((z1, cond, r1.to(z1.device)))
        metrics = {}
        self.surrogate.eval()
        with torch.no_grad():  # accuracy on the fresh samples BEFORE the surrogate trains on them
            z = torch.cat([f[0] for f in fresh])
            c = None if cond is None else torch.cat([f[1] for f in fresh])
            r = torch.cat([f[2] for f in fresh])
            acc, npairs = ranking_accuracy(self.surrogate(z, c), r, c)
        metrics["lasro/surrogate_acc_fresh"] = acc
        metrics["lasro/fresh_pairs"] = npairs
        for zz, cc, rr in fresh:
            self.buffer.add(zz, cc, rr, tr.epoch)
        if self.surrogate_updates == 0:
            steps = a.initial_surrogate_steps
        else:
            steps = 0 if a.freeze_surrogate else a.surrogate_steps
        metrics.update(self.train_surrogate(steps))
        metrics["lasro/buffer"] = len(self.buffer)
        if len(fresh) > 1:
            metrics["lasro/reward_1step"] = float(fresh[1][2].mean())
        return metrics

    def train_surrogate(self, steps: int) -> dict:
        """``steps`` Bradley-Terry steps on pairs of the replay buffer -> {"lasro/bt_loss", "lasro/surrogate_acc_train"}."""
        tr, a = self.trainer, self.acfg
        if steps == 0 or len(self.buffer) < 2:
            return {}
        self.surrogate.train()
        loss_sum, acc_sum, n = 0.0, 0.0, 0
        for _ in range(steps):
            w, lo = self.buffer.sample_pairs(a.pairs, tr.cpu_gen)
            if len(w) == 0:
                break
            idx = torch.cat([w, lo])
            c = self.buffer.cond[idx] if self.trainer.task.num_classes else None
            out = self.surrogate(self.buffer.z[idx], c)
            r_w, r_l = out[: len(w)], out[len(w):]
            loss = bradley_terry_loss(r_w, r_l)
            self.surrogate_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.surrogate_opt.step()
            loss_sum += float(loss.detach())
            acc_sum += float((r_w > r_l).float().mean())
            n += 1
        self.surrogate.eval()
        self.surrogate_updates += n
        return {"lasro/bt_loss": loss_sum / max(n, 1), "lasro/surrogate_acc_train": acc_sum / max(n, 1),
                "lasro/surrogate_steps": n}

    # ---- the generator's epoch: N_gen deterministic-policy-gradient steps through the sampler ---------------
    def generator_loss(self, x_T: Tensor, cond) -> tuple[Tensor, dict]:
        """L = c0 L_reg - sum_k c_k S_k[R(z_k, c)] on one batch of initial noises x_T (module docstring)."""
        tr, a = self.trainer, self.acfg
        state = tr.gen.get_state()
        z = self.outputs(tr.policy, x_T, cond, grad=True, generator=tr.gen)
        g_ref = torch.Generator(device=tr.device)
        g_ref.set_state(state)  # the same solver noise for the reference (stochastic solvers)
        with torch.no_grad():
            z_ref = self.outputs(tr.ref, x_T, cond, grad=False, generator=g_ref)
        regs = {k: (z[k] - z_ref[k]).flatten(1).pow(2).mean(1).mean() for k in self.out_steps}
        reg = sum(regs[k] * (a.reg_1step if k == 1 and len(self.out_steps) == 2 else 1.0) for k in regs)
        loss, info = a.c0 * reg, {"lasro/reg": float(reg.detach())}
        info.update({f"lasro/reg_z{k}": float(v.detach()) for k, v in regs.items()})
        c = cond if tr.task.num_classes else None
        for k in self.out_steps:
            r = self.surrogate(z[k], c)
            self.norms[k].update(r.detach())
            loss = loss - self.weights[k] * self.norms[k](r).mean()
            info[f"lasro/surrogate_z{k}"] = float(r.detach().mean())
        return loss, info

    def update(self, batch: RolloutBatch) -> dict:
        tr, a = self.trainer, self.acfg
        sums: dict[str, float] = {}
        for _ in range(a.gen_steps):
            cond = tr.task.sample_conditions(a.gen_batch, tr.cpu_gen)
            cond = None if cond is None else cond.to(tr.device)
            x_T = torch.randn((a.gen_batch, *tr.task.sample_shape), generator=tr.gen, device=tr.device)
            x_T = x_T * tr.process.prior_std()
            # the shared optimizer step: non-finite check before anything is applied, microbatches, and (several
            # processes) clipping of the averaged gradient
            def loss_fn(sub, x_T=x_T, cond=cond):
                return self.generator_loss(x_T[sub], None if cond is None else cond[sub])

            info = gradient_step(self, loss_fn, torch.arange(a.gen_batch, device=tr.device))
            for key, v in info.items():
                sums[key] = sums.get(key, 0.0) + v
        out = {f"train/{k}" if not k.startswith("lasro/") else k: v / a.gen_steps for k, v in sums.items()}
        out["train/updates"] = a.gen_steps
        return out

    # ---- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "surrogate_head": self.surrogate.head.state_dict(),
                "surrogate_opt": self.surrogate_opt.state_dict(),
                "buffer": self.buffer.state_dict(), "norms": {k: n.state_dict() for k, n in self.norms.items()},
                "surrogate_updates": self.surrogate_updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.surrogate.head.load_state_dict(state["surrogate_head"])
        self.surrogate_opt.load_state_dict(state["surrogate_opt"])
        self.buffer.load_state_dict(state["buffer"])
        for k, st in state["norms"].items():
            self.norms[int(k)].load_state_dict(st)
        self.surrogate_updates = state["surrogate_updates"]
