r"""The diffusers backend: Stable Diffusion 1.5, SDXL and SDXL-Turbo / LCM pipelines as ctrldiff models.

Latent-space rollouts: the pipeline's UNet is wrapped as a ctrldiff denoiser ``model(z, t, cond)`` over
latents z [B, 4, h, w]; its discrete training schedule (the scheduler's ``alphas_cumprod``) becomes the
continuous-time :class:`~ctrldiff.noise.DiscreteVP` process, and continuous t maps to the UNet's timestep
argument N t - 1 (N = num_train_timesteps). So every solver and the Girsanov KL_path work unchanged.

Conditions are prompt **indices** into a fixed prompt set (a LongTensor [B], like class labels, so that
the engine's batching, minibatching and per-condition statistics need nothing new); the wrapper looks up
the prompt embeddings (computed once per prompt by the pipeline's own ``encode_prompt``; SDXL: both text
encoders, the pooled embedding and add_time_ids), and index P = len(prompts) is the empty prompt used by
classifier-free guidance. Rewards see decoded images [B, 3, H, W] in [-1, 1] and the prompt strings.

Importing this module does not import diffusers: :func:`require_diffusers` does, on first use.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import Strict
from ..errors import CtrlDiffError
from ..noise import DiscreteVP

SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                       "LatentConsistencyModelPipeline": "sd"}
PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_FILE = "pytorch_lora_weights.safetensors"


class DiffusersConfig(Strict):
    """The ``diffusers`` config section: used when ``model`` is a diffusers pipeline (directory or hub id)."""

    prompts: str = Field("simple-animals", description="prompt set: a built-in name (simple-animals, "
                         "imagenet-animals, ...) or a text file with one prompt per line")
    resolution: int | None = Field(None, ge=8, description="image size in pixels (default: the pipeline's native)")
    lora_rank: int = Field(4, ge=1, description="LoRA rank r on the UNet")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha (scale alpha / r); default: = rank")
    lora_targets: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                                    description="UNet module names that get LoRA adapters")
    full_finetune: bool = Field(False, description="train every UNet weight instead of LoRA (saved with "
                                "save_pretrained)")
    gradient_checkpointing: bool = False
    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="dtype of the frozen weights and of autocast (fp16/bf16 autocast on CUDA; bf16 on "
        "CPU is optional); trainable weights stay fp32")
    decode_chunk: int = Field(8, ge=1, description="latents decoded by the VAE per call")
    variant: str | None = Field(None, description="weights variant to load, e.g. fp16")
    embedded_guidance: float = Field(8.5, ge=1, description="guidance scale fed to UNets with a guidance "
                                     "embedding (LCM: time_cond_proj_dim)")


# ---- dependencies and locating a pipeline --------------------------------------------------------------
def check_diffusers_installed() -> None:
    """A one-line CtrlDiffError unless diffusers, transformers and peft are installed (imports nothing)."""
    import importlib.util

    missing = []
    for mod in ("diffusers", "transformers", "peft"):
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[mod] is None (import blocked)
            found = False
        if not found:
            missing.append(mod)
    if missing:
        raise CtrlDiffError(f"the diffusers backend needs {', '.join(missing)} (not installed): "
                            "pip install 'ctrldiff[diffusers]'")


def require_diffusers():
    """Import diffusers (after :func:`check_diffusers_installed`)."""
    check_diffusers_installed()
    try:
        import diffusers
    except ImportError as e:
        raise CtrlDiffError(f"cannot import diffusers ({_first_line(e)}): pip install 'ctrldiff[diffusers]'") from None
    return diffusers


def is_diffusers_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def looks_like_hub_id(spec: str) -> bool:
    """'owner/name' with no such local path."""
    parts = spec.split("/")
    return (len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and not Path(spec).exists()
            and not spec.endswith((".json", ".safetensors")))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (HF_ENDPOINT, default huggingface.co) accepts a TCP connection within ``timeout`` s.
    Name resolution runs in a thread too, so a black-holed network cannot hang the caller."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout + 0.5)
    return bool(ok)


@contextmanager
def quiet_hf():
    """diffusers / transformers logging at ERROR and no progress bars inside (loading and casting chatter)."""
    import logging

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    old_d, old_t = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity(logging.ERROR)
    tlog.set_verbosity(logging.ERROR)
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(old_d)
        tlog.set_verbosity(old_t)
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _check_components(root: Path, index: dict) -> None:
    """Every model component named in model_index.json must have its folder and a weights file."""
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = root / name
        if not folder.is_dir():
            raise CtrlDiffError(f"diffusers pipeline {root}: component {name!r} ({spec[1]}) is missing: no folder "
                                f"{folder}")
        if spec[0] in ("diffusers", "transformers") and not any(
                p.suffix in (".safetensors", ".bin") for p in folder.iterdir()) and "Scheduler" not in spec[1] \
                and "Tokenizer" not in spec[1] and "Processor" not in spec[1] and "FeatureExtractor" not in spec[1]:
            raise CtrlDiffError(f"diffusers pipeline {root}: component {name!r} has no weights file in {folder} "
                                "(expected e.g. diffusion_pytorch_model.safetensors or model.safetensors)")


def resolve_pipeline(spec: str) -> tuple[str, dict, bool]:
    """Find the pipeline ``spec`` (a save_pretrained directory or a hub id) -> (source, model_index, local_only).

    A hub id is looked up in the local HF cache only when HF_HUB_OFFLINE is set or the hub is unreachable,
    so that no call ever waits on a dead network; failing that, one line says what is missing."""
    check_diffusers_installed()
    p = Path(spec).expanduser()
    if p.is_dir():
        if not is_diffusers_dir(p):
            raise CtrlDiffError(f"{p} is not a diffusers pipeline directory (no model_index.json)")
        try:
            index = json.loads((p / "model_index.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CtrlDiffError(f"{p / 'model_index.json'} is not valid JSON: {_first_line(e)}") from None
        _check_components(p, index)
        return str(p), index, True
    if not looks_like_hub_id(spec):
        raise CtrlDiffError(f"model {spec!r} is not a diffusers pipeline directory (with model_index.json) nor a "
                            "hub id 'owner/name'")
    from huggingface_hub import constants, hf_hub_download

    offline = hub_offline()
    local_only = offline or not hub_reachable()
    try:
        path = hf_hub_download(spec, "model_index.json", local_files_only=local_only, etag_timeout=5)
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFound, RepositoryNotFound, network errors, ...
        if local_only:
            why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
            raise CtrlDiffError(f"cannot load hub model {spec!r}: {why} and it is not in the local HF cache "
                                f"({constants.HF_HUB_CACHE}), nor is it a local path; download it where there is "
                                "network, or pass a local pipeline directory") from None
        raise CtrlDiffError(f"cannot load hub model {spec!r}: {_first_line(e)}") from None
    index = json.loads(Path(path).read_text())
    return spec, index, local_only


def load_pipeline(spec: str, dtype: torch.dtype = torch.float32, variant: str | None = None):
    """Load a supported pipeline (SD 1.5 / SDXL / SDXL-Turbo / LCM) -> (pipeline, kind 'sd' | 'sdxl')."""
    source, index, local_only = resolve_pipeline(spec)  # before importing diffusers: a missing model fails fast
    diffusers = require_diffusers()
    cls_name = index.get("_class_name")
    if cls_name not in SUPPORTED_PIPELINES:
        raise CtrlDiffError(f"{spec}: pipeline type {cls_name!r} is not supported; ctrldiff fine-tunes "
                            f"{', '.join(SUPPORTED_PIPELINES)}")
    kind = SUPPORTED_PIPELINES[cls_name]
    kw = {"dtype": dtype, "local_files_only": local_only}
    if variant:
        kw["variant"] = variant
    if "safety_checker" in index:
        kw.update(safety_checker=None, requires_safety_checker=False)
    try:
        with quiet_hf():
            pipe = getattr(diffusers, cls_name).from_pretrained(source, **kw)
    except CtrlDiffError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError (missing file), ValueError (bad config), ...
        raise CtrlDiffError(f"cannot load diffusers pipeline {spec}: {_first_line(e)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe, kind


# ---- prompt embeddings -------------------------------------------------------------------------------
class PromptEmbeddings:
    """Text embeddings of a prompt set by the pipeline's own ``encode_prompt``, computed once per prompt on
    first use (the text encoders are frozen). Index P = len(prompts) is the unconditional (empty) prompt, as
    the pipeline builds it for classifier-free guidance (SDXL with force_zeros_for_empty_prompt: zeros)."""

    def __init__(self, pipe, kind: str, prompts: list[str], device, dtype: torch.dtype):
        self.pipe, self.kind, self.prompts = pipe, kind, list(prompts)
        self.device, self.dtype = torch.device(device), dtype
        self._emb: dict[int, Tensor] = {}
        self._pooled: dict[int, Tensor] = {}

    @property
    def null_index(self) -> int:
        return len(self.prompts)

    @torch.no_grad()
    def _encode(self, idx: list[int]) -> None:
        texts = [self.prompts[i] for i in idx if i != self.null_index] or [""]
        # the tokenizers make their tensors on the default device, which the pipeline then moves to self.device:
        # give them the CPU they assume, whatever the caller's default device
        with torch.device("cpu"):
            if self.kind == "sdxl":
                emb, neg, pooled, neg_pooled = self.pipe.encode_prompt(texts, device=self.device,
                                                                       num_images_per_prompt=1,
                                                                       do_classifier_free_guidance=True)
            else:
                emb, neg = self.pipe.encode_prompt(texts, self.device, 1, True, None)
                pooled = neg_pooled = None
        j = 0
        for i in idx:
            if i == self.null_index:
                self._emb[i] = neg[0].to(self.dtype)
                if neg_pooled is not None:
                    self._pooled[i] = neg_pooled[0].to(self.dtype)
            else:
                self._emb[i] = emb[j].to(self.dtype)
                if pooled is not None:
                    self._pooled[i] = pooled[j].to(self.dtype)
                j += 1

    def lookup(self, cond: Tensor | None, batch: int) -> tuple[Tensor, Tensor | None]:
        """cond [B] prompt indices (None = unconditional) -> (embeddings [B, L, D], pooled [B, P] or None)."""
        if cond is None:
            idx = [self.null_index] * batch
        else:
            if not isinstance(cond, Tensor) or cond.dtype.is_floating_point:
                raise CtrlDiffError("a text-to-image model takes prompt indices (a LongTensor [B]) as its condition, "
                                    f"got {type(cond).__name__}")
            idx = cond.reshape(-1).tolist()
            if len(idx) == 1 and batch > 1:
                idx = idx * batch
            bad = [i for i in idx if not 0 <= i <= self.null_index]
            if bad:
                raise CtrlDiffError(f"prompt index {bad[0]} out of range 0..{self.null_index} "
                                    f"({len(self.prompts)} prompts + the empty prompt)")
        todo = sorted(set(idx) - set(self._emb))
        for s in range(0, len(todo), 64):
            self._encode(todo[s:s + 64])
        emb = torch.stack([self._emb[i] for i in idx])
        pooled = torch.stack([self._pooled[i] for i in idx]) if self.kind == "sdxl" else None
        return emb, pooled


# ---- the denoiser ------------------------------------------------------------------------------------
class DiffusersDenoiser(nn.Module):
    """A diffusers UNet as a ctrldiff model: ``forward(z, t, cond)`` with z [B, 4, h, w] latents, t [B] in
    [0, 1], cond [B] prompt indices -> the UNet's output (eps or v, see ``prediction``) [B, 4, h, w].

    ``adapters=False`` runs the same UNet with its LoRA adapters disabled: the frozen reference model at no
    extra memory. Autocast (fp16/bf16) wraps the UNet call when ``autocast_dtype`` is set."""

    def __init__(self, unet: nn.Module, process: DiscreteVP, prompts: PromptEmbeddings, prediction: str,
                 kind: str, image_size: int, adapters: bool = True, autocast_dtype: torch.dtype | None = None,
                 embedded_guidance: float = 8.5):
        super().__init__()
        self.unet = unet
        self.process, self.prompts, self.prediction, self.kind = process, prompts, prediction, kind
        self.image_size, self.adapters, self.autocast_dtype = int(image_size), adapters, autocast_dtype
        self.num_classes = len(prompts.prompts)
        self.embedded_guidance = float(embedded_guidance)

    def null_condition(self, cond: Tensor) -> Tensor:
        return torch.full_like(cond, self.prompts.null_index)

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

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        emb, pooled = self.prompts.lookup(cond, B)
        wdtype = next(self.unet.parameters()).dtype
        run_dtype = self.autocast_dtype or wdtype
        timestep = self.process.timestep(t.double()).to(torch.float32)
        ac = (torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
              else nullcontext())
        ctx = nullcontext() if self.adapters or not getattr(self.unet, "_hf_peft_config_loaded", False) \
            else _adapters_off(self.unet)
        with ctx, ac:
            out = self.unet(x.to(run_dtype), timestep, encoder_hidden_states=emb.to(x.device, run_dtype),
                            added_cond_kwargs=self._added_cond(pooled, B, x.device, run_dtype),
                            timestep_cond=self._timestep_cond(B, x.device, run_dtype), return_dict=False)[0]
        return out.to(x.dtype)


    def encoder_features(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> list[Tensor]:
        """The UNet's down path and middle block at (t, x): [h_block_1, ..., h_block_n, h_mid], each
        [B, C_l, H_l, W_l] (the backbone of LaSRO's latent surrogate, METHODS section 4)."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64)
        if t.ndim == 0:
            t = t.expand(B)
        emb_text, pooled = self.prompts.lookup(cond, B)
        unet = self.unet
        run_dtype = self.autocast_dtype or next(unet.parameters()).dtype
        ac = (torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
              else nullcontext())
        ctx = nullcontext() if self.adapters or not getattr(unet, "_hf_peft_config_loaded", False) \
            else _adapters_off(unet)
        with ctx, ac:
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


class _adapters_off:
    """Context manager: the UNet's LoRA adapters disabled inside (the reference model)."""

    def __init__(self, unet):
        layers = getattr(unet, "_ctrldiff_tuner_layers", None)
        if layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
            unet._ctrldiff_tuner_layers = layers
        self.layers = layers

    def __enter__(self):
        for m in self.layers:
            m.enable_adapters(False)

    def __exit__(self, *exc):
        for m in self.layers:
            m.enable_adapters(True)


# ---- the pieces a task needs -------------------------------------------------------------------------
class DiffusersModel:
    """A loaded pipeline prepared for fine-tuning: the trainable denoiser, its frozen reference, the
    process, the latent shape, VAE decoding and saving. Built by :func:`load_diffusers_model`."""

    def __init__(self, spec: str, pipe, kind: str, prompts: list[str], cfg: DiffusersConfig, device: str = "cpu"):
        with quiet_hf():
            self._setup(spec, pipe, kind, prompts, cfg, device)

    def _setup(self, spec, pipe, kind, prompts, cfg, device) -> None:
        self.spec, self.pipe, self.kind, self.cfg = spec, pipe, kind, cfg
        self.device = torch.device(device)
        dtype = DTYPES[cfg.dtype]
        if dtype != torch.float32 and self.device.type == "cpu" and dtype == torch.float16:
            raise CtrlDiffError("diffusers.dtype=fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
        self.autocast_dtype = None if dtype == torch.float32 else dtype
        sched = pipe.scheduler.config
        pred = sched.get("prediction_type", "epsilon")
        if pred not in PREDICTION:
            raise CtrlDiffError(f"{spec}: scheduler prediction_type {pred!r} is not supported "
                                f"(use one of {', '.join(PREDICTION)})")
        self.prediction = PREDICTION[pred]
        self.process = DiscreteVP.from_scheduler_config(sched)
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        native = int(pipe.unet.config.sample_size) * self.vae_scale
        self.resolution = int(cfg.resolution or native)
        if self.resolution % self.vae_scale:
            raise CtrlDiffError(f"diffusers.resolution must be a multiple of {self.vae_scale}, got {self.resolution}")
        h = self.resolution // self.vae_scale
        self.latent_shape = (int(pipe.unet.config.in_channels), h, h)
        unet = pipe.unet
        # frozen parts in the run dtype (VAEs that overflow in fp16 stay fp32), trainable parts fp32
        for name in ("text_encoder", "text_encoder_2"):
            enc = getattr(pipe, name, None)
            if enc is not None:
                enc.to(self.device, dtype=dtype).requires_grad_(False).eval()
        vae_dtype = torch.float32 if pipe.vae.config.get("force_upcast", False) and dtype == torch.float16 else dtype
        pipe.vae.to(self.device, dtype=vae_dtype).requires_grad_(False).eval()
        self.prompt_emb = PromptEmbeddings(pipe, kind, prompts, self.device, dtype)
        if cfg.full_finetune:
            ref_unet = copy.deepcopy(unet).to(self.device, dtype=dtype).requires_grad_(False).eval()
            unet.to(self.device, dtype=torch.float32).requires_grad_(True).train()
        else:
            from peft import LoraConfig

            unet.to(self.device, dtype=dtype).requires_grad_(False)
            self.lora_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                          init_lora_weights="gaussian", target_modules=list(cfg.lora_targets))
            try:
                unet.add_adapter(self.lora_config)
            except ValueError as e:
                raise CtrlDiffError(f"diffusers.lora_targets {cfg.lora_targets}: {_first_line(e)}") from None
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            unet.train()
            ref_unet = unet
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        kw = dict(process=self.process, prompts=self.prompt_emb, prediction=self.prediction, kind=kind,
                  image_size=self.resolution, autocast_dtype=self.autocast_dtype,
                  embedded_guidance=cfg.embedded_guidance)
        self.model = DiffusersDenoiser(unet, **kw)
        self.ref = DiffusersDenoiser(ref_unet, adapters=cfg.full_finetune, **kw)

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.unet.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the trained weights (LoRA matrices, or the whole UNet when full fine-tuning)."""
        return {n: p.detach().clone() for n, p in self.model.unet.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.model.unet.named_parameters())
        missing = [k for k in state if k not in params]
        if missing:
            raise CtrlDiffError(f"checkpoint does not fit this UNet (unknown weight {missing[0]!r})")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def decode(self, z: Tensor, grad: bool = False) -> Tensor:
        """Latents [B, 4, h, w] -> images [B, 3, H, W] in [-1, 1] by the VAE, ``decode_chunk`` at a time."""
        vae = self.pipe.vae
        sf = vae.config.scaling_factor
        shift = vae.config.get("shift_factor", None) or 0.0
        vdtype = next(vae.parameters()).dtype
        outs = []
        with torch.set_grad_enabled(grad):
            for s in range(0, z.shape[0], self.cfg.decode_chunk):
                zz = z[s:s + self.cfg.decode_chunk] / sf + shift
                outs.append(vae.decode(zz.to(vdtype), return_dict=False)[0].float().clamp(-1, 1))
        return torch.cat(outs)

    def save(self, out: str | Path) -> Path:
        """LoRA: ``out/pytorch_lora_weights.safetensors``, loadable by ``pipe.load_lora_weights(out)``; full
        fine-tuning: the whole pipeline with ``save_pretrained`` (loadable by ``from_pretrained(out)``)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        unet = self.model.unet
        if self.cfg.full_finetune:
            self.pipe.save_pretrained(str(out))
            return out
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        layers = {k: v.detach().float().contiguous().cpu() for k, v in layers.items()}
        meta = unet.peft_config["default"].to_dict()
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        type(self.pipe).save_lora_weights(str(out), unet_lora_layers=layers, unet_lora_adapter_metadata=meta,
                                          safe_serialization=True)
        return out / LORA_FILE


def load_diffusers_model(spec: str, prompts: list[str], cfg: DiffusersConfig | None = None,
                         device: str = "cpu") -> DiffusersModel:
    """Load pipeline ``spec`` (directory or hub id) and prepare it for fine-tuning on ``prompts``."""
    cfg = cfg or DiffusersConfig()
    pipe, kind = load_pipeline(spec, torch.float32, cfg.variant)
    return DiffusersModel(spec, pipe, kind, prompts, cfg, device)
