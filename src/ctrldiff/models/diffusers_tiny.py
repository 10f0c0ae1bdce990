"""Tiny, randomly initialised Stable Diffusion 1.5-, SDXL-, SD3- and FLUX.1-shaped pipelines built from configs (no
download): for tests, benchmarks and trying the diffusers backend on a CPU. Same component types and wiring as the
real pipelines (UNet2DConditionModel with cross-attention / SD3Transformer2DModel / FluxTransformer2DModel,
AutoencoderKL, CLIP and T5 text encoders with their tokenizers, DDIM with SD's scaled_linear betas or
FlowMatchEulerDiscreteScheduler with SD3's shift / FLUX's dynamic shift), a few hundred thousand parameters each.
The tokenizers are built offline: CLIP BPE and T5 unigram vocabularies over single letters."""

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


def tiny_t5_tokenizer():
    """A T5 (unigram) tokenizer over single letters: '<pad>', '</s>', '<unk>', then letters with and without the
    word-start marker; built offline (no sentencepiece model file)."""
    from transformers import T5TokenizerFast

    letters = list(string.ascii_lowercase)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in letters] + [("\u2581" + c, -2.5) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _t5_encoder(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


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
    raise ValueError(f"tiny pipeline kind must be 'sd15', 'sdxl', 'sd3' or 'flux', got {kind!r}")


def _flow_vae(sample_size: int, latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, norm_num_groups=8,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=latent_channels, sample_size=2 * sample_size, shift_factor=0.0609,
                         scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)


def tiny_flow_pipeline(kind: str = "sd3", seed: int = 0, sample_size: int = 8, shift: float = 3.0,
                       guidance_embeds: bool = True):
    """A tiny 'sd3' (StableDiffusion3Pipeline: SD3Transformer2DModel, two CLIP-with-projection encoders + T5,
    FlowMatchEulerDiscreteScheduler(shift)) or 'flux' (FluxPipeline: FluxTransformer2DModel with rotary axes and, if
    ``guidance_embeds``, the guidance embedding of FLUX.1 [dev]; CLIP + T5; the scheduler's dynamic shift) pipeline
    with random weights; latents [4, sample_size, sample_size], images 2x that."""
    require_diffusers()
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, t5tok = tiny_tokenizer(), tiny_t5_tokenizer()
    if kind == "sd3":
        net = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                    attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                    caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        return StableDiffusion3Pipeline(
            transformer=net, scheduler=sched, vae=_flow_vae(sample_size, 4),
            text_encoder=CLIPTextModelWithProjection(_text_config(tok)), tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tok)), tokenizer_2=tiny_tokenizer(),
            text_encoder_3=_t5_encoder(t5tok), tokenizer_3=t5tok)
    if kind == "flux":
        net = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=guidance_embeds, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(transformer=net, scheduler=sched, vae=_flow_vae(sample_size, 4),
                            text_encoder=CLIPTextModel(_text_config(tok)), tokenizer=tok,
                            text_encoder_2=_t5_encoder(t5tok), tokenizer_2=t5tok)
    raise ValueError(f"tiny flow pipeline kind must be 'sd3' or 'flux', got {kind!r}")


def save_tiny_pipeline(path: str | Path, kind: str = "sd15", seed: int = 0, **kw) -> Path:
    """Build :func:`tiny_pipeline` ('sd15', 'sdxl') or :func:`tiny_flow_pipeline` ('sd3', 'flux') and
    ``save_pretrained`` it to ``path`` (a few MB)."""
    import logging

    from diffusers.utils import logging as dlog

    old = dlog.get_verbosity()
    dlog.set_verbosity(logging.ERROR)
    try:
        build = tiny_flow_pipeline if kind in ("sd3", "flux") else tiny_pipeline
        build(kind, seed, **kw).save_pretrained(str(path))
    finally:
        dlog.set_verbosity(old)
    return Path(path)
