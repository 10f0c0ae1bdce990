"""One DDPO epoch on a tiny SD 1.5-shaped pipeline: ctrldiff vs TRL's DDPOTrainer, same settings.

Both sides load the same saved tiny pipeline, use the same batch (B samples, one sampling batch per epoch),
K DDIM(eta=1) steps, CFG scale, fp32, LoRA rank 4 (alpha 4, the same four attention projections), the same
JPEG-compressibility reward, one inner epoch with ONE optimizer step over all B x K (sample, step) pairs
(TRL: train_batch_size = B, gradient accumulation over the K timesteps; ctrldiff: optim.minibatch = B K,
optim.microbatch = B), and the same number of CPU threads. Epoch 0 warms up; epochs 1.. are timed, by wall
clock and by the process's CPU time (with one thread, CPU time is the steadier measure on a shared machine).

ctrldiff additionally evaluates the frozen reference along every trajectory to log KL_path (Girsanov);
``--no-kl`` sets log.kl_path=false for the same work as TRL, and ``--reuse-graph`` sets
optim.reuse_rollout_graph=true (the single policy step goes through the rollout's own autograd graph, one UNet
forward per (sample, step) fewer). The three ctrldiff variants and TRL run interleaved, ``--rounds`` times.
TRL runs in its own virtual environment: trl 0.23.1 is the last release with DDPOTrainer (0.24.0 ships no
DDPO), installed with the diffusers / transformers of its time:

    python -m venv /work/venvs/trl && /work/venvs/trl/bin/pip install torch==2.13.0 && \\
      /work/venvs/trl/bin/pip install trl==0.23.1 diffusers==0.35.2 'transformers>=4.56,<5' 'peft>=0.17,<0.18' \\
      'accelerate>=1.10,<1.11'
    python benchmarks/diffusers_ddpo_vs_trl.py --trl-python /work/venvs/trl/bin/python
Writes benchmarks/results/diffusers_ddpo_vs_trl.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird"]


def jpeg_kb(images01: torch.Tensor) -> torch.Tensor:
    """-(JPEG size in kB) of images [B, 3, H, W] in [0, 1] (quality 95): the reward of both sides."""
    arr = (images01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        out.append(-buf.tell() / 1000.0)
    return torch.tensor(out)


def legacy_copy(pipe_dir: Path, out: Path) -> Path:
    """The same pipeline in the layout older transformers (TRL's) read: CLIPTokenizer from vocab.json +
    merges.txt (transformers 5 saves tokenizer.json), CLIPTextModel weights under 'text_model.' keys."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(pipe_dir, out)
    tok_dir = out / "tokenizer"
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    (tok_dir / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]))
    merges = spec["model"].get("merges") or []
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(
        (" ".join(m) if isinstance(m, list) else m) + "\n" for m in merges))
    wfile = out / "text_encoder" / "model.safetensors"
    state = load_file(str(wfile))
    save_file({(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}, str(wfile),
              metadata={"format": "pt"})
    return out


# ---- the ctrldiff side ---------------------------------------------------------------------------------
def run_ctrldiff(args, pipe_dir: str) -> dict:
    from ctrldiff.train.config import TrainConfig
    from ctrldiff.train.trainer import Trainer

    prompt_file = Path(pipe_dir) / "prompts.txt"

    def reward(x, cond):
        return jpeg_kb((x + 1) / 2)

    cfg = TrainConfig(
        algo="ddpo", model=pipe_dir, beta=0.0, epochs=args.epochs, batch_size=args.batch, rollout_chunk=args.batch,
        reward_async=False, sampler=dict(solver="ddim", eta=1.0, steps=args.steps, guidance=args.guidance),
        optim=dict(lr=3e-4, minibatch=args.batch * args.steps, microbatch=args.batch, inner_epochs=1, grad_clip=1.0,
                   reuse_rollout_graph=args.reuse_graph),
        ddpo=dict(clip=1e-4, adv_clip=5.0, stat_buffer=16, stat_min_count=16),
        diffusers=dict(prompts=str(prompt_file), lora_rank=4, lora_alpha=4, dtype="fp32"),
        log=dict(progress=False, tensorboard=False, num_final_eval=0, num_eval_samples=1, kl_path=not args.no_kl))
    tr = Trainer(cfg, reward=reward)
    times, cpu = [], []
    for _ in range(args.epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        rec = tr.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"epoch_s": times, "epoch_cpu_s": cpu, "updates_per_epoch": rec["train/updates"],
            "reward_mean": rec["reward_mean"]}


# ---- the TRL side (runs inside the TRL venv) -------------------------------------------------------------
def run_trl(args, pipe_dir: str) -> dict:
    import trl
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    def prompt_fn():
        return random.choice(PROMPTS), {}

    def reward_fn(images, prompts, metadata):
        return jpeg_kb(images), {}

    with tempfile.TemporaryDirectory() as logdir:
        cfg = DDPOConfig(
            num_epochs=args.epochs, sample_num_steps=args.steps, sample_eta=1.0, sample_guidance_scale=args.guidance,
            sample_batch_size=args.batch, sample_num_batches_per_epoch=1, train_batch_size=args.batch,
            train_gradient_accumulation_steps=1, train_learning_rate=3e-4, train_num_inner_epochs=1,
            train_timestep_fraction=1.0, train_cfg=True, mixed_precision="no", log_with=None,
            per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=16,
            per_prompt_stat_tracking_min_count=16, save_freq=10**6, async_reward_computation=False,
            train_use_8bit_adam=False, allow_tf32=False, project_kwargs={"logging_dir": logdir, "project_dir": logdir},
            tracker_project_name="bench", train_max_grad_norm=1.0)
        from accelerate import PartialState

        PartialState()  # TRL's pipeline logs through accelerate's logger, which needs a state first
        pipe = DefaultDDPOStableDiffusionPipeline(pipe_dir, use_lora=True)
        assert len(pipe.sd_pipeline.tokenizer) > 3, "TRL's pipeline did not read the tokenizer"
        trainer = DDPOTrainer(cfg, reward_fn, prompt_fn, pipe)
        times, cpu, step = [], [], 0
        for epoch in range(args.epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            step = trainer.step(epoch, step)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        n_lora = sum(p.numel() for p in pipe.sd_pipeline.unet.parameters() if p.requires_grad)
    return {"epoch_s": times, "epoch_cpu_s": cpu, "trl_version": trl.__version__, "trainable_params": n_lora}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["both", "ctrldiff", "trl"], default="both")
    ap.add_argument("--pipeline", default=None, help="(internal) saved tiny pipeline directory")
    ap.add_argument("--trl-python", default="/work/venvs/trl/bin/python")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--epochs", type=int, default=3, help="epoch 0 is warm-up; the rest are timed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="the three runs are repeated, interleaved, this many times")
    ap.add_argument("--no-kl", action="store_true", help="ctrldiff: skip the reference evaluation for KL_path")
    ap.add_argument("--reuse-graph", action="store_true", help="ctrldiff: optim.reuse_rollout_graph=true")
    ap.add_argument("--sample-size", type=int, default=16, help="tiny UNet latent size (image = 2x)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    if args.side == "ctrldiff":
        print(json.dumps(run_ctrldiff(args, args.pipeline)))
        return
    if args.side == "trl":
        print(json.dumps(run_trl(args, args.pipeline)))
        return
    from ctrldiff.models.diffusers_tiny import save_tiny_pipeline

    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("side", "pipeline", "trl_python")}}
    with tempfile.TemporaryDirectory() as tmp:
        pipe_dir = save_tiny_pipeline(Path(tmp) / "tiny-sd15", "sd15", sample_size=args.sample_size)
        (pipe_dir / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        trl_dir = legacy_copy(pipe_dir, Path(tmp) / "tiny-sd15-legacy")
        skip = ("no_kl", "rounds", "reuse_graph")
        common = [f"--{k.replace('_', '-')}={v}" for k, v in results["settings"].items() if k not in skip]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        runs = [("ctrldiff", sys.executable, []), ("ctrldiff_no_kl", sys.executable, ["--no-kl"]),
                ("ctrldiff_no_kl_reuse_graph", sys.executable, ["--no-kl", "--reuse-graph"]),
                ("trl", args.trl_python, [])]
        for rnd in range(args.rounds):  # interleaved, so that load from other jobs hits every side alike
            for name, python, extra in runs:
                side = "trl" if name == "trl" else "ctrldiff"
                where = trl_dir if side == "trl" else pipe_dir
                r = subprocess.run([python, __file__, f"--side={side}", f"--pipeline={where}", *common, *extra],
                                   capture_output=True, text=True, env=env)
                if r.returncode:
                    tail = r.stderr.strip().splitlines()[-15:]
                    results[name] = {"error": "\n".join(tail)}
                    print(f"{name}: FAILED\n" + "\n".join(tail), flush=True)
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                entry = results.setdefault(name, {"rounds": []})
                entry["rounds"].append(res)
                print(f"round {rnd} {name}: epochs " + ", ".join(f"{t:.2f}" for t in res["epoch_s"]) + " s wall, "
                      + ", ".join(f"{t:.2f}" for t in res["epoch_cpu_s"]) + " s CPU", flush=True)
    for name, _, _ in runs:
        entry = results.get(name, {})
        if "rounds" in entry:
            timed = sorted(t for res in entry["rounds"] for t in (res["epoch_s"][1:] or res["epoch_s"]))
            cpu = sorted(t for res in entry["rounds"] for t in (res["epoch_cpu_s"][1:] or res["epoch_cpu_s"]))
            entry.update(timed_min_s=timed[0], timed_median_s=timed[len(timed) // 2], n_timed=len(timed),
                         timed_cpu_median_s=cpu[len(cpu) // 2])
            print(f"{name}: wall min {entry['timed_min_s']:.3f} s/epoch, median {entry['timed_median_s']:.3f}; CPU time "
                  f"median {entry['timed_cpu_median_s']:.3f} s/epoch ({len(timed)} timed epochs)")
    if "timed_min_s" in results.get("trl", {}):
        for name in ("ctrldiff", "ctrldiff_no_kl", "ctrldiff_no_kl_reuse_graph"):
            if "timed_min_s" in results.get(name, {}):
                sp = {k: results["trl"][f"timed_{k}_s"] / results[name][f"timed_{k}_s"]
                      for k in ("min", "median", "cpu_median")}
                results[f"speedup_{name}_vs_trl"] = sp
                print(f"speed-up {name} vs TRL: wall {sp['min']:.2f}x (min), {sp['median']:.2f}x (median); "
                      f"CPU time {sp['cpu_median']:.2f}x (median)")
    out = ROOT / "benchmarks" / "results" / "diffusers_ddpo_vs_trl.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
