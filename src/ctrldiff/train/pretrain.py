r"""Pretraining by denoising score matching, and training the digits classifier.

DSM with the eps parameterisation:  t ~ U[t_min, 1],  x_t = alpha_t x_0 + sigma_t eps,
    L(theta) = E || eps_theta(x_t, t, c~) - eps ||^2,
or with ``prediction='v'`` the regression on the process's v target (flow matching on the rectified flow:
v = eps - x0, L = E || v_theta(x_t, t, c~) - (eps - x0) ||^2), or on x0 with ``prediction='x0'``; where c~ is the
label replaced by the null token with probability ``cond_drop`` (so one network
learns both the conditional and the unconditional model that classifier-free guidance mixes).
AdamW with linear warm-up and cosine decay, an EMA of the weights (the EMA model is the one that
is saved), gradient clipping, and atomic periodic checkpoints (EMA + raw + optimizer + step).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from ..data.toy2d import TOY2D, sample_toy2d
from ..errors import CtrlDiffError, choice
from ..models.base import MODEL_TYPES, save_model
from ..noise import PROCESSES, make_process

DATASETS = ("digits", *TOY2D)
CHECKPOINT = "checkpoint.pt"


class PretrainConfig(BaseModel):
    """Settings of :func:`pretrain` (unknown keys are an error)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "digits"
    steps: int = Field(20000, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(200, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    cond_drop: float = Field(0.1, ge=0, le=1)
    t_min: float = Field(1e-3, ge=0, lt=1)
    process: str = "vp"
    prediction: str = Field("eps", description="what the network predicts: eps, v (the flow velocity on 'rf') or x0")
    resolution: int = 8
    model: dict = Field(default_factory=dict, description="overrides of the model constructor's arguments")
    seed: int = 0
    out: str = "runs/pretrain"
    checkpoint_every: int = Field(1000, gt=0)
    log_every: int = Field(200, gt=0)
    resume: bool = False
    command: str | None = None

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return choice("data set", v, DATASETS)

    @field_validator("prediction")
    @classmethod
    def _prediction(cls, v: str) -> str:
        return choice("prediction type", v, ("eps", "v", "x0"))

    @field_validator("process")
    @classmethod
    def _process(cls, v: str) -> str:
        return choice("noise process", v, PROCESSES)


def build_model(cfg: PretrainConfig) -> nn.Module:
    """The default model for the data set: a class-conditional UNet for digits, an MLP for 2-D data."""
    if cfg.dataset == "digits":
        from ..models.unet import UNet

        kw = dict(in_channels=1, resolution=cfg.resolution, num_classes=10, prediction=cfg.prediction) | cfg.model
        cls = UNet
    else:
        kw = dict(dim=2, hidden=128, depth=3, num_classes=0, prediction=cfg.prediction) | cfg.model
        cls = MODEL_TYPES["mlp"]
    try:
        return cls(**kw)
    except TypeError as e:
        raise CtrlDiffError(f"bad model setting for {cls.model_type}: {e}") from None


class DataSampler:
    """Draws training batches (x0 [B, ...], labels [B] or None) with a seeded generator."""

    def __init__(self, cfg: PretrainConfig, generator: torch.Generator):
        self.dataset, self.gen = cfg.dataset, generator
        self.images = self.labels = None
        if cfg.dataset == "digits":
            from ..data.digits import load_digits

            d = load_digits("train", cfg.resolution)
            self.images, self.labels = d.images, d.labels

    @property
    def data_shape(self) -> list[int]:
        return list(self.images.shape[1:]) if self.images is not None else [2]

    def __call__(self, batch: int) -> tuple[Tensor, Tensor | None]:
        if self.images is None:
            return sample_toy2d(self.dataset, batch, self.gen), None
        idx = torch.randint(0, self.labels.numel(), (batch,), generator=self.gen)
        return self.images[idx], self.labels[idx]


def dsm_loss(model: nn.Module, process, x0: Tensor, cond: Tensor | None, t_min: float, cond_drop: float,
             generator: torch.Generator) -> Tensor:
    """E ||out_theta(x_t, t, c~) - target||^2 with t ~ U[t_min, 1] and label dropout (the null token); the target
    is eps, x0 or the process's v (``process.velocity``: eps - x0 on the rectified flow) per ``model.prediction``."""
    b = x0.shape[0]
    t = t_min + (1 - t_min) * torch.rand(b, generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    xt, _ = process.marginal(x0, t, eps)
    if cond is not None and cond_drop > 0:
        drop = torch.rand(b, generator=generator) < cond_drop
        cond = torch.where(drop, model.null_condition(cond), cond)
    pred = getattr(model, "prediction", "eps")
    target = eps if pred == "eps" else x0 if pred == "x0" else process.velocity(x0, eps, t)
    return F.mse_loss(model(xt, t, cond), target)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay theta_ema + (1 - decay) theta (buffers copied)."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then os.replace (never leaves a half-written checkpoint)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class PretrainResult:
    model_path: Path
    checkpoint_path: Path
    losses: list[float] = field(default_factory=list)
    train_time_s: float = 0.0


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] | None = print) -> PretrainResult:
    """Train a denoiser by DSM; writes ``out/checkpoint.pt`` periodically and ``out/model.{safetensors,json}``
    (the EMA weights) at the end. Returns the paths and the loss curve (mean per log window)."""
    log = log or (lambda s: None)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    process = make_process(cfg.process)
    data = DataSampler(cfg, gen)
    model = build_model(cfg)
    out.mkdir(parents=True, exist_ok=True)  # after everything that can reject the config: no empty directory
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed, losses = 0, 0.0, []
    ckpt_path = out / CHECKPOINT
    if cfg.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step, elapsed, losses = ck["step"], ck.get("train_time_s", 0.0), ck.get("losses", [])
        gen.set_state(ck["generator"])
        log(f"resumed from {ckpt_path} at step {step}")

    def checkpoint() -> None:
        atomic_save({"step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                     "optimizer": opt.state_dict(), "config": cfg.model_dump(), "generator": gen.get_state(),
                     "train_time_s": elapsed, "losses": losses}, ckpt_path)

    model.train()
    t0, window = time.perf_counter() - elapsed, []
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x0, labels = data(cfg.batch_size)
        loss = dsm_loss(model, process, x0, labels, cfg.t_min, cfg.cond_drop, gen)
        if not torch.isfinite(loss):
            raise CtrlDiffError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        window.append(loss.item())
        elapsed = time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.steps:
            losses.append(sum(window) / len(window))
            window = []
            log(f"step {step}/{cfg.steps}  loss {losses[-1]:.4f}  lr {lr_at(step - 1, cfg):.2e}  {elapsed:.0f}s")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    meta = {"dataset": cfg.dataset, "data_shape": data.data_shape, "process": process.config(),
            "steps": step, "train_time_s": round(elapsed, 1), "final_loss": losses[-1] if losses else None,
            "prediction": cfg.prediction, "cond_drop": cfg.cond_drop, "seed": cfg.seed, "command": cfg.command}
    path = save_model(ema, out / "model", metadata=meta)
    log(f"saved EMA model to {path} ({elapsed:.0f}s)")
    return PretrainResult(path, ckpt_path, losses, elapsed)


# ---- the digits classifier ------------------------------------------------------------------
class ClassifierConfig(BaseModel):
    """Settings of :func:`train_classifier` (unknown keys are an error)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(60, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    shift: int = Field(1, ge=0, le=3, description="random translation of up to this many pixels")
    noise_std: float = Field(0.1, ge=0, description="Gaussian pixel noise added during training")
    width: int = Field(32, gt=0)
    feature_dim: int = Field(128, gt=0)
    seed: int = 0
    out: str = "runs/classifier"
    command: str | None = None


def augment(x: Tensor, shift: int, noise_std: float, generator: torch.Generator) -> Tensor:
    """Random translation by up to ``shift`` pixels (background -1 fills in) plus Gaussian noise. x [B, 1, H, W]."""
    if shift > 0:
        b, _, h, w = x.shape
        pad = F.pad(x, (shift,) * 4, value=-1.0)
        dx, dy = (torch.randint(0, 2 * shift + 1, (b,), generator=generator) for _ in range(2))
        rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, 1, h, w + 2 * shift)
        x = pad.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, 1, h, w)
        x = x.gather(3, cols)
    if noise_std > 0:
        x = x + noise_std * torch.randn(x.shape, generator=generator)
    return x


@dataclass
class ClassifierResult:
    model_path: Path
    test_accuracy: float
    train_time_s: float


def train_classifier(cfg: ClassifierConfig, log: Callable[[str], None] | None = print) -> ClassifierResult:
    """Train the digit classifier on the fixed train split; report held-out accuracy; save to out/digit_classifier.*"""
    from ..data.digits import load_digits
    from ..models.classifier import DigitClassifier, accuracy

    log = log or (lambda s: None)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, test = load_digits("train"), load_digits("test")
    model = DigitClassifier(width=cfg.width, feature_dim=cfg.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train)
    total = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x = augment(train.images[idx], cfg.shift, cfg.noise_std, gen)
            loss = F.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == cfg.epochs:
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss.item():.4f}  "
                f"held-out accuracy {accuracy(model, test.images, test.labels):.4f}")
    elapsed = time.perf_counter() - t0
    model.eval()
    acc = accuracy(model, test.images, test.labels)
    meta = {"test_accuracy": acc, "train_accuracy": accuracy(model, train.images, train.labels),
            "train_time_s": round(elapsed, 1), "epochs": cfg.epochs, "seed": cfg.seed, "command": cfg.command}
    path = save_model(model, Path(cfg.out) / "digit_classifier", metadata=meta)
    log(f"held-out accuracy {acc:.4f}; saved to {path} ({elapsed:.0f}s)")
    return ClassifierResult(path, acc, elapsed)
