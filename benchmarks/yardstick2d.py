"""Exact 2-D yardstick (METHODS section 7): CTRL(a), CTRL(b), DDPO and DPOK (and, with --algos, reward
backprop and Diffusion-DPO) against the exact optimum.

The pretrained model is the exact score of the 'gmm2' mixture plus a zero-initialised residual MLP, so
p_ref is known, and p* = p_ref exp(r / beta) / Z and J* = beta log E_ref exp(r / beta) follow by
quadrature. At reward-query budgets (default 5k, 20k, 50k) each run is evaluated on fresh samples
(EM, 20 steps, the training solver): E r, KL_path (Girsanov), J, the optimality gap (J* - J) / |J*|,
and MMD^2 to exact samples of p*. Also: the queries each algorithm needs to reach 90% of the attainable
improvement J* - J_ref.

    python benchmarks/yardstick2d.py                 # full: 2 rewards x 4 algorithms x 2 seeds
    python benchmarks/yardstick2d.py --quick         # 1 seed, budgets 5k and 20k
    python benchmarks/yardstick2d.py --algos reward-backprop diffusion-dpo diffusion-dpo-bt --budgets 5000 20000 \
        --out benchmarks/results/yardstick2d_baselines.json       # the two baselines (METHODS section 2)
    python benchmarks/yardstick2d.py --flow --quick --out benchmarks/results/yardstick2d_rf.json
        # the rectified-flow yardstick 'gmm2-rf-exact' (exact velocity + residual; rollouts and evaluation by
        # ddim eta = 1, the exact Gaussian step, 20 steps; p* and J* are the same)
Writes benchmarks/results/yardstick2d.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ctrldiff.data.toy2d import gmm_preset
from ctrldiff.eval.evaluate import evaluate_policy
from ctrldiff.eval.exact2d import TiltedTarget
from ctrldiff.rewards.toy2d import mode_switch, quadratic
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer

REWARDS = {
    # unimodal: pulls mass towards (0, 2), between and above the two modes
    "quadratic": (lambda: quadratic((0.0, 2.0), 4.0), 0.5),
    # moves mass from the heavy left mode (0.7) to the light right one (0.3)
    "mode_switch": (lambda: mode_switch(2.0), 0.5),
}
ALGOS = {
    "ctrl-a": dict(algo="ctrl", ctrl=dict(estimator="a", value=dict(reward_term="surrogate", epochs=4))),
    "ctrl-b": dict(algo="ctrl", ctrl=dict(estimator="b", value=dict(reward_term="surrogate", epochs=4))),
    "ddpo": dict(algo="ddpo"),
    "dpok": dict(algo="dpok"),
    # not in the default set (--algos reward-backprop diffusion-dpo diffusion-dpo-bt). Diffusion-DPO's learning
    # rates are the best of {1e-3, 1e-4, 1e-5} on seed 0 (hard labels drift without bound at 1e-3 and 1e-4)
    "reward-backprop": dict(algo="reward-backprop"),
    "diffusion-dpo": dict(algo="diffusion-dpo", optim=dict(lr=1e-5)),
    "diffusion-dpo-bt": dict(algo="diffusion-dpo", diffusion_dpo=dict(labels="bradley-terry"), optim=dict(lr=1e-4)),
    "diffusion-dpo-bt-d8": dict(algo="diffusion-dpo", diffusion_dpo=dict(labels="bradley-terry", draws=8),
                                optim=dict(lr=1e-4)),
    # the strongest current baselines (METHODS section 9; --algos adjoint-matching flow-grpo flow-grpo-fast
    # diffusion-nft): all with their defaults on the yardstick's EM(20) rollouts (eta = 1, memoryless), except
    # Flow-GRPO-Fast (eta sampler: ODE steps with a random window of 4 SDE steps at eta = 1 in the first 10 steps;
    # -anywhere: the window anywhere in the 20 steps, the first version measured)
    "adjoint-matching": dict(algo="adjoint-matching"),
    "flow-grpo": dict(algo="flow-grpo"),
    "flow-grpo-fast": dict(algo="flow-grpo", flow_grpo=dict(window=4), sampler=dict(solver="eta", eta=1.0)),
    "flow-grpo-fast-anywhere": dict(algo="flow-grpo", flow_grpo=dict(window=4, window_range=(0, 20)),
                                    sampler=dict(solver="eta", eta=1.0)),
    "diffusion-nft": dict(algo="diffusion-nft"),
    # variants measured while diagnosing (docs/BASELINES.md)
    "adjoint-matching-lr3e-4": dict(algo="adjoint-matching", optim=dict(lr=3e-4)),
    "diffusion-nft-kl1": dict(algo="diffusion-nft", diffusion_nft=dict(kl_coef=1.0)),
}
NEW_ALGOS = ["adjoint-matching", "flow-grpo", "flow-grpo-fast", "diffusion-nft", "diffusion-nft-kl1"]
VARIANTS = ["adjoint-matching-lr3e-4", "flow-grpo-fast-anywhere"]  # diagnostics only, in no default set
DEFAULT_ALGOS = ["ctrl-a", "ctrl-b", "ddpo", "dpok"]
BATCH = 256


def run_one(reward_name: str, algo: str, seed: int, budgets: list[int], eval_every: int, n_eval: int,
            return_trainer: bool = False, robust: bool = False, flow: bool = False) -> dict:
    """Train ``algo`` until the largest budget, evaluating at each budget; ``return_trainer`` adds the trained
    Trainer under "trainer" (for further evaluation, e.g. with other solvers); ``robust`` adds E r, KL_path and J
    of the final model under the solvers / step counts of benchmarks/robustness.py (the step-robustness table).
    ``flow``: the rectified-flow yardstick 'gmm2-rf-exact', sampled (training and evaluation) by ddim eta = 1."""
    make, beta = REWARDS[reward_name]
    reward = make()
    target = TiltedTarget(gmm_preset("gmm2"), reward, beta)
    j_ref = target.mean_reward_ref
    spec = dict(ALGOS[algo])
    optim = {"lr": 1e-3, "minibatch": 512, **spec.pop("optim", {})}  # an entry may override the optimiser
    sampler = dict(solver="ddim", eta=1.0, steps=20) if flow else dict(solver="em", steps=20)
    sampler.update(spec.pop("sampler", {}))  # an entry may override the rollout sampler
    cfg = TrainConfig(model="gmm2-rf-exact" if flow else "gmm2-exact", beta=beta, epochs=max(budgets) // BATCH + 1,
                      batch_size=BATCH, seed=seed, sampler=sampler, optim=optim,
                      log=dict(progress=False, tensorboard=False), **spec)
    tr = Trainer(cfg, reward=reward)
    curve, at_budget = [], {}
    todo = sorted(budgets)
    t0 = time.perf_counter()

    def evaluate(samples: bool = False):
        ev = evaluate_policy(tr.policy, tr.ref, tr.process, reward, sample_shape=(2,), n=n_eval, steps=20,
                             solver=sampler["solver"], eta=sampler.get("eta", 0.0), beta=beta, seed=10_000 + seed,
                             return_samples=samples)
        ev["gap"] = (target.J_star - ev["objective"]) / abs(target.J_star)
        ev["improvement_frac"] = (ev["objective"] - j_ref) / (target.J_star - j_ref)
        ev["queries"] = tr.reward_queries
        return ev

    while todo:
        tr.step()
        if todo and tr.reward_queries >= todo[0]:
            ev = evaluate(samples=True)
            x = ev.pop("samples")
            ev.update(target.sample_distance(x, n_ref=n_eval))
            at_budget[todo.pop(0)] = ev
            curve.append({k: ev[k] for k in ("queries", "objective", "improvement_frac")})
        elif tr.epoch % eval_every == 0:
            ev = evaluate()
            curve.append({k: ev[k] for k in ("queries", "objective", "improvement_frac")})
    hit = next((c["queries"] for c in curve if c["improvement_frac"] >= 0.9), None)
    wall = time.perf_counter() - t0
    res = {"reward": reward_name, "algo": algo, "seed": seed, "model": cfg.model, "beta": beta,
           "J_star": target.J_star, "J_ref": j_ref, "at_budget": at_budget, "curve": curve, "queries_to_90pct": hit,
           "wall_s": wall, "train_per_epoch_s": tr.wall_s / max(tr.epoch, 1), "epochs": tr.epoch}
    if robust:
        from robustness import EVALS

        res["robust"] = {}
        for solver, steps, eta in EVALS:
            ev = evaluate_policy(tr.policy, tr.ref, tr.process, reward, sample_shape=(2,), n=n_eval, solver=solver,
                                 steps=steps, eta=eta, beta=beta, seed=777 + seed)
            res["robust"][f"{solver}:{steps}"] = {k: ev[k] for k in ("reward_mean", "kl_path", "objective")}
    if return_trainer:
        res["trainer"] = tr
    return res


def discretisation_floor(reward_name: str, n_eval: int = 2000, seeds=(0, 1, 2), steps: int = 20,
                         solver: str = "em", flow: bool = False) -> dict:
    """The gap that the exact optimal control (:class:`~ctrldiff.eval.exact2d.OptimalScore`) leaves when it is
    sampled and evaluated exactly as the trained models are (``solver``, ``steps``; the same evaluation seeds):
    E r, KL_path, J, gap and MMD^2 to p*, mean over ``seeds``. No algorithm can beat it on this grid except by noise."""
    from ctrldiff.eval.exact2d import OptimalScore
    from ctrldiff.models.mlp import ExactGMMScore
    from ctrldiff.noise import make_process

    make, beta = REWARDS[reward_name]
    reward = make()
    gmm = gmm_preset("gmm2")
    target = TiltedTarget(gmm, reward, beta)
    # flow: the rectified-flow yardstick (velocity models, sampled like the trained ones by ddim eta = 1)
    process = make_process("rf" if flow else "vp")
    prediction = "v" if flow else "eps"
    solver = "ddim" if flow else solver
    ref = ExactGMMScore(gmm, process, prediction=prediction)
    # the optimal score from the target's cells: a lattice of Gaussians, smooth where the cell is well below sigma_t
    # at the last time a step evaluates (sigma ~ 0.18 for 20 EM steps: cell 0.05, 4x fewer cells than the J* grid;
    # sigma ~ 0.035 for 100 steps: the J* grid's cell 0.025)
    star = OptimalScore(TiltedTarget(gmm, reward, beta, n_grid=200 if steps <= 20 else 400), process, mass_tol=1e-8,
                        prediction=prediction)
    rows = []
    for seed in seeds:
        ev = evaluate_policy(star, ref, process, reward, sample_shape=(2,), n=n_eval, steps=steps, solver=solver,
                             eta=1.0, beta=beta, seed=10_000 + seed, return_samples=True)
        x = ev.pop("samples")
        ev["gap"] = (target.J_star - ev["objective"]) / abs(target.J_star)
        ev.update(target.sample_distance(x, n_ref=n_eval))
        rows.append(ev)
    keys = ("reward_mean", "kl_path", "objective", "gap", "mmd")
    return {"reward": reward_name, "solver": solver, "steps": steps, "J_star": target.J_star,
            **{k: statistics.mean(r[k] for r in rows) for k in keys}, "per_seed": rows}


def _ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def table(results: list[dict], budgets: list[int], floors: list[dict] | None = None) -> str:
    lines = []
    for rname in REWARDS:
        rs = [r for r in results if r["reward"] == rname]
        if not rs:
            continue
        lines.append(f"\n**reward {rname}** (beta = {rs[0]['beta']}, J* = {rs[0]['J_star']:.4f}, "
                     f"J_ref = E_ref r = {rs[0]['J_ref']:.4f})\n")
        lines.append("| algo | queries | E r | KL_path | J | gap (J*-J)/|J*| | MMD² to p* |")
        lines.append("|---|---|---|---|---|---|---|")
        for fl in floors or []:
            if fl["reward"] == rname:
                lines.append(f"| exact optimal control (floor, {fl['solver']} {fl['steps']}) | — | " + " | ".join(
                    f"{fl[k]:.3f}" for k in ("reward_mean", "kl_path", "objective", "gap", "mmd")) + " |")
        for algo in ALGOS:
            ra = [r for r in rs if r["algo"] == algo]
            if not ra:
                continue
            for b in budgets:
                evs = [r["at_budget"][str(b)] if str(b) in r["at_budget"] else r["at_budget"].get(b) for r in ra]
                evs = [e for e in evs if e]
                lines.append(f"| {algo} | {b} | " + " | ".join(
                    _ms([e[k] for e in evs]) for k in ("reward_mean", "kl_path", "objective", "gap", "mmd")) + " |")
        lines.append("\n| algo | queries to reach 90% of J* - J_ref (per seed) | train wall-clock per epoch (s) |")
        lines.append("|---|---|---|")
        for algo in ALGOS:
            ra = [r for r in rs if r["algo"] == algo]
            if ra:
                per_epoch = [r["train_per_epoch_s"] for r in ra if "train_per_epoch_s" in r]
                lines.append(f"| {algo} | " + ", ".join(str(r["queries_to_90pct"] or "not reached") for r in ra)
                             + f" | {_ms(per_epoch)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--budgets", type=int, nargs="+", default=None)
    ap.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    ap.add_argument("--algos", nargs="+", default=DEFAULT_ALGOS, choices=list(ALGOS))
    ap.add_argument("--floor", action="store_true", help="also compute the discretisation floor of each reward")
    ap.add_argument("--robust", action="store_true", help="also evaluate each final model with other solvers / steps")
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flow", action="store_true", help="the rectified-flow yardstick gmm2-rf-exact (ddim eta = 1)")
    ap.add_argument("--out", default="benchmarks/results/yardstick2d.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    budgets = args.budgets or ([5000, 20000] if args.quick else [5000, 20000, 50000])
    t0 = time.perf_counter()
    results, floors = [], []
    if args.floor:
        for rname in args.rewards:
            fl = discretisation_floor(rname, n_eval=args.n_eval, flow=args.flow)
            print(f"{rname:12s} floor (exact optimal control, {fl['solver']} 20): J {fl['objective']:.4f} "
                  f"gap {fl['gap']:.4f} MMD {fl['mmd']:.4f}", flush=True)
            floors.append(fl)
    for rname in args.rewards:
        for algo in args.algos:
            for seed in seeds:
                res = run_one(rname, algo, seed, budgets, eval_every=5, n_eval=args.n_eval, robust=args.robust,
                              flow=args.flow)
                last = res["at_budget"][max(budgets)]
                print(f"{rname:12s} {algo:16s} seed {seed}: J {last['objective']:.4f} gap {last['gap']:.3f} "
                      f"(J* {res['J_star']:.4f}), 90% at {res['queries_to_90pct']} queries, {res['wall_s']:.0f} s",
                      flush=True)
                results.append(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"seeds": seeds, "budgets": budgets, "batch": BATCH, "total_s": time.perf_counter() - t0,
            "threads": args.threads, "model": "gmm2-rf-exact" if args.flow else "gmm2-exact"}
    out.write_text(json.dumps({"meta": meta, "results": results, "floors": floors}, indent=1))
    print(table(json.loads(out.read_text())["results"], budgets, floors))
    print(f"\ntotal {meta['total_s']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
