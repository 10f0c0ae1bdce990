r"""Diffusion-DPO (Wallace et al. 2023), online, METHODS section 2: preference pairs from the current policy's
samples, the DPO loss on the denoising objective.

Pairs. Each epoch's rollouts are scored by the true reward (any reward, black box allowed; no other queries).
Samples that share a condition (all of them for an unconditional model) are split at random into groups of
``group_size``; within a group the winner/loser pairs (w, l) are the best against the worst sample
(``pairs=best-worst``) or every ranked pair with r_w - r_l > ``margin`` (``pairs=all``).

Loss. DPO needs log p_theta(x) / p_ref(x) of a sample; with the diffusion ELBO (in the units of KL_path:
the eps-loss weight is -d lambda / dt, lambda = log-SNR, as in :func:`ctrldiff.solvers.kl_weights`)
    log p_theta(x0) / p_ref(x0) ~= -int (-lambda'(t)) E_eps[ ||eps - eps_theta(x_t)||^2 - ||eps - eps_ref(x_t)||^2 ] dt,
    x_t = alpha_t x0 + sigma_t eps.
One Monte Carlo draw of (t, eps), shared by the winner and the loser, gives Wallace et al.'s eq. (14)
(``draws`` > 1 averages the bracket over that many draws before the sigmoid):
    L = -log sigmoid( -beta_dpo * W_t * [ (||eps - eps_theta(x_t^w)||^2 - ||eps - eps_ref(x_t^w)||^2)
                                         - (||eps - eps_theta(x_t^l)||^2 - ||eps - eps_ref(x_t^l)||^2) ] )
where W_t = T omega(lambda_t) is the importance weight of the drawn t:
    t_sampling=grid        t = t_k of the rollout grid, k ~ U{0..K-1}, W = K w_k  (w_k = lambda_{k+1} - lambda_k);
                           trains the denoiser at the times the sampler uses (needed for few-step generators)
    t_sampling=continuous  lambda ~ U[lambda(t_max), lambda(t_min)], W = lambda(t_min) - lambda(t_max).
Squared norms are summed over data dims (the KL_path convention). beta_dpo (default: the run's beta) is the KL
weight of the DPO objective max E r_BT - beta_dpo KL (0.05 when the run's beta is 0); at theta = ref the loss is
log 2 exactly. The rollout samples x_K (at t_min) play the role of the data x0.

Labels. The paper's hard labels (the winner always wins) make the Bradley-Terry reward gap of every pair
infinite: nothing bounds the update but beta_dpo's saturation of the sigmoid, and online the policy drifts
without limit (KL_path grows). ``labels=bradley-terry`` [an extension, not in the paper] uses the soft label
p = sigmoid(r_w - r_l) of a Bradley-Terry model of the true reward,
    L = -[ p log sigmoid(z) + (1 - p) log sigmoid(-z) ],   z = the logit above,
whose minimiser over log-ratios is z = r_w - r_l, i.e. beta_dpo log p_theta / p_ref = r + const: with
beta_dpo = beta the DPO optimum is the tilted target p* of J (METHODS section 0), up to the ELBO approximation.

Several processes: pairs are formed within each process's own batch_size / W samples (a process whose every
condition has a single sample stops the run with an error on every process); ``minibatch`` is the global
minibatch (ceil(minibatch / W) of a process's own pairs per step, the same number of steps everywhere: the fewest
any process's pairs allow), gradients are averaged before clipping, ``dpo/pairs`` and ``dpo/reward_gap`` are over
every process's pairs. Groups, pair order and times come from a per-process generator (checkpointed).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config import Strict
from ..errors import CtrlDiffError
from ..solvers import kl_weights, model_eps, select_cond
from .base import Algorithm, RolloutBatch, gradient_step, register_algorithm

DEFAULT_BETA_DPO = 0.05  # the temperature when neither diffusion_dpo.beta_dpo nor the run's beta is > 0


class DiffusionDPOConfig(Strict):
    beta_dpo: float | None = Field(None, gt=0, description="DPO temperature (KL weight of the DPO objective); "
                                   f"None: the run's beta, or {DEFAULT_BETA_DPO} when beta = 0 (DPO needs a "
                                   "temperature > 0)")
    pairs: Literal["best-worst", "all"] = Field("all", description="per comparison group: best vs worst sample, "
                                                "or all pairs ranked by reward with r_w - r_l > margin")
    group_size: int = Field(4, ge=2, description="samples of one condition per comparison group (a random "
                            "partition of each condition's samples)")
    margin: float = Field(0.0, ge=0, description="pairs=all: keep pairs with r_w - r_l > margin")
    labels: Literal["hard", "bradley-terry"] = Field(
        "hard", description="hard: the winner is always preferred (the paper); bradley-terry: soft label "
        "p = sigmoid(r_w - r_l), whose DPO optimum is the tilted target p_ref exp(r / beta_dpo)")
    t_sampling: Literal["grid", "continuous"] = Field(
        "grid", description="grid: t on the rollout solver's grid (weight K w_k); continuous: uniform in log-SNR")
    minibatch: int = Field(64, ge=1, description="preference pairs per gradient step (a remainder of the epoch's "
                           "pairs is left out)")
    draws: int = Field(1, ge=1, description="(t, eps) draws per pair averaged inside the sigmoid; 1: the paper's "
                       "loss (one draw: the expectation over t outside the log-sigmoid)")


def condition_groups(cond, n: int) -> list[Tensor]:
    """Indices of the samples that share a condition (labels, embeddings or prompts; None: one group) -> [n_c]."""
    if cond is None:
        return [torch.arange(n, device="cpu")]
    if isinstance(cond, Tensor):
        keys = [int(c) if c.ndim == 0 else tuple(c.flatten().tolist()) for c in cond.detach().cpu()]
    else:
        keys = list(cond)
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [torch.tensor(v, device="cpu") for v in groups.values()]


def preference_pairs(rewards: Tensor, cond, group_size: int, mode: str, margin: float,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Winner / loser indices [P], [P]: within random groups of ``group_size`` samples of one condition."""
    r = rewards.detach().cpu()
    wins, loses = [], []
    for idx in condition_groups(cond, len(r)):
        idx = idx[torch.randperm(len(idx), generator=generator, device="cpu")]
        for s in range(0, len(idx), group_size):
            g = idx[s:s + group_size]
            if len(g) < 2:
                continue
            g = g[torch.argsort(r[g], descending=True, stable=True)]
            if mode == "best-worst":
                if r[g[0]] > r[g[-1]]:
                    wins.append(g[:1])
                    loses.append(g[-1:])
                continue
            i, j = torch.triu_indices(len(g), len(g), 1, device=g.device)  # i < j: g[i] ranked above g[j]
            keep = r[g[i]] - r[g[j]] > margin
            wins.append(g[i[keep]])
            loses.append(g[j[keep]])
    if not wins:
        return torch.zeros(0, dtype=torch.long, device="cpu"), torch.zeros(0, dtype=torch.long, device="cpu")
    return torch.cat(wins), torch.cat(loses)


