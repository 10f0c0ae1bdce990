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
}
DEFAULT_ALGOS = ["ctrl-a", "ctrl-b", "ddpo", "dpok"]
BATCH = 256


def run_one(reward_name: str, algo: str, seed: int, budgets: list[int], eval_every: int, n_eval: int,
            return_trainer: bool = False, flow: bool = False) -> dict:
    """Train ``algo`` until the largest budget, evaluating at each budget; ``return_trainer`` adds the trained
    Trainer under "trainer" (for further evaluation, e.g. with other solvers). ``flow``: the rectified-flow
    yardstick 'gmm2-rf-exact', sampled (training and evaluation) by ddim eta = 1."""
    make, beta = REWARDS[reward_name]
    reward = make()
    target = TiltedTarget(gmm_preset("gmm2"), reward, beta)
    j_ref = target.mean_reward_ref
    spec = dict(ALGOS[algo])
    optim = {"lr": 1e-3, "minibatch": 512, **spec.pop("optim", {})}  # an entry may override the optimiser
    sampler = dict(solver="ddim", eta=1.0, steps=20) if flow else dict(solver="em", steps=20)
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
    res = {"reward": reward_name, "algo": algo, "seed": seed, "model": cfg.model, "beta": beta,
           "J_star": target.J_star, "J_ref": j_ref,
           "at_budget": at_budget, "curve": curve, "queries_to_90pct": hit, "wall_s": time.perf_counter() - t0}
    if return_trainer:
        res["trainer"] = tr
    return res


def _ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def table(results: list[dict], budgets: list[int]) -> str:
    lines = []
    for rname in REWARDS:
        rs = [r for r in results if r["reward"] == rname]
        if not rs:
            continue
        lines.append(f"\n**reward {rname}** (beta = {rs[0]['beta']}, J* = {rs[0]['J_star']:.4f}, "
                     f"J_ref = E_ref r = {rs[0]['J_ref']:.4f})\n")
        lines.append("| algo | queries | E r | KL_path | J | gap (J*-J)/|J*| | MMD² to p* |")
        lines.append("|---|---|---|---|---|---|---|")
        for algo in ALGOS:
            ra = [r for r in rs if r["algo"] == algo]
            if not ra:
                continue
            for b in budgets:
                evs = [r["at_budget"][str(b)] if str(b) in r["at_budget"] else r["at_budget"].get(b) for r in ra]
                evs = [e for e in evs if e]
                lines.append(f"| {algo} | {b} | " + " | ".join(
                    _ms([e[k] for e in evs]) for k in ("reward_mean", "kl_path", "objective", "gap", "mmd")) + " |")
        lines.append("\n| algo | queries to reach 90% of J* - J_ref (per seed) |")
        lines.append("|---|---|")
        for algo in ALGOS:
            ra = [r for r in rs if r["algo"] == algo]
            if ra:
                lines.append(f"| {algo} | " + ", ".join(str(r["queries_to_90pct"] or "not reached") for r in ra) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--budgets", type=int, nargs="+", default=None)
    ap.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    ap.add_argument("--algos", nargs="+", default=DEFAULT_ALGOS, choices=list(ALGOS))
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flow", action="store_true", help="the rectified-flow yardstick gmm2-rf-exact (ddim eta = 1)")
    ap.add_argument("--out", default="benchmarks/results/yardstick2d.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    budgets = args.budgets or ([5000, 20000] if args.quick else [5000, 20000, 50000])
    t0 = time.perf_counter()
    results = []
    for rname in args.rewards:
        for algo in args.algos:
            for seed in seeds:
                res = run_one(rname, algo, seed, budgets, eval_every=5, n_eval=args.n_eval, flow=args.flow)
                last = res["at_budget"][max(budgets)]
                print(f"{rname:12s} {algo:16s} seed {seed}: J {last['objective']:.4f} gap {last['gap']:.3f} "
                      f"(J* {res['J_star']:.4f}), 90% at {res['queries_to_90pct']} queries, {res['wall_s']:.0f} s",
                      flush=True)
                results.append(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"seeds": seeds, "budgets": budgets, "batch": BATCH, "total_s": time.perf_counter() - t0,
            "threads": args.threads, "model": "gmm2-rf-exact" if args.flow else "gmm2-exact"}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(table(json.loads(out.read_text())["results"], budgets))
    print(f"\ntotal {meta['total_s']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
