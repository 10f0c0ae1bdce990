"""What every algorithm shares: the rollout batch it receives, the minibatch of (sample, step) pairs
it computes a loss on, and the one policy-update loop (inner epochs, minibatches, clipping).

An algorithm module implements ``loss(mb) -> (loss, info)`` — its update rule, written like the
equations in METHODS.md — and optionally ``prepare(batch)`` (fit a value network, compute advantages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import CtrlDiffError
from ..solvers import kl_weights, model_eps, prediction_of
from ..trajectory import Trajectory, gaussian_log_prob

ALGORITHMS: dict[str, type[Algorithm]] = {}
BLACK_BOX_ALGOS = "ddpo, ddpo-sf, dpok, ctrl, flow-grpo, diffusion-nft or diffusion-dpo"  # they need no reward gradient


def register_algorithm(name: str):
    def deco(cls):
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return deco


@dataclass
class RolloutBatch:
    """One epoch's rollouts. B samples, K steps.

    traj     the sampled trajectories (detached; outputs are the sampling policy's eps)
    rewards  [B] terminal rewards r(x_K, c)
    eps_ref  [B, K, D] the frozen reference model's eps at every visited (t_k, x_k)
    kl_rate  [B, K] per-step (1/2) g^2 ||s_old - s_ref||^2 dtau_k   (sums to KL_path per sample)
    advantages  [B] or [B, K], filled by the algorithm's ``prepare``
    """

    traj: Trajectory
    rewards: Tensor
    eps_ref: Tensor
    kl_rate: Tensor
    advantages: Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def kl_path(self) -> Tensor:
        return self.kl_rate.sum(1)


@dataclass
class Minibatch:
    """A minibatch of N (sample, step) pairs with the new policy already evaluated on it."""

    b: Tensor  # [N] sample index
    k: Tensor  # [N] step index
    t: Tensor  # [N] time t_k
    x: Tensor  # [N, D] state x_k
    x_next: Tensor  # [N, D] state x_{k+1}
    cond: Tensor | None
    eps: Tensor  # [N, D] new policy's eps at (t_k, x_k) (with grad)
    eps_old: Tensor  # [N, D] sampling policy's eps
    eps_ref: Tensor  # [N, D]
    log_prob: Tensor | None  # [N] new policy's log-density of x_k -> x_{k+1}
    log_prob_old: Tensor | None  # [N]
    batch: RolloutBatch


class Algorithm:
    """Base class. Subclasses set ``name`` (by @register_algorithm) and implement ``loss``."""

    name = "base"
    needs_log_prob = True  # the update needs stochastic transitions (EM, DDIM eta > 0 or policy noise)
    needs_reference = True  # the update uses eps_ref / kl_rate (else the trainer may skip them: log.kl_path=false)
    any_grid = True  # the update holds on any time grid (sampler.random_grid may redraw it every epoch)

    def __init__(self, cfg, trainer):
        self.cfg, self.trainer = cfg, trainer
        self.trust_radius = 1.0  # the trust region's current size, in units of max_update_kl (trust_region_growth)
        # acceptance_pool: the last epochs' held-out first-order gains per unit of root cost, (l, se), before any
        # selection (every epoch's, kept or undone): the prior that an epoch's own noisy estimate is shrunk towards
        self.gain_history: list[tuple[float, float]] = []
        # epoch_momentum: the running average of the epochs' raw update directions (theta - start, before any
        # trust region or acceptance scaling), along which each epoch steps
        self.momentum: list[Tensor] | None = None
        # certify_z: the start's r - beta KL_path on the certification noise (this process's share), the start's
        # weights (CPU), and the trained weights of a run whose end the test did not certify (kept, not thrown away)
        self.start_terms: Tensor | None = None
        self.start_params: list[Tensor] | None = None
        self.uncertified_params: list[Tensor] | None = None
        self.uncertified_ema: list[Tensor] | None = None

    def require_differentiable_reward(self) -> None:
        """One-line error for an algorithm that back-propagates through the reward, given a black-box one."""
        reward = self.trainer.reward
        if not getattr(reward, "differentiable", False):
            raise CtrlDiffError(f"{self.name} needs a differentiable reward; {reward.name!r} is not (use --algo "
                                f"{BLACK_BOX_ALGOS} for black-box rewards)")

    # -- hooks ----------------------------------------------------------------------------------
    def rollout_kwargs(self) -> dict:
        """Extra solver arguments for the trainer's rollouts (default: the configured policy noise)."""
        return {"policy_std": self.trainer.cfg.sampler.policy_std}

    def sample_conditions(self, n: int, generator: torch.Generator):
        """The conditions of an epoch's ``n`` rollouts (default: the task's; group sampling repeats them)."""
        return self.trainer.task.sample_conditions(n, generator)

    def train_pairs(self, batch: RolloutBatch) -> Tensor | None:
        """Flat indices b * K + k of the (sample, step) pairs the shared update trains on (None: all B * K)."""
        return None

    def prepare(self, batch: RolloutBatch) -> dict:
        """Compute advantages / fit critics before the policy update; returns metrics."""
        return {}

    def loss(self, mb: Minibatch) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The algorithm's state for a checkpoint: what every algorithm shares (the trust region's radius, the
        certification's start); subclasses add theirs to it."""
        st = {"trust_radius": self.trust_radius, "gain_history": list(self.gain_history)}
        if self.momentum is not None:
            st["momentum"] = [m.detach().cpu().clone() for m in self.momentum]
        if self.start_terms is not None:
            st.update(start_terms=self.start_terms, start_params=self.start_params,
                      uncertified_params=self.uncertified_params, uncertified_ema=self.uncertified_ema)
        return st

    def load_state_dict(self, state: dict) -> None:
        self.trust_radius = state.get("trust_radius", 1.0)
        self.gain_history = list(state.get("gain_history", []))
        mom = state.get("momentum")
        self.momentum = None if mom is None else [m.to(p.device) for m, p in
                                                  zip(mom, self.trainer.trainable_parameters, strict=True)]
        self.start_terms = state.get("start_terms")
        self.start_params = state.get("start_params")
        self.uncertified_params = state.get("uncertified_params")
        self.uncertified_ema = state.get("uncertified_ema")

    # -- the shared update loop -------------------------------------------------------------------
    def update(self, batch: RolloutBatch) -> dict:
        """The epoch's policy update (:meth:`policy_step`); in a run (Trainer.train) it first records the start for
        :meth:`certify` at the first epoch, and ends with that test at the last."""
        tr = self.trainer
        end = getattr(tr, "end_epoch", None)  # set by Trainer.train: the run's last epoch is end - 1
        if end is not None and tr.epoch == 0 and self.start_terms is None and self.certify_z() is not None:
            self.record_start()
        out = self.policy_step(batch)
        if end is not None and tr.epoch == end - 1 and self.start_terms is not None:
            out.update(self.certify())
        return out

    def policy_step(self, batch: RolloutBatch) -> dict:
        tr = self.trainer
        ocfg = tr.cfg.optim
        traj = batch.traj
        B, K = traj.batch_size, traj.num_steps
        info_sums: dict[str, float] = {}
        n_updates = 0
        graph = batch.extras.pop("outputs_graph", None)  # optim.reuse_rollout_graph: the rollout's eps with grad
        pairs = self.train_pairs(batch)  # None: every (sample, step) pair; else the flat indices b * K + k trained on
        n_pairs = B * K if pairs is None else len(pairs)
        size = self.minibatch_size(tr.cfg.batch_size * (n_pairs // max(B, 1)))

        def partition() -> list[Tensor]:
            mbs = tr.minibatches(n_pairs, size, traj.states.device)
            return list(mbs) if pairs is None else [pairs.to(i.device)[i] for i in mbs]

        subset = pairs is not None  # the algorithm trains on a subset of the steps
        held = self.held_out(batch)  # trajectories kept out of the update to test it (None: no acceptance test)
        if held is not None:
            keep = self.trained(batch).repeat_interleave(K)  # flat pairs b * K + k
            pairs = keep.nonzero().squeeze(1) if pairs is None else pairs[keep[pairs.to(keep.device)]]
            n_pairs = len(pairs)
            size = self.minibatch_size(tr.cfg.batch_size * (n_pairs // max(B, 1)))
        mbs = None
        if graph is not None and subset:
            raise CtrlDiffError(f"optim.reuse_rollout_graph trains on every (sample, step) pair; {self.name} trains "
                                "on a subset of the steps")
        if graph is not None:  # one step over every trained pair (the held-out trajectories' graph goes unused)
            mbs = list(tr.minibatches(n_pairs, size, traj.states.device))
            if self.inner_epochs() != 1 or len(mbs) != 1 or len(mbs[0]) != n_pairs:
                raise CtrlDiffError("optim.reuse_rollout_graph needs one policy step per epoch: inner_epochs=1 and "
                                    f"optim.minibatch >= the pairs trained on ({n_pairs})")
            if pairs is not None:
                mbs = [pairs.to(mbs[0].device)[mbs[0]]]
        elif self.needs_log_prob and tr.recompute_log_prob_old:
            # one partition into minibatches for every inner epoch, and log p_old recomputed on exactly those
            # forward passes: theta_old's own log-density in the update's precision (ratio == 1 at theta_old)
            mbs = partition()
            batch.extras["log_prob_old"] = self.recompute_log_prob_old(batch, mbs)
        tested = held is not None
        start = ([p.detach().clone() for p in tr.trainable_parameters] if self.max_update_kl() > 0 or tested
                 else None)
        limit = self.max_update_kl() * self.trust_radius
        if start is not None and self.signal_scaled():
            rho = self.signal_fraction(batch, pairs)
            limit *= rho
            info_sums["signal_fraction"] = rho
            if rho == 0.0:  # no reproducible direction in this batch: no step (the optimiser state is left as is)
                return {"train/signal_fraction": 0.0, "train/updates": 0, "train/update_kl": 0.0,
                        "train/trust_region_scale": 0.0}
        for _ in range(self.inner_epochs()):
            if mbs is None:
                epoch_mbs = partition()
            elif graph is None:  # the fixed partition of recompute_log_prob_old, in a fresh order every inner epoch
                epoch_mbs = [mbs[i] for i in torch.randperm(len(mbs), generator=tr.cpu_gen, device="cpu").tolist()]
            else:
                epoch_mbs = mbs
            for idx in epoch_mbs:
                tr.optimizer.zero_grad(set_to_none=True)
                # gradient accumulation over microbatches: same update, less memory (never more pairs per pass than
                # optim.minibatch, also when an algorithm's policy step spans more pairs); with the rollout's graph
                # in memory already, one backward pass through it
                micro = len(idx) if graph is not None else ocfg.microbatch or min(len(idx), ocfg.minibatch)
                total, infos = 0.0, {}
                for ms in range(0, len(idx), micro):
                    sub = idx[ms:ms + micro]
                    mb = self.make_minibatch(batch, sub // K, sub % K,
                                             eps=None if graph is None else graph[sub // K, sub % K])
                    loss, info = self.loss(mb)
                    if not torch.isfinite(loss):
                        raise CtrlDiffError(f"{self.name}: non-finite loss at epoch {tr.epoch} (diverged); nothing "
                                            "was applied from this minibatch and the last checkpoint is intact. Lower "
                                            "optim.lr or raise beta")
                    frac = len(sub) / len(idx)  # every loss is a mean over its pairs
                    (loss * frac).backward()
                    total += float(loss.detach()) * frac
                    for key, v in info.items():
                        infos[key] = infos.get(key, 0.0) + float(v) * frac
                loss, info = torch.tensor(total, device="cpu"), infos
                tr.sync_grads(tr.optimizer)  # several processes: clip the averaged gradient
                gnorm = torch.nn.utils.clip_grad_norm_(tr.trainable_parameters, ocfg.grad_clip)
                tr.optimizer.step()
                info = {"loss": float(loss.detach()), "grad_norm": float(gnorm), **info}
                for key, v in info.items():
                    info_sums[key] = info_sums.get(key, 0.0) + float(v)
                n_updates += 1
        out = {f"train/{k}": v / max(n_updates, 1) for k, v in info_sums.items()}
        if "signal_fraction" in info_sums:
            out["train/signal_fraction"] = info_sums["signal_fraction"]
        out["train/updates"] = n_updates
        kl = None
        if start is not None and self.epoch_momentum() > 0:  # the step is along the epochs' averaged direction
            out["train/momentum_cos"] = self.apply_momentum(start, self.epoch_momentum())
        if start is not None and limit > 0:  # the epoch's update, measured in nats, is kept within max_update_kl
            out.update(self.enforce_trust_region(batch, start, limit=limit))
            kl = out["train/update_kl_kept"]
        if tested:  # and it is kept only as far as it improves J on trajectories it was not fitted on
            # (up to the trust region's edge when the step stopped short of it: KL grows as s^2 along the step)
            s_max = math.sqrt(limit / kl) if self.fills_trust_region() and kl else 1.0  # kl: None without a limit
            out.update(self.accept_update(batch, start, held, s_max=s_max))
            past_edge = out.pop("train/accept_free", 0.0) >= s_max
            upper = out.pop("train/accept_upper", 0.0)
            if out.get("train/accepted", 0.0) > 1.0:  # lengthened: the KL is checked again, and cut back if past the edge
                check = self.enforce_trust_region(batch, start, limit=limit)
                out["train/update_kl_kept"] = check["train/update_kl_kept"]
                out["train/accepted"] *= check["train/trust_region_scale"]  # the length finally kept
                # and the gain is estimated again where the step ended: the first estimate was extrapolated
                if self.verify_lengthened(batch, start, held, out):
                    past_edge = False
            if self.trust_region_growth() > 1 and limit > 0:
                # narrowed after a step kept under half the edge; or, narrowing on evidence, only where even the
                # held-out gain's upper bound (one standard error above it) wants under half of it
                short = (upper if self.narrows_on_evidence() else out.get("train/accepted", 0.0)) < 0.5 * s_max
                self.adapt_trust_radius(past_edge, short)
                out["train/trust_radius"] = self.trust_radius
        return out

    # -- the end of a run: kept only if it is better than its start -----------------------------------
    def certify_z(self) -> float | None:
        """Standard errors by which the fine-tune's J must be above the start's for the run to end with it
        (:meth:`certify`); None: no test."""
        return None

    @torch.no_grad()
    def continue_training(self) -> None:
        """A run that ended with its start's weights (:meth:`certify`) and is trained further (``--resume --set
        epochs=N``) goes on from the weights it had trained to, and from their weight EMA, not from the start."""
        if self.uncertified_params is None:
            return
        tr = self.trainer
        copy_into(tr.trainable_parameters, self.uncertified_params)
        if tr.ema is not None and self.uncertified_ema is not None:
            copy_into(tr.ema, self.uncertified_ema)
        self.uncertified_params = self.uncertified_ema = None

    def certify_samples(self) -> int:
        """Size of the certification noise set (:meth:`certify`)."""
        return 64

    def certify_refine(self) -> int:
        """:meth:`certify` also tests the gain with the training solver at this many times its steps (1: not)."""
        return 1

    @torch.no_grad()
    def record_start(self) -> None:
        """At the run's first update, before it: the start's r - beta KL_path on the certification noise, at the
        training solver and at :meth:`certify_refine` times its steps (:meth:`Trainer.certification_terms`), and a
        copy of the start's weights (on the CPU, and in the checkpoint)."""
        tr = self.trainer
        terms = tr.certification_terms(tr.policy, self.certify_samples(), self.certify_refine())
        if tr.dist.all_reduce_int([terms is None])[0]:  # reward_errors=skip and the reward failed: no certification
            return
        self.start_terms = terms
        self.start_params = cpu_copy(tr.trainable_parameters)

    @torch.no_grad()
    def certify(self) -> dict:
        """After the last epoch's update: the run ends with the fine-tuned weights only if their J is above the
        start's by :meth:`certify_z` standard errors; otherwise with the start's weights (and weight EMA). The
        comparison is paired: both models are sampled from the same fixed noises (the certification set,
        :meth:`certify_samples` of them, which no rollout, update or evaluation uses), so the difference of J is
        estimated without the sampling noise that each J has on its own, and without any model of the gain: it is the
        plain Monte Carlo difference, unbiased for the fine-tune, which never saw that noise. With
        :meth:`certify_refine` > 1 the gain must also pass at that many times the training solver's steps (a gain at
        the training grid only may be a fit of its discretisation error). A fine-tune whose gain cannot be told from
        noise is not returned for a better model. The trained weights (and EMA) stay in the algorithm's state
        (``uncertified_params``, saved in the checkpoint), and training further goes on from them
        (:meth:`continue_training`)."""
        tr = self.trainer
        start = self.start_terms if self.start_terms.dim() == 2 else self.start_terms[:, None]  # older checkpoints
        with tr.final_weights():  # with optim.ema_decay the run ends with its weight EMA: that is what is tested
            end = tr.certification_terms(tr.policy, self.certify_samples(),
                                         self.certify_refine() if start.shape[1] > 1 else 1)
        if tr.dist.all_reduce_int([end is None])[0]:  # reward_errors=skip and the reward failed: the fine-tune is kept
            return {"train/certified": float("nan")}
        diffs = tr.dist.all_gather_cat(end - start[:, : end.shape[1]])  # the grids both ends were sampled at
        out, ok = {}, True
        for c, name in enumerate(["", "_fine"][: diffs.shape[1]]):  # the training solver, and refine x its steps
            gain, se = mean_and_se(diffs[:, c])
            ok = ok and gain - self.certify_z() * se > 0
            out[f"train/certified_gain{name}"], out[f"train/certified_gain{name}_se"] = gain, se
        if not ok:
            self.uncertified_params = cpu_copy(tr.trainable_parameters)
            copy_into(tr.trainable_parameters, self.start_params)
            if tr.ema is not None:
                self.uncertified_ema = cpu_copy(tr.ema)
                copy_into(tr.ema, self.start_params)
        if diffs.shape[1] > 1:
            out["train/certified_steps_fine"] = tr.cfg.sampler.steps * self.certify_refine()
        return {"train/certified": float(ok), **out}

    def verify_lengthened(self, batch: RolloutBatch, start: list[Tensor], held: Tensor, out: dict,
                          tries: int = 3) -> bool:
        """A step lengthened past the optimiser's own was chosen by a gain model linear in the likelihood ratios,
        extrapolated from where the optimiser stopped. Estimate the gain again at the parameters it reached (the ratios
        there, exact; the KL change, exact) and halve the extra length, down to the optimiser's step, while its lower
        confidence bound is not above 0. Updates ``out``; returns whether the step was shortened."""
        z = self.acceptance_z()
        shortened = False
        for i in range(tries + 1):
            lin, quad = self.gathered_held_out_terms(batch, held)
            gain, se = mean_and_se(lin - quad)
            out["train/lengthened_gain"], out["train/lengthened_gain_se"] = gain, se
            s_now = out["train/accepted"]
            if gain - z * se > 0 or s_now <= 1.0 or i == tries:
                break
            s_new = max(1.0, 1.0 + (s_now - 1.0) / 2)
            self.rescale_update(start, s_new / s_now)
            out["train/update_kl_kept"] *= (s_new / s_now) ** 2  # KL grows as s^2 along the step
            out["train/accepted"], shortened = s_new, True
        return shortened

    def trust_region_growth(self) -> float:
        """Largest factor by which :meth:`adapt_trust_radius` may widen the trust region (1: a fixed one)."""
        return 1.0

    def narrows_on_evidence(self) -> bool:
        """Whether :meth:`adapt_trust_radius` narrows the trust region only where the held-out gain's upper bound
        wants a step under half its edge (True), or whenever the step kept was (False)."""
        return False

    def adapt_trust_radius(self, past_edge: bool, short: bool) -> None:
        """The trust region's size from the held-out test, as a classic trust-region method sets its radius from how
        well its model predicted the step: doubled (up to :meth:`trust_region_growth` times max_update_kl) when the
        held-out gain's lower confidence bound, at one standard error more than the acceptance test's, wanted a longer
        step than the edge allowed; halved (never below max_update_kl) when the step kept was under half the edge.
        The reward's scale and the learning rate do not enter; the held-out evidence alone decides. Noise that
        passes the acceptance test (about 16% of pure-noise epochs at z = 1) seldom widens the region: nominally 2%
        of them, and 1 of 24 in ``tests/test_ctrl.py``."""
        if past_edge:
            self.trust_radius = min(2 * self.trust_radius, self.trust_region_growth())
        elif short:
            self.trust_radius = max(self.trust_radius / 2, 1.0)

    # -- the acceptance test of an update on held-out trajectories ------------------------------------
    def held_out(self, batch: RolloutBatch) -> Tensor | None:
        """The (local) trajectories of ``batch`` that the policy update does not train on, so that
        :meth:`accept_update` can test it on them (None: no test). Chosen once per batch with ``cpu_gen``."""
        frac = self.held_out_fraction()
        if frac <= 0:
            return None
        if "held_out" not in batch.extras:
            B = batch.traj.batch_size
            n = min(max(int(round(frac * B)), 2), B - 1)
            perm = torch.randperm(B, generator=self.trainer.cpu_gen, device="cpu")
            batch.extras["held_out"] = perm[:n].sort().values.to(batch.traj.states.device)
        return batch.extras["held_out"]

    def held_out_fraction(self) -> float:
        """Share of each batch's trajectories held out to test the update (0: none; see :meth:`accept_update`)."""
        return 0.0

    def acceptance_z(self) -> float:
        """Standard errors by which the held-out estimate of an update's gain in J must be above 0."""
        return 1.0

    def acceptance_shrink(self) -> bool:
        """Whether the held-out gain's first-order term L is shrunk by its own noise before the step's length is
        chosen: L (1 - se^2 / L^2)_+ (positive-part James-Stein), see :meth:`accept_update`."""
        return False

    def fills_trust_region(self) -> bool:
        """Whether :meth:`accept_update` may lengthen a step that stopped short of the trust region up to its edge
        (so that the step's length in nats, not the learning rate, is what the held-out trajectories choose)."""
        return False

    def held_out_advantages(self, batch: RolloutBatch, held: Tensor) -> Tensor:
        """[n_held, K] A_k of the held-out trajectories for the test: a return that is unbiased for theirs (any
        baseline that does not depend on their own actions keeps E[(rho_k - 1) A_k] unbiased). Default: the terminal
        reward less the mean of the trajectories that were trained on, at every step."""
        r = batch.rewards
        return (r[held] - self.trainer.dist.mean(r[self.trained(batch)], 0))[:, None].expand(len(held),
                                                                                          batch.traj.num_steps)

    def trained(self, batch: RolloutBatch) -> Tensor:
        """[B] bool: the trajectories the policy update trains on (all but the :meth:`held_out` ones)."""
        keep = torch.ones(batch.traj.batch_size, dtype=torch.bool, device=batch.traj.states.device)
        held = self.held_out(batch)
        if held is not None:
            keep[held] = False
        return keep

    @torch.no_grad()
    def held_out_terms(self, batch: RolloutBatch, held: Tensor, per_step: bool = False) -> tuple[Tensor, Tensor]:
        """Per held-out trajectory, the gain in J of the epoch's step theta_old -> theta scaled by s, to second order
        (performance difference, the step's likelihood ratios at the sampled transitions, eps linear in s):
            gain_b(s) = s l_b - s^2 q_b,
            l_b = sum_k (rho_k - 1) A_k - 2 beta sum_k w_k (eps_old - eps_ref) . (eps - eps_old),
            q_b = beta sum_k w_k ||eps - eps_old||^2,
        rho_k the ratio theta / old of transition k, A_k from :meth:`held_out_advantages`, w_k the KL quadrature
        weights (the KL part is exact: beta times the change of the closed-form step KL to the reference). -> l, q [n]
        (``per_step``: each step's terms, [n, K])"""
        tr, traj = self.trainer, batch.traj
        K = traj.num_steps
        adv = self.held_out_advantages(batch, held).reshape(-1).double()
        w = self.step_weights(batch)
        b = held.repeat_interleave(K)
        k = torch.arange(K, device=held.device).repeat(len(held))
        micro = tr.cfg.optim.microbatch or tr.cfg.optim.minibatch
        lin = torch.zeros(len(b), dtype=torch.float64, device=held.device)
        quad = torch.zeros_like(lin)
        for s in range(0, len(b), micro):
            bb, kk = b[s:s + micro], k[s:s + micro]
            x, x_next = traj.states[bb, kk], traj.states[bb, kk + 1]
            cond = traj.cond[bb] if isinstance(traj.cond, Tensor) else traj.cond
            eps = model_eps(tr.policy, tr.process, x, traj.times[kk], cond)
            eps_old, eps_ref = traj.outputs[bb, kk], batch.eps_ref[bb, kk]
            std = traj.std[kk].clamp_min(1e-12)
            log_ratio = (gaussian_log_prob(x_next, traj.step_mean(kk, eps, x), std)
                         - gaussian_log_prob(x_next, traj.step_mean(kk, eps_old, x), std))
            log_ratio = torch.where(traj.std[kk] > 0, log_ratio, torch.zeros_like(log_ratio))  # deterministic: 1
            step, wk = (eps - eps_old).flatten(1), w[kk].to(eps.dtype)
            cross = wk * ((eps_old - eps_ref).flatten(1) * step).sum(1)
            lin[s:s + micro] = torch.expm1(log_ratio.double()) * adv[s:s + micro] - 2 * self.cfg.beta * cross.double()
            quad[s:s + micro] = self.cfg.beta * (wk * step.pow(2).sum(1)).double()
        lin, quad = lin.reshape(len(held), K), quad.reshape(len(held), K)
        return (lin, quad) if per_step else (lin.sum(1), quad.sum(1))

    def gathered_held_out_terms(self, batch: RolloutBatch, held: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`held_out_terms` of every process's held-out trajectories (each process gets all of them)."""
        lin, quad = self.held_out_terms(batch, held)
        dist = self.trainer.dist
        return dist.all_gather_cat(lin), dist.all_gather_cat(quad)

    def held_out_gain(self, batch: RolloutBatch, held: Tensor) -> Tensor:
        """Per held-out trajectory, the estimate of J(theta) - J(theta_old) for the step as it stands: l_b - q_b."""
        lin, quad = self.held_out_terms(batch, held)
        return lin - quad

    def accept_update(self, batch: RolloutBatch, start: list[Tensor], held: Tensor, s_max: float = 1.0) -> dict:
        """Scale the epoch's update to the length that the held-out trajectories support: with the gain of the step
        scaled by s estimated as s L - s^2 Q (:meth:`held_out_terms`, means over the held-out trajectories), the
        length that maximises its lower confidence bound s (L - z se(L)) - s^2 Q is
            s* = clip((L - z se(L)) / (2 Q), 0, s_max)   (z = :meth:`acceptance_z`),
        so an update is undone (s* = 0) unless its first-order gain is z standard errors above 0 on trajectories it was
        not fitted on, a weak one is shortened (its KL cost grows as s^2, its gain as s), and a strong one is kept
        whole, or lengthened along itself up to ``s_max`` (the trust region's edge). Sampling noise in the update's
        direction does not pass for a gain, and a reward whose improvement cannot pay for beta times the KL it costs
        does not move the policy. With :meth:`acceptance_pool` the L that chooses the length is the epoch's own
        estimate shrunk towards the last epochs' (:meth:`pooled_gain`)."""
        z = self.acceptance_z()
        lin, quad = self.gathered_held_out_terms(batch, held)
        (L, se), Q = mean_and_se(lin), float(quad.mean())
        out = {"train/held_out_gain": L - Q, "train/held_out_gain_se": se}
        if self.acceptance_pool() and Q > 0:
            L, se = self.pooled_gain(L, se, Q)
            out.update({"train/pooled_gain": L - Q, "train/pooled_gain_se": se})
        # shrunk: E[L_true | L] under a flat-ish prior is about L (1 - se^2 / L^2)_+, so that a step of noise-level
        # evidence (L ~ se) moves the policy little and one of strong evidence (L >> se) keeps its length
        Ls = (L - se * se / L if L > se else 0.0) if self.acceptance_shrink() else L
        lcb, top = Ls - z * se, max(s_max, 1.0)
        s = min(max(lcb / (2 * Q), 0.0), top) if Q > 0 else (top if lcb > 0 else 0.0)
        if s < 1.0 and self.shortening_z() > 0 and (1 + s) * Q - Ls < self.shortening_z() * se:
            s = 1.0  # shorter than the optimiser's own step only where that is better by shortening_z se: kept whole
        if s > 1.0 and self.lengthening_z() > 0:  # beyond the optimiser's own step only as far as the evidence goes
            far = lcb - self.lengthening_z() * se
            s = max(1.0, min(far / (2 * Q), top) if Q > 0 else (top if far > 0 else 1.0))
        # the length without an edge at one standard error more: the evidence that a wider trust region asks for
        wide = L - (z + 1) * se
        free = max(wide / (2 * Q), 0.0) if Q > 0 else (math.inf if wide > 0 else 0.0)
        high = L + se  # and at one standard error above the estimate: the evidence that a narrower one asks for
        upper = max(high / (2 * Q), 0.0) if Q > 0 else (math.inf if high > 0 else 0.0)
        if s != 1.0:
            self.rescale_update(start, s)
        return {"train/accepted": s, **out, "train/accept_free": free, "train/accept_upper": upper}

    def lengthening_z(self) -> float:
        """Further standard errors of the held-out gain that the part of a step beyond s = 1 must be supported by
        (:meth:`accept_update`; 0: lengthened to the estimate's optimum)."""
        return 0.0

    def shortening_z(self) -> float:
        """Standard errors by which the held-out estimate must prefer a step shorter than the optimiser's own (s < 1,
        undone included) to the whole step, gain(s) - gain(1) = (1 - s) ((1 + s) Q - L), before it is shortened
        (:meth:`accept_update`; 0: wherever the estimate prefers it)."""
        return 0.0

    def acceptance_pool(self) -> int:
        """Epochs whose held-out gains form the prior of :meth:`pooled_gain` (0: each epoch's estimate alone)."""
        return 0

    def pooled_gain(self, L: float, se: float, Q: float) -> tuple[float, float]:
        """The epoch's first-order held-out gain L (standard error se) shrunk towards the last epochs' (empirical
        Bayes), -> (posterior mean, posterior standard deviation), in L's units.

        Choosing the step's length by s* = L / (2 Q) from a noisy L is a winner's curse: with L_hat = L + n the chosen
        step's expected true gain is (L^2 - se^2) / (4 Q), at or below 0 wherever the signal-to-noise ratio of one
        epoch is under 1 (a sparse reward), and the run random-walks. The gains of successive epochs' steps share
        their scale: per unit of root cost, l = L / sqrt(Q) (a step scaled by s has gain s l sqrt(Q) - s^2 Q, so l does
        not depend on its length, nor on the learning rate). The last :meth:`acceptance_pool` epochs' estimates l_j
        (every epoch's, before its own acceptance: no selection) give a prior for this epoch's l with mean m (their
        mean) and variance tau^2 + var(m): tau^2 = max(var(l_j) - mean(se_j^2), 0) the spread of the true gains,
        var(m) = max(var(l_j), mean(se_j^2)) / n. The posterior mean m + k (l_hat - m), k = prior var / (prior var +
        se^2), weighs this epoch's own evidence by how much the epochs' true gains differ (a step of an unusual
        direction keeps its own estimate) and by the prior's own noise (few epochs, k near 1). Fewer than 3 epochs: L as
        it is."""
        root = math.sqrt(Q)
        ell, s_ell = L / root, se / root
        hist = self.gain_history[-self.acceptance_pool():]
        self.gain_history = (hist + [(ell, s_ell)])[-self.acceptance_pool():]
        if len(hist) < 3:
            return L, se
        ls = torch.tensor([h[0] for h in hist], dtype=torch.float64)
        m, v, noise = float(ls.mean()), float(ls.var()), sum(h[1] ** 2 for h in hist) / len(hist)
        tau2 = max(v - noise, 0.0)
        prior = tau2 + max(v, noise) / len(hist)  # m's own noise is at least its estimates' sampling noise
        k = prior / (prior + s_ell ** 2) if prior + s_ell ** 2 > 0 else 1.0
        return (m + k * (ell - m)) * root, math.sqrt(k) * se

    def epoch_momentum(self) -> float:
        """mu of :meth:`apply_momentum` (0: each epoch steps along its own update)."""
        return 0.0

    @torch.no_grad()
    def apply_momentum(self, start: list[Tensor], mu: float) -> float:
        """theta <- start + m, m <- mu m + (theta - start): the epoch steps along an exponential average of the
        epochs' raw updates (before the trust region and the acceptance test scale them), not along its own alone.
        Where one epoch's direction is mostly sampling noise (a sparse or rare-event reward), its noise costs KL
        and gains nothing, and the run's steps random-walk; averaged over about (1 + mu) / (1 - mu) epochs, the
        noise's share of the direction shrinks while a signal that persists across epochs adds up. The trust region
        and the held-out test then size the averaged step as they size any other (its held-out trajectories shaped
        neither this epoch's update nor the earlier ones'). -> the cosine between this epoch's update and the average
        it joins (0 at the first epoch)."""
        d = torch._foreach_sub([p.detach() for p in self.trainer.trainable_parameters], start)
        if self.momentum is None:
            self.momentum = [x.clone() for x in d]
            return 0.0
        dot = sum(float((a * b).sum()) for a, b in zip(d, self.momentum, strict=True))
        nd = math.sqrt(sum(float(a.pow(2).sum()) for a in d))
        nm = math.sqrt(sum(float(b.pow(2).sum()) for b in self.momentum))
        torch._foreach_mul_(self.momentum, mu)
        torch._foreach_add_(self.momentum, d)
        self.move_params(torch._foreach_sub(self.momentum, d))  # theta - start becomes m
        return dot / (nd * nm) if nd > 0 and nm > 0 else 0.0

    def rescale_update(self, start: list[Tensor], a: float) -> None:
        """theta <- start + a (theta - start): the epoch's step scaled along itself (a = 0 undoes it)."""
        params = [p.detach() for p in self.trainer.trainable_parameters]
        with torch.no_grad():
            moved = torch._foreach_mul(torch._foreach_sub(params, start), a - 1)
        self.move_params(moved, to=start if a == 0 else None)  # a = 0: exactly back where the epoch started

    @torch.no_grad()
    def move_params(self, moved: list[Tensor], to: list[Tensor] | None = None) -> None:
        """theta <- theta + moved (or exactly ``to``, where that is where the move ends), and the weight EMA by
        moved times its weight: the EMA's last update saw theta before the move, so the move counts as it is."""
        tr = self.trainer
        params = [p.detach() for p in tr.trainable_parameters]
        if to is not None:
            torch._foreach_copy_(params, to)
        else:
            torch._foreach_add_(params, moved)
        if tr.ema is not None:
            torch._foreach_add_(tr.ema, moved, alpha=1 - tr.cfg.optim.ema_decay)

    def signal_scaled(self) -> bool:
        """Whether the trust region shrinks with the batch's signal fraction (:meth:`signal_fraction`)."""
        return False

    def signal_fraction(self, batch: RolloutBatch, pairs: Tensor | None = None, n: int = 128, groups: int = 8,
                        z: float = 1.0) -> float:
        """rho in [0, 1]: the share of the full batch's loss gradient that is signal, not sampling noise. The gradient
        at the sampling policy is taken on ``groups`` disjoint sets of the batch's trajectories (up to ``n`` pairs
        each): g_i = s + n_i with independent noises, so the mean of g_i . g_j over i != j estimates |s|^2 and the mean
        of |g_i|^2 estimates |s|^2 + |n_G|^2; the full batch has 1 / groups of that noise variance, so
        rho = |s|^2 / (|s|^2 + |n_G|^2 / groups), with |s|^2 taken at a lower confidence bound (``z`` standard errors
        below the mean of the dots), 0 when the groups do not agree on a direction. With a trust region
        the step that maximises the expected improvement along a noisy gradient has rho times the KL of the
        noise-free one (for a quadratic objective, eta* = |s|^2 / (lambda E|g|^2)); so a batch with no reproducible
        direction does not move the policy, and a reward x 0.1 moves it less than the same reward x 10."""
        tr, traj = self.trainer, batch.traj
        B, K = traj.batch_size, traj.num_steps
        perm = torch.randperm(B, generator=tr.cpu_gen, device="cpu").to(traj.states.device)
        allowed = None if pairs is None else torch.zeros(B * K, dtype=torch.bool, device=traj.states.device)
        if allowed is not None:
            allowed[pairs.to(traj.states.device)] = True
        grads = []
        for part in perm.tensor_split(groups):
            idx = (part[:, None] * K + torch.arange(K, device=part.device)[None]).reshape(-1)
            if allowed is not None:
                idx = idx[allowed[idx]]
            idx = idx[torch.randperm(len(idx), generator=tr.cpu_gen, device="cpu").to(idx.device)[:n]]
            tr.optimizer.zero_grad(set_to_none=True)
            micro = tr.cfg.optim.microbatch or max(len(idx), 1)
            for ms in range(0, len(idx), micro):
                sub = idx[ms:ms + micro]
                loss, _ = self.loss(self.make_minibatch(batch, sub // K, sub % K))
                (loss * len(sub) / len(idx)).backward()
            tr.sync_grads(tr.optimizer)
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                                    for p in tr.trainable_parameters]).double())
        tr.optimizer.zero_grad(set_to_none=True)
        g = torch.stack(grads)
        gram = g @ g.T
        sq = float(gram.diagonal().mean())
        off = gram[~torch.eye(groups, dtype=torch.bool, device=gram.device)]
        # a lower confidence bound on |s|^2: the mean of the pairwise dots less z of its standard errors (the dots
        # of one group share its noise: the errors of the group means, std / sqrt(groups))
        dot = float(off.mean() - z * off.std() / math.sqrt(groups))
        if dot <= 0 or sq <= 0:
            return 0.0
        return min(dot / (dot + max(sq - dot, 0.0) / groups), 1.0)

    def max_update_kl(self) -> float:
        """Trust region (nats per trajectory) on the Girsanov KL_path between the policy being updated and the
        sampling policy; 0 = none (see :meth:`enforce_trust_region`)."""
        return 0.0

    @torch.no_grad()
    def update_kl(self, batch: RolloutBatch, idx: Tensor) -> float:
        """KL_path(P_theta || P_old) per trajectory, from the pairs ``idx``: K * mean over the pairs of
        int_k (1/2) g^2 ||s_theta - s_old||^2 dtau (the closed-form Girsanov KL; averaged over processes)."""
        tr, traj = self.trainer, batch.traj
        K = traj.num_steps
        w = self.step_weights(batch)
        micro = tr.cfg.optim.microbatch or len(idx)
        tot = torch.zeros((), dtype=torch.float64, device=traj.states.device)
        for s in range(0, len(idx), micro):
            sub = idx[s:s + micro]
            b, k = sub // K, sub % K
            cond = traj.cond[b] if isinstance(traj.cond, Tensor) else traj.cond
            eps = model_eps(tr.policy, tr.process, traj.states[b, k], traj.times[k], cond)
            tot += (w[k].to(eps.dtype) * (eps - traj.outputs[b, k]).flatten(1).pow(2).sum(1)).double().sum()
        kl = tr.dist.all_reduce_mean((tot / max(len(idx), 1) * K).reshape(1))
        return float(kl)

    def enforce_trust_region(self, batch: RolloutBatch, start: list[Tensor], pairs: int = 512,
                             tries: int = 3, limit: float | None = None) -> dict:
        """After an epoch's policy steps: if the policy is more than ``max_update_kl`` nats (per trajectory,
        measured on ``pairs`` random (sample, step) pairs of the batch) from the sampling policy, move the parameters
        back along the epoch's step towards where they started. The KL grows quadratically along it, so
        theta <- start + sqrt(limit / kl) (theta - start), repeated while still outside (at most ``tries`` times).
        So an update's size is set in nats, not by the learning rate or the reward's scale."""
        limit = self.max_update_kl() if limit is None else limit
        tr = self.trainer
        B, K = batch.traj.batch_size, batch.traj.num_steps
        idx = torch.randperm(B * K, generator=tr.cpu_gen, device="cpu")[:pairs].to(batch.traj.states.device)
        kl0 = kl = self.update_kl(batch, idx)
        scale = 1.0
        for _ in range(tries):
            if kl <= limit:
                break
            a = math.sqrt(limit / kl)
            scale *= a
            self.rescale_update(start, a)
            kl = self.update_kl(batch, idx)
        return {"train/update_kl": kl0, "train/trust_region_scale": scale, "train/update_kl_kept": kl}

    def inner_epochs(self) -> int:
        return self.trainer.cfg.optim.inner_epochs

    def recompute_log_prob_old(self, batch: RolloutBatch, mbs: list[Tensor]) -> Tensor:
        """log p_theta_old(x_{k+1} | x_k) of every pair [B, K], evaluated minibatch by minibatch and microbatch by
        microbatch exactly as the update's forward passes will be (same pairs together, same precision, and with
        grad enabled as there, so that no kernel choice depends on it; each graph is dropped at once)."""
        ocfg, K = self.trainer.cfg.optim, batch.traj.num_steps
        out = batch.traj.log_probs.clone()
        for idx in mbs:
            micro = ocfg.microbatch or min(len(idx), ocfg.minibatch)
            for ms in range(0, len(idx), micro):
                sub = idx[ms:ms + micro]
                out[sub // K, sub % K] = self.make_minibatch(batch, sub // K, sub % K).log_prob.detach()
        return out

    def minibatch_size(self, n_pairs: int) -> int:
        """(sample, step) pairs per policy step, of the epoch's ``n_pairs`` = batch_size * K (all processes)."""
        return self.trainer.cfg.optim.minibatch

    def make_minibatch(self, batch: RolloutBatch, b: Tensor, k: Tensor, eps: Tensor | None = None) -> Minibatch:
        """Pairs (b, k) with the policy's eps at them (``eps``: already evaluated, with its graph, by a rollout
        with optim.reuse_rollout_graph; the policy is unchanged since, so it is the same function of theta)."""
        tr, traj = self.trainer, batch.traj
        x, x_next = traj.states[b, k], traj.states[b, k + 1]
        t = traj.times[k]
        cond = traj.cond[b] if isinstance(traj.cond, Tensor) else traj.cond
        if eps is None:
            eps = model_eps(tr.policy, tr.process, x, t, cond)
        log_prob = log_prob_old = None
        if self.needs_log_prob:
            mean = traj.step_mean(k, eps, x)
            log_prob = gaussian_log_prob(x_next, mean, traj.std[k])
            log_prob_old = batch.extras.get("log_prob_old", traj.log_probs)[b, k]
        return Minibatch(b=b, k=k, t=t, x=x, x_next=x_next, cond=cond, eps=eps, eps_old=traj.outputs[b, k],
                         eps_ref=batch.eps_ref[b, k], log_prob=log_prob, log_prob_old=log_prob_old, batch=batch)

    # -- small shared formulas ------------------------------------------------------------------------
    def step_weights(self, batch: RolloutBatch, prediction: str | None = None) -> Tensor:
        """The KL_path quadrature weights w_k of the batch's grid and eta [K] (:func:`ctrldiff.solvers.kl_weights`, for
        the policy's output type or ``prediction``), computed once per batch and kept in ``batch.extras``."""
        pred = prediction_of(self.trainer.policy) if prediction is None else prediction
        key = f"kl_weights/{pred}"
        if key not in batch.extras:
            traj = batch.traj
            batch.extras[key] = kl_weights(self.trainer.process, traj.times, traj.eta, pred)
        return batch.extras[key]

    def step_kl_rate(self, mb: Minibatch, eps: Tensor, target: Tensor | None = None,
                     prediction: str | None = None) -> Tensor:
        """int over step k of (1/2) g^2 ||s - s_target||^2 dtau per pair, s = -eps / sigma (target: s_ref) -> [N]
        (the quadrature of :func:`ctrldiff.solvers.kl_weights` for the policy's output type, or ``prediction``: 'eps'
        weights a regression loss uniformly in time in score units, whatever the model predicts)."""
        w = self.step_weights(mb.batch, prediction)[mb.k].to(eps.dtype)
        target = mb.eps_ref if target is None else target
        return w * (eps - target).flatten(1).pow(2).sum(1)


class TerminalRewardAlgorithm(Algorithm):
    """Shared by DDPO and DPOK: advantages from the terminal reward minus a per-condition baseline,
    whose buffers are part of the checkpoint. Subclasses set ``acfg`` (with stat_buffer / stat_min_count)."""

    def __init__(self, cfg, trainer, acfg):
        super().__init__(cfg, trainer)
        from ..rewards.stats import PerConditionStats

        self.acfg = acfg
        # several processes: the buffers see every process's rewards, so every process has the same baseline
        self.stats = PerConditionStats(acfg.stat_buffer, acfg.stat_min_count, gather=trainer.dist.all_gather_any)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.stats.load_state_dict(state["stats"])


def cpu_copy(tensors: list[Tensor]) -> list[Tensor]:
    """Detached copies on the CPU (weights kept aside: the certification's start, a run's uncertified end)."""
    return [t.detach().to("cpu", copy=True) for t in tensors]


@torch.no_grad()
def copy_into(dst: list[Tensor], src: list[Tensor]) -> None:
    """dst[i] <- src[i] in place, each on its own device (e.g. weights from a CPU copy)."""
    for d, s in zip(dst, src, strict=True):
        d.detach().copy_(s.to(d.device))


def mean_and_se(v: Tensor) -> tuple[float, float]:
    """The mean of per-trajectory values and its standard error, sqrt(var / (n - 1)) with var the population variance."""
    m = float(v.mean())
    return m, math.sqrt(max(float(v.pow(2).mean()) - m ** 2, 0.0) / max(len(v) - 1, 1))


def ppo_clip_loss(ratio: Tensor, adv: Tensor, clip: float) -> Tensor:
    """-mean min(rho A, clip(rho, 1 - eps, 1 + eps) A)   (per pair, [N] -> scalar)."""
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()


def gradient_step(algo: Algorithm, loss_fn, idx: Tensor) -> dict:
    """One optimizer step on the mean loss over the items ``idx`` [N] (for algorithms that override ``update``).

    ``loss_fn(sub) -> (loss, info)`` is a mean over the items ``sub``; with ``optim.microbatch`` (where the
    config has it) the items are processed in chunks whose gradients are accumulated (same step, less memory).
    A non-finite loss stops before anything is applied. Several processes: ``idx`` is this process's share of the
    global minibatch (from ``trainer.minibatches``), the gradient is averaged across processes before it is
    clipped, so the step is that of one process on the global minibatch. Returns {"loss", "grad_norm", **info}
    (this process's means; ``grad_norm`` is the averaged gradient's)."""
    tr = algo.trainer
    micro = getattr(tr.cfg.optim, "microbatch", None) or len(idx)
    tr.optimizer.zero_grad(set_to_none=True)
    out: dict[str, float] = {"loss": 0.0}
    for s in range(0, len(idx), micro):
        sub = idx[s:s + micro]
        loss, info = loss_fn(sub)
        if not torch.isfinite(loss):
            tr.optimizer.zero_grad(set_to_none=True)
            raise CtrlDiffError(f"{algo.name}: non-finite loss at epoch {tr.epoch} (diverged); nothing was applied "
                                "from this minibatch and the last checkpoint is intact. Lower optim.lr or raise beta")
        frac = len(sub) / len(idx)
        (loss * frac).backward()
        out["loss"] += float(loss.detach()) * frac
        for key, v in info.items():
            out[key] = out.get(key, 0.0) + float(v) * frac
    tr.sync_grads(tr.optimizer)  # several processes: clip the averaged gradient (as the shared update loop)
    out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(tr.trainable_parameters, tr.cfg.optim.grad_clip))
    tr.optimizer.step()
    return out
