r"""""The diffusers backend, shared part: pipelines as ctrldiff models, one file per model family.

Families (each one file): :mod:`.diffusers_sd` (UNet pipelines: SD 1.5, SDXL, SDXL-Turbo / LCM; eps / v
prediction on the scheduler's discrete VP schedule), :mod:`.diffusers_sd3` (SD3 / SD3.5: MMDiT transformer, three
text encoders, flow matching) and :mod:`.diffusers_flux` (FLUX.1: packed latents, rotary ids, guidance embedding).
Each family turns its scheduler into a continuous-time :class:`~ctrldiff.noise.NoiseProcess` (DiscreteVP for the
UNets, the shifted rectified flow :class:`~ctrldiff.noise.FlowMatch` for the transformers) and its network into a
ctrldiff denoiser ``model(z, t, cond)`` over latents z [B, C, h, w], so every solver, KL_path and algorithm works
unchanged.

Conditions are prompt **indices** into a fixed prompt set (a LongTensor [B], like class labels, so that
the engine's batching, minibatching and per-condition statistics need nothing new); the wrapper looks up
the prompt embeddings (computed once per prompt by the pipeline's own ``encode_prompt`` and cached; optionally
on disk, ``diffusers.prompt_cache``), and index P = len(prompts) is the empty prompt used by classifier-free
guidance. Rewards see decoded images [B, 3, H, W] in [-1, 1] and the prompt strings. This file holds what all
families share: the config, locating and loading a pipeline, the prompt-embedding cache, LoRA (peft) set-up and
saving in the format plain diffusers ``pipe.load_lora_weights`` reads, gradient checkpointing, dtypes, decoding.

Importing this module does not import diffusers: :func:`require_diffusers` does, on first use.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
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
from ..noise import NoiseProcess

# pipeline class -> (family module, kind)
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": ("diffusers_sd", "sd"),
                       "StableDiffusionXLPipeline": ("diffusers_sd", "sdxl"),
                       "LatentConsistencyModelPipeline": ("diffusers_sd", "sd"),
                       "StableDiffusion3Pipeline": ("diffusers_sd3", "sd3"),
                       "FluxPipeline": ("diffusers_flux", "flux")}
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
    embedded_guidance: float | None = Field(None, ge=0, description="guidance scale fed to networks with a "
                                            "guidance embedding (LCM: time_cond_proj_dim, default 8.5; guidance-"
                                            "distilled FLUX.1: guidance_embeds, default 3.5)")
    prompt_cache: str | None = Field(None, description="a .pt file for the prompt embeddings: computed once per "
                                     "(pipeline, prompt set, resolution) and reused by later runs (the T5 encoder of "
                                     "SD3 / FLUX is their largest part)")
    free_text_encoders: bool = Field(False, description="encode every prompt at start-up, then drop the text "
                                     "encoders from memory")
    max_sequence_length: int | None = Field(None, ge=1, description="T5 tokens per prompt (SD3 / FLUX; default: "
                                            "the pipeline's, 256 / 512)")


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
    """Load a supported pipeline (SD 1.5 / SDXL / SDXL-Turbo / LCM / SD3 / SD3.5 / FLUX.1) -> (pipeline, kind:
    'sd' | 'sdxl' | 'sd3' | 'flux')."""
    source, index, local_only = resolve_pipeline(spec)  # before importing diffusers: a missing model fails fast
    diffusers = require_diffusers()
    cls_name = index.get("_class_name")
    if cls_name not in SUPPORTED_PIPELINES:
        raise CtrlDiffError(f"{spec}: pipeline type {cls_name!r} is not supported; ctrldiff fine-tunes "
                            f"{', '.join(SUPPORTED_PIPELINES)}")
    kind = SUPPORTED_PIPELINES[cls_name][1]
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
    """Text embeddings of a prompt set by the family's ``encode`` (the pipeline's own ``encode_prompt``), computed
    once per prompt on first use (the text encoders are frozen). Index P = len(prompts) is the unconditional (empty)
    prompt, as the pipeline builds it for classifier-free guidance (SDXL with force_zeros_for_empty_prompt: zeros).
    ``encode(texts) -> (emb [n, ...], pooled [n, ...] | None, null_emb [...], null_pooled [...] | None)``."""

    def __init__(self, encode, prompts: list[str], device, dtype: torch.dtype):
        self.encode_fn, self.prompts = encode, list(prompts)
        self.device, self.dtype = torch.device(device), dtype
        self._emb: dict[int, Tensor] = {}
        self._pooled: dict[int, Tensor] = {}

    @property
    def null_index(self) -> int:
        return len(self.prompts)

    @torch.no_grad()
    def _encode(self, idx: list[int]) -> None:
        texts = [self.prompts[i] for i in idx if i != self.null_index] or [""]
        # the tokenizers make their tensors on the default device, which the pipeline then moves to its device:
        # give them the CPU they assume, whatever the caller's default device
        with torch.device("cpu"):
            emb, pooled, null, null_pooled = self.encode_fn(texts)
        j = 0
        for i in idx:
            if i == self.null_index:
                self._emb[i] = null.to(self.dtype)
                if null_pooled is not None:
                    self._pooled[i] = null_pooled.to(self.dtype)
            else:
                self._emb[i] = emb[j].to(self.dtype)
                if pooled is not None:
                    self._pooled[i] = pooled[j].to(self.dtype)
                j += 1

    def encode_all(self) -> None:
        """Encode every prompt and the empty one now (e.g. before dropping the text encoders)."""
        todo = sorted(set(range(self.null_index + 1)) - set(self._emb))
        for s in range(0, len(todo), 64):
            self._encode(todo[s:s + 64])

    def state_dict(self) -> dict:
        return {"prompts": self.prompts, "emb": {i: v.cpu() for i, v in self._emb.items()},
                "pooled": {i: v.cpu() for i, v in self._pooled.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("prompts") != self.prompts:
            raise CtrlDiffError("the prompt cache holds another prompt set")
        self._emb = {int(i): v.to(self.device, self.dtype) for i, v in state["emb"].items()}
        self._pooled = {int(i): v.to(self.device, self.dtype) for i, v in state["pooled"].items()}

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
        if todo and self.encode_fn is None:
            raise CtrlDiffError("the text encoders were dropped (diffusers.free_text_encoders) and prompt "
                                f"{todo[0]} was never encoded")
        for s in range(0, len(todo), 64):
            self._encode(todo[s:s + 64])
        emb = torch.stack([self._emb[i] for i in idx])
        pooled = torch.stack([self._pooled[i] for i in idx]) if self._pooled else None
        return emb, pooled


# ---- the denoiser: what every family shares -----------------------------------------------------------
class _adapters_off:
    """Context manager: the network's LoRA adapters disabled inside (the reference model)."""

    def __init__(self, net):
        layers = getattr(net, "_ctrldiff_tuner_layers", None)
        if layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
            net._ctrldiff_tuner_layers = layers
        self.layers = layers

    def __enter__(self):
        for m in self.layers:
            m.enable_adapters(False)

    def __exit__(self, *exc):
        for m in self.layers:
            m.enable_adapters(True)


