r"""Progressive distillation (Salimans & Ho 2022) of a pretrained diffusion model into a 1-2-step generator.

Why progressive distillation (and not consistency distillation): the student stays an ordinary
eps-prediction diffusion model of the same class as the teacher, sampled by the code base's own
deterministic DDIM solver on the uniform grid ``process.time_grid(K)`` at K = 2 (or 1) steps. So the
distilled generator is a ``Task`` model like any other: the shared Trainer, every solver, the reference
model / KL_path machinery and ``save_model`` / ``load_model`` work on it unchanged. A consistency model
would need its own sampler (a boundary-condition parameterisation and a re-noising schedule).

One halving (student grid K, teacher grid 2K, both uniform in t from t_max to t_min, the student's
grid = every second teacher point):
    x0, c ~ data,   k ~ U{0, ..., K-1},   t = t_k, s = t_{k+1}, m = the teacher grid point in between,
    x_t = alpha_t x0 + sigma_t eps,
    x_s = DDIM_teacher(DDIM_teacher(x_t; t -> m); m -> s)                      (two teacher steps, no grad)
    x0~ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)
          (the clean prediction that takes the student from x_t to x_s in ONE DDIM step)
    L   = E[ max(alpha_t^2 / sigma_t^2, 1) || x0_hat_student(x_t, t, c) - x0~ ||^2 ]   (truncated SNR weight)
After a halving the student becomes the (frozen) teacher of the next one. The first teacher may be
classifier-free guided (``guidance``): the guidance is distilled into the student, which is then
sampled without guidance. DDIM step (eta = 0):  x_s = alpha_s x0_hat + sigma_s eps_hat.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ..errors import CtrlDiffError
from ..models.base import save_model
from ..noise import NoiseProcess, _bcast


class DistillConfig(BaseModel):
    """Settings of :func:`distill` (unknown keys are an error)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field("digits", description="'digits' (the shipped model) or a saved model path")
    teacher_steps: int = Field(8, ge=2, description="DDIM steps of the first teacher (a power of 2 times target)")
    target_steps: int = Field(2, ge=1, description="steps of the final student")
    guidance: float | None = Field(None, ge=0, description="CFG scale of the first teacher (None: the shipped "
                                   "digits model's recommended scale for 'digits', else no guidance)")
    steps_per_halving: int = Field(1500, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    out: str = "runs/distill"
    log_every: int = Field(100, gt=0)
    command: str | None = None

    @model_validator(mode="after")
    def _halvings(self):
        r = self.teacher_steps / self.target_steps
        if r < 2 or r != 2 ** round(math.log2(r)):
            raise ValueError(f"teacher_steps / target_steps must be a power of 2 (>= 2), got "
                             f"{self.teacher_steps} / {self.target_steps}")
        return self


def ddim_step(process: NoiseProcess, x: Tensor, eps: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """Deterministic DDIM from t to s (t, s [B] or scalars): x_s = alpha_s x0_hat + sigma_s eps."""
    a_t, s_t = _bcast(process.alpha(t), x), _bcast(process.sigma(t), x)
    a_s, s_s = _bcast(process.alpha(s), x), _bcast(process.sigma(s), x)
    return a_s * (x - s_t * eps) / a_t + s_s * eps


def distill_target(process: NoiseProcess, x_t: Tensor, x_s: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """x0~ with DDIM(x_t; x0~, t -> s) = x_s:  (x_s - (sigma_s/sigma_t) x_t) / (alpha_s - (sigma_s/sigma_t) alpha_t)."""
    a_t, s_t = _bcast(process.alpha(t), x_t), _bcast(process.sigma(t), x_t)
    a_s, s_s = _bcast(process.alpha(s), x_t), _bcast(process.sigma(s), x_t)
    r = s_s / s_t
    return (x_s - r * x_t) / (a_s - r * a_t)


def halving_loss(student: nn.Module, teacher: nn.Module, process: NoiseProcess, x0: Tensor, cond: Tensor | None,
                 student_steps: int, generator: torch.Generator) -> Tensor:
    """The progressive-distillation loss of one minibatch (module docstring) for a student on ``student_steps``."""
    from ..solvers import model_eps

    B = x0.shape[0]
    ts = process.time_grid(student_steps, dtype=torch.float64)
    tt = process.time_grid(2 * student_steps, dtype=torch.float64)
    k = torch.randint(0, student_steps, (B,), generator=generator)
    t, s, m = ts[k], ts[k + 1], tt[2 * k + 1]
    eps = torch.randn(x0.shape, generator=generator)
    x_t = (_bcast(process.alpha(t), x0) * x0.double() + _bcast(process.sigma(t), x0) * eps).float()
    tf, mf = t.float(), m.float()
    with torch.no_grad():
        x_m = ddim_step(process, x_t.double(), model_eps(teacher, process, x_t, tf, cond).double(), t, m).float()
        x_s = ddim_step(process, x_m.double(), model_eps(teacher, process, x_m, mf, cond).double(), m, s)
        target = distill_target(process, x_t.double(), x_s, t, s).float()
    eps_hat = model_eps(student, process, x_t, tf, cond)
    x0_hat = (x_t - _bcast(process.sigma(tf), x_t) * eps_hat) / _bcast(process.alpha(tf), x_t)
    w = torch.clamp(process.alpha(t) ** 2 / process.sigma(t) ** 2, min=1.0).float()
    return (w * (x0_hat - target).flatten(1).pow(2).mean(1)).mean()


def _load_teacher(name: str) -> nn.Module:
    if name == "digits":
        from ..assets import load_digits_model

        return load_digits_model()
    from ..models import load_model

    return load_model(name)


@dataclass
class DistillResult:
    model_path: Path
    stage_paths: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    train_time_s: float = 0.0


def distill(cfg: DistillConfig, log: Callable[[str], None] | None = print,
            teacher: nn.Module | None = None) -> DistillResult:
    """Halve the teacher's DDIM step count until ``target_steps``; each stage's student is saved to
    ``out/student_<K>step.*`` and the final one to ``out/model.*`` (metadata: process, teacher, steps, guidance)."""
    from ..data.digits import load_digits
    from ..data.toy2d import TOY2D, sample_toy2d
    from ..guidance import with_guidance
    from ..noise import make_process, process_from_config

    log = log or (lambda s: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    base = teacher if teacher is not None else _load_teacher(cfg.teacher)
    meta = dict(getattr(base, "metadata", {}) or {})
    process = process_from_config(meta["process"]) if "process" in meta else make_process("vp")
    dataset = meta.get("dataset", "digits")
    guidance = cfg.guidance
    if guidance is None and cfg.teacher == "digits" and teacher is None:
        from ..assets import DEFAULT_GUIDANCE

        guidance = DEFAULT_GUIDANCE
    if dataset == "digits":
        res = int(getattr(base, "resolution", 8))
        d = load_digits("train", res)

        def data(b: int) -> tuple[Tensor, Tensor | None]:
            i = torch.randint(0, len(d), (b,), generator=gen)
            return d.images[i], d.labels[i] if getattr(base, "num_classes", 0) else None
    elif dataset in TOY2D:
        def data(b: int) -> tuple[Tensor, Tensor | None]:
            return sample_toy2d(dataset, b, gen), None
    else:
        raise CtrlDiffError(f"cannot distill: teacher data set {dataset!r} is not digits or a 2-D data set")
    teacher_net = with_guidance(base.eval().requires_grad_(False), guidance)
    student = copy.deepcopy(base).train().requires_grad_(True)
    K = cfg.teacher_steps // 2
    t0, c0, losses, stages = time.perf_counter(), time.process_time(), [], []
    while K >= cfg.target_steps:
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
        window: list[float] = []
        for step in range(cfg.steps_per_halving):
            frac = step / max(1, cfg.steps_per_halving - 1)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
            x0, c = data(cfg.batch_size)
            loss = halving_loss(student, teacher_net, process, x0, c, K, gen)
            if not torch.isfinite(loss):
                raise CtrlDiffError(f"distillation diverged at {K} steps, step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            window.append(loss.item())
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps_per_halving:
                losses.append(sum(window) / len(window))
                window = []
                log(f"{2 * K} -> {K} steps: step {step + 1}/{cfg.steps_per_halving}  loss {losses[-1]:.5f}  "
                    f"{time.perf_counter() - t0:.0f}s")
        student.eval()
        stage_meta = {**{k: meta[k] for k in ("dataset", "data_shape") if k in meta}, "process": process.config(),
                      "teacher": cfg.teacher, "teacher_steps": cfg.teacher_steps, "seed": cfg.seed,
                      "steps_per_halving": cfg.steps_per_halving, "final_loss": round(losses[-1], 5),
                      "generator_steps": K, "guidance_distilled": guidance, "sampler": {"solver": "ddim", "eta": 0.0,
                                                                                       "steps": K},
                      "distilled_by": "progressive", "train_time_s": round(time.perf_counter() - t0, 1),
                      "command": cfg.command}
        stages.append(save_model(student, out / f"student_{K}step", metadata=stage_meta))
        teacher_net = copy.deepcopy(student).requires_grad_(False)  # the next halving's teacher (no guidance)
        student.train()
        K //= 2
    student.eval()
    elapsed = time.perf_counter() - t0
    stage_meta["train_time_s"] = round(elapsed, 1)
    stage_meta["train_cpu_s"] = round(time.process_time() - c0, 1)  # < wall time on a shared machine
    path = save_model(student, out / "model", metadata=stage_meta)
    log(f"saved the {cfg.target_steps}-step generator to {path} ({elapsed:.0f}s)")
    return DistillResult(path, stages, losses, elapsed)


# ---- quality of a few-step digits generator -----------------------------------------------------------
@torch.no_grad()
def few_step_quality(model: nn.Module, steps: int, n: int = 1000, seed: int = 0, guidance: float | None = None,
                     process: NoiseProcess | None = None, samples: Tensor | None = None,
                     labels: Tensor | None = None) -> dict:
    """Sample quality of a class-conditional digits generator at ``steps`` deterministic DDIM steps (or of given
    ``samples`` [n, 1, 8, 8] with ``labels`` [n]): the shipped classifier's accuracy on the requested labels, the
    Frechet distance in the classifier's feature space to the 300 held-out digits, and the diversity (mean pairwise
    feature distance). The real-vs-real Frechet baseline (train vs held-out digits) is :func:`real_frechet`."""
    from ..assets import load_digit_classifier
    from ..data.digits import load_digits
    from ..eval.metrics import classifier_accuracy, diversity, frechet_distance_from_features
    from ..guidance import with_guidance
    from ..noise import make_process, process_from_config
    from ..solvers import sample

    clf = load_digit_classifier().eval()
    if samples is None:
        if process is None:
            meta = getattr(model, "metadata", {}) or {}
            process = process_from_config(meta["process"]) if "process" in meta else make_process("vp")
        labels = torch.arange(n) % 10
        gen = torch.Generator().manual_seed(seed)
        samples = sample(with_guidance(model.eval(), guidance), process, (n, 1, 8, 8), steps, "ddim", cond=labels,
                         generator=gen, eta=0.0).final
    x = samples.clamp(-1, 1)
    feats = clf.features(x)
    test = load_digits("test")
    return {"steps": steps, "n": len(x), "accuracy": classifier_accuracy(clf(x), labels),
            "frechet": frechet_distance_from_features(feats, clf.features(test.images)),
            "diversity": diversity(feats)["overall"]}


@torch.no_grad()
def real_frechet() -> dict:
    """The real-vs-real baselines: Frechet distance and diversity of the 1,497 training digits vs the 300 held out."""
    from ..assets import load_digit_classifier
    from ..data.digits import load_digits
    from ..eval.metrics import diversity, frechet_distance_from_features

    clf = load_digit_classifier().eval()
    f_train, f_test = clf.features(load_digits("train").images), clf.features(load_digits("test").images)
    return {"frechet_train_vs_test": frechet_distance_from_features(f_train, f_test),
            "diversity_test": diversity(f_test)["overall"]}
