"""Tiny, randomly initialised Stable Diffusion 1.5- and SDXL-shaped pipelines built from configs (no download):
for tests, benchmarks and trying the diffusers backend on a CPU. Same component types and wiring as the real
pipelines (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIP text encoder(s) and tokenizer(s),
DDIM scheduler with SD's scaled_linear betas), a few hundred thousand parameters each."""

from __future__ import annotations

import string
from pathlib import Path

import torch

from .diffusers_backend import require_diffusers


def tiny_tokenizer():
    """A CLIP BPE tokenizer over single letters (every word is spelled out; no merges)."""
    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(tok, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=len(tok), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, projection_dim=projection)


def tiny_pipeline(kind: str = "sd15", seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 8):
    """A tiny 'sd15' (StableDiffusionPipeline) or 'sdxl' (StableDiffusionXLPipeline: two text encoders,
    pooled embeddings, add_time_ids) pipeline with random weights; latents [4, sample_size, sample_size],
    images 2x that."""
    require_diffusers()
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, sample_size=2 * sample_size)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
                          prediction_type=prediction_type)
    common = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4,
                  out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=8,
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    if kind == "sd15":
        unet = UNet2DConditionModel(cross_attention_dim=32, **common)
        te = CLIPTextModel(_text_config(tok))
        return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "sdxl":
        unet = UNet2DConditionModel(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=8 * 6 + 32, use_linear_projection=True,
                                    **common)
        te = CLIPTextModel(_text_config(tok))
        te2 = CLIPTextModelWithProjection(_text_config(tok))
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=sched)
    raise ValueError(f"tiny pipeline kind must be 'sd15' or 'sdxl', got {kind!r}")


def save_tiny_pipeline(path: str | Path, kind: str = "sd15", seed: int = 0, **kw) -> Path:
    """Build :func:`tiny_pipeline` and ``save_pretrained`` it to ``path`` (a few MB)."""
    import logging

    from diffusers.utils import logging as dlog

    old = dlog.get_verbosity()
    dlog.set_verbosity(logging.ERROR)
    try:
        tiny_pipeline(kind, seed, **kw).save_pretrained(str(path))
    finally:
        dlog.set_verbosity(old)
    return Path(path)
