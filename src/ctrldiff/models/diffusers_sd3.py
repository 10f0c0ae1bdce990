r"""SD3 / SD3.5 pipelines (``StableDiffusion3Pipeline``): the MMDiT ``SD3Transformer2DModel`` predicting the flow
velocity v = eps - x0 over latents z [B, C, h, w], three text encoders (two CLIP with projection, whose pooled
embeddings are concatenated into ``pooled_projections``, and T5, whose tokens follow the padded CLIP tokens), and the
``FlowMatchEulerDiscreteScheduler`` with its ``shift`` as the continuous-time :class:`~ctrldiff.noise.FlowMatch`
process. The transformer's timestep is N t (N = num_train_timesteps). CFG works as in the pipeline (on v).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CtrlDiffError
from .diffusers_backend import PipelineDenoiser
from .diffusers_flow import FlowFamily


class SD3Denoiser(PipelineDenoiser):
    """``SD3Transformer2DModel`` as a ctrldiff model: v(z, t, prompt) [B, C, h, w]."""

    net_attr = "transformer"

    def _call_net(self, x: Tensor, t: Tensor, emb: Tensor, pooled: Tensor | None) -> Tensor:
        dt = self.run_dtype
        timestep = self.process.timestep(t.double()).to(torch.float32)
        return self.transformer(hidden_states=x.to(dt), timestep=timestep, encoder_hidden_states=emb.to(x.device, dt),
                                pooled_projections=pooled.to(x.device, dt), return_dict=False)[0]


class SD3Family(FlowFamily):
    denoiser = SD3Denoiser
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def native_resolution(self) -> int:
        return int(self.pipe.transformer.config.sample_size) * self.vae_scale()

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        p = int(self.pipe.transformer.config.patch_size)
        if resolution % (self.vae_scale() * p):
            raise CtrlDiffError(f"diffusers.resolution must be a multiple of {self.vae_scale() * p} for this SD3 "
                                f"pipeline, got {resolution}")
        h = resolution // self.vae_scale()
        return int(self.pipe.transformer.config.in_channels), h, h

    def image_seq_len(self, resolution: int) -> int:
        return (resolution // self.vae_scale() // int(self.pipe.transformer.config.patch_size)) ** 2

    def encode(self, texts: list[str]):
        kw = {} if self.cfg.max_sequence_length is None else {"max_sequence_length": self.cfg.max_sequence_length}
        emb, neg, pooled, neg_pooled = self.pipe.encode_prompt(texts, None, None, device=self.device,
                                                               num_images_per_prompt=1,
                                                               do_classifier_free_guidance=True, **kw)
        return emb, pooled, neg[0], neg_pooled[0]


FAMILY = SD3Family
