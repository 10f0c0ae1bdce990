"""LAION aesthetic predictor ("improved-aesthetic-predictor", sac+logos+ava1-l14-linearMSE):

    r(x) = MLP( e(x) / ||e(x)|| ),   e(x) = CLIP ViT-L/14 image embedding (projected, 768-d)

Weights: the head ``sac+logos+ava1-l14-linearMSE.pth`` (github.com/christophschuhmann/improved-aesthetic-predictor;
a state dict with keys layers.0/2/4/6/7.{weight,bias}, also accepted as .safetensors) and a transformers CLIPModel
of ``openai/clip-vit-large-patch14`` (a local ``save_pretrained`` directory or the hub id).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ...errors import CtrlDiffError
from .common import FrozenModelReward, MLPHead, find_weight_file, from_pretrained, load_state_dict_file, load_strict
from .common import preprocess_images as _prep

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class AestheticReward(FrozenModelReward):
    """Aesthetic score (about 1..10) of images [B, 3, H, W] in [-1, 1]; cond is not used."""

    name = "aesthetic"

    def __init__(self, clip, head: MLPHead):
        super().__init__([clip, head])
        self.clip, self.head = clip, head
        self.size = int(clip.config.vision_config.image_size)

    def embed(self, x: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings [B, D]."""
        px = _prep(x, self.size, name=self.name)
        e = self.clip.visual_projection(self.clip.vision_model(pixel_values=px).pooler_output)
        return e / e.norm(dim=-1, keepdim=True)

    def score(self, x: Tensor, cond=None) -> Tensor:
        return self.head(self.embed(x))[:, 0]


def load_aesthetic(path: str | None = None, head: str | None = None, clip: str | None = None) -> AestheticReward:
    """``aesthetic:path=DIR`` (DIR holds the head file and optionally ``clip/``, a CLIPModel directory), or
    ``aesthetic:head=FILE;clip=DIR_OR_HUB_ID``."""
    from transformers import CLIPModel

    what = "reward 'aesthetic'"
    if path is None and head is None:
        raise CtrlDiffError(f"{what} needs its weights: aesthetic:path=DIR (with {HEAD_FILE} and clip/) or "
                            "aesthetic:head=FILE;clip=DIR_OR_HUB_ID")
    head_file = find_weight_file(head or path, what, (HEAD_FILE, "aesthetic.safetensors", "head.safetensors"))
    if clip is None:
        clip = str(Path(path) / "clip") if path is not None and (Path(path) / "clip").is_dir() else DEFAULT_CLIP
    model = from_pretrained(CLIPModel, clip, f"{what} (CLIP model)")
    dim = int(model.config.projection_dim)
    mlp = MLPHead(dim)
    load_strict(mlp, load_state_dict_file(head_file, what), what, head_file)
    return AestheticReward(model, mlp)
