"""One LoRA CTRL epoch on an SD3.5-Medium-architecture pipeline with random weights (no download): time and peak memory.

The MMDiT transformer (SD3.5 Medium: 24 layers, 24 heads of 64, dual attention in layers 0-12, qk RMS-norm; ~2.5B
parameters), the 16-channel VAE, CLIP-L / CLIP-G (with projections) and T5 (XXL width; ``--t5-layers``, 24 = the
full 4.7B encoder) are built from the configs below directly on the device in bf16; random weights do not change
the cost of an epoch. The prompt embeddings are computed once (the T5 cost is not per epoch) and the text encoders
are then dropped (``diffusers.free_text_encoders``). Default: 1024 px (latents 16 x 128 x 128, 4096 tokens),
batch 4, 28 DDIM(eta = 1) steps on the scheduler's shift-3 flow grid, CFG 4.5, LoRA rank 16 on the attention
projections, bf16 + autocast, gradient checkpointing, CTRL estimator (a), JPEG-compressibility reward.

    python benchmarks/gpu_flow_lora.py                       # on a GPU (largest of --resolution that fits)
    python benchmarks/gpu_flow_lora.py --cpu                 # CPU dry run: the same code path at tiny widths
Prints and writes benchmarks/results/gpu_flow_lora[_cpu].json (or ``--out PATH``, as benchmarks/gpu_check.py's
FLOW_CHECKS expects); ``run(args)`` returns the record.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sd15_lora_ctrl import timed_epoch  # noqa: E402

SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD35_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, use_quant_conv=False,
    use_post_quant_conv=False,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
# --cpu: the same families, narrow enough for a CPU (the dims that must agree still agree: 32 + 32 <= 64 = T5 width,
# pooled 32 + 32 = 64)
CPU = dict(transformer=dict(sample_size=8, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                            pooled_projection_dim=64, pos_embed_max_size=16, dual_attention_layers=(0,)),
           vae=dict(latent_channels=4, block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, sample_size=16, layers_per_block=1),
           clip=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
           t5=dict(d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4))


def build_pipeline(cpu: bool, t5_layers: int, device: str, dtype: torch.dtype):
    """The SD3.5-Medium-architecture StableDiffusion3Pipeline, built on ``device`` in ``dtype`` (random weights)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ctrldiff.models.diffusers_tiny import tiny_t5_tokenizer, tiny_tokenizer

    torch.manual_seed(0)
    tok, t5tok = tiny_tokenizer(), tiny_t5_tokenizer()  # tokenisation cost is negligible; the encoders have full size

    def clip(kw):
        return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77,
                                                          bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                                          **(CPU["clip"] if cpu else kw)))

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = SD3Transformer2DModel(**{**SD35M_TRANSFORMER, **(CPU["transformer"] if cpu else {})})
            vae = AutoencoderKL(**{**SD35_VAE, **(CPU["vae"] if cpu else {})})
            t5cfg = {**T5_XXL, **(CPU["t5"] if cpu else {"num_layers": t5_layers})}
            t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), relative_attention_num_buckets=32, pad_token_id=0,
                                         eos_token_id=1, decoder_start_token_id=0, **t5cfg))
            te, te2 = clip(CLIP_L), clip(CLIP_G)
    finally:
        torch.set_default_dtype(old)
    pipe = StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tiny_tokenizer(),
                                    text_encoder_3=t5, tokenizer_3=t5tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe, sum(p.numel() for p in net.parameters())


def run(args) -> dict:
    from ctrldiff.train.config import TrainConfig
    from ctrldiff.train.text_task import text_to_image_task
    from ctrldiff.train.trainer import Trainer

    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    res = args.resolution or (16 if args.cpu else 1024)
    steps = args.steps or (3 if args.cpu else 28)
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    t0 = time.perf_counter()
    pipe, n_params = build_pipeline(args.cpu, args.t5_layers, device,
                                    {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    print(f"built pipeline: transformer {n_params / 1e6:.1f}M parameters ({time.perf_counter() - t0:.0f}s)", flush=True)
    cfg = TrainConfig(
        algo="ctrl", model="sd35-medium-random", reward="jpeg-compressibility", beta=0.05, epochs=1,
        batch_size=args.batch, rollout_chunk=args.batch, device=device,
        sampler=dict(solver="ddim", eta=1.0, steps=steps, guidance=4.5),
        optim=dict(lr=1e-4, minibatch=args.batch * 2, microbatch=args.microbatch),
        ctrl=dict(estimator="a", value=dict(epochs=1, minibatch=64, surrogate_steps=20)),
        diffusers=dict(prompts="simple-animals", resolution=res, lora_rank=args.lora_rank, dtype=dtype,
                       gradient_checkpointing=True, decode_chunk=2, free_text_encoders=True,
                       lora_targets=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                     "to_add_out"],
                       max_sequence_length=args.max_sequence_length),
        log=dict(progress=False, tensorboard=False, num_final_eval=0, num_eval_samples=2))
    task = text_to_image_task(cfg.model, cfg.diffusers, device, pipeline=pipe, kind="sd3")
    tr = Trainer(cfg, task=task)
    setup_s = time.perf_counter() - t0
    rec, epoch_s = timed_epoch(tr, cuda)
    n_lora = sum(p.numel() for p in task.trainable)
    out = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu", "cpu_dry_run": args.cpu,
        "architecture": "SD3.5-Medium (random weights)" if not args.cpu else "SD3 family, tiny widths",
        "transformer_parameters": n_params, "lora_parameters": n_lora, "lora_rank": args.lora_rank,
        "t5_layers": CPU["t5"]["num_layers"] if args.cpu else args.t5_layers, "resolution": res,
        "latent_shape": list(task.sample_shape), "batch": args.batch, "steps": steps, "shift": task.process.shift,
        "dtype": dtype, "gradient_checkpointing": True, "setup_s": round(setup_s, 2), "epoch_s": round(epoch_s, 2),
        "rollout_s": rec["rollout_s"], "updates": rec["train/updates"], "reward_mean": rec["reward_mean"],
        "max_memory_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "torch": torch.__version__,
    }
    print(json.dumps(out, indent=1))
    if args.out:  # benchmarks/gpu_check.py's FLOW_CHECKS protocol: one JSON object at --out
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    elif args.write:
        res_dir = Path(__file__).parent / "results"
        res_dir.mkdir(exist_ok=True)
        (res_dir / f"gpu_flow_lora{'_cpu' if args.cpu else ''}.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="CPU dry run at tiny widths and 16 px")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 1024; --cpu: 16)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--microbatch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default 28; --cpu: 3)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--t5-layers", type=int, default=24, help="T5-XXL encoder layers (24 = full; used once per prompt)")
    ap.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens per prompt")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", dest="write", action="store_false", help="do not write the results JSON")
    ap.add_argument("--out", default=None, help="write the JSON record here (instead of benchmarks/results/)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    main()
