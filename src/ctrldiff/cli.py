"""The ``ctrldiff`` command line.

User errors (:class:`~ctrldiff.errors.CtrlDiffError`, bad options) print one line ``error: ...``
and exit with status 1 (2 for usage errors), never a traceback.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

# The command line owns the thread settings only when it is what loads torch (the `ctrldiff` process); a program
# or test that imported torch first and then calls the CLI keeps its own. Idle OpenMP threads then sleep instead
# of spinning (an explicit OMP_WAIT_POLICY wins): a spinning thread burns a core another process needs.
AUTO_THREADS = "torch" not in sys.modules
if AUTO_THREADS:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402
import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from .errors import CtrlDiffError  # noqa: E402


def _validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "value"
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"invalid {loc}: {msg}" + (f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else "")


class _Group(click.Group):
    """A click group that turns user errors raised by any command into one line on stderr."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _cwd_on_path()
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: interrupted (Ctrl-C)", err=True)
            sys.exit(1)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except CtrlDiffError as e:
            click.echo(f"error: {_process_tag()}{e}", err=True)
            sys.exit(1)
        except ValidationError as e:
            click.echo(f"error: {_validation_message(e)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


def _cwd_on_path() -> None:
    """Make ``--reward mymod:fn`` import ``mymod.py`` from the current directory, as ``python -m`` would: the
    ``ctrldiff`` console script puts its own bin directory, not the working directory, on ``sys.path``. Appended,
    so a local file never shadows an installed package."""
    import os

    cwd = os.getcwd()
    if not any(p in ("", ".", cwd) for p in sys.path):
        sys.path.append(cwd)


def _process_tag() -> str:
    """'(process R) ' in the workers R > 0 of a multi-process run (each process reports its own errors)."""
    import os

    rank = os.environ.get("RANK", "0")
    return f"(process {rank}) " if rank not in ("", "0") and os.environ.get("WORLD_SIZE", "1") != "1" else ""


def _command_line() -> str:
    return "ctrldiff " + shlex.join(sys.argv[1:])


MAX_DEFAULT_THREADS = 4


def _busy_cores(seconds: float = 0.25) -> float:
    """How many cores other processes keep busy right now: the machine's non-idle CPU time over ``seconds``
    (/proc/stat) less this process's own, divided by the time. 0.0 where /proc/stat cannot be read."""
    import time

    def read() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            vals = [float(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)  # idle + iowait
        own = sum(os.times()[:2])
        return sum(vals[:8]) - idle, own, time.monotonic()

    try:
        hz = os.sysconf("SC_CLK_TCK")
        b0, o0, t0 = read()
        time.sleep(seconds)
        b1, o1, t1 = read()
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, ((b1 - b0) / hz - (o1 - o0)) / max(t1 - t0, 1e-3))


def default_threads(cores: int | None = None, busy: float | None = None) -> int:
    """torch CPU threads when neither --threads nor OMP_NUM_THREADS is given: the cores other processes leave idle
    at start-up, at most 4 (the small models gain little beyond), at least 1. Taking a core another process is
    using makes every parallel region wait for a descheduled thread: beside one busy process on 2 cores the
    torch default of 2 threads ran the main job several times slower than 1 thread (README, --threads)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if busy is None:
        busy = _busy_cores()
    return max(1, min(MAX_DEFAULT_THREADS, cores, int(cores - busy + 0.5)))


def _threads(n: int | None, processes: int = 1) -> None:
    """--threads N; without it (and without OMP_NUM_THREADS, in a process whose torch the CLI loaded)
    :func:`default_threads`, or with ``processes`` > 1 training processes on this machine their share of the cores."""
    if n is not None:
        if n < 1:
            raise CtrlDiffError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    elif AUTO_THREADS and not os.environ.get("OMP_NUM_THREADS"):
        if processes > 1:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, min(MAX_DEFAULT_THREADS, cores // processes)))
        else:
            torch.set_num_threads(default_threads())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ctrldiff")
def main() -> None:
    """ctrldiff: fine-tune diffusion models with rewards by continuous-time RL."""


@main.command()
@click.argument("dataset", metavar="DATASET", type=click.Choice(["digits", "gmm2", "gmm4", "gmm8", "checkerboard", "rings"]))
@click.option("--steps", type=int, default=20000, show_default=True, help="optimizer steps")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="peak AdamW learning rate")
@click.option("--ema-decay", type=float, default=0.999, show_default=True)
@click.option("--cond-drop", type=float, default=0.1, show_default=True, help="label dropout for CFG")
@click.option("--process", default="vp", show_default=True, help="noise process: vp, vp-cosine, rf")
@click.option("--prediction", default="eps", show_default=True,
              help="network output: eps, v (on --process rf: the flow-matching velocity eps - x0) or x0")
@click.option("--checkpoint-every", type=int, default=1000, show_default=True)
@click.option("--log-every", type=int, default=200, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="runs/pretrain", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="continue from OUT/checkpoint.pt if it exists")
@click.option("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
def pretrain(dataset, steps, batch_size, lr, ema_decay, cond_drop, process, prediction, checkpoint_every, log_every,
             out, seed, resume, threads) -> None:
    """Pretrain a denoiser on DATASET by denoising score matching (EMA weights saved to OUT/model.*)."""
    from .train.pretrain import PretrainConfig
    from .train.pretrain import pretrain as run

    _threads(threads)
    cfg = PretrainConfig(dataset=dataset, steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                         cond_drop=cond_drop, process=process, prediction=prediction,
                         checkpoint_every=checkpoint_every, log_every=log_every,
                         out=out, seed=seed, resume=resume, command=_command_line())
    res = run(cfg, log=click.echo)
    click.echo(f"model: {res.model_path}")
    click.echo(f"checkpoint: {res.checkpoint_path}")



@main.command("train-classifier")
@click.option("--epochs", type=int, default=60, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="peak AdamW learning rate (one-cycle)")
@click.option("--shift", type=int, default=1, show_default=True, help="augmentation: random shift in pixels")
@click.option("--noise-std", type=float, default=0.1, show_default=True, help="augmentation: pixel noise")
@click.option("--out", type=click.Path(file_okay=False), default="runs/classifier", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads")
def train_classifier(epochs, batch_size, lr, shift, noise_std, out, seed, threads) -> None:
    """Train the 8x8 digit classifier on the fixed train split and report its held-out accuracy."""
    from .train.pretrain import ClassifierConfig
    from .train.pretrain import train_classifier as run

    _threads(threads)
    cfg = ClassifierConfig(epochs=epochs, batch_size=batch_size, lr=lr, shift=shift, noise_std=noise_std, out=out,
                           seed=seed, command=_command_line())
    res = run(cfg, log=click.echo)
    click.echo(f"model: {res.model_path}")


@main.command()
@click.option("--teacher", default="digits", show_default=True, help="'digits' (shipped) or a saved model path")
@click.option("--teacher-steps", type=int, default=8, show_default=True, help="DDIM steps of the first teacher")
@click.option("--target-steps", type=int, default=2, show_default=True, help="steps of the final generator")
@click.option("--guidance", type=float, default=None, help="CFG scale of the first teacher, distilled into the "
              "student (default: the shipped digits model's recommended scale for 'digits', else none)")
@click.option("--steps-per-halving", type=int, default=1500, show_default=True, help="optimizer steps per halving")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="runs/distill", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log-every", type=int, default=100, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads")
def distill(teacher, teacher_steps, target_steps, guidance, steps_per_halving, batch_size, lr, out, seed, log_every,
            threads) -> None:
    """Progressive distillation of a pretrained model into a TARGET-STEPS (1-2) step DDIM generator (OUT/model.*)."""
    from .train.distill import DistillConfig
    from .train.distill import distill as run

    _threads(threads)
    cfg = DistillConfig(teacher=teacher, teacher_steps=teacher_steps, target_steps=target_steps, guidance=guidance,
                        steps_per_halving=steps_per_halving, batch_size=batch_size, lr=lr, out=out, seed=seed,
                        log_every=log_every, command=_command_line())
    res = run(cfg, log=click.echo)
    click.echo(f"model: {res.model_path}")


def run_sample(model_path: str | None, solver: str, eta: float | None, steps: int, guidance: float | None, seed: int,
               label: str, n: int, out: Path, fmt: str = "safetensors") -> dict[str, Path]:
    """Sample ``n`` states from a saved model and write a picture and a tensor file; returns their paths."""
    from .assets import DEFAULT_GUIDANCE, default_digits_model_path
    from .errors import check, choice
    from .guidance import with_guidance
    from .models import load_model
    from .models import unet as _unet  # noqa: F401  (registers the model types)
    from .noise import make_process, process_from_config
    from .solvers import SOLVERS
    from .solvers import sample as draw

    choice("solver", solver, SOLVERS)
    check(steps >= 1, f"--steps must be >= 1, got {steps}")
    check(n >= 1, f"--n must be >= 1, got {n}")
    check(eta is None or solver == "ddim", f"--eta applies to the ddim solver only, not {solver!r}")
    check(eta is None or eta >= 0, f"--eta must be >= 0, got {eta}")
    from .assets import SHIPPED_MODELS, load_shipped_model
    from .eval.target import is_run_dir

    if model_path is not None and Path(model_path).is_dir():
        check(is_run_dir(model_path), f"{model_path} is a directory but not a ctrldiff run directory (no config.yaml); "
              "give a run directory or a model .safetensors/.json file")
        model, process, shape, num_classes, guidance = _run_model(model_path, guidance)
    else:
        model = load_shipped_model(model_path) if model_path in SHIPPED_MODELS else \
            load_model(model_path or default_digits_model_path())
        meta = getattr(model, "metadata", {}) or {}
        process = process_from_config(meta["process"]) if "process" in meta else make_process("vp")
        if "data_shape" in meta:
            shape = tuple(meta["data_shape"])
        elif hasattr(model, "resolution"):
            shape = (model.in_channels, model.resolution, model.resolution)
        else:
            shape = (model.dim,)
        num_classes = int(getattr(model, "num_classes", 0))
        if num_classes and guidance is None:
            guidance = DEFAULT_GUIDANCE
    cond = None
    if num_classes:
        lab = _parse_label(label, num_classes)
        cond = torch.arange(n) % num_classes if lab is None else torch.full((n,), lab, dtype=torch.long)
    else:
        check(label == "all", f"this model is unconditional: --label {label!r} cannot be used")
        guidance = None
    gen = torch.Generator().manual_seed(seed)
    kw = {"eta": eta} if eta is not None else {}
    with torch.no_grad():
        x = draw(with_guidance(model, guidance), process, (n, *shape), steps, solver, cond=cond, generator=gen, **kw).final
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"samples": x.contiguous()} | ({"labels": cond} if cond is not None else {})
    tpath = out / f"samples.{fmt}"
    if fmt == "pt":
        torch.save(tensors, tpath)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(tpath))
    png = out / "samples.png"
    if x.ndim == 4:
        from .data.digits import save_grid

        save_grid(x, png, nrow=min(n, num_classes or 10))
    else:
        _scatter(x, png)
    return {"grid": png, "tensors": tpath}


def _run_model(run_dir: str, guidance: float | None):
    """A run directory's newest weights (final model or latest checkpoint, as ``ctrldiff eval`` takes them), its
    noise process, data shape and class count; guidance: the given scale, else the run's training one."""
    from .eval.target import load_setup
    from .train.task import _is_diffusers_spec
    from .train.trainer import load_run_config

    cfg = load_run_config(run_dir)
    if _is_diffusers_spec(cfg.model):
        raise CtrlDiffError(f"{run_dir} fine-tuned a diffusers pipeline: sample it with diffusers "
                            f"(pipe.load_lora_weights('{run_dir}/lora')) or `ctrldiff export`")
    setup = load_setup(run_dir, guidance=None)  # None: the bare policy (guidance is applied by the caller)
    return (setup.policy, setup.process, setup.sample_shape, setup.num_classes,
            cfg.sampler.guidance if guidance is None else guidance)


def _scatter(x: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=3, alpha=0.6)
    ax.set_aspect("equal")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _parse_label(value: str, num_classes: int) -> int | None:
    if value == "all":
        return None
    try:
        label = int(value)
    except ValueError:
        raise CtrlDiffError(f"--label must be an integer in 0..{num_classes - 1} or 'all', got {value!r}") from None
    if not 0 <= label < num_classes:
        raise CtrlDiffError(f"--label must lie in 0..{num_classes - 1} or be 'all', got {label}")
    return label


@main.command()
@click.argument("model_or_run", required=False, default=None)
@click.option("--model", "model_path", type=click.Path(), default=None,
              help="model .safetensors/.json, a shipped model (digits (default), digits-2step, digits-rf) or a run "
                   "directory")
@click.option("--solver", default="em", show_default=True, help="em, ddim, ode-euler, heun or dpmpp-2m")
@click.option("--eta", type=float, default=None, help="DDIM stochasticity (ddim only; 0 = deterministic)")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's "
              "recommended one for the shipped model, else 1 = none)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--label", default="all", show_default=True, help="class label N, or 'all' to cycle through the classes")
