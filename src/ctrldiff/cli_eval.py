"""``ctrldiff eval`` (reward, KL_path, J and quality metrics under any solver) and ``ctrldiff report`` (HTML)."""

from __future__ import annotations

import json

import click

from .errors import CtrlDiffError


def _guidance(value: str) -> float | str | None:
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        return float(value)
    except ValueError:
        raise CtrlDiffError(f"--guidance must be a number, 'none' or 'auto', got {value!r}") from None


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def format_eval(doc: dict) -> str:
    """The evaluation document as a human-readable table."""
    lines = [f"model {doc['model']}  (weights {doc['weights']})",
             f"reference {doc['reference']}, reward {doc['reward']}, beta {doc['beta']:g}, guidance "
             f"{'none' if doc['guidance'] is None else doc['guidance']}, n {doc['n']}, seed {doc['seed']}"]
    cols = [("solver", "label", "s"), ("E r", "reward_mean", ".4f"), ("std r", "reward_std", ".4f"),
            ("KL_path", "kl_path", ".4f"), ("J", "objective", ".4f")]
    if doc["kind"] == "digits":
        cols += [("acc", "accuracy", ".3f"), ("diversity", "diversity", ".3f"), ("FD", "frechet", ".3f")]
    elif doc["kind"] == "exact-2d":
        cols += [("gap", "optimality_gap", ".4f"), ("MMD^2", "mmd", ".2e"), ("MMD^2 floor", "mmd_baseline", ".2e")]
    table = [[name for name, _, _ in cols]] + [[_fmt(r.get(k), f) for _, k, f in cols] for r in doc["results"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
              for row in table]
    if doc.get("real_baseline"):
        b = doc["real_baseline"]
        lines.append(f"real-vs-real baseline: FD {b['frechet_train_vs_heldout']:.3f} (train n={b['n_train']} vs "
                     f"held-out n={b['n_heldout']}), held-out diversity {_fmt(b['diversity_heldout'], '.3f')}, "
                     f"classifier accuracy on held-out {b['accuracy_heldout']:.3f}")
    if doc.get("exact"):
        e = doc["exact"]
        lines.append(f"exact target p*: J* {e['J_star']:.4f}, E_p* r {e['mean_reward_star']:.4f}, "
                     f"KL(p*||p_ref) {e['kl_star']:.4f}, E_ref r {e['mean_reward_ref']:.4f}")
    return "\n".join(lines)


@click.command("eval")
@click.argument("model_or_run")
@click.option("--solver", default=None, help="Solver: em, ddim, ode-euler, heun, dpmpp-2m (default: the run's "
              "training solver, else em).")
@click.option("--steps", type=int, default=None, help="Solver steps (default: the run's, else 50).")
@click.option("--solvers", "solver_list", default=None, metavar="LIST",
              help=f"Several solvers at once, e.g. {'em:10,em:50,ddim:50,heun:25'!r} (replaces --solver/--steps).")
@click.option("--eta", type=float, default=None, help="DDIM eta (default: the run's sampler.eta, else 0).")
@click.option("--n", "n", type=int, default=512, show_default=True, help="Samples per solver.")
@click.option("--reward", default=None, help="Reward (default: the run's, else the training default).")
@click.option("--beta", type=float, default=None, help="KL_path weight in J (default: the run's, else 0.05).")
@click.option("--guidance", default="auto", show_default=True, help="CFG scale, 'none', or 'auto' (the run's).")
@click.option("--ref", default=None, help="Reference model (default: the run's model, else the model itself).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--device", default="cpu", show_default=True, help="Where the models run: cpu, cuda, cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (nothing else) to stdout.")
def eval_cmd(model_or_run, solver, steps, solver_list, eta, n, reward, beta, guidance, ref, seed, threads,
             device, as_json) -> None:
    """Evaluate MODEL_OR_RUN ('digits', '<gmm>-exact', a model file or a run directory): reward, KL_path to the
    reference by Girsanov, J = E r - beta KL_path per solver; digits: classifier accuracy, diversity and
    Frechet distance to held-out digits; '<gmm>-exact': optimality gap to the exact optimum and MMD to p*.

    For deterministic solvers (ddim with eta 0, heun, dpmpp-2m, ode-euler) KL_path is the Girsanov integrand
    averaged along the ODE paths; J is then not a lower bound on J* and the gap can be negative."""
    import torch

    from .cli import _threads
    from .eval.run_eval import evaluate_setup, parse_solvers
    from .eval.target import load_setup

    _threads(threads)
    if solver_list and (solver or steps):
        raise CtrlDiffError("give either --solvers or --solver/--steps, not both")
    try:
        torch.empty(0, device=device)
    except Exception as e:  # noqa: BLE001 - unknown device string, CUDA not available, ...
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CtrlDiffError(f"--device {device!r} cannot be used here ({why})") from None
    setup = load_setup(model_or_run, reward=reward, beta=beta, guidance=_guidance(guidance), ref=ref, device=device)
    run = setup.sampler
    if steps is not None and steps < 1:
        raise CtrlDiffError(f"--steps must be >= 1, got {steps}")
    specs = parse_solvers(solver_list or solver or run.get("solver", "em"), steps or run.get("steps", 50))
    if eta is None:  # a run trained with DDIM is evaluated with its eta unless told otherwise
        eta = run["eta"] if run.get("solver") == "ddim" else 0.0
    doc = evaluate_setup(setup, specs, n=n, seed=seed, eta=eta, device=device)
    click.echo(json.dumps(doc, indent=1, allow_nan=False) if as_json else format_eval(doc))


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR [RUN_DIR ...]")
@click.option("--out", type=click.Path(dir_okay=False), default="report.html", show_default=True)
@click.option("--solvers", "solver_list", default="em:10,em:50,ddim:50,heun:25", show_default=True,
              help="Solver/step grid of the robustness table.")
@click.option("--n", "n", type=int, default=64, show_default=True, help="Samples per robustness cell.")
@click.option("--no-robustness", is_flag=True, help="Skip the solver/step robustness table (fast).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
def report_cmd(run_dirs, out, solver_list, n, no_robustness, seed, threads) -> None:
    """Write a self-contained HTML report comparing RUN_DIRs: overlaid reward / KL_path / J curves, before/after
    samples, a summary table and J under several solvers and step counts (images embedded as data URIs)."""
    from .cli import _threads
    from .eval.report import write_report
    from .eval.run_eval import parse_solvers

    _threads(threads)
    specs = None if no_robustness else parse_solvers(solver_list)
    path = write_report(list(run_dirs), out, solvers=specs, n=n, seed=seed,
                        log=lambda m: click.echo(m, err=True))
    click.echo(f"report: {path}")
