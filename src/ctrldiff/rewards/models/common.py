"""Shared pieces of the model rewards: batched torch preprocessing, prompt checking, and loading weights from
local paths or Hugging Face hub ids with one-line errors (never a hang when offline).

Nothing here imports transformers at module level: the loaders import it when a reward is built.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import CtrlDiffError

# OpenAI CLIP's normalisation; PickScore, HPSv2, the LAION CLIP models and ImageReward's BLIP all use it
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def preprocess_images(x: Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD, name: str = "reward") -> Tensor:
    """CLIP-style preprocessing in torch, batched and differentiable.

    [B, 3, H, W] (or [B, 1, H, W], repeated to RGB) in [-1, 1] -> [B, 3, size, size]: map to [0, 1], resize the
    shorter side to ``size`` (bicubic, antialiased, as torchvision's Resize(size, BICUBIC)), clamp to [0, 1],
    center-crop ``size`` x ``size``, then (x - mean) / std per channel.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise CtrlDiffError(f"reward {name!r} expects images [B, 3, H, W] in [-1, 1], got shape {tuple(x.shape)}")
    x = (x.float().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def require_prompts(cond, name: str, batch: int) -> list[str]:
    """The B text prompts of a text-to-image batch; anything else is a one-line error naming what was given."""
    if cond is None:
        raise CtrlDiffError(f"reward {name!r} needs a text prompt per image (cond = list[str]), got none")
    if isinstance(cond, Tensor):
        raise CtrlDiffError(f"reward {name!r} needs text prompts (cond = list[str]), got a tensor of shape "
                            f"{tuple(cond.shape)} (class labels cannot be scored by a text-image model)")
    if not isinstance(cond, (list, tuple)) or not all(isinstance(c, str) for c in cond):
        raise CtrlDiffError(f"reward {name!r} needs text prompts (cond = list[str]), got {type(cond).__name__}")
    if len(cond) != batch:
        raise CtrlDiffError(f"reward {name!r} got {len(cond)} prompts for {batch} images")
    return list(cond)


# ---- finding and loading weights ------------------------------------------------------------------------
def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CTRLDIFF_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub endpoint ($HF_ENDPOINT or huggingface.co) be opened within ``timeout``?"""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def from_pretrained(cls, source: str | Path, what: str, **kwargs):
    """``cls.from_pretrained(source)`` for a local directory, or a hub id (the local HF cache first; a download
    only when the hub is reachable and downloads are not switched off). Errors are one line naming ``what``."""
    src = str(source)
    local = Path(src).expanduser()
    if local.exists():
        try:
            return cls.from_pretrained(str(local), local_files_only=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/JSONDecodeError/...
            raise CtrlDiffError(f"{what}: cannot load {cls.__name__} from {local}: {_first_line(e)}") from None
    if not _HUB_ID.match(src):
        raise CtrlDiffError(f"{what}: {src} does not exist (give a local directory or a hub id 'org/name')")
    try:
        return cls.from_pretrained(src, local_files_only=True, **kwargs)  # the local Hugging Face cache
    except Exception:  # noqa: BLE001 - not cached (or incompletely): try the hub below
        pass
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if hub_offline():
        raise CtrlDiffError(f"{what}: {src!r} is not a local directory nor in the Hugging Face cache, and hub "
                            "downloads are switched off (HF_HUB_OFFLINE); download it where there is network "
                            "or pass a local directory")
    if not hub_reachable():
        raise CtrlDiffError(f"{what}: {src!r} is not a local directory nor in the Hugging Face cache, and "
                            f"{endpoint} cannot be reached; download it where there is network or pass a local "
                            "directory")
    try:
        return cls.from_pretrained(src, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise CtrlDiffError(f"{what}: cannot load {cls.__name__} {src!r} from {endpoint}: {_first_line(e)}") from None


def find_weight_file(path: str | Path, what: str, names: tuple[str, ...] = ()) -> Path:
    """``path`` itself if it is a file, else in the directory ``path``: the first of ``names`` that exists, or the
    only weight file (*.safetensors/.pt/.pth/.bin/.ckpt) there."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise CtrlDiffError(f"{what}: weight file or directory {p} not found")
    for n in names:
        if (p / n).is_file():
            return p / n
    found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        want = " or ".join(names) if names else "one *.safetensors / *.pth / *.pt file"
        raise CtrlDiffError(f"{what}: {p} must hold {want}; found "
                            + (", ".join(f.name for f in found) if found else "no weight file"))
    return found[0]


def load_state_dict_file(path: str | Path, what: str) -> dict[str, Tensor]:
    """A state dict from .safetensors or a torch pickle (.pt/.pth/.bin/.ckpt, loaded with weights_only=True);
    a checkpoint dict wrapping it under 'state_dict' or 'model' is unwrapped, a DDP 'module.' prefix dropped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CtrlDiffError(f"{what}: weight file {p} not found")
    if p.suffix not in WEIGHT_SUFFIXES:
        raise CtrlDiffError(f"{what}: {p} is not a weight file (expected {', '.join(WEIGHT_SUFFIXES)})")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt, truncated or foreign file
        raise CtrlDiffError(f"{what}: cannot read weight file {p}: {_first_line(e)}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CtrlDiffError(f"{what}: {p} does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_strict(module: nn.Module, sd: dict[str, Tensor], what: str, source: str | Path) -> None:
    """``module.load_state_dict(sd)`` with every key and shape required to match; else one line naming them."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})"
             for k in own if k in sd and sd[k].shape != own[k].shape]

    def few(keys):
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    problems = ([f"missing {few(missing)}"] if missing else []) + ([f"unexpected {few(unexpected)}"]
                                                                   if unexpected else [])
    problems += [f"wrong shape {few(wrong)}"] if wrong else []
    if problems:
        raise CtrlDiffError(f"{what}: {source} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True)


class MLPHead(nn.Module):
    """The MLP of the LAION improved aesthetic predictor and of ImageReward: input -> 1024 -> 128 -> 64 -> 16 -> 1.

    ``layers`` is the Sequential of the original code, so the checkpoints' key names load as they are:
    layers.0 (Linear in->1024), 1 Dropout(0.2), 2 (1024->128), 3 Dropout(0.2), 4 (128->64), 5 Dropout(0.1),
    6 (64->16), 7 (16->1). No activations, as in the originals.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class FrozenModelReward:
    """Base of the model rewards: frozen modules in eval mode, moved to the images' device on first use.

    Subclasses set ``name`` and ``modules`` (a list of nn.Module) and implement ``score(x, cond) -> [B]``.
    Gradients flow to the images (``differentiable = True``) but never into the reward model's weights.
    """

    differentiable = True
    name = "model-reward"

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self._device: torch.device | None = None
        for m in modules:
            m.eval().requires_grad_(False)

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            for m in self.modules:
                m.to(device)
            self._device = device

    def __call__(self, x: Tensor, cond=None) -> Tensor:
        self._to(x.device)
        return self.score(x, cond)

    def score(self, x: Tensor, cond) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
