"""Solver and step-count robustness (issue: "fine-tune with EM at 20 steps; evaluate anywhere").

Each algorithm fine-tunes the exact-'gmm2' model (mode_switch reward, beta 0.5) with Euler-Maruyama at
20 steps for a fixed reward-query budget; the fine-tuned score is then evaluated with EM at 5, 10, 20,
50 and 100 steps, DDIM (eta = 0, 50 steps), Heun (25 steps = 50 model calls) and DPM-Solver++(2M)
(20 steps). J = E r - beta KL_path with KL_path by Girsanov along each solver's paths. With ``--optimal`` the table
also has the exact optimal control (:class:`~ctrldiff.eval.exact2d.OptimalScore`, the continuous-time optimum that
every method aims at) under the same solvers: what a fine-tune that learned the continuous-time object scores there.

    python benchmarks/robustness.py [--budget 20000] [--seeds 0 1] [--optimal]
Writes benchmarks/results/robustness.json and prints a markdown table.
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
from ctrldiff.rewards.toy2d import mode_switch
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer

ALGOS = {
    "ctrl-a": dict(algo="ctrl", ctrl=dict(estimator="a", value=dict(reward_term="surrogate", epochs=4))),
    "ctrl-b": dict(algo="ctrl", ctrl=dict(estimator="b", value=dict(reward_term="surrogate", epochs=4))),
    "ddpo": dict(algo="ddpo"),
    "dpok": dict(algo="dpok"),
}
EVALS = [("em", 5, 0.0), ("em", 10, 0.0), ("em", 20, 0.0), ("em", 50, 0.0), ("em", 100, 0.0),
         ("ddim", 50, 0.0), ("heun", 25, 0.0), ("dpmpp-2m", 20, 0.0)]
BETA, BATCH = 0.5, 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=20000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--optimal", action="store_true", help="also evaluate the exact optimal control under each solver")
    ap.add_argument("--out", default="benchmarks/results/robustness.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reward = mode_switch(2.0)
    target = TiltedTarget(gmm_preset("gmm2"), reward, BETA)
    t0 = time.perf_counter()
    rows = []
    for algo in args.algos:
        for seed in args.seeds:
            cfg = TrainConfig(model="gmm2-exact", beta=BETA, epochs=args.budget // BATCH + 1, batch_size=BATCH,
                              seed=seed, sampler=dict(solver="em", steps=20), optim=dict(lr=1e-3, minibatch=512),
                              log=dict(progress=False, tensorboard=False), **ALGOS[algo])
            tr = Trainer(cfg, reward=reward)
            while tr.reward_queries < args.budget:
                tr.step()
            for solver, steps, eta in EVALS:
                ev = evaluate_policy(tr.policy, tr.ref, tr.process, reward, sample_shape=(2,), n=args.n_eval,
                                     solver=solver, steps=steps, eta=eta, beta=BETA, seed=777 + seed)
                rows.append({"algo": algo, "seed": seed, "solver": solver, "steps": steps, **ev})
            print(f"{algo} seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    ref_rows = []
    for solver, steps, eta in EVALS:  # the reference model under each solver (J_ref, KL = 0)
        ev = evaluate_policy(tr.ref, tr.ref, tr.process, reward, sample_shape=(2,), n=args.n_eval, solver=solver,
                             steps=steps, eta=eta, beta=BETA, seed=777)
        ref_rows.append({"solver": solver, "steps": steps, **ev})
    opt_rows = optimal_rows(target.gmm, reward, BETA, tr.process, tr.ref, args.n_eval) if args.optimal else []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"budget": args.budget, "seeds": args.seeds, "beta": BETA, "J_star": target.J_star,
            "J_ref_exact": target.mean_reward_ref, "total_s": time.perf_counter() - t0}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "reference": ref_rows, "optimal": opt_rows}, indent=1))
    print(f"\nJ after fine-tuning with EM-20 ({args.budget} reward queries), evaluated with other solvers; "
          f"J* = {target.J_star:.4f}, mean ± std over seeds {args.seeds}\n")
    header = "| algo | " + " | ".join(f"{s} {n}" for s, n, _ in EVALS) + " |"
    print(header)
    print("|---" * (len(EVALS) + 1) + "|")
    print("| reference | " + " | ".join(f"{r['objective']:.3f}" for r in ref_rows) + " |")
    if opt_rows:
        print("| exact optimal control | " + " | ".join(f"{r['objective']:.3f}" for r in opt_rows) + " |")
    for algo in args.algos:
        cells = []
        for solver, steps, _ in EVALS:
            js = [r["objective"] for r in rows if r["algo"] == algo and r["solver"] == solver and r["steps"] == steps]
            cells.append(f"{statistics.mean(js):.3f} ± {statistics.stdev(js):.3f}" if len(js) > 1 else f"{js[0]:.3f}")
        print(f"| {algo} | " + " | ".join(cells) + " |")
    print(f"\ntotal {meta['total_s']:.0f} s; wrote {out}")


def optimal_rows(gmm, reward, beta: float, process, ref, n_eval: int, solvers=None, n_grid: int = 100,
                 seed: int = 777) -> list[dict]:
    """The exact optimal control s* = s_ref + grad V / beta, sampled and scored like the fine-tuned models under each
    solver (``solvers``: (solver, steps, eta), EVALS by default): E r, KL_path and J. A model that learned the
    continuous-time optimum gets these numbers, whatever a coarse solver's KL_path quadrature makes of them. The
    target's grid: ``n_grid`` cells a side (100 and 200 gave the same E r, KL_path and J to 3 decimals at em 5, 10, 20
    and 50 on the mode switch)."""
    from ctrldiff.eval.exact2d import OptimalScore

    star = OptimalScore(TiltedTarget(gmm, reward, beta, n_grid=n_grid), process, mass_tol=1e-8)
    rows = []
    for solver, steps, eta in solvers or EVALS:
        ev = evaluate_policy(star, ref, process, reward, sample_shape=(2,), n=n_eval, solver=solver, steps=steps,
                             eta=eta, beta=beta, seed=seed)
        rows.append({"solver": solver, "steps": steps, **{k: ev[k] for k in ("reward_mean", "kl_path", "objective")}})
    return rows


if __name__ == "__main__":
    main()
