"""CTRL's two promises, measured (issue: robust to solver and step count; a fine-tune that never lowers J).

    python benchmarks/ctrl_promises.py robustness [--epochs N] [--n 500] [--seed 0] [--algo ctrl]
        The default main job (`ctrldiff train --algo ctrl`, every default), then J = E r - beta KL_path of the
        fine-tuned and of the untouched model at the training solver and at em:20, em:50, em:100, ddim:50 (eta 1)
        and heun:25, on the same fixed noises and conditions. --algo dpok: the same for DPOK, to compare.
    python benchmarks/ctrl_promises.py grid [--epochs N] [--seeds 0 1 2] [--scales 0.1 1 10] [--algos ctrl dpok]
        The same defaults on 8 rewards (6 image, 2 exact 2-D), each also scaled by 10 and by 0.1: J of CTRL, DPOK
        and the reference at the training solver and at em:100, reward calls (terminal and value) and wall-clock.
        centering, crispness and left-heavy (benchmarks/ctrl_rewards.py) were written after the defaults were
        chosen; no default was tuned on them.
    python benchmarks/ctrl_promises.py line --run RUN_DIR [--along 0 0.5 1 1.5 2 3 4] [--n 1000]
        J, E r and KL_path of theta_start + s (theta_trained - theta_start) for each s, at the run's training solver,
        on the same fixed noises: is the run's whole displacement too short, too long, or a poor direction? (A run
        that ended at its start is taken at the weights it trained to.)
    python benchmarks/ctrl_promises.py kltime --run RUN_DIR [--solvers em:20 em:100] [--n 200] [--ref-below TAU]
        Where along the time axis a finished run (any algorithm) spends its KL_path: the Girsanov increments of its
        trained weights against the reference, summed over bands of the step's start time, on fixed noises, at each
        solver, and the mean ||eps - eps_ref||^2 each band's KL implies; with E r and J. (A CTRL run that ended at
        its start is taken at the weights it trained to.)
        --ref-below TAU: the same with the reference model at times <= TAU (the trained one above).
    python benchmarks/ctrl_promises.py seeds --variants NAME=GLOB [NAME=GLOB ...]
        Robustness files of several seeds per variant (each GLOB, e.g.
        'benchmarks/results/ctrl_promises_robustness_m2_seed*.json'; the seed is read from the name's trailing
        number): mean J at each solver, the difference from the first variant paired by seed (± its standard
        error), heun:25 against the training solver per seed, and over every file the correlation of that
        difference with KL_path at the training solver.
    python benchmarks/ctrl_promises.py render
        The markdown tables of the saved results.

Results go to benchmarks/results/ctrl_promises_{robustness,grid}.json. Every run uses --threads (default 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ctrl_rewards  # noqa: E402

from ctrldiff.algorithms.base import mean_and_se  # noqa: E402
from ctrldiff.config import apply_overrides  # noqa: E402
from ctrldiff.eval.evaluate import evaluate_policy  # noqa: E402
from ctrldiff.rewards.base import WeightedSum, call_reward, make_reward  # noqa: E402
from ctrldiff.train.config import TrainConfig  # noqa: E402
from ctrldiff.train.trainer import Trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRID = {  # the grid's 8 rewards (the default --tasks). name: (model, reward spec or callable, written after the defaults)
    "digit-alignment": ("digits", "digit-alignment", False),
    "digit-correct": ("digits", "digit-correct", False),
    "jpeg-compressibility": ("digits", "jpeg-compressibility", False),
    "centering": ("digits", ctrl_rewards.centering, True),
    "crispness": ("digits", ctrl_rewards.crispness, True),
    "left-heavy": ("digits", ctrl_rewards.left_heavy, True),
    "toy2d-quadratic": ("gmm2-exact", "toy2d-quadratic", False),
    "toy2d-mode-switch": ("gmm2-exact", "toy2d-mode-switch", False),
}
TASKS = GRID | {  # and the 60-epoch check's (docs/CTRL.md section 16)
    "thickness": ("digits", ctrl_rewards.thickness, True),
    "symmetry": ("digits", ctrl_rewards.symmetry, True),
    "hollow": ("digits", ctrl_rewards.hollow, True),
}
ROBUST_SOLVERS = ["em:20", "em:50", "em:100", "ddim:50", "heun:25"]
QUIET = dict(progress=False, tensorboard=False, num_final_eval=0)


def scaled_reward(spec, scale: float):
    r = make_reward(spec)
    return r if scale == 1 else WeightedSum([(scale, r)])


def evaluate(tr: Trainer, model, solver: str, n: int, seed: int = 4321, samples: bool = False,
             as_is: bool = False) -> dict:
    """E r, KL_path, J (and the classifier's accuracy) of ``model`` at ``solver`` ('name:steps') on n fixed noises and
    conditions; ``samples``: also the samples themselves, under "samples" (with "cond", their conditions). The policy
    is evaluated with the weights the run ends with (:meth:`Trainer.final_weights`: the weight EMA with
    ``optim.ema_decay``), or with ``as_is`` with the weights it holds."""
    name, steps = solver.split(":")
    cond = tr.task.eval_conditions(n)
    with tr.final_weights() if model is tr.policy and not as_is else contextlib.nullcontext():
        ev = evaluate_policy(model, tr.ref, tr.process, tr.reward, sample_shape=tr.task.sample_shape, n=n,
                             solver=name, steps=int(steps), eta=tr.cfg.sampler.eta, cond=cond, seed=seed,
                             beta=tr.cfg.beta, return_samples=True)
    out = {k: ev[k] for k in ("reward_mean", "kl_path", "objective")}
    if tr.task.num_classes:  # the classifier's verdict on the same samples
        out["accuracy"] = float(make_reward("digit-correct")(ev["samples"], cond).mean())
    if samples:
        out |= {"samples": ev["samples"], "cond": cond}
    return out


OVERRIDES: list[str] = []  # --set KEY=VALUE: applied to every run's config (e.g. ctrl.max_update_kl=0.1)


def train(algo: str, model: str, reward, seed: int, epochs: int | None) -> tuple[Trainer, float]:
    kw = {"epochs": epochs} if epochs else {}
    data = dict(algo=algo, model=model, seed=seed, log=QUIET, **kw)
    cfg = TrainConfig(**apply_overrides(data, OVERRIDES)) if OVERRIDES else TrainConfig(**data)
    tr = Trainer(cfg, reward=reward)
    t0 = time.perf_counter()
    tr.train()
    return tr, time.perf_counter() - t0


def robustness(args) -> dict:
    algo = getattr(args, "algo", "ctrl")  # --algo dpok: the same main job and evaluation, for comparison
    tr, wall = train(algo, TrainConfig().model, TrainConfig().reward, args.seed, args.epochs)
    s = tr.cfg.sampler
    train_solver = f"{s.solver}:{s.steps}"
    rows = []
    for solver in [train_solver] + [x for x in ROBUST_SOLVERS if x != train_solver]:
        row = {"solver": solver, "ref": evaluate(tr, tr.ref, solver, args.n), "ft": evaluate(tr, tr.policy, solver, args.n)}
        rows.append(row)
        print(f"{solver:8s} J ref {row['ref']['objective']:.4f}  J fine-tuned {row['ft']['objective']:.4f} "
              f"(E r {row['ft']['reward_mean']:.4f}, KL_path {row['ft']['kl_path']:.3f})", flush=True)
    return {"algo": algo, "config": json.loads(tr.cfg.model_dump_json()), "train_solver": train_solver, "wall_s": wall,
            "reward_queries": tr.reward_queries, "value_reward_queries": tr.value_reward_queries, "n": args.n,
            "rows": rows}


def grid(args) -> dict:
    path = Path(getattr(args, "out", None) or RESULTS / "ctrl_promises_grid.json")
    done = json.loads(path.read_text())["runs"] if path.exists() and args.resume else []
    key = lambda r: (r["task"], r["scale"], r["seed"], r["algo"])  # noqa: E731
    have = {key(r) for r in done}
    for task in args.tasks:
        model, spec, _ = TASKS[task]
        for scale in args.scales:
            for seed in args.seeds:
                ref_ev = None
                for algo in args.algos:
                    if (task, scale, seed, algo) in have:
                        continue
                    tr, wall = train(algo, model, scaled_reward(spec, scale), seed, args.epochs)
                    s = tr.cfg.sampler
                    solvers = [f"{s.solver}:{s.steps}", "em:100"]
                    if ref_ev is None:
                        ref_ev = {sv: evaluate(tr, tr.ref, sv, args.n) for sv in solvers}
                    run = {"task": task, "scale": scale, "seed": seed, "algo": algo, "epochs": tr.cfg.epochs,
                           "wall_s": wall, "reward_queries": tr.reward_queries,
                           "value_reward_queries": tr.value_reward_queries,
                           "ended_at_start": getattr(tr.algo, "uncertified_params", None) is not None,
                           "ref": ref_ev, "ft": {sv: evaluate(tr, tr.policy, sv, args.n) for sv in solvers}}
                    if run["ended_at_start"]:  # what the run had trained to, before the certification refused it
                        tr.algo.continue_training()
                        run["ft_trained"] = {sv: evaluate(tr, tr.policy, sv, args.n) for sv in solvers}
                    done.append(run)
                    j = {sv: (run["ft"][sv]["objective"], ref_ev[sv]["objective"]) for sv in solvers}
                    print(f"{task:20s} x{scale:<4g} seed {seed} {algo:5s}: " + "  ".join(
                        f"{sv} J {a:.4f} (ref {b:.4f})" for sv, (a, b) in j.items()) +
                        f"  calls {run['reward_queries']} (value {run['value_reward_queries']}), {wall:.0f} s"
                        + ("  (ended at the start)" if run["ended_at_start"] else ""), flush=True)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps({"meta": vars(args) | {"func": None}, "runs": done}, indent=1))
    return {"runs": done}


def _ms(v: list[float]) -> str:
    return f"{v[0]:.4f}" if len(v) == 1 else f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}"


def _grid_row(task: str, scale: float, rs: list[dict]) -> str:
    by = {a: [r for r in rs if r["algo"] == a] for a in ("ctrl", "dpok")}
    sv = list(rs[0]["ft"])  # the training solver and em:100
    c, d = by["ctrl"], by["dpok"]

    def cell(runs, which="ft"):
        return " / ".join(_ms([r[which][s]["objective"] for r in runs]) for s in sv) if runs else "—"

    def below(runs):
        return "/".join(str(sum(r["ft"][s]["objective"] < r["ref"][s]["objective"] for r in runs)) for s in sv) \
            if runs else "—"

    def at_start(runs):  # ctrl.certify_z: runs that ended with the start's weights (files from before it: —)
        return str(sum(r["ended_at_start"] for r in runs)) if runs and "ended_at_start" in runs[0] else "—"

    def wall(runs):
        return f"{statistics.mean(r['wall_s'] for r in runs):.0f}" if runs else "—"

    calls = f"{c[0]['reward_queries']} ({c[0]['value_reward_queries']})" if c else "—"
    return (f"| {task} | {scale:g} | {len(c) or len(d)} | {cell(c or d, 'ref')} | {cell(c)} | {cell(d)} | {below(c)} | "
            f"{below(d)} | {at_start(c)} | {calls} | {d[0]['reward_queries'] if d else '—'} | {wall(c)} | {wall(d)} |")


def render(merge: list[str] | None = None) -> str:
    out = []
    p = RESULTS / "ctrl_promises_robustness.json"
    if p.exists():
        r = json.loads(p.read_text())
        out += [f"**Step robustness** (default main job, trained at {r['train_solver']}, {r['wall_s']:.0f} s; "
                f"{r['n']} fixed noises)\n", "| solver | J untouched | J fine-tuned | E r fine-tuned | KL_path | "
                "accuracy untouched -> fine-tuned | J vs training solver |", "|---|---|---|---|---|---|---|"]
        j0 = r["rows"][0]["ft"]["objective"]
        for row in r["rows"]:
            a, b = row["ref"], row["ft"]
            out.append(f"| {row['solver']} | {a['objective']:.3f} | {b['objective']:.3f} | {b['reward_mean']:.3f} | "
                       f"{b['kl_path']:.2f} | {a.get('accuracy', float('nan')):.3f} -> {b.get('accuracy', float('nan')):.3f}"
                       f" | {100 * (b['objective'] - j0) / abs(j0):+.1f}% |")
    files = [Path(f) for f in merge] if merge else [RESULTS / "ctrl_promises_grid.json"]
    runs = [r for f in files if f.exists() for r in json.loads(f.read_text())["runs"]]
    if runs:
        out += ["\n**Never below the start, and against DPOK** (same defaults everywhere; J at the training solver / "
                "at em:100; `below` counts seeds with J < J_ref)\n",
                "| reward | scale | seeds | J_ref | CTRL J | DPOK J | CTRL below start | DPOK below start | "
                "CTRL ended at start | CTRL reward calls (value) | DPOK calls | CTRL s | DPOK s |", "|---" * 13 + "|"]
        cells = sorted({(r["task"], r["scale"]) for r in runs}, key=lambda c: (list(TASKS).index(c[0]), c[1]))
        for task, scale in cells:
            out.append(_grid_row(task, scale, [r for r in runs if r["task"] == task and r["scale"] == scale]))
    return "\n".join(out)


def seeds(variants: list[str]) -> str:
    """The ``seeds`` command: robustness files of several seeds per variant, side by side (see the module's doc)."""
    import glob
    import re

    runs = {}  # name -> {seed: {solver: ft row}}
    for spec in variants:
        name, sep, pattern = spec.partition("=")
        if not sep:
            raise SystemExit(f"--variants: expected NAME=GLOB, got {spec!r}")
        files = sorted(glob.glob(pattern))
        if not files:
            raise SystemExit(f"--variants: no file matches {pattern!r}")
        runs[name] = {}
        for f in files:
            m = re.search(r"(\d+)\.json$", f)
            rows = json.loads(Path(f).read_text())["rows"]
            runs[name][int(m.group(1)) if m else 0] = {r["solver"]: r["ft"] for r in rows}
    base = next(iter(runs))
    solvers = [s for s in ROBUST_SOLVERS if all(s in r for v in runs.values() for r in v.values())]
    train = solvers[0]
    out = ["Mean ± standard deviation over the seeds:", "",
           "| variant | seeds | " + " | ".join(f"J {s}" for s in solvers) + f" | E r {train} | KL_path {train} | "
           f"heun:25 vs {train}, per seed | more than 5% below |", "|---" * (len(solvers) + 6) + "|"]
    pts = []
    for name, v in runs.items():
        sd = sorted(v)
        rel = [(v[s]["heun:25"]["objective"] - v[s][train]["objective"]) / abs(v[s][train]["objective"])
               for s in sd] if "heun:25" in solvers else []
        pts += [(v[s][train]["kl_path"], r) for s, r in zip(sd, rel, strict=False)]  # none without heun:25
        out.append(f"| {name} | {len(sd)} | " + " | ".join(_ms([v[s][sol]["objective"] for s in sd]) for sol in solvers)
                   + f" | {_ms([v[s][train]['reward_mean'] for s in sd])} | {_ms([v[s][train]['kl_path'] for s in sd])}"
                   f" | {' '.join(f'{100 * r:+.1f}%' for r in rel)} | {sum(r < -0.05 for r in rel)} |")
    out += ["", f"| variant - {base} (paired by seed) | seeds | " + " | ".join(solvers) + " |",
            "|---" * (len(solvers) + 2) + "|"]
    for name, v in list(runs.items())[1:]:
        common = sorted(set(v) & set(runs[base]))
        cells = []
        for sol in solvers:
            d = torch.tensor([v[s][sol]["objective"] - runs[base][s][sol]["objective"] for s in common])
            m, se = mean_and_se(d) if len(d) else (0.0, 0.0)
            cells.append("—" if not len(d) else f"{m:+.3f}" if len(d) == 1 else f"{m:+.3f} ± {se:.3f}")
        out.append(f"| {name} | {len(common)} | " + " | ".join(cells) + " |")
    if len(pts) > 2:
        r = statistics.correlation([p[0] for p in pts], [p[1] for p in pts])
        out.append(f"\nOver all {len(pts)} runs: correlation of heun:25's relative difference from {train} with "
                   f"KL_path at {train}: {r:+.2f}")
    return "\n".join(out)


def load_finished_run(path: str) -> Trainer:
    """A trainer holding a finished run's last checkpoint (its config, weights and algorithm state)."""
    from ctrldiff.train.checkpoint import load_latest_checkpoint
    from ctrldiff.train.trainer import load_run_config

    run = Path(path)
    tr = Trainer(load_run_config(run))
    _, state, _ = load_latest_checkpoint(run / "checkpoints")
    tr.load_state_dict(state)
    return tr


def line(args) -> list[dict]:
    """J along a finished CTRL run's displacement from its start (see the module docstring)."""
    from ctrldiff.algorithms.base import copy_into

    run = Path(args.run)
    tr = load_finished_run(args.run)
    cfg = tr.cfg
    algo = tr.algo
    if algo.start_params is None:
        raise SystemExit(f"{run}: no start weights in its checkpoint (a CTRL run with ctrl.certify_z > 0 keeps them)")
    start = [p.clone() for p in algo.start_params]
    trained = [p.clone() for p in (algo.uncertified_params or tr.trainable_parameters)]
    rows = []
    for a in args.along:
        with torch.no_grad():
            copy_into(tr.trainable_parameters, [p0 + a * (p1 - p0) for p0, p1 in zip(start, trained, strict=True)])
        ev = evaluate(tr, tr.policy, f"{cfg.sampler.solver}:{cfg.sampler.steps}", args.n, seed=777, as_is=True)
        rows.append({"along": a, **{k: ev[k] for k in ("objective", "reward_mean", "kl_path")}})
        print(f"s = {a:4.2f}: J {ev['objective']:.4f}  E r {ev['reward_mean']:.4f}  KL_path {ev['kl_path']:.3f}",
              flush=True)
    return rows


KL_BANDS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.0)


def kltime(args) -> list[dict]:
    """KL_path of a finished run's trained weights by band of time, at each solver (see the module docstring)."""
    from ctrldiff.algorithms.base import copy_into
    from ctrldiff.guidance import ReferenceBelow
    from ctrldiff.solvers import evaluate_along, get_solver, kl_increments, kl_weights, prediction_of

    tr = load_finished_run(args.run)
    cfg = tr.cfg
    trained = getattr(tr.algo, "uncertified_params", None)
    rows = []
    with tr.final_weights() if trained is None else contextlib.nullcontext(), torch.no_grad():
        if trained is not None:
            copy_into(tr.trainable_parameters, trained)
        for solver in args.solvers:
            name, steps = solver.split(":")
            g = torch.Generator().manual_seed(777)
            cond = tr.task.eval_conditions(args.n)
            times = tr.process.time_grid(int(steps))
            x = torch.randn((args.n, *tr.task.sample_shape), generator=g) * tr.process.prior_std()
            fn = get_solver(name, **({"eta": cfg.sampler.eta} if name in ("ddim", "eta") else {}))
            model = tr.policy if args.ref_below is None else ReferenceBelow(tr.policy, tr.ref, args.ref_below)
            traj = fn(model, x, times, tr.process, cond, generator=g)
            eps_ref = evaluate_along(tr.ref, tr.process, traj)
            inc = kl_increments(tr.process, traj.times, traj.outputs, eps_ref,
                                prediction=prediction_of(tr.policy)).mean(0).double()
            r = float(call_reward(tr.reward, traj.final, cond).double().mean())
            row = {"solver": solver, "reward_mean": r, "kl_path": float(inc.sum()),
                   "objective": r - cfg.beta * float(inc.sum()), "bands": {}}
            start = traj.times[:-1].double()
            w = kl_weights(tr.process, traj.times, prediction=prediction_of(tr.policy)).double()
            row["eps_change"] = {}  # per band, the mean ||eps - eps_ref||^2 that its KL_path implies (KL / weight)
            for hi, lo in zip(KL_BANDS[:-1], KL_BANDS[1:], strict=True):
                m = (start <= hi) & (start > lo)
                row["bands"][f"({lo}, {hi}]"] = float(inc[m].sum())
                if m.any():
                    row["eps_change"][f"({lo}, {hi}]"] = float(inc[m].sum() / w[m].sum())
            rows.append(row)
            bands = "  ".join(f"{k} {v:.2f}" for k, v in row["bands"].items())
            change = "  ".join(f"{k} {v:.2f}" for k, v in row["eps_change"].items())
            print(f"{solver}: J {row['objective']:.4f}  E r {r:.4f}  KL_path {row['kl_path']:.2f} = {bands}\n"
                  f"    ||eps - eps_ref||^2 by band: {change}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["robustness", "grid", "line", "kltime", "seeds", "render"])
    ap.add_argument("--epochs", type=int, default=None, help="default: the config default")
    ap.add_argument("--seed", type=int, default=0, help="robustness: the training seed")
    ap.add_argument("--algo", default="ctrl", help="robustness: the algorithm (e.g. dpok, for comparison)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.1, 10.0])
    ap.add_argument("--tasks", nargs="+", default=list(GRID), choices=list(TASKS))
    ap.add_argument("--algos", nargs="+", default=["ctrl", "dpok"])
    ap.add_argument("--n", type=int, default=500, help="evaluation samples per solver")
    ap.add_argument("--resume", action="store_true", help="grid: keep the saved runs, add the missing ones")
    ap.add_argument("--out", default=None,
                    help="results file (default benchmarks/results/ctrl_promises_{grid,robustness}.json)")
    ap.add_argument("--merge", nargs="+", default=None, help="render: grid results files to show together")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run", default=None, help="line, kltime: a finished run directory")
    ap.add_argument("--along", type=float, nargs="+", default=[0, 0.5, 1, 1.5, 2, 3, 4],
                    help="line: the multiples of the run's displacement to evaluate")
    ap.add_argument("--solvers", nargs="+", default=["em:20", "em:100"], help="kltime: the solvers to sample with")
    ap.add_argument("--ref-below", type=float, default=None, metavar="TAU",
                    help="kltime: sample with the reference model at times <= TAU (the trained one above)")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME=GLOB",
                    help="seeds: robustness files per variant, the first the baseline")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (repeatable), e.g. ctrl.max_update_kl=0.1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    OVERRIDES[:] = args.overrides
    if args.what == "robustness":
        res = robustness(args)
        out = Path(args.out) if args.out else RESULTS / "ctrl_promises_robustness.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    elif args.what in ("line", "kltime"):  # one finished run: rows printed, and saved with --out
        if not args.run:
            raise SystemExit(f"{args.what} needs --run RUN_DIR")
        rows = (line if args.what == "line" else kltime)(args)
        if args.out:
            Path(args.out).write_text(json.dumps({"run": args.run, "n": args.n, "rows": rows}, indent=1))
        return
    elif args.what == "seeds":
        if not args.variants:
            raise SystemExit("seeds needs --variants NAME=GLOB [NAME=GLOB ...]")
        print(seeds(args.variants))
        return
    elif args.what == "grid":
        grid(args)
        if args.out and not args.merge:  # the table of this run's file, not the default one's
            args.merge = [args.out]
    print(render(args.merge))


if __name__ == "__main__":
    main()
