r"""UNet pipelines: Stable Diffusion 1.5, SDXL and SDXL-Turbo / LCM.

The pipeline's UNet is wrapped as a ctrldiff denoiser over latents z [B, 4, h, w]; its discrete training schedule
(the scheduler's ``alphas_cumprod``) becomes the continuous-time :class:`~ctrldiff.noise.DiscreteVP` process, and
continuous t maps to the UNet's timestep argument N t - 1 (N = num_train_timesteps). SDXL: both text encoders, the
pooled embedding and add_time_ids; LCM: the guidance-scale embedding (time_cond_proj_dim).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CtrlDiffError
from ..noise import DiscreteVP
from .diffusers_backend import Family, PipelineDenoiser

PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


class UNetDenoiser(PipelineDenoiser):
    """A diffusers UNet as a ctrldiff model (output eps, v or x0 per the scheduler's prediction_type)."""

    net_attr = "unet"

    def _added_cond(self, pooled: Tensor | None, batch: int, device, dtype) -> dict | None:
        if self.kind != "sdxl":
            return None
        s = self.image_size
        time_ids = torch.tensor([[s, s, 0, 0, s, s]], device=device, dtype=dtype).expand(batch, 6)
        return {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": time_ids}

    def _timestep_cond(self, batch: int, device, dtype) -> Tensor | None:
        dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        if dim is None:
            return None
        from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
            LatentConsistencyModelPipeline,
        )

        w = torch.full((batch,), self.embedded_guidance - 1.0, device="cpu")
        emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        return emb.to(device=device, dtype=dtype)

    def _call_net(self, x: Tensor, t: Tensor, emb: Tensor, pooled: Tensor | None) -> Tensor:
        B, run_dtype = x.shape[0], self.run_dtype
        timestep = self.process.timestep(t.double()).to(torch.float32)
        return self.unet(x.to(run_dtype), timestep, encoder_hidden_states=emb.to(x.device, run_dtype),
                         added_cond_kwargs=self._added_cond(pooled, B, x.device, run_dtype),
                         timestep_cond=self._timestep_cond(B, x.device, run_dtype), return_dict=False)[0]

    def encoder_features(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> list[Tensor]:
        """The UNet's down path and middle block at (t, x): [h_block_1, ..., h_block_n, h_mid], each
        [B, C_l, H_l, W_l] (the backbone of LaSRO's latent surrogate, METHODS section 4)."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64)
        if t.ndim == 0:
            t = t.expand(B)
        emb_text, pooled = self.prompts.lookup(cond, B)
        unet = self.unet
        run_dtype = self.run_dtype
        off, ac = self._contexts()
        with off, ac:
            h = x.to(run_dtype)
            timestep = self.process.timestep(t).to(torch.float32)
            enc = emb_text.to(x.device, run_dtype)
            emb = unet.time_embedding(unet.get_time_embed(sample=h, timestep=timestep),
                                      self._timestep_cond(B, x.device, run_dtype))
            aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=enc,
                                     added_cond_kwargs=self._added_cond(pooled, B, x.device, run_dtype) or {})
            emb = emb + aug if aug is not None else emb
            if unet.time_embed_act is not None:
                emb = unet.time_embed_act(emb)
            h, feats = unet.conv_in(h), []
            for block in unet.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=enc)
                else:
                    h, _ = block(hidden_states=h, temb=emb)
                feats.append(h)
            if unet.mid_block is not None:
                mid = unet.mid_block
                h = mid(h, emb, encoder_hidden_states=enc) if getattr(mid, "has_cross_attention", False) else mid(h, emb)
                feats.append(h)
        return [f.float() for f in feats]


class UNetFamily(Family):
    denoiser = UNetDenoiser
    default_embedded_guidance = 8.5  # LCM's guidance-scale embedding

    def prediction(self) -> str:
        pred = self.pipe.scheduler.config.get("prediction_type", "epsilon")
        if pred not in PREDICTION:
            raise CtrlDiffError(f"scheduler prediction_type {pred!r} is not supported (use one of "
                                f"{', '.join(PREDICTION)})")
        return PREDICTION[pred]

    def process(self, resolution: int) -> DiscreteVP:
        return DiscreteVP.from_scheduler_config(self.pipe.scheduler.config)

    def native_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.vae_scale()

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        h = resolution // self.vae_scale()
        return int(self.pipe.unet.config.in_channels), h, h

    def encode(self, texts: list[str]):
        if self.kind == "sdxl":
            emb, neg, pooled, neg_pooled = self.pipe.encode_prompt(texts, device=self.device, num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=True)
            return emb, pooled, neg[0], neg_pooled[0]
        emb, neg = self.pipe.encode_prompt(texts, self.device, 1, True, None)
        return emb, None, neg[0], None


FAMILY = UNetFamily
