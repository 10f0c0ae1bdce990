"""Text-to-image fine-tuning of a diffusers pipeline (SD 1.5 / SDXL / SDXL-Turbo / LCM / SD3 / SD3.5 / FLUX.1) as a Task.

The engine sees latents [B, 4, h, w] and conditions = prompt indices [B] into the prompt set (so per-prompt
statistics, minibatching and CFG work as for class labels); the reward sees decoded images [B, 3, H, W] in
[-1, 1] and ``cond`` = the list[str] of the B prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..models.diffusers_backend import DiffusersConfig, DiffusersModel, load_diffusers_model
from .task import Task

# defaults for fields the user did not set: the built-in models' defaults (100 grid samples, 500 final-eval
# samples, 4096-pair chunks) are far too many UNet calls for a latent diffusion model
TEXT_TO_IMAGE_DEFAULTS = {
    "log.num_eval_samples": 8, "log.num_final_eval": 16, "rollout_chunk": 8, "batch_size": 16,
    "optim.minibatch": 32, "optim.microbatch": 8, "ctrl.value.minibatch": 64, "sampler.steps": 20,
}
# flow-matching pipelines: stochastic rollouts by the exact Gaussian (DDPM-posterior) step, not Euler-Maruyama,
# whose first step from t_max = 0.999 is unstable (g^2 = 2t / (1 - t))
FLOW_DEFAULTS = {"sampler.solver": "ddim", "sampler.eta": 1.0}


@dataclass
class TextToImageTask(Task):
    backend: DiffusersModel | None = None
    prompts: tuple[str, ...] = ()

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n prompts drawn uniformly with replacement (as DDPO does) -> indices [n]."""
        return torch.randint(0, len(self.prompts), (n,), generator=generator, device="cpu")

    def eval_conditions(self, n: int) -> Tensor:
        return torch.arange(n, device="cpu") % len(self.prompts)

    def decode(self, x: Tensor, grad: bool = False) -> Tensor:
        return self.backend.decode(x, grad=grad)

    def reward_cond(self, cond):
        if cond is None:
            return None
        return [self.prompts[i] if i < len(self.prompts) else "" for i in cond.reshape(-1).tolist()]

    def check_sampler(self, sampler) -> None:
        self.backend.check_sampler(sampler)

    def condition_names(self) -> list[str]:
        return list(self.prompts)

    def model_state_dict(self) -> dict:
        return self.backend.trainable_state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        self.backend.load_trainable_state_dict(state)

    def save_final(self, out: Path, metadata: dict) -> Path:
        """LoRA -> RUN_DIR/lora/pytorch_lora_weights.safetensors (``pipe.load_lora_weights(RUN_DIR/lora)``);
        full fine-tuning -> RUN_DIR/pipeline (``from_pretrained(RUN_DIR/pipeline)``)."""
        import json

        target = out / ("pipeline" if self.backend.cfg.full_finetune else "lora")
        path = self.backend.save(target)
        (target / "ctrldiff.json").write_text(json.dumps({"base_model": self.backend.spec, **metadata}, indent=1))
        return path


def text_to_image_task(model: str, cfg: DiffusersConfig | None = None, device: str = "cpu",
                       pipeline=None, kind: str | None = None) -> TextToImageTask:
    """The task of pipeline ``model`` (a directory or hub id), or of an already built ``pipeline`` object of family
    ``kind`` ('sd', 'sdxl', 'sd3', 'flux'; ``model`` is then only its name)."""
    from ..data.prompts import load_prompts

    cfg = cfg or DiffusersConfig()
    prompts = load_prompts(cfg.prompts)
    if pipeline is None:
        backend = load_diffusers_model(model, prompts, cfg, device)
    else:
        backend = DiffusersModel(model, pipeline, kind, prompts, cfg, device)
    return TextToImageTask(name=model, model=backend.model, ref=backend.ref, process=backend.process,
                           sample_shape=backend.latent_shape, num_classes=len(prompts), trainable=backend.trainable,
                           config_defaults=dict(TEXT_TO_IMAGE_DEFAULTS) | (FLOW_DEFAULTS if backend.family.flow else {}),
                           backend=backend, prompts=tuple(prompts))
