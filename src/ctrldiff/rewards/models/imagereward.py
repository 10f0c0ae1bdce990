"""ImageReward (Xu et al. 2023): BLIP ViT-L/16 image encoder, a BERT-base text encoder with cross-attention to the
image tokens, and an MLP on the text encoder's first ([CLS]) token:

    r(x, c) = (MLP( T(c; V(x))[:, 0] ) - mean) / std,   mean = 0.16717362830052426, std = 1.0333394966054072

Weights: ``ImageReward.pt`` from THUDM/ImageReward (a state dict in the layout of ImageReward's own BLIP code:
``blip.visual_encoder.*`` a timm-style ViT, ``blip.text_encoder.*`` BLIP's med.py BertModel, ``mlp.layers.*``),
and the ``bert-base-uncased`` tokenizer (vocab.txt). The model is built from transformers' BlipVisionModel and
BlipTextModel (``is_decoder`` config so that every layer has cross-attention, called in encoder mode with a
bidirectional mask) and the checkpoint's keys are renamed by :func:`imagereward_to_hf`; its sizes are read from the
checkpoint's tensor shapes (heads = width / 64, as in BLIP's 'large' ViT and BERT-base).

Verification status: the scoring path (tokenizer max_length 35, [CLS] feature, mean/std) and the key layout were
read off ImageReward's source (ImageReward.py, models/BLIP/blip_pretrain.py: visual_encoder, text_encoder,
vision_proj, text_proj; med.py: BERT names identical to transformers' BlipText*, cross-attention in every layer,
"multimodal" mode by default) and BLIP's vit.py, and matched to transformers' modeling_blip(.py/_text.py)
(qkv fused in both ViTs with the same [3, heads, head_dim] order, ViT LayerNorm eps 1e-6, BERT eps from
med_config.json or 1e-12). tests/test_reward_oracles.py::test_imagereward_oracle builds the ``image-reward``
package's own model (its ViT, med.py BERT, MLP and ``ImageReward.score``) at tiny sizes with random weights, saves
its state dict and scores the same images and prompts through this loader: equal to 5e-7. The official
ImageReward.pt itself could not be downloaded here (a strict load names every missing, unexpected or mis-shaped
key).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import Tensor, nn

from ...errors import CtrlDiffError
from .common import (
    FrozenModelReward,
    MLPHead,
    find_weight_file,
    from_pretrained,
    load_state_dict_file,
    load_strict,
    require_prompts,
)
from .common import preprocess_images as _prep

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35  # ImageReward's tokenizer max_length
IGNORED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids", "blip.itm_head.",
           "blip.temp", "blip.text_encoder.pooler.")
_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def imagereward_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """ImageReward checkpoint keys -> this module's keys (``vision.*`` BlipVisionModel, ``text.*`` BlipTextModel,
    ``mlp.layers.*``). Keys of parts ImageReward does not use for scoring (``IGNORED``) are dropped."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith(IGNORED):
            continue
        if k.startswith("blip.text_encoder."):
            out["text." + k[len("blip.text_encoder."):]] = v
        elif k.startswith("blip.visual_encoder."):
            r = k[len("blip.visual_encoder."):]
            if m := re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", r):
                out[f"vision.encoder.layers.{m[1]}.{_VIT_BLOCK.get(m[2], m[2])}.{m[3]}"] = v
            else:
                out["vision." + {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                                 "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                                 "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                                 "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}.get(r, r)] = v
        else:
            out[k] = v
    return out


def _count(sd: dict, pattern: str) -> int:
    return len({m[1] for k in sd if (m := re.match(pattern, k))})


def configs_from_checkpoint(sd: dict[str, Tensor], med_config: dict | None = None):
    """BlipVisionConfig and BlipTextConfig with the sizes of an ImageReward checkpoint (keys as in the file)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    try:
        width = sd["blip.visual_encoder.cls_token"].shape[-1]
        patch = sd["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
        n_pos = sd["blip.visual_encoder.pos_embed"].shape[1]
        vit_mlp = sd["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
        vocab, hidden = sd["blip.text_encoder.embeddings.word_embeddings.weight"].shape
        max_pos = sd["blip.text_encoder.embeddings.position_embeddings.weight"].shape[0]
        inter = sd["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as e:
        raise CtrlDiffError(f"reward 'imagereward': the checkpoint has no {e.args[0]!r}; is it ImageReward.pt?") from None
    grid = round((n_pos - 1) ** 0.5)
    med = med_config or {}
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=vit_mlp, patch_size=patch, image_size=grid * patch,
                              num_hidden_layers=_count(sd, r"^blip\.visual_encoder\.blocks\.(\d+)\."),
                              num_attention_heads=width // 64, layer_norm_eps=1e-6, hidden_act="gelu")
    text = BlipTextConfig(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width, intermediate_size=inter,
                          num_hidden_layers=_count(sd, r"^blip\.text_encoder\.encoder\.layer\.(\d+)\."),
                          num_attention_heads=med.get("num_attention_heads", hidden // 64),
                          max_position_embeddings=max_pos, hidden_act=med.get("hidden_act", "gelu"),
                          layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, is_decoder=True, pad_token_id=med.get("pad_token_id", 0))
    return vision, text


class ImageRewardModel(nn.Module):
    """``vision`` (BlipVisionModel), ``text`` (BlipTextModel with cross-attention, no pooler), ``mlp`` (MLPHead)."""

    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = MLPHead(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, 3, S, S] normalised pixels, [B, L] tokens -> raw MLP output [B] (before the mean/std shift)."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # [B, 1 + N, width]
        image_atts = image_embeds.new_ones(image_embeds.shape[:-1], dtype=attention_mask.dtype)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, is_decoder=False)
        return self.mlp(out.last_hidden_state[:, 0, :])[:, 0]


class ImageReward(FrozenModelReward):
    """ImageReward score of images [B, 3, H, W] in [-1, 1] for their prompts (cond = list[str])."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer):
        super().__init__([model])
        self.model, self.tokenizer = model, tokenizer
        self.size = int(model.vision.config.image_size)

    def score(self, x: Tensor, cond) -> Tensor:
        prompts = require_prompts(cond, self.name, x.shape[0])
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt").to(x.device)
        raw = self.model(_prep(x, self.size, name=self.name), tok["input_ids"], tok["attention_mask"])
        return (raw - MEAN) / STD


def load_imagereward(path: str | None = None, tokenizer: str | None = None) -> ImageReward:
    """``imagereward:path=DIR_OR_FILE[;tokenizer=DIR_OR_HUB_ID]``: DIR holds ImageReward.pt, optionally
    med_config.json and a tokenizer (vocab.txt, or a ``tokenizer/`` directory); the tokenizer defaults to
    ``bert-base-uncased``."""
    from transformers import BertTokenizer

    what = "reward 'imagereward'"
    if path is None:
        raise CtrlDiffError(f"{what} needs its weights: imagereward:path=DIR (with ImageReward.pt)")
    file = find_weight_file(path, what, ("ImageReward.pt", "ImageReward.safetensors"))
    folder = file.parent
    med = None
    if (folder / "med_config.json").is_file():
        try:
            med = json.loads((folder / "med_config.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CtrlDiffError(f"{what}: {folder / 'med_config.json'} is not valid JSON: {e}") from None
        if not isinstance(med, dict):
            raise CtrlDiffError(f"{what}: {folder / 'med_config.json'} must hold a JSON object")
    sd = load_state_dict_file(file, what)
    model = ImageRewardModel(*configs_from_checkpoint(sd, med))
    load_strict(model, imagereward_to_hf(sd), what, file)
    if tokenizer is None:
        tokenizer = next((str(p) for p in (folder / "tokenizer", folder) if (Path(p) / "vocab.txt").is_file()),
                         "bert-base-uncased")
    return ImageReward(model, from_pretrained(BertTokenizer, tokenizer, f"{what} (tokenizer)"))
