"""What is being fine-tuned: the trainable model, its frozen reference, the noise process, the data
shape and how conditions are drawn. Built from the config's ``model`` field."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CtrlDiffError
from ..noise import NoiseProcess, RectifiedFlow, make_process, process_from_config


@dataclass
class Task:
    name: str
    model: nn.Module  # trainable
    ref: nn.Module  # frozen reference
    process: NoiseProcess
    sample_shape: tuple[int, ...]
    num_classes: int = 0
    trainable: list = field(default_factory=list)
    data: Tensor | None = None  # training data [n, *sample_shape] (the 'scratch-*' tasks; used by q-learning)
    data_labels: Tensor | None = None  # [n] long, for conditional data sets

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        """Balanced labels (each class equally often, shuffled) or None for unconditional models."""
        if not self.num_classes:
            return None
        labels = torch.arange(n, device="cpu") % self.num_classes
        return labels[torch.randperm(n, generator=generator, device="cpu")]

    def eval_conditions(self, n: int) -> Tensor | None:
        return None if not self.num_classes else torch.arange(n, device="cpu") % self.num_classes

    # ---- hooks the trainer calls (identity / defaults for the built-in models; see TextToImageTask) ------
    config_defaults: dict = field(default_factory=dict)  # dotted config keys -> values, for fields left unset

    def decode(self, x: Tensor, grad: bool = False) -> Tensor:
        """Model state -> what the reward sees (latent models: the decoded images)."""
        return x

    def reward_cond(self, cond):
        """The model's condition -> the reward's (text-to-image: prompt indices -> list[str] of prompts)."""
        return cond

    def check_sampler(self, sampler) -> None:
        """Raise a one-line CtrlDiffError for a sampler setting (solver, steps, ...) this model cannot use."""

    def condition_names(self) -> list[str] | None:
        """Names of conditions 0..num_classes-1 for per-condition metrics (None: the label numbers)."""
        return None

    def model_state_dict(self) -> dict:
        """The trained weights that go into a checkpoint."""
        return self.model.state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

    def save_final(self, out: Path, metadata: dict) -> Path | None:
        """Write the fine-tuned model into the run directory ``out`` (final_model.{safetensors,json})."""
        if not hasattr(self.model, "config"):
            return None
        from ..models.base import save_model

        return save_model(self.model, out / "final_model", metadata=metadata)


def _freeze(m: nn.Module) -> nn.Module:
    m = copy.deepcopy(m).eval()
    m.requires_grad_(False)
    return m


def _process_of(model: nn.Module) -> NoiseProcess:
    meta = getattr(model, "metadata", {}) or {}
    return process_from_config(meta["process"]) if "process" in meta else make_process("vp")


# rectified-flow models: stochastic rollouts by the exact Gaussian (DDPM-posterior) step unless the user picks a
# sampler; Euler-Maruyama's first step from t_max = 0.999 scales the state by 1 - dtau / (1 - t) (unstable at few steps)
FLOW_SAMPLER_DEFAULTS = {"sampler.solver": "ddim", "sampler.eta": 1.0}

SCRATCH_2D_SIZE = 10_000  # points in the fixed (seed 0) data set of a 'scratch-<2-D data set>' task


def scratch_task(model: str, process: str = "vp", device: str = "cpu") -> Task:
    """A fresh mean network plus a data set, for training from scratch (q-learning). The network predicts v
    and starts at v = 0, i.e. at the score -x of N(0, I) data (a stable start: an eps = 0 start has score 0,
    whose reverse drift -f y = +beta y / 2 blows the samples up):

    'scratch-<gmm2|gmm4|gmm8|checkerboard|rings>'  MLP (2-D), 10,000 fixed data points;
    'scratch-<gmm2|gmm4|gmm8>-cond'                 class-conditional MLP, label = mixture component;
    'scratch-digits'                                class-conditional UNet, the 1,497 training digits.
    The reference model (used only for KL_path in the logs and the 'before' samples) is the data's exact
    noised score: closed form for the mixtures, the empirical distribution's (ratio estimator with all
    the data) otherwise, so the logged KL_path is the path KL to the data process."""
    from ..algorithms.ratio import EmpiricalScore
    from ..data.toy2d import TOY2D, gmm_preset, sample_toy2d
    from ..models.mlp import ExactGMMScore, MLPScoreModel

    name = model.removeprefix("scratch-")
    proc = make_process(process)
    gen = torch.Generator().manual_seed(0)
    labels = None
    if name == "digits":
        from ..data.digits import NUM_CLASSES, load_digits
        from ..models.unet import UNet

        d = load_digits("train")
        data, labels = d.images, d.labels
        net = UNet(in_channels=1, resolution=d.resolution, num_classes=NUM_CLASSES, prediction="v")
        ref = EmpiricalScore(data, proc, labels)
    elif name.endswith("-cond") and name.removesuffix("-cond") in ("gmm2", "gmm4", "gmm8"):
        gmm = gmm_preset(name.removesuffix("-cond"))
        labels = torch.multinomial(gmm.weights, SCRATCH_2D_SIZE, replacement=True, generator=gen)
        z = torch.randn(SCRATCH_2D_SIZE, 2, generator=gen, dtype=torch.float64)
        data = (gmm.means[labels] + gmm.stds[labels, None] * z).float()
        net = MLPScoreModel(dim=2, hidden=128, depth=3, num_classes=len(gmm.weights), prediction="v", zero_init=True)
        ref = EmpiricalScore(data, proc, labels)
    elif name in TOY2D:
        data = sample_toy2d(name, SCRATCH_2D_SIZE, gen)
        net = MLPScoreModel(dim=2, hidden=128, depth=3, prediction="v", zero_init=True)
        ref = ExactGMMScore(gmm_preset(name), proc, None) if name.startswith("gmm") else EmpiricalScore(data, proc)
    else:
        raise CtrlDiffError(f"unknown from-scratch task {model!r}; use scratch-<{'|'.join(TOY2D)}>, "
                            "scratch-<gmm2|gmm4|gmm8>-cond or scratch-digits")
    net = net.to(device).train()
    ncls = int(net.config.get("num_classes", 0))
    return Task(model, net, ref.to(device).eval(), proc, tuple(data.shape[1:]), ncls, list(net.parameters()),
                data=data.to(device), data_labels=None if labels is None else labels.to(device))


def _is_diffusers_spec(model: str) -> bool:
    from ..models.diffusers_backend import is_diffusers_dir, looks_like_hub_id

    p = Path(model).expanduser()
    if p.with_suffix(".json").is_file() and not p.is_dir():
        return False
    return is_diffusers_dir(p) or (p.is_dir() and not p.with_suffix(".json").exists()) or looks_like_hub_id(model)


def build_task(model: str, process: str = "vp", device: str = "cpu", diffusers=None) -> Task:
    """'digits' (the shipped model), 'digits-2step' (the shipped 2-step generator distilled from it: sample it with
    deterministic DDIM at 1 or 2 steps, no guidance), 'digits-rf' (the shipped rectified-flow digits model, velocity
    prediction), '<preset>-exact' (2-D yardstick), '<preset>-rf-exact' (its rectified-flow version: the exact velocity
    plus a zero-initialised residual), 'scratch-<data set>' (a fresh model
    and a data set, see :func:`scratch_task`), a path to a saved model, or a diffusers pipeline (a directory with
    model_index.json, or a hub id 'owner/name'; ``diffusers`` is its DiffusersConfig section)."""
    from ..assets import SHIPPED_MODELS

    if model not in SHIPPED_MODELS and not model.startswith("scratch-") and not model.endswith("-exact") \
            and _is_diffusers_spec(model):
        from .text_task import text_to_image_task

        return text_to_image_task(model, diffusers, device)
    if model.startswith("scratch-"):
        return scratch_task(model, process, device)
    if model.endswith("-exact"):
        from ..data.toy2d import gmm_preset, parse_exact_spec
        from ..models.mlp import ExactGMMScore, MLPScoreModel

        preset, flow = parse_exact_spec(model)
        gmm = gmm_preset(preset)
        if flow and process not in ("vp", "rf"):  # 'vp' is the config default: '-rf-exact' implies the flow
            raise CtrlDiffError(f"{model!r} is the rectified-flow yardstick (process 'rf'); it cannot use process "
                                f"{process!r}: use '{preset}-exact' for other processes")
        proc = make_process("rf" if flow else process)
        pred = "v" if flow else "eps"
        torch.manual_seed(0)
        residual = MLPScoreModel(dim=2, hidden=128, depth=3, zero_init=True, prediction=pred)
        policy = ExactGMMScore(gmm, proc, residual, prediction=pred).to(device)
        ref = ExactGMMScore(gmm, proc, None, prediction=pred).to(device)
        return Task(model, policy, ref, proc, (2,), 0, list(residual.parameters()),
                    config_defaults=dict(FLOW_SAMPLER_DEFAULTS) if flow else {})
    if model in SHIPPED_MODELS:
        from ..assets import load_shipped_model

        net = load_shipped_model(model, device=device)
        name = model
    else:
        from ..models.base import load_model

        if not Path(model).with_suffix(".json").exists() and not Path(model).exists():
            raise CtrlDiffError(f"model {model!r} is neither one of {', '.join(SHIPPED_MODELS)}, a '<gmm>-exact' "
                                "preset nor a model file")
        net = load_model(model, device=device)
        name = str(model)
    net.requires_grad_(True).train()
    cfg = net.config
    if "dim" in cfg:
        shape = (cfg["dim"],)
    else:
        res = cfg.get("resolution", cfg.get("image_size", 8))
        shape = (cfg.get("in_channels", cfg.get("channels", 1)), res, res)
    process = _process_of(net)
    return Task(name, net, _freeze(net), process, shape, int(cfg.get("num_classes", 0)),
                [p for p in net.parameters() if p.requires_grad],
                config_defaults=dict(FLOW_SAMPLER_DEFAULTS) if isinstance(process, RectifiedFlow) else {})
