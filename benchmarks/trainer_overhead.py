"""Trainer overhead: time per (sample x step) of a CTRL epoch vs the bare model work it contains.

The bare work for one epoch of B trajectories x K steps is: K batched forward passes to roll out
(no grad), one forward pass of the frozen reference over the B*K visited states (no grad), and one
forward+backward pass (+ optimiser step) of the policy over the B*K (sample, step) pairs in the
trainer's minibatches. The trainer adds the solver arithmetic, reward calls, KL accounting, the value
network fit and the bookkeeping. Goal: trainer time <= 1.3 x bare time.

    python benchmarks/trainer_overhead.py [--epochs 5] [--threads 2] [--estimator a]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctrldiff.solvers import model_eps
from ctrldiff.train.config import TrainConfig
from ctrldiff.train.trainer import Trainer


def bare_epoch(tr: Trainer) -> float:
    """The model calls of one epoch, with nothing else."""
    cfg, task, proc = tr.cfg, tr.task, tr.process
    B, K, mb = cfg.batch_size, cfg.sampler.steps, cfg.optim.minibatch
    cond = task.sample_conditions(B)
    x = torch.randn((B, *task.sample_shape))
    times = tr.times
    t0 = time.perf_counter()
    states = []
    with torch.no_grad():
        for k in range(K):
            states.append(x)
            x = x + 0.01 * model_eps(tr.policy, proc, x, times[k], cond)
        xs = torch.stack(states, 1).reshape(B * K, *task.sample_shape)
        ts = times[:K].repeat(B)
        cs = cond.repeat_interleave(K) if cond is not None else None
        for i in range(0, B * K, 4096):
            model_eps(tr.ref, proc, xs[i:i + 4096], ts[i:i + 4096], None if cs is None else cs[i:i + 4096])
    perm = torch.randperm(B * K)
    for s in range(0, B * K - mb + 1, mb):
        i = perm[s:s + mb]
        loss = model_eps(tr.policy, proc, xs[i], ts[i], None if cs is None else cs[i]).pow(2).mean()
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tr.optimizer.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--estimator", default="a", choices=["a", "b"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(algo="ctrl", ctrl=dict(estimator=args.estimator), log=dict(progress=False, tensorboard=False))
    tr = Trainer(cfg)
    B, K = cfg.batch_size, cfg.sampler.steps
    tr.step()
    bare_epoch(tr)  # warm-up
    trainer_s, bare_s = [], []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        rec = tr.step()
        trainer_s.append(time.perf_counter() - t0)
        bare_s.append(bare_epoch(tr))
    tm, bm = statistics.median(trainer_s), statistics.median(bare_s)
    print(f"CTRL({args.estimator}) on the shipped digits model, {B} samples x {K} steps per epoch, "
          f"{args.threads} threads, median of {args.epochs} epochs")
    print("| | s / epoch | ms / (sample x step) |\n|---|---|---|")
    print(f"| trainer epoch | {tm:.3f} | {1000 * tm / (B * K):.3f} |")
    print(f"| bare model work | {bm:.3f} | {1000 * bm / (B * K):.3f} |")
    print(f"| ratio | {tm / bm:.2f} | goal <= 1.3 |")
    print(f"(last epoch: rollout {rec['rollout_s']:.3f} s)")


if __name__ == "__main__":
    main()