class PipelineDenoiser(nn.Module):
    """A pipeline's denoising network as a ctrldiff model ``forward(z, t, cond)``: z [B, C, h, w] latents, t [B] in
    [0, 1], cond [B] prompt indices -> the network's output (``prediction``: eps, v or x0) [B, C, h, w]. A family
    subclass implements :meth:`_call_net` (the network call at continuous time t with the prompt embeddings).

    ``adapters=False`` runs the same network with its LoRA adapters disabled: the frozen reference model at no
    extra memory. Autocast (fp16/bf16) wraps the call when ``autocast_dtype`` is set."""

    net_attr = "unet"  # the pipeline attribute holding the network (and this module's attribute for it)
    cfg_unsupported: str | None = None  # why classifier-free guidance cannot wrap this model (None: it can)

    def __init__(self, net: nn.Module, process: NoiseProcess, prompts: PromptEmbeddings, prediction: str,
                 kind: str, image_size: int, adapters: bool = True, autocast_dtype: torch.dtype | None = None,
                 embedded_guidance: float | None = None):
        super().__init__()
        setattr(self, self.net_attr, net)
        self.process, self.prompts, self.prediction, self.kind = process, prompts, prediction, kind
        self.image_size, self.adapters, self.autocast_dtype = int(image_size), adapters, autocast_dtype
        self.num_classes = len(prompts.prompts)
        self.embedded_guidance = embedded_guidance

    @property
    def net(self) -> nn.Module:
        return getattr(self, self.net_attr)

    def null_condition(self, cond: Tensor) -> Tensor:
        return torch.full_like(cond, self.prompts.null_index)

    def _contexts(self):
        ac = (torch.autocast(self.net_device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
              else nullcontext())
        off = nullcontext() if self.adapters or not getattr(self.net, "_hf_peft_config_loaded", False) \
            else _adapters_off(self.net)
        return off, ac

    @property
    def net_device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def run_dtype(self) -> torch.dtype:
        return self.autocast_dtype or next(self.net.parameters()).dtype

    def _call_net(self, x: Tensor, t: Tensor, emb: Tensor, pooled: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        emb, pooled = self.prompts.lookup(cond, B)
        off, ac = self._contexts()
        with off, ac:
            out = self._call_net(x, t, emb, pooled)
        return out.to(x.dtype)


# ---- the pieces a task needs -------------------------------------------------------------------------
class Family:
    """What one model family provides (a subclass in each family file)."""

    denoiser: type[PipelineDenoiser] = PipelineDenoiser
    text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    default_embedded_guidance: float | None = None
    flow: bool = False  # a flow-matching family (velocity prediction on a shifted rectified flow)

    def __init__(self, pipe, kind: str, cfg: DiffusersConfig, device: torch.device):
        self.pipe, self.kind, self.cfg, self.device = pipe, kind, cfg, device

    def process(self, resolution: int) -> NoiseProcess:
        raise NotImplementedError

    def prediction(self) -> str:
        raise NotImplementedError

    def vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def native_resolution(self) -> int:
        raise NotImplementedError

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def encode(self, texts: list[str]):
        """-> (emb [n, ...], pooled [n, ...] | None, null_emb [...], null_pooled [...] | None)."""
        raise NotImplementedError

    def check_sampler(self, sampler) -> None:
        """Raise a one-line CtrlDiffError for a sampler setting this family cannot use."""


def family_of(kind: str) -> type[Family]:
    module = {k: m for m, k in SUPPORTED_PIPELINES.values()}[kind]
    return importlib.import_module(f"{__package__}.{module}").FAMILY


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
        fam = self.family = family_of(kind)(pipe, kind, cfg, self.device)
        self.prediction = fam.prediction()
        self.vae_scale = fam.vae_scale()
        self.resolution = int(cfg.resolution or fam.native_resolution())
        if self.resolution % fam.vae_scale():
            raise CtrlDiffError(f"diffusers.resolution must be a multiple of {fam.vae_scale()}, got {self.resolution}")
        self.latent_shape = fam.latent_shape(self.resolution)
        self.process = fam.process(self.resolution)
        net_attr = fam.denoiser.net_attr
        net = getattr(pipe, net_attr)
        # frozen parts in the run dtype (VAEs that overflow in fp16 stay fp32), trainable parts fp32
        for name in fam.text_encoders:
            enc = getattr(pipe, name, None)
            if enc is not None:
                enc.to(self.device, dtype=dtype).requires_grad_(False).eval()
        vae_dtype = torch.float32 if pipe.vae.config.get("force_upcast", False) and dtype == torch.float16 else dtype
        pipe.vae.to(self.device, dtype=vae_dtype).requires_grad_(False).eval()
        self.prompt_emb = PromptEmbeddings(fam.encode, prompts, self.device, dtype)
        self._prompt_cache(prompts)
        if cfg.full_finetune:
            ref_net = copy.deepcopy(net).to(self.device, dtype=dtype).requires_grad_(False).eval()
            net.to(self.device, dtype=torch.float32).requires_grad_(True).train()
        else:
            from peft import LoraConfig

            net.to(self.device, dtype=dtype).requires_grad_(False)
            self.lora_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                          init_lora_weights="gaussian", target_modules=list(cfg.lora_targets))
            try:
                net.add_adapter(self.lora_config)
            except ValueError as e:
                raise CtrlDiffError(f"diffusers.lora_targets {cfg.lora_targets}: {_first_line(e)}") from None
            for p in net.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            net.train()
            ref_net = net
        if cfg.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        guidance = cfg.embedded_guidance if cfg.embedded_guidance is not None else fam.default_embedded_guidance
        kw = dict(process=self.process, prompts=self.prompt_emb, prediction=self.prediction, kind=kind,
                  image_size=self.resolution, autocast_dtype=self.autocast_dtype, embedded_guidance=guidance)
        self.model = fam.denoiser(net, **kw)
        self.ref = fam.denoiser(ref_net, adapters=cfg.full_finetune, **kw)

    def _prompt_cache(self, prompts: list[str]) -> None:
        """diffusers.prompt_cache: load the embeddings of this (pipeline, prompts, resolution) or compute and write
        them; diffusers.free_text_encoders: encode everything now and drop the encoders."""
        cfg, pe = self.cfg, self.prompt_emb
        if cfg.prompt_cache:
            key = hashlib.sha256(json.dumps([self.spec, self.kind, prompts, self.resolution, cfg.max_sequence_length,
                                             cfg.dtype]).encode()).hexdigest()[:16]
            path = Path(cfg.prompt_cache).expanduser()
            doc = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
            if key in doc:
                pe.load_state_dict(doc[key])
            else:
                pe.encode_all()
                doc[key] = pe.state_dict()
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                torch.save(doc, tmp)
                os.replace(tmp, path)
        if cfg.free_text_encoders:
            pe.encode_all()
            pe.encode_fn = None
            for name in self.family.text_encoders:
                if getattr(self.pipe, name, None) is not None:
                    setattr(self.pipe, name, None)

    def check_sampler(self, sampler) -> None:
        self.family.check_sampler(sampler)

    @property
    def net(self) -> nn.Module:
        return self.model.net

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the trained weights (LoRA matrices, or the whole network when full fine-tuning)."""
        return {n: p.detach().clone() for n, p in self.net.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.net.named_parameters())
        missing = [k for k in state if k not in params]
        if missing:
            raise CtrlDiffError(f"checkpoint does not fit this {self.model.net_attr} (unknown weight {missing[0]!r})")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def decode(self, z: Tensor, grad: bool = False) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] by the VAE (z / scaling_factor + shift_factor),
        ``decode_chunk`` at a time."""
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
        net = self.net
        if self.cfg.full_finetune:
            self.pipe.save_pretrained(str(out))
            return out
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(net))
        layers = {k: v.detach().float().contiguous().cpu() for k, v in layers.items()}
        meta = net.peft_config["default"].to_dict()
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        attr = self.model.net_attr  # 'unet' or 'transformer': save_lora_weights(unet_lora_layers=...) etc.
        type(self.pipe).save_lora_weights(str(out), **{f"{attr}_lora_layers": layers,
                                                         f"{attr}_lora_adapter_metadata": meta},
                                          safe_serialization=True)
        return out / LORA_FILE


def load_diffusers_model(spec: str, prompts: list[str], cfg: DiffusersConfig | None = None,
                         device: str = "cpu") -> DiffusersModel:
    """Load pipeline ``spec`` (directory or hub id) and prepare it for fine-tuning on ``prompts``."""
    cfg = cfg or DiffusersConfig()
    pipe, kind = load_pipeline(spec, torch.float32, cfg.variant)
    return DiffusersModel(spec, pipe, kind, prompts, cfg, device)