def t_of_log_snr(process, lam: Tensor, iters: int = 60) -> Tensor:
    """Invert the (decreasing) log-SNR of ``process`` by bisection on [t_min, t_max] -> t [N] (float64)."""
    lo = torch.full_like(lam, process.t_min, dtype=torch.float64)
    hi = torch.full_like(lam, process.t_max, dtype=torch.float64)
    lam = lam.double()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = process.log_snr(mid) > lam  # lambda(mid) > target: the target lies at larger t
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


@register_algorithm("diffusion-dpo")
class DiffusionDPO(Algorithm):
    needs_log_prob = False

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        self.acfg: DiffusionDPOConfig = cfg.diffusion_dpo
        self.beta_dpo = self.acfg.beta_dpo or (cfg.beta if cfg.beta > 0 else DEFAULT_BETA_DPO)
        ncls, W = trainer.task.num_classes, trainer.dist.world_size
        if ncls and cfg.batch_size // W < 2 * ncls:  # pairs are formed within each process's own samples
            per = f" ({cfg.batch_size // W} per process with {W} processes)" if W > 1 else ""
            raise CtrlDiffError(f"diffusion-dpo compares samples of the same condition: batch_size={cfg.batch_size}"
                                f"{per} gives fewer than 2 samples per condition for {ncls} classes (use >= "
                                f"{2 * ncls * W})")
        # the random groups, pair order and times depend on this process's pairs: with several processes they are
        # drawn from a generator of this process's own, so that the shared cpu_gen stays in step everywhere
        self.gen = trainer.cpu_gen if W == 1 else torch.Generator().manual_seed(trainer.process_seed(cfg.seed + 3))

    def state_dict(self) -> dict:
        st = super().state_dict()
        return st if self.gen is self.trainer.cpu_gen else {**st, "pair_gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "pair_gen" in state and self.gen is not self.trainer.cpu_gen:
            self.gen.set_state(state["pair_gen"])

    # ---- pairs --------------------------------------------------------------------------------------
    def prepare(self, batch: RolloutBatch) -> dict:
        a, tr = self.acfg, self.trainer
        dist = tr.dist
        win, lose = preference_pairs(batch.rewards, batch.traj.cond, a.group_size, a.pairs, a.margin, self.gen)
        largest = max(len(g) for g in condition_groups(batch.traj.cond, batch.traj.batch_size))
        # every process checks every process's largest condition group (the same error everywhere, no deadlock)
        largest_by_rank = dist.all_reduce_int([largest if r == dist.rank else 0 for r in range(dist.world_size)])
        if min(largest_by_rank) < 2:
            if not dist.enabled:
                raise CtrlDiffError(f"diffusion-dpo: every condition of epoch {tr.epoch} has a single sample, so no "
                                    "pair can be formed; raise batch_size")
            bad = ", ".join(str(r) for r, n in enumerate(largest_by_rank) if n < 2)
            raise CtrlDiffError(f"diffusion-dpo: on process(es) {bad} every condition of epoch {tr.epoch} has a "
                                f"single sample among its {batch.traj.batch_size} (pairs are formed within a "
                                f"process's own samples), so no pair can be formed; raise batch_size")
        dev = batch.traj.states.device
        batch.extras["winners"], batch.extras["losers"] = win.to(dev), lose.to(dev)
        r = batch.rewards.detach().cpu()
        n_pairs = dist.all_reduce_int([len(win)])[0]  # over every process's pairs
        batch.extras["global_pairs"] = n_pairs
        return {"dpo/pairs": n_pairs, "dpo/reward_gap": float(dist.mean(r[win] - r[lose])) if n_pairs else 0.0}

    # ---- the loss -----------------------------------------------------------------------------------
    def draw_times(self, n: int, times: Tensor, device) -> tuple[Tensor, Tensor]:
        """n times t and their importance weights W_t = T omega(lambda_t) (module docstring) -> [n], [n]."""
        proc = self.trainer.process
        if self.acfg.t_sampling == "grid":
            K = times.numel() - 1
            k = torch.randint(0, K, (n,), generator=self.gen, device="cpu")
            w = kl_weights(proc, times.cpu())
            return times.cpu()[k].to(device), (K * w[k]).to(device)
        lam_hi = proc.log_snr(torch.tensor(proc.t_min, dtype=torch.float64, device="cpu"))
        lam_lo = proc.log_snr(torch.tensor(proc.t_max, dtype=torch.float64, device="cpu"))
        lam = lam_lo + (lam_hi - lam_lo) * torch.rand(n, generator=self.gen, dtype=torch.float64, device="cpu")
        t = t_of_log_snr(proc, lam)
        return t.float().to(device), (lam_hi - lam_lo).float().expand(n).to(device)

    def pair_loss(self, batch: RolloutBatch, win: Tensor, lose: Tensor) -> tuple[Tensor, dict]:
        """The DPO loss over pairs (x0[win_i], x0[lose_i]) [P] with one shared (t, eps) per pair -> scalar."""
        tr, traj = self.trainer, batch.traj
        proc = tr.process
        m, P = self.acfg.draws, len(win)
        win_m, lose_m = win.repeat(m), lose.repeat(m)  # [m P]: draw j of pair i at j P + i
        x0 = torch.cat([traj.final[win_m], traj.final[lose_m]])
        t, weight = self.draw_times(m * P, traj.times, x0.device)
        eps = torch.randn((m * P, *x0.shape[1:]), generator=tr.gen, device=x0.device, dtype=x0.dtype).repeat(
            2, *[1] * (x0.ndim - 1))
        tt = t.to(x0.dtype).repeat(2)
        xt, _ = proc.marginal(x0, tt, eps)
        cond = select_cond(traj.cond, torch.cat([win_m, lose_m]))
        err = (eps - model_eps(tr.policy, proc, xt, tt, cond)).flatten(1).pow(2).sum(1)
        with torch.no_grad():
            err_ref = (eps - model_eps(tr.ref, proc, xt, tt, cond)).flatten(1).pow(2).sum(1)
        d = err - err_ref  # [2 m P]: the policy's denoising error minus the reference's
        inside = (-self.beta_dpo * weight * (d[:m * P] - d[m * P:])).reshape(m, P).mean(0)
        if self.acfg.labels == "hard":
            loss = -F.logsigmoid(inside).mean()
        else:
            r = batch.rewards
            p = torch.sigmoid(r[win.to(r.device)] - r[lose.to(r.device)]).to(inside)
            loss = -(p * F.logsigmoid(inside) + (1 - p) * F.logsigmoid(-inside)).mean()
        ins = inside.detach()
        return loss, {"dpo_acc": float((ins > 0).float().mean()), "dpo_logit": float(ins.mean()),
                      "denoise_err_w": float(err[:m * P].detach().mean()),
                      "denoise_err_l": float(err[m * P:].detach().mean())}

    def update(self, batch: RolloutBatch) -> dict:
        tr = self.trainer
        win, lose = batch.extras["winners"], batch.extras["losers"]
        P = len(win)  # this process's pairs
        sums: dict[str, float] = {}
        n_updates = 0
        # a global minibatch of diffusion_dpo.minibatch pairs: ceil(minibatch / W) of this process's own pairs per
        # step and the same number of steps on every process (the fewest any process's pairs allow)
        for _ in range(self.inner_epochs() if batch.extras["global_pairs"] else 0):
            for sub in tr.minibatches(P, self.acfg.minibatch, win.device, generator=self.gen):
                info = gradient_step(self, lambda s: self.pair_loss(batch, win[s], lose[s]), sub)
                for key, v in info.items():
                    sums[key] = sums.get(key, 0.0) + v
                n_updates += 1
        out = {f"train/{k}": v / max(n_updates, 1) for k, v in sums.items()}
        out["train/updates"] = n_updates
        return out
