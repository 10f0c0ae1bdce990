"""``ctrldiff train``: fine-tune a model with a reward, any algorithm, one trainer."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .errors import CtrlDiffError

# command-line flags that map onto config fields (flag value None = not given)
_FLAG_FIELDS = {
    "model": "model", "reward": "reward", "beta": "beta", "epochs": "epochs", "batch_size": "batch_size",
    "solver": "sampler.solver", "steps": "sampler.steps", "guidance": "sampler.guidance", "seed": "seed",
    "lr": "optim.lr", "device": "device", "estimator": "ctrl.estimator", "prompts": "diffusers.prompts",
}


def build_train_config(algo: str | None, config_file: str | None, flags: dict, overrides: list[str]):
    """Defaults <- config file <- flags <- ``--set key=value`` overrides; validated as one TrainConfig."""
    from .config import apply_overrides, build_config, load_yaml
    from .train.config import TrainConfig

    data = load_yaml(config_file) if config_file else {}
    if algo:
        data["algo"] = algo
    sets = [f"{_FLAG_FIELDS[k]}={v}" for k, v in flags.items() if v is not None and k in _FLAG_FIELDS]
    return build_config(TrainConfig, apply_overrides(data, sets + list(overrides)), "config")


@click.command("train")
@click.option("--algo", type=click.Choice(["ctrl", "ddpo", "ddpo-sf", "dpok", "q-learning", "reward-backprop",
                                          "diffusion-dpo", "lasro"]), default=None,
              help="Algorithm (default: ctrl, or the config file's).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="YAML config file.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<algo>-<model>-<time>).")
@click.option("--model", default=None, help="'digits' (shipped), 'gmm2-exact', 'scratch-gmm2' / 'scratch-digits' "
              "(a fresh model and a data set, for q-learning), a saved model path, or a diffusers pipeline (a "
              "directory with model_index.json, or a hub id such as stabilityai/sdxl-turbo).")
@click.option("--prompts", default=None, help="Diffusers models: prompt set (simple-animals, imagenet-animals, or a "
              "text file with one prompt per line).")
@click.option("--reward", default=None, help="Built-in name, module:function, or '1.0*a + 0.1*b'.")
@click.option("--beta", type=float, default=None, help="KL_path weight in J = E r - beta KL_path.")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Trajectories per epoch.")
@click.option("--solver", default=None, help="Rollout solver: em, ddim, ode-euler.")
@click.option("--steps", type=int, default=None, help="Solver steps per rollout.")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale.")
@click.option("--estimator", type=click.Choice(["a", "b"]), default=None, help="CTRL policy-update estimator.")
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config field, e.g. --set ctrl.value.epochs=8 (repeatable).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(algo, config_file, out, overrides, resume_dir, overwrite, threads, quiet, **flags) -> None:
    """Fine-tune a diffusion model with a reward (CTRL, DDPO, DDPO-SF, DPOK), or train one from data and a
    reward with q-learning (--algo q-learning --model scratch-<data set>).

    With no options it fine-tunes the shipped digits model with CTRL (EM, 20 steps, a fresh random time
    grid every epoch) on the download-free digit-confidence reward (the shipped classifier's log-odds of
    the conditioned label), then writes a before/after grid and a reward curve into the run directory.

    Several processes: `accelerate launch [--cpu | --multi_gpu] --num_processes N -m ctrldiff train ...` or
    `torchrun --nproc_per_node N -m ctrldiff train ...` (docs/DISTRIBUTED.md).
    """
    import sys

    import torch

    from .launcher import accelerate_cpu_processes, launch_env, spawn_workers
    from .train.trainer import Trainer, load_run_config

    n_workers = accelerate_cpu_processes()
    if n_workers:  # `accelerate launch --cpu --num_processes N` started this one process: start the N workers
        sys.exit(spawn_workers(n_workers))
    main = launch_env()[0] == 0
    echo = click.echo if main else (lambda *a, **k: None)  # process 0 speaks for the run

    if threads is not None:
        if threads < 1:
            raise CtrlDiffError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if resume_dir:
        if algo or config_file or any(v is not None for v in flags.values()):
            raise CtrlDiffError("--resume continues a run with its saved config; use --set to change a field")
        cfg = load_run_config(resume_dir, list(overrides))
        out_dir = Path(resume_dir)
    else:
        cfg = build_train_config(algo, config_file, flags, list(overrides))
        if quiet:
            cfg.log.progress = False
        model_tag = Path(cfg.model).stem if cfg.model not in ("digits",) else cfg.model
        out_dir = Path(out) if out else Path("runs") / f"{cfg.algo}-{model_tag}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not out and launch_env()[1] > 1:  # every process uses process 0's time-stamped directory
            from .train.distributed import get_dist

            out_dir = Path(get_dist(cfg.device)[0].all_gather_object(str(out_dir))[0])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out_dir, resume=bool(resume_dir), overwrite=overwrite)
    procs = f", {trainer.dist.world_size} processes" if trainer.dist.enabled else ""
    echo(f"run directory: {out_dir}  (algo {cfg.algo}, model {trainer.task.name}, reward "
         f"{trainer.reward.name}, {cfg.epochs} epochs x {cfg.batch_size} samples x {cfg.sampler.steps} steps{procs})")
    records = trainer.train()
    if records:
        first, last = records[0], records[-1]
        echo(f"reward {first['reward_mean']:.4f} -> {last['reward_mean']:.4f}, KL_path {last['kl_path']:.4f}, "
             f"J {first['objective']:.4f} -> {last['objective']:.4f}, reward queries {last['reward_queries']}, "
             f"{time.perf_counter() - t0:.1f} s")
    fe = out_dir / "final_eval.json"
    if fe.exists() and main:
        import json

        ev = json.loads(fe.read_text())
        b, a = ev["before"], ev["after"]
        click.echo(f"held-out evaluation ({b['n']} fixed-noise samples, {b['solver']} {b['steps']} steps): reward "
                   f"{b['reward_mean']:.4f} -> {a['reward_mean']:.4f}, KL_path {a['kl_path']:.4f}, "
                   f"J {b['objective']:.4f} -> {a['objective']:.4f}")
    names = ["final_eval.json", "metrics.jsonl", "samples/before_after.png", "reward_curve.png", "final_model.safetensors",
             "lora/pytorch_lora_weights.safetensors", "pipeline/model_index.json"]
    echo("wrote " + ", ".join(str(out_dir / n) for n in names if (out_dir / n).exists()))