@click.option("--n", "n", type=int, default=100, show_default=True, help="number of samples")
@click.option("--out", type=click.Path(file_okay=False), default="samples", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["safetensors", "pt"]), default="safetensors", show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads")
def sample(model_or_run, model_path, solver, eta, steps, guidance, seed, label, n, out, fmt, threads) -> None:
    """Sample from MODEL_OR_RUN (a model .safetensors/.json or a run directory: its final model or latest
    checkpoint, with its training guidance; default: the shipped digits model); writes OUT/samples.png and
    OUT/samples.(safetensors|pt)."""
    _threads(threads)
    if model_or_run and model_path:
        raise CtrlDiffError("give the model either as MODEL_OR_RUN or with --model, not both")
    model_path = model_path or model_or_run
    if model_path == "digits":
        model_path = None
    paths = run_sample(model_path=model_path, solver=solver, eta=eta, steps=steps, guidance=guidance, seed=seed,
                       label=label, n=n, out=Path(out), fmt=fmt)
    for kind, p in paths.items():
        click.echo(f"{kind}: {p}")


@main.command("verify-assets")
def verify_assets() -> None:
    """Check the shipped assets against the sha256 and sizes in assets/manifest.json."""
    from .assets import verify_manifest

    for name, digest in verify_manifest().items():
        click.echo(f"ok  {name}  {digest}")


def _register_subcommands() -> None:
    from .cli_config import config_cmd
    from .cli_eval import eval_cmd, report_cmd
    from .cli_export import export_cmd
    from .cli_serve import serve_reward_cmd
    from .cli_train import train_cmd

    main.add_command(train_cmd)
    main.add_command(eval_cmd)
    main.add_command(report_cmd)
    main.add_command(serve_reward_cmd)
    main.add_command(config_cmd)
    main.add_command(export_cmd)


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
