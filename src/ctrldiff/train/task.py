"""What is being fine-tuned: the trainable model, its frozen reference, the noise process, the data
shape and how conditions are drawn. Built from the config's ``model`` field."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CtrlDiffError
from ..noise import NoiseProcess, make_process, process_from_config


@dataclass
class Task:
    name: str
    model: nn.Module  # trainable
    ref: nn.Module  # frozen reference
    process: NoiseProcess
    sample_shape: tuple[int, ...]
    num_classes: int = 0
    trainable: list = field(default_factory=list)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        """Balanced labels (each class equally often, shuffled) or None for unconditional models."""
        if not self.num_classes:
            return None
        labels = torch.arange(n) % self.num_classes
        return labels[torch.randperm(n, generator=generator)]

    def eval_conditions(self, n: int) -> Tensor | None:
        return None if not self.num_classes else torch.arange(n) % self.num_classes


def _freeze(m: nn.Module) -> nn.Module:
    m = copy.deepcopy(m).eval()
    m.requires_grad_(False)
    return m


def _process_of(model: nn.Module) -> NoiseProcess:
    meta = getattr(model, "metadata", {}) or {}
    return process_from_config(meta["process"]) if "process" in meta else make_process("vp")


def build_task(model: str, process: str = "vp", device: str = "cpu") -> Task:
    """'digits' (the shipped model), '<preset>-exact' (2-D yardstick), or a path to a saved model."""
    if model.endswith("-exact"):
        from ..data.toy2d import gmm_preset
        from ..models.mlp import ExactGMMScore, MLPScoreModel

        gmm = gmm_preset(model.removesuffix("-exact"))
        proc = make_process(process)
        torch.manual_seed(0)
        residual = MLPScoreModel(dim=2, hidden=128, depth=3, zero_init=True)
        policy = ExactGMMScore(gmm, proc, residual).to(device)
        ref = ExactGMMScore(gmm, proc, None).to(device)
        return Task(model, policy, ref, proc, (2,), 0, list(residual.parameters()))
    if model == "digits":
        from ..assets import load_digits_model

        net = load_digits_model(device=device)
        name = "digits"
    else:
        from ..models.base import load_model

        if not Path(model).with_suffix(".json").exists() and not Path(model).exists():
            raise CtrlDiffError(f"model {model!r} is neither 'digits', a '<gmm>-exact' preset nor a model file")
        net = load_model(model, device=device)
        name = str(model)
    net.requires_grad_(True).train()
    cfg = net.config
    if "dim" in cfg:
        shape = (cfg["dim"],)
    else:
        res = cfg.get("resolution", cfg.get("image_size", 8))
        shape = (cfg.get("in_channels", cfg.get("channels", 1)), res, res)
    return Task(name, net, _freeze(net), _process_of(net), shape, int(cfg.get("num_classes", 0)),
                [p for p in net.parameters() if p.requires_grad])
