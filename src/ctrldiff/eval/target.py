"""What ``ctrldiff eval`` evaluates: a policy, its reference, the reward and beta, resolved from a model
spec ('digits', '<gmm>-exact', a saved model path) or from a training run directory.

For a run directory the policy is the run's ``final_model`` (or its latest checkpoint when that is newer
or the model type cannot be saved, e.g. the '*-exact' models), applied to the task of its ``config.yaml``;
the reference, reward, beta and guidance are the run's, unless overridden. A run that fine-tuned a diffusers
pipeline is evaluated on its latest checkpoint (the LoRA / trained weights) with its prompt set: samples are
latents, decoded by the pipeline's VAE for the reward, which gets the prompt strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CtrlDiffError, check
from ..guidance import with_guidance, with_reference_below
from ..noise import NoiseProcess
from ..rewards.base import make_reward
from ..solvers import data_end_time


@dataclass
class EvalSetup:
    """Everything needed to evaluate one policy against one reference."""

    name: str  # what was asked for (model spec or run directory)
    source: str  # where the policy weights came from
    policy: nn.Module  # already wrapped in classifier-free guidance if any
    ref: nn.Module
    ref_name: str
    process: NoiseProcess
    sample_shape: tuple[int, ...]
    num_classes: int
    reward: object
    beta: float
    guidance: float | None
    model_spec: str  # the task's model spec ('digits', 'gmm2-exact', a path)
    run_dir: Path | None = None
    sampler: dict = field(default_factory=dict)  # the run's training sampler (solver, steps, eta) if any
    task: object | None = None  # the Task (decode, reward_cond, eval_conditions: latent text-to-image runs)
    chunk: int = 1000  # samples per solver call

    @property
    def is_digits(self) -> bool:
        """Class-conditional 1-channel image model with 10 classes: the digits metrics apply."""
        return self.num_classes == 10 and len(self.sample_shape) == 3 and self.sample_shape[0] == 1

    @property
    def exact_preset(self) -> str | None:
        """'gmm2' for a 'gmm2-exact' task (the exact 2-D yardstick applies), else None."""
        from ..data.toy2d import parse_exact_spec

        parsed = parse_exact_spec(self.model_spec)
        return parsed[0] if parsed else None

    def conditions(self, n: int) -> torch.Tensor | None:
        """Balanced evaluation labels (or prompt indices) 0, 1, ..., C-1, 0, ... [n] (None for unconditional models)."""
        if self.task is not None:
            return self.task.eval_conditions(n)
        return None if not self.num_classes else torch.arange(n, device="cpu") % self.num_classes

    @property
    def prompts(self) -> list[str] | None:
        """The prompt set of a text-to-image run (conditions index it), else None."""
        names = getattr(self.task, "prompts", None)
        return list(names) if names else None


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.yaml").exists()


def _frozen(m: nn.Module) -> nn.Module:
    return m.eval().requires_grad_(False)


def _run_weights(run: Path, task, device: str = "cpu") -> tuple[nn.Module, str]:
    """The run's newest weights: final_model.* or the latest checkpoint loaded into ``task.model``."""
    from ..models.base import load_model
    from ..train.checkpoint import latest_checkpoint

    final = run / "final_model.safetensors"
    ckpt = latest_checkpoint(run / "checkpoints") if (run / "checkpoints").is_dir() else None
    ckpt_epoch = int(ckpt.stem.split("_")[-1]) if ckpt is not None else -1
    if final.exists():
        meta = json.loads(final.with_suffix(".json").read_text()).get("metadata", {})
        if int(meta.get("epochs", 0)) >= ckpt_epoch:
            return load_model(final).to(device), str(final)
    if ckpt is None:
        raise CtrlDiffError(f"run directory {run} has neither final_model.safetensors nor a checkpoint to evaluate")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    _load_checkpoint_weights(task, state)
    return task.model, str(ckpt)


def _load_checkpoint_weights(task, state: dict) -> None:
    """The checkpoint's trained weights into ``task``; its EMA weights instead when the run kept an EMA
    (``optim.ema_decay``), as its final model does."""
    task.load_model_state_dict(state["model"])
    if state.get("ema") is not None:
        params = list(task.trainable)
        check(len(params) == len(state["ema"]), "the checkpoint's EMA weights do not match the model's parameters")
        with torch.no_grad():
            for p, e in zip(params, state["ema"], strict=True):
                p.copy_(e)


