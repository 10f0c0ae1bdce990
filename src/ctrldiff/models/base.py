"""Save / load any built-in model with one call each way: ``NAME.safetensors`` + ``NAME.json``.

The JSON holds ``{"type": <registered name>, "config": {...constructor kwargs...}}`` and optional
metadata; the safetensors file holds the state dict.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import CtrlDiffError

MODEL_TYPES: dict[str, type] = {}


def register_model(name: str):
    def deco(cls):
        cls.model_type = name
        MODEL_TYPES[name] = cls
        return cls

    return deco


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def save_model(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``path.safetensors`` and ``path.json``; returns the weights path."""
    wpath, cpath = _paths(path)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "config"):
        raise CtrlDiffError(f"{type(model).__name__} has no config: only registered models can be saved")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = wpath.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp))
    tmp.replace(wpath)
    doc = {"type": model.model_type, "config": model.config, "metadata": metadata or {}}
    tmpc = cpath.with_suffix(".json.tmp")
    tmpc.write_text(json.dumps(doc, indent=2))
    tmpc.replace(cpath)
    return wpath


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (give the .safetensors, .json or stem path)."""
    wpath, cpath = _paths(path)
    for p in (cpath, wpath):
        if not p.exists():
            raise CtrlDiffError(f"model file not found: {p}")
    try:
        doc = json.loads(cpath.read_text())
        cls = MODEL_TYPES[doc["type"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CtrlDiffError(f"{cpath} is not a ctrldiff model config (type must be one of "
                            f"{', '.join(sorted(MODEL_TYPES))}): {e}") from None
    model = cls(**doc["config"])
    try:
        model.load_state_dict(load_file(str(wpath)))
    except Exception as e:  # noqa: BLE001 - report any mismatch as one line
        raise CtrlDiffError(f"weights in {wpath} do not fit a {doc['type']} model: {str(e).splitlines()[0]}") from None
    model.metadata = doc.get("metadata", {})
    return model.to(device).eval()


class TimeEmbedding(nn.Module):
    """Gaussian Fourier features of t in [0, 1] followed by an MLP."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(scale * 64), dim // 2)) * 0.1)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.SiLU(), nn.Linear(dim * 2, dim))

    def forward(self, t: Tensor) -> Tensor:
        arg = t[:, None].float() * self.freqs[None] * 2 * math.pi
        return self.mlp(torch.cat([arg.sin(), arg.cos()], 1))


class ConditionalMixin:
    """Class-label conditions: labels 0..num_classes-1 plus a null token num_classes for CFG."""

    num_classes: int = 0

    def null_condition(self, cond: Tensor) -> Tensor:
        return torch.full_like(cond, self.num_classes)

    def _cond_or_null(self, cond: Tensor | None, batch: int, device) -> Tensor | None:
        if self.num_classes == 0:
            return None
        if cond is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        cond = torch.as_tensor(cond, device=device).long()
        if cond.ndim == 0:
            cond = cond.expand(batch)
        if cond.numel() and (cond.min() < 0 or cond.max() > self.num_classes):
            raise CtrlDiffError(f"condition labels must lie in 0..{self.num_classes - 1} "
                                f"(or {self.num_classes} for unconditional), got {cond.min()}..{cond.max()}")
        return cond
