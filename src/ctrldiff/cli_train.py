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
        from .errors import choice
        from .train.config import ALGOS

        data["algo"] = choice("--algo", algo, ALGOS)
    sets = [f"{_FLAG_FIELDS[k]}={v}" for k, v in flags.items() if v is not None and k in _FLAG_FIELDS]
    return build_config(TrainConfig, apply_overrides(data, sets + list(overrides)), "config")


@click.command("train")
@click.option("--algo", default=None, help="Algorithm: ctrl, ddpo, ddpo-sf, dpok, q-learning, reward-backprop, "
              "diffusion-dpo, lasro, adjoint-matching, flow-grpo or diffusion-nft (default: ctrl, or the config file's).")
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
@click.option("--solver", default=None, help="Rollout solver: em, ddim, ode-euler, eta (with --set sampler.eta=...).")
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
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: the cores other processes "
              "leave idle at start, at most 4; OMP_NUM_THREADS is honoured).")
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

    from .cli import _threads

    _threads(threads, processes=launch_env()[3])
    if resume_dir:
        if algo or config_file or any(v is not None for v in flags.values()):
            raise CtrlDiffError("--resume continues a run with its saved config; use --set to change a field")
        cfg = load_run_config(resume_dir, list(overrides))
        out_dir = Path(resume_dir)
    else:
        cfg = build_train_config(algo, config_file, flags, list(overrides))
        if quiet:
            cfg.log.progress = False
        model_tag = Path(cfg.model).stem if cfg.model not in ("digits", "digits-2step", "digits-rf") else cfg.model
        out_dir = Path(out) if out else Path("runs") / f"{cfg.algo}-{model_tag}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not out and launch_env()[1] > 1:  # every process uses process 0's time-stamped directory
            from .train.distributed import get_dist

            out_dir = Path(get_dist(cfg.device)[0].all_gather_object(str(out_dir))[0])
    t0 = time.perf_counter()
    created = main and not out_dir.exists()
    try:
        trainer = Trainer(cfg, out_dir, resume=bool(resume_dir), overwrite=overwrite)
    except BaseException:  # a launch that fails before training leaves no run directory behind
        if created:
            remove_unstarted_run(out_dir)
        raise
    if resume_dir and trainer.is_complete():
        echo(f"run {out_dir} is complete ({trainer.epoch} of {cfg.epochs} epochs); nothing to do. To train "
             f"longer: ctrldiff train --resume {out_dir} --set epochs=N (N > {cfg.epochs})")
        _echo_summary(out_dir, None, echo)
        return
    procs = f", {trainer.dist.world_size} processes" if trainer.dist.enabled else ""
    echo(f"run directory: {out_dir}  (algo {cfg.algo}, model {trainer.task.name}, reward "
         f"{trainer.reward.name}, {cfg.epochs} epochs x {cfg.batch_size} samples x {cfg.sampler.steps} steps{procs}, "
         f"{torch.get_num_threads()} torch threads)")
    try:
        records = trainer.train()
    except KeyboardInterrupt:
        if created and remove_unstarted_run(out_dir):
            echo(f"interrupted before the first epoch finished; removed {out_dir} (nothing to resume)", err=True)
        else:
            echo(interrupted_message(out_dir, trainer.epoch, cfg.epochs, threads)
                 + (f" (under the same launcher, {trainer.dist.world_size} processes)" if trainer.dist.enabled else ""),
                 err=True)
        sys.exit(130)
    except BaseException:
        if created:
            remove_unstarted_run(out_dir)
        raise
    _echo_summary(out_dir, records, echo, time.perf_counter() - t0)


def remove_unstarted_run(out_dir: Path) -> bool:
    """Delete a run directory this launch created if no epoch finished in it (no metrics.jsonl with a record);
    returns whether it was removed."""
    import shutil

    if not out_dir.is_dir():
        return False
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        return False
    shutil.rmtree(out_dir, ignore_errors=True)
    return True


def interrupted_message(out_dir: Path, epoch: int, epochs: int, threads: int | None = None) -> str:
    """What Ctrl-C prints: where the run stopped, its last checkpoint and the command that continues it."""
    import shlex

    from .train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out_dir / "checkpoints") if (out_dir / "checkpoints").is_dir() else None
    where = (f"last checkpoint: {ckpt} (epoch {_ckpt_epoch(ckpt)})" if ckpt is not None else
             "no checkpoint yet, resuming replays the run from epoch 0")
    cmd = "ctrldiff train --resume " + shlex.quote(str(out_dir)) + (f" --threads {threads}" if threads else "")
    return f"interrupted at epoch {epoch} of {epochs}; {where}\ncontinue with: {cmd}"


def _ckpt_epoch(path: Path) -> str:
    digits = "".join(c for c in path.stem if c.isdigit())
    return str(int(digits)) if digits else "?"


def _echo_summary(out_dir: Path, records: list[dict] | None, echo, seconds: float | None = None) -> None:
    """The end-of-run lines: the training curve's first and last epoch (noisy: one batch each), then the result,
    J before -> after on the held-out fixed-noise evaluation (final_eval.json) when the run wrote one."""
    import json

    if records:
        first, last = records[0], records[-1]
        echo(f"training: reward {first['reward_mean']:.4f} -> {last['reward_mean']:.4f}, KL_path "
             f"{last['kl_path']:.4f}, J {first['objective']:.4f} -> {last['objective']:.4f} (first -> last epoch, one "
             f"batch each), reward queries {last['reward_queries']}" + (f", {seconds:.1f} s" if seconds else ""))
        if last.get("train/certified") == 0.0:
            fine = (f"; at {last['train/certified_steps_fine']} steps {last['train/certified_gain_fine']:+.4g} +- "
                    f"{last['train/certified_gain_fine_se']:.2g}" if "train/certified_gain_fine" in last else "")
            echo(f"the gain over the start was not certified (J {last['train/certified_gain']:+.4g} +- "
                 f"{last['train/certified_gain_se']:.2g}{fine}, paired on fixed noises that training never saw: not "
                 "ctrl.certify_z standard errors above 0 at each): the run ends with the start's weights; the trained ones "
                 "are in the last checkpoint's algorithm state (uncertified_params), and --resume --set epochs=N "
                 "trains on from them")
    names = ["final_eval.json", "metrics.jsonl", "samples/before_after.png", "reward_curve.png", "final_model.safetensors",
             "lora/pytorch_lora_weights.safetensors", "pipeline/model_index.json"]
    echo("wrote " + ", ".join(str(out_dir / n) for n in names if (out_dir / n).exists()))
    fe = out_dir / "final_eval.json"
    if fe.exists():
        ev = json.loads(fe.read_text())
        b, a = ev["before"], ev["after"]
        echo(f"result (held-out: {b['n']} fixed-noise samples, {b['solver']} {b['steps']} steps): J {b['objective']:.4f} "
             f"-> {a['objective']:.4f} (reward {b['reward_mean']:.4f} -> {a['reward_mean']:.4f}, KL_path "
             f"{a['kl_path']:.4f})")
