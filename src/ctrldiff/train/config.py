"""The one training configuration, shared by every algorithm (sections per algorithm)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..algorithms.adjoint_matching import AdjointMatchingConfig
from ..algorithms.ctrl import CTRLConfig
from ..algorithms.ddpo import DDPOConfig
from ..algorithms.diffusion_dpo import DiffusionDPOConfig
from ..algorithms.diffusion_nft import DiffusionNFTConfig
from ..algorithms.dpok import DPOKConfig
from ..algorithms.flow_grpo import FlowGRPOConfig
from ..algorithms.lasro import LaSROConfig
from ..algorithms.qlearning import QLearningConfig
from ..algorithms.reward_backprop import RewardBackpropConfig
from ..config import Strict
from ..models.diffusers_backend import DiffusersConfig

ALGOS = ("ctrl", "ddpo", "ddpo-sf", "dpok", "q-learning", "reward-backprop", "diffusion-dpo", "lasro", "adjoint-matching",
         "flow-grpo", "diffusion-nft")


class SamplerConfig(Strict):
    solver: Literal["em", "ddim", "ode-euler", "eta"] = Field(
        "em", description="rollout solver; RL updates need stochastic transitions: em, ddim with eta > 0, eta with "
        "eta > 0, or an ODE solver (ddim eta=0, ode-euler, eta with eta=0) with policy_std > 0. 'eta': the eta-family "
        "sampler dY = [-f Y + (1 + eta^2)/2 g^2 s] dtau + eta g dB (eta = 1: em, eta = 0: the probability-flow ODE)")
    steps: int = Field(20, ge=1, le=1000, description="solver steps of the rollouts (the shipped digits model is within "
                       "a few % of its continuous-time J from 20 EM steps on; at 10 it is only 72% recognisable, and a "
                       "fine-tune there spends its KL repairing the grid)")
    eta: float = Field(1.0, ge=0, description="noise level of the ddim and eta solvers (KL_path and J* of the "
                       "yardstick assume eta = 1 for the eta solver: METHODS section 8)")
    policy_std: float = Field(0.0, ge=0, description="Gaussian policy noise on the action (eps units)")
    guidance: float | None = Field(None, ge=0, description="classifier-free guidance scale (None: off)")
    random_grid: bool | None = Field(
        None, description="draw a fresh time grid every epoch (each interior time uniform between the midpoints to "
        "its neighbours on the fixed grid), so that an update cannot fit one grid's discretisation error: the "
        "Girsanov ratios, KL_path and TD advantages hold on any grid. None (auto): on for continuous-time processes "
        "and algorithms whose update holds on any grid (not lasro / q-learning, not discrete diffusers schedules)")
    reference_data_end: bool = Field(
        False, description="the fine-tune leaves the data end to the reference: at times at or below the midpoint of "
        "the training grid's last two interior times (0.076 on the 20-step VP grid; every finer solver uses the same "
        "time) the policy is the reference model, so no update can fit the training grid's last, largest step, whose "
        "change costs KL_path at finer solvers for little reward there. The run's evaluation, `ctrldiff eval RUN` and "
        "the exported model card use the same rule (`ctrldiff sample --model` and exported LoRAs do not). Measured, off: "
        "rewards of coarse structure gain (left-heavy x10: +0.34 / +0.47 J at em:20 / em:100), rewards that need "
        "control at the data end lose (the main job: -3.5 J at em:20; the 2-D quadratic x10: -5.5), docs/CTRL.md "
        "section 21")
    random_grid_space: Literal["time", "log_snr"] = Field(
        "time", description="with random_grid: draw each interior time uniform between the midpoints to its "
        "neighbours in time, or in log-SNR. log_snr lets the last interior time reach down to where the log-SNR is "
        "halfway to the data end's (on the shipped VP 20-step grid, down to t = 0.0095 instead of 0.026), so that training "
        "also visits the small times that finer solvers step through")


class OptimConfig(Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.0, ge=0, lt=1, description="exponential moving average of the trained weights, "
                             "updated after every policy step with this decay (0: off). The run's final model "
                             "(final_model / LoRA), final_eval.json and before/after figure use the EMA weights; "
                             "checkpoints hold both")
    warmup_steps: int = Field(0, ge=0, description="policy optimizer steps over which the learning rate rises "
                              "linearly from lr / warmup_steps to lr (0: none). Adam's first steps move every "
                              "parameter by about lr whatever the gradient, which a few-step generator feels most")
    inner_epochs: int = Field(1, ge=1, description="passes over each epoch's rollouts")
    minibatch: int = Field(256, ge=1, description="(sample, step) pairs per gradient step (ddpo-sf takes one step over "
                           "all batch_size * steps pairs, in passes of this many)")
    reuse_rollout_graph: bool = Field(
        False, description="keep the rollout's autograd graph and take the (single) policy step through it, "
        "instead of evaluating the policy again: saves one model forward per (sample, step). Needs memory for every "
        "step's activations, inner_epochs=1 and minibatch >= batch_size * steps")
    recompute_log_prob_old: bool | None = Field(
        None, description="recompute log p_old of every (sample, step) pair at theta_old with the update's own "
        "forward passes (same minibatches, same precision; one extra forward without grad per pair), and keep that "
        "partition into minibatches for every inner epoch: so the ratio is exactly 1 at theta_old also under fp16 / "
        "bf16 autocast, where the rollout's eps (other batches, other kernels) differs by rounding. None: on when the "
        "policy runs in reduced precision (autocast or fp16/bf16 weights)")
    microbatch: int | None = Field(None, ge=1, description="pairs per forward/backward pass: a minibatch is split "
                                   "into microbatches whose gradients are accumulated (same update, less memory); "
                                   "also the chunk size of the reference model's evaluation. None: the whole minibatch")


class LogConfig(Strict):
    sample_every: int = Field(0, ge=0, description="write a sample grid every N epochs (0: start and end)")
    checkpoint_every: int = Field(5, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        ["tensorboard"], description="experiment trackers that get every epoch's metrics and the sample grids: "
        "tensorboard (RUN_DIR/tensorboard; pip install tensorboard), wandb (pip install wandb; WANDB_MODE=offline "
        "keeps it local). A missing package turns its tracker off with a warning; [] for none")
    tensorboard: bool = Field(True, description="kept for old configs: false removes tensorboard from trackers")
    wandb_project: str = Field("ctrldiff", min_length=1, description="wandb project of the run (log.trackers: wandb)")
    progress: bool = True
    num_eval_samples: int = Field(100, ge=1, description="samples in the grids / scatter plots")
    kl_path: bool = Field(True, description="evaluate the reference model along every rollout to log KL_path; "
                          "false skips that for algorithms whose update does not use it (ddpo, ddpo-sf): "
                          "kl_path and objective are then logged as NaN")
    num_final_eval: int = Field(500, ge=0, description="fixed-noise samples scored before/after at the end "
                                "(final_eval.json); 0 = skip")

    def active_trackers(self) -> list[str]:
        """``trackers`` without duplicates, less tensorboard when the old ``tensorboard: false`` switch is set."""
        return [t for t in dict.fromkeys(self.trackers) if t != "tensorboard" or self.tensorboard]


class TrainConfig(Strict):
    algo: Literal["ctrl", "ddpo", "ddpo-sf", "dpok", "q-learning", "reward-backprop", "diffusion-dpo", "lasro",
                  "adjoint-matching", "flow-grpo", "diffusion-nft"] = "ctrl"
    model: str = Field("digits", description="'digits' (shipped), 'gmm2-exact' | 'gmm4-exact' | 'gmm8-exact' "
                       "(exact 2-D score + zero-initialised residual), 'scratch-<data set>' (fresh model + data, for "
                       "q-learning: scratch-gmm2, scratch-gmm4-cond, scratch-digits, ...), a saved model path, or a "
                       "diffusers pipeline: a directory with model_index.json or a hub id (section 'diffusers')")
    process: Literal["vp", "vp-cosine", "rf"] = Field("vp", description="noise process for *-exact and scratch-* models")
    reward: str = Field("digit-confidence", description="built-in name, module:function, or weighted sum (default: "
                        "the digit classifier's log-odds of the conditioned label, which keeps headroom in continuous "
                        "time where log p(c | x) is saturated)")
    reward_errors: Literal["raise", "skip"] = Field(
        "raise", description="a reward batch with NaN/inf/wrong shape/exception: stop, or skip it (counted)")
    beta: float = Field(0.05, ge=0, description="KL_path weight in J = E r - beta KL_path")
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(128, ge=1, description="trajectories per epoch")
    rollout_chunk: int = Field(256, ge=1, description="trajectories sampled per solver call")
    reward_async: bool = Field(True, description="score a chunk's rewards while the next chunk is sampled")
    seed: int = 0
    device: str = "cpu"
    sampler: SamplerConfig = SamplerConfig()
    optim: OptimConfig = OptimConfig()
    log: LogConfig = LogConfig()
    ctrl: CTRLConfig = CTRLConfig()
    ddpo: DDPOConfig = DDPOConfig()
    dpok: DPOKConfig = DPOKConfig()
    qlearning: QLearningConfig = QLearningConfig()
    reward_backprop: RewardBackpropConfig = RewardBackpropConfig()
    diffusion_dpo: DiffusionDPOConfig = DiffusionDPOConfig()
    lasro: LaSROConfig = LaSROConfig()
    adjoint_matching: AdjointMatchingConfig = AdjointMatchingConfig()
    flow_grpo: FlowGRPOConfig = FlowGRPOConfig()
    diffusion_nft: DiffusionNFTConfig = DiffusionNFTConfig()
    diffusers: DiffusersConfig = DiffusersConfig()

    @model_validator(mode="after")
    def _compatible(self):
        s = self.sampler
        needs_lp = (self.algo in ("ddpo", "ddpo-sf", "dpok", "flow-grpo")
                    or (self.algo == "ctrl" and self.ctrl.estimator == "a"))
        deterministic = (s.solver == "ode-euler" or (s.solver in ("ddim", "eta") and s.eta == 0)) and s.policy_std == 0
        if self.algo == "q-learning" and s.policy_std > 0:
            raise ValueError("q-learning sets its own policy noise (theta / (2 g^2), qlearning.theta): leave "
                             "sampler.policy_std at 0")
        if needs_lp and deterministic:
            raise ValueError(f"algo {self.algo!r} needs stochastic rollouts, but sampler.solver={s.solver!r} "
                             f"(eta={s.eta}) with policy_std=0 is deterministic: use em, ddim with eta > 0, "
                             "or set sampler.policy_std > 0")
        if self.algo == "lasro" and s.steps > 2:
            raise ValueError(f"algo 'lasro' fine-tunes 1-2-step generators: sampler.steps must be 1 or 2, got "
                             f"{s.steps} (use e.g. --model digits-2step --solver ddim --steps 2 --set sampler.eta=0)")
        if self.algo == "ctrl" and self.ctrl.estimator == "b" and self.beta <= 0:
            raise ValueError("ctrl.estimator=b needs beta > 0")
        if self.algo == "adjoint-matching":
            memoryless = s.solver == "em" or (s.solver in ("eta", "ddim") and s.eta == 1)
            if not memoryless or s.policy_std > 0:
                raise ValueError(f"adjoint-matching needs the memoryless sampler: sampler.solver=em (or eta / ddim with "
                                 f"eta=1) and policy_std=0, got {s.solver!r} (eta={s.eta}, policy_std={s.policy_std})")
        for name, sec in (("flow-grpo", self.flow_grpo), ("diffusion-nft", self.diffusion_nft)):
            if self.algo == name and self.batch_size % sec.group_size:
                raise ValueError(f"{name} samples groups of {sec.group_size} rollouts per condition: batch_size "
                                 f"({self.batch_size}) must be a multiple of {name.replace('-', '_')}.group_size")
        if self.algo == "flow-grpo" and self.flow_grpo.window is not None:
            if s.solver != "eta" or s.eta <= 0:
                raise ValueError("flow_grpo.window (Flow-GRPO-Fast) runs the eta sampler: set sampler.solver=eta and "
                                 f"sampler.eta > 0, got {s.solver!r} (eta={s.eta})")
            lo, hi = self.flow_grpo.window_range or (0, max(-(-s.steps // 2), self.flow_grpo.window))
            if not 0 <= lo < hi <= s.steps or hi - lo < self.flow_grpo.window:
                raise ValueError(f"flow_grpo.window ({self.flow_grpo.window} steps) must fit in flow_grpo.window_range "
                                 f"[{lo}, {hi}) within the {s.steps} sampler steps")
        if self.algo == "diffusion-dpo":
            if self.batch_size < 2:
                raise ValueError(f"diffusion-dpo compares samples of one condition: batch_size must be >= 2 per "
                                 f"condition, got {self.batch_size}")
        return self


def default_config(algo: str = "ctrl") -> TrainConfig:
    return TrainConfig(algo=algo)
