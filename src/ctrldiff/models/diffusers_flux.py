r"""FLUX.1 pipelines (``FluxPipeline``): the ``FluxTransformer2DModel`` predicting the flow velocity on **packed**
latents (2x2 patches: [B, C, h, w] <-> [B, h w / 4, 4 C]) with rotary position ids (img_ids: (0, row, col) of each
patch; txt_ids: zeros), CLIP's pooled embedding and T5's tokens as the text, and, for the guidance-distilled models
(FLUX.1 [dev]: ``guidance_embeds``), a guidance-scale embedding instead of classifier-free guidance. ctrldiff's
state is the unpacked latent z [B, C, h, w] (so image-shaped tools work); the denoiser packs and unpacks. The
scheduler's resolution-dependent shift exp(mu) becomes the :class:`~ctrldiff.noise.FlowMatch` shift; the
transformer's timestep is t itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CtrlDiffError
from .diffusers_backend import PipelineDenoiser
from .diffusers_flow import FlowFamily


def pack(z: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4 C] (FluxPipeline._pack_latents)."""
    B, C, h, w = z.shape
    return z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(z: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack`: [B, (h/2)(w/2), 4 C] -> [B, C, h, w]."""
    B, _, c4 = z.shape
    return z.view(B, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Rotary ids of the packed patches [(h/2)(w/2), 3]: (0, row, col)."""
    ids = torch.zeros(h // 2, w // 2, 3, device="cpu")
    ids[..., 1] = torch.arange(h // 2, device="cpu")[:, None]
    ids[..., 2] = torch.arange(w // 2, device="cpu")[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxDenoiser(PipelineDenoiser):
    """``FluxTransformer2DModel`` as a ctrldiff model: v(z, t, prompt) [B, C, h, w] (packed inside)."""

    net_attr = "transformer"

    @property
    def cfg_unsupported(self) -> str:
        if self.transformer.config.guidance_embeds:
            return ("this FLUX.1 pipeline is guidance-distilled: it takes no classifier-free guidance "
                    "(sampler.guidance / --guidance); set its guidance embedding with diffusers.embedded_guidance "
                    f"(now {self.embedded_guidance})")
        return ("this FLUX.1 pipeline (no guidance embedding, e.g. [schnell]) is distilled to sample without "
                "classifier-free guidance: drop sampler.guidance / --guidance")

    def _call_net(self, x: Tensor, t: Tensor, emb: Tensor, pooled: Tensor | None) -> Tensor:
        B, _, h, w = x.shape
        dt = self.run_dtype
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((B,), float(self.embedded_guidance), device=x.device, dtype=torch.float32)
        out = self.transformer(hidden_states=pack(x).to(dt), timestep=t.to(torch.float32), guidance=guidance,
                               pooled_projections=pooled.to(x.device, dt), encoder_hidden_states=emb.to(x.device, dt),
                               txt_ids=torch.zeros(emb.shape[1], 3, device=x.device, dtype=dt),
                               img_ids=image_ids(h, w, x.device, dt), return_dict=False)[0]
        return unpack(out, h, w)


class FluxFamily(FlowFamily):
    denoiser = FluxDenoiser
    default_embedded_guidance = 3.5  # FluxPipeline's default guidance_scale

    def native_resolution(self) -> int:
        return 128 * self.vae_scale()  # FluxPipeline.default_sample_size

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % (2 * self.vae_scale()):
            raise CtrlDiffError(f"diffusers.resolution must be a multiple of {2 * self.vae_scale()} for FLUX (packed "
                                f"2x2 latents), got {resolution}")
        h = resolution // self.vae_scale()
        return int(self.pipe.transformer.config.in_channels) // 4, h, h

    def image_seq_len(self, resolution: int) -> int:
        return (resolution // self.vae_scale() // 2) ** 2

    def encode(self, texts: list[str]):
        kw = {} if self.cfg.max_sequence_length is None else {"max_sequence_length": self.cfg.max_sequence_length}
        emb, pooled, _ = self.pipe.encode_prompt(texts, None, device=self.device, num_images_per_prompt=1, **kw)
        null, null_pooled, _ = self.pipe.encode_prompt([""], None, device=self.device, num_images_per_prompt=1, **kw)
        return emb, pooled, null[0], null_pooled[0]


FAMILY = FluxFamily
