"""The digits main job, side by side: CTRL, DDPO and DPOK with the default configuration (the shipped
digits model, digit-alignment reward, EM 10 steps, 128 samples per epoch) on the same budget.

Each run reports the held-out evaluation the trainer writes at the end (500 fixed-noise samples,
reward before -> after, KL_path, J) plus the fraction of samples the shipped classifier labels
correctly, and its wall time.

    python benchmarks/digits_main.py [--epochs 60] [--algos ctrl ddpo dpok] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ctrldiff.eval.evaluate import evaluate_policy
from ctrldiff.rewards import make_reward
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="default: the config default")
    ap.add_argument("--algos", nargs="+", default=["ctrl", "ddpo", "dpok"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/digits_main")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    correct = make_reward("digit-correct")
    rows = []
    for algo in args.algos:
        kw = {"epochs": args.epochs} if args.epochs else {}
        cfg = TrainConfig(algo=algo, seed=args.seed, log=dict(progress=False, tensorboard=False), **kw)
        out = Path(args.out) / algo
        t0 = time.perf_counter()
        tr = Trainer(cfg, out, overwrite=True)
        tr.train()
        wall = time.perf_counter() - t0
        ev = json.loads((out / "final_eval.json").read_text())
        s = cfg.sampler
        n = cfg.log.num_final_eval
        acc = {name: evaluate_policy(m, tr.ref, tr.process, correct, sample_shape=tr.task.sample_shape, n=n,
                                     solver=s.solver, steps=s.steps, cond=tr.task.eval_conditions(n), seed=4321)
               ["reward_mean"] for name, m in (("before", tr.ref), ("after", tr.policy))}
        rows.append({"algo": algo, "epochs": cfg.epochs, "wall_s": wall, "reward_queries": tr.reward_queries,
                     "before": ev["before"], "after": ev["after"], "accuracy": acc})
        print(f"{algo}: reward {ev['before']['reward_mean']:.3f} -> {ev['after']['reward_mean']:.3f}, "
              f"KL {ev['after']['kl_path']:.3f}, acc {acc['before']:.3f} -> {acc['after']:.3f}, {wall:.0f} s", flush=True)
    print(f"\n| algo | epochs | reward queries | E r before -> after | KL_path | J (beta={cfg.beta}) | "
          "classifier accuracy before -> after | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, a = r["before"], r["after"]
        print(f"| {r['algo']} | {r['epochs']} | {r['reward_queries']} | {b['reward_mean']:.3f} -> {a['reward_mean']:.3f} | "
              f"{a['kl_path']:.3f} | {b['objective']:.3f} -> {a['objective']:.3f} | "
              f"{r['accuracy']['before']:.3f} -> {r['accuracy']['after']:.3f} | {r['wall_s']:.0f} s |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