def _diffusers_run_weights(run: Path, task) -> tuple[nn.Module, str]:
    """A diffusers run's trained weights (LoRA or full) from its latest readable checkpoint, into ``task``."""
    from ..train.checkpoint import load_latest_checkpoint

    path, state, rejected = (load_latest_checkpoint(run / "checkpoints", map_location="cpu")
                             if (run / "checkpoints").is_dir() else (None, None, []))
    if state is None:
        why = f" ({'; '.join(rejected)})" if rejected else ""
        raise CtrlDiffError(f"run directory {run} has no readable checkpoint to evaluate{why}")
    _load_checkpoint_weights(task, state)
    return task.model, str(path)


def _build(spec: str, process: str = "vp", device: str = "cpu"):
    from ..assets import SHIPPED_MODELS
    from ..train.task import build_task

    if spec not in SHIPPED_MODELS and not spec.endswith("-exact"):
        p = Path(spec)
        if not (p.exists() or p.with_suffix(".json").exists()):
            raise CtrlDiffError(f"{spec!r} is neither 'digits', a '<gmm>-exact' preset, a model file nor a run directory")
        check(not p.is_dir(), f"{spec} is a directory but not a ctrldiff run (no config.yaml)")
    return build_task(spec, process, device)


def load_setup(spec: str, *, reward: str | None = None, beta: float | None = None,
               guidance: float | str | None = "auto", ref: str | None = None, device: str = "cpu") -> EvalSetup:
    """Resolve MODEL_OR_RUN into an :class:`EvalSetup`.

    Defaults for a run come from its config.yaml (reward, beta, sampler.guidance, reference = its model);
    for a model they are the training defaults (TrainConfig) and the reference is the model itself
    (KL_path = 0) unless ``ref`` names another model; the default reward of a 2-D model is
    'toy2d-mode-switch'. ``guidance``: a CFG scale, None (off) or 'auto' (the run's, else off).
    """
    from ..train.config import TrainConfig
    from ..train.trainer import load_run_config

    check(beta is None or beta >= 0, f"--beta must be >= 0, got {beta}")
    run_dir = Path(spec) if is_run_dir(spec) else None
    text_task, chunk = None, 1000
    if run_dir is not None:
        cfg = load_run_config(run_dir)
        from ..train.task import _is_diffusers_spec, build_task

        if _is_diffusers_spec(cfg.model):
            check(ref is None, "--ref is not available for a diffusers run: its reference is the pipeline it "
                  f"fine-tuned ({cfg.model})")
            task = text_task = build_task(cfg.model, cfg.process, device, cfg.diffusers)
            policy, source = _diffusers_run_weights(run_dir, task)
            chunk = max(cfg.rollout_chunk, 1)
        else:
            task = _build(cfg.model, cfg.process, device)
            policy, source = _run_weights(run_dir, task, device)
        ref_model, ref_name = task.ref, cfg.model
        sampler = {"solver": cfg.sampler.solver, "steps": cfg.sampler.steps, "eta": cfg.sampler.eta}
    else:
        cfg = TrainConfig()
        task = _build(spec, cfg.process, device)
        if tuple(task.sample_shape) == (2,):
            cfg.reward = "toy2d-mode-switch"
        policy, source, ref_model, ref_name, sampler = task.model, spec, task.ref, spec, {}
    if ref is not None:
        other = _build(ref, cfg.process, device)
        check(other.sample_shape == task.sample_shape,
              f"reference {ref!r} has data shape {other.sample_shape}, the model {task.sample_shape}")
        ref_model, ref_name = other.model, ref
    g = cfg.sampler.guidance if guidance == "auto" else guidance
    check(g is None or g >= 0, f"--guidance must be >= 0, got {g}")
    policy = with_guidance(_frozen(policy), g)
    if run_dir is not None and cfg.sampler.reference_data_end:  # the run's own reference, whatever --ref compares to
        policy = with_reference_below(policy, with_guidance(_frozen(task.ref), g),
                                      data_end_time(task.process, cfg.sampler.steps))
    return EvalSetup(
        name=spec, source=source, policy=policy, ref=with_guidance(_frozen(ref_model), g),
        ref_name=ref_name, process=task.process, sample_shape=tuple(task.sample_shape), num_classes=task.num_classes,
        reward=make_reward(reward if reward is not None else cfg.reward), beta=float(cfg.beta if beta is None else beta),
        guidance=g, model_spec=cfg.model if run_dir is not None else spec, run_dir=run_dir, sampler=sampler,
        task=text_task, chunk=chunk)
