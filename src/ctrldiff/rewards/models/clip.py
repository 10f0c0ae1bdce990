"""CLIP-based text-image rewards on transformers' CLIPModel, scored per (image i, prompt i):

* PickScore (Kirstain et al. 2023):  r = exp(logit_scale) * cos(f_img(x), f_txt(c)),  CLIP ViT-H/14 fine-tuned on
  Pick-a-Pic; weights ``yuvalkirstain/PickScore_v1``, tokenizer ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
* CLIPScore (Hessel et al. 2021):   r = w * max(cos(f_img(x), f_txt(c)), 0),  w = 2.5;  default model
  ``openai/clip-vit-base-patch32`` (the paper's ViT-B/32).
* HPSv2 (Wu et al. 2023):           r = cos(f_img(x), f_txt(c))  (the HPS score, no logit scale);  open_clip
  ViT-H-14 fine-tuned, checkpoint ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (xswu/HPSv2). open_clip is
  not needed: the open_clip state dict is converted to a transformers CLIPModel (:func:`openclip_to_hf`) whose
  config and tokenizer come from the model it was fine-tuned from, ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from .common import FrozenModelReward, find_weight_file, from_pretrained, load_state_dict_file, load_strict, require_prompts
from .common import preprocess_images as _prep

LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class ClipReward(FrozenModelReward):
    """A CLIPModel and its tokenizer; ``kind`` is 'pickscore', 'clipscore' or 'hpsv2' (see the module docstring)."""

    def __init__(self, kind: str, model, tokenizer, w: float = 2.5):
        super().__init__([model])
        self.name, self.kind, self.model, self.tokenizer, self.w = kind, kind, model, tokenizer, w
        self.size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def features(self, x: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """L2-normalised image and text embeddings, [B, D] each."""
        px = _prep(x, self.size, name=self.name)
        img = self.model.visual_projection(self.model.vision_model(pixel_values=px).pooler_output)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(x.device)
        out = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        txt = self.model.text_projection(out.pooler_output)
        return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)

    def score(self, x: Tensor, cond) -> Tensor:
        img, txt = self.features(x, require_prompts(cond, self.name, x.shape[0]))
        cos = (img * txt).sum(-1)
        if self.kind == "pickscore":
            return self.model.logit_scale.exp() * cos
        if self.kind == "clipscore":
            return self.w * cos.clamp(min=0)
        return cos


def _tokenizer(model_source: str, tokenizer: str | None, fallback: str | None, what: str):
    """The tokenizer given, else the model directory's own (tokenizer.json / vocab.json), else ``fallback``."""
    from transformers import CLIPTokenizer

    if tokenizer is None:
        p = Path(model_source).expanduser()
        has_own = p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "vocab.json"))
        tokenizer = model_source if has_own or fallback is None else fallback
    return from_pretrained(CLIPTokenizer, tokenizer, f"{what} (tokenizer)")


def load_pickscore(model: str = "yuvalkirstain/PickScore_v1", tokenizer: str | None = None) -> ClipReward:
    """``pickscore:model=DIR_OR_HUB_ID[;tokenizer=DIR_OR_HUB_ID]`` (the tokenizer defaults to the model directory's
    own, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` as in the PickScore code)."""
    from transformers import CLIPModel

    what = "reward 'pickscore'"
    m = from_pretrained(CLIPModel, model, f"{what} (CLIP model)")
    return ClipReward("pickscore", m, _tokenizer(model, tokenizer, LAION_H14, what))


def load_clipscore(model: str = "openai/clip-vit-base-patch32", tokenizer: str | None = None,
                   w: float = 2.5) -> ClipReward:
    """``clipscore[:model=DIR_OR_HUB_ID;w=2.5]``: w * max(cos, 0)."""
    from transformers import CLIPModel

    what = "reward 'clipscore'"
    m = from_pretrained(CLIPModel, model, f"{what} (CLIP model)")
    return ClipReward("clipscore", m, _tokenizer(model, tokenizer, None, what), w=float(w))


# ---- HPSv2: open_clip checkpoint -> transformers CLIPModel -------------------------------------------------
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                "attn.out_proj": "self_attn.out_proj"}
_FLAT = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
         "visual.class_embedding": "vision_model.embeddings.class_embedding",
         "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
         "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
         "visual.ln_post.weight": "vision_model.post_layernorm.weight",
         "visual.ln_post.bias": "vision_model.post_layernorm.bias",
         "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
         "positional_embedding": "text_model.embeddings.position_embedding.weight",
         "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
         "logit_scale": "logit_scale"}


def openclip_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip CLIP state dict (ViT image tower, standard text tower) to transformers' CLIPModel keys.

    Per residual block: ln_1/ln_2 -> layer_norm1/2, attn.in_proj_{weight,bias} [3D, ...] -> q/k/v_proj split in
    that order, attn.out_proj -> self_attn.out_proj, mlp.c_fc/c_proj -> mlp.fc1/fc2. The projections
    ``visual.proj`` [D_v, E] and ``text_projection`` [D_t, E] become the transposed Linear weights
    visual_projection / text_projection [E, D]. Keys it does not know are kept (load_strict then names them).
    """
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k in _FLAT:
            out[_FLAT[k]] = v
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif k == "attn_mask":  # open_clip's causal mask buffer (older versions save it)
            continue
        elif m := _BLOCK.match(k):
            tower = "vision_model" if m[1] else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m[2]}.", m[3]
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            mod, _, leaf = rest.rpartition(".")
            out[prefix + f"{_BLOCK_PARTS.get(mod, mod)}.{leaf}"] = v
        else:
            out[k] = v
    return out


HPS_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt", "HPS_v2.pt", "hpsv2.safetensors")


def load_hpsv2(path: str | None = None, base: str = LAION_H14, tokenizer: str | None = None) -> ClipReward:
    """``hpsv2:path=FILE_OR_DIR[;base=DIR_OR_HUB_ID]``: the open_clip checkpoint (a state dict, or a dict with
    'state_dict') converted into a CLIPModel built from ``base``'s config.json (with GELU; base's tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    from ...errors import CtrlDiffError

    what = "reward 'hpsv2'"
    if path is None:
        raise CtrlDiffError(f"{what} needs its checkpoint: hpsv2:path=HPS_v2.1_compressed.pt (or a directory with it)")
    file = find_weight_file(path, what, HPS_FILES)
    cfg = from_pretrained(CLIPConfig, base, f"{what} (CLIP config)")
    model = CLIPModel(cfg)
    sd = openclip_to_hf(load_state_dict_file(file, what))
    load_strict(model, sd, what, file)
    return ClipReward("hpsv2", model, _tokenizer(base, tokenizer, None, what))
