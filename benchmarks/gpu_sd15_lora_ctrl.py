"""One LoRA CTRL epoch on a Stable Diffusion 1.5-architecture pipeline with random weights (no download).

The UNet, VAE and CLIP text encoder are built from the SD 1.5 configs written below (860M-parameter UNet,
83M VAE, 123M text encoder); random weights do not change the cost of an epoch. Default: 512 px, batch 4,
50 DDIM(eta=1) steps, CFG 7.5, LoRA rank 4, bf16 frozen weights + autocast, gradient checkpointing,
CTRL estimator (a) with the JPEG-compressibility reward (so the value's R term is the latent surrogate).
Reports wall time of the epoch and torch.cuda.max_memory_allocated (goal: < 10 GB peak).

    python benchmarks/gpu_sd15_lora_ctrl.py                 # on a GPU
    python benchmarks/gpu_sd15_lora_ctrl.py --tiny          # CPU smoke run: 64 px, 2 x 4 steps, small widths
Writes benchmarks/results/gpu_sd15_lora_ctrl[_tiny].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    only_cross_attention=False, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
    attention_head_dim=8, use_linear_projection=False,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, scaling_factor=0.18215, act_fn="silu",
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                      timestep_spacing="trailing")
# --tiny: the same architecture family, narrow enough for a CPU
TINY = dict(unet=dict(block_out_channels=[32, 64, 64, 64], norm_num_groups=8, cross_attention_dim=32, sample_size=8),
            vae=dict(block_out_channels=[16, 32, 32, 32], norm_num_groups=8, sample_size=64),
            text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=32))


def build_pipeline(path: Path, tiny: bool) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ctrldiff.models.diffusers_tiny import tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()  # tokenisation cost is negligible; the text encoder has SD 1.5's size
    text_cfg = {**SD15_TEXT, **(TINY["text"] if tiny else {})}
    text_cfg["vocab_size"] = max(len(tok), text_cfg["vocab_size"] if not tiny else 0)
    unet = UNet2DConditionModel(**{**SD15_UNET, **(TINY["unet"] if tiny else {})})
    vae = AutoencoderKL(**{**SD15_VAE, **(TINY["vae"] if tiny else {})})
    te = CLIPTextModel(CLIPTextConfig(**text_cfg))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    n_unet = sum(p.numel() for p in unet.parameters())
    print(f"built pipeline: UNet {n_unet / 1e6:.1f}M parameters", flush=True)
    return path


def timed_epoch(tr, cuda: bool) -> tuple[dict, float]:
    """One training epoch, timed (with the CUDA peak-memory counter reset before it) -> (its record, seconds)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    rec = tr.step()
    if cuda:
        torch.cuda.synchronize()
    return rec, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at a tiny width and resolution")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--estimator", default="a", choices=["a", "b"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--final-eval", type=int, default=0, metavar="N",
                    help="then the run's final evaluation (Trainer.final_eval: N fixed-noise samples of the reference "
                    "and of the fine-tuned model, decoded and scored on the device); 0: skip")
    ap.add_argument("--out", default=None, help="JSON file to write (default: benchmarks/results/"
                    "gpu_sd15_lora_ctrl[_tiny].json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ctrldiff.train.config import TrainConfig
    from ctrldiff.train.trainer import Trainer

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    res = args.resolution or (64 if args.tiny else 512)
    steps = args.steps or (4 if args.tiny else 50)
    dtype = args.dtype or ("bf16" if cuda else "fp32")  # bf16: the trainer uses no fp16 loss scaling
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build_pipeline(Path(tmp) / "sd15-random", args.tiny)
        cfg = TrainConfig(
            algo="ctrl", model=str(path), reward="jpeg-compressibility", beta=0.05, epochs=1, batch_size=args.batch,
            rollout_chunk=args.batch, device=device, reward_async=True,
            sampler=dict(solver="ddim", eta=1.0, steps=steps, guidance=7.5),
            optim=dict(lr=1e-4, minibatch=args.batch * 2, microbatch=2 if not args.tiny else 4),
            ctrl=dict(estimator=args.estimator, value=dict(epochs=1, minibatch=64, surrogate_steps=20)),
            diffusers=dict(prompts="simple-animals", resolution=res, lora_rank=4, dtype=dtype,
                           gradient_checkpointing=True, decode_chunk=2),
            log=dict(progress=False, tensorboard=False, num_final_eval=args.final_eval, num_eval_samples=2))
        tr = Trainer(cfg, Path(tmp) / "run" if args.final_eval else None)
        setup_s = time.perf_counter() - t0
        rec, epoch_s = timed_epoch(tr, cuda)
        final = None
        if args.final_eval:
            t2 = time.perf_counter()
            res = tr.final_eval()
            final = {"n": args.final_eval, "s": round(time.perf_counter() - t2, 2),
                     "reward_before": res["before"]["reward_mean"], "reward_after": res["after"]["reward_mean"],
                     "kl_path_after": res["after"]["kl_path"]}
    out = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu", "tiny": args.tiny,
        "resolution": res, "batch": args.batch, "steps": steps, "dtype": dtype, "estimator": args.estimator,
        "lora_rank": 4, "gradient_checkpointing": True, "setup_s": round(setup_s, 2), "epoch_s": round(epoch_s, 2),
        "rollout_s": rec["rollout_s"], "updates": rec["train/updates"], "reward_mean": rec["reward_mean"],
        "final_eval": final,
        "max_memory_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "torch": torch.__version__,
    }
    print(json.dumps(out, indent=1))
    dest = Path(args.out) if args.out else Path(__file__).parent / "results" / \
        f"gpu_sd15_lora_ctrl{'_tiny' if args.tiny else ''}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    if cuda and out["max_memory_allocated_gb"] >= 10:
        print(f"WARNING: peak memory {out['max_memory_allocated_gb']} GB is over the 10 GB goal")


if __name__ == "__main__":
    main()
