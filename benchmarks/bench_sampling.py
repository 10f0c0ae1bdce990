"""Time sampling 100 digits with 50 steps for every solver, with classifier-free guidance.

    python benchmarks/bench_sampling.py [--model PATH] [--n 100] [--steps 50] [--guidance 2] [--threads N]

One warm-up run per solver, then the median of ``--repeats`` timed runs. Heun makes two model
calls per step; CFG doubles the batch of every call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctrldiff.assets import DEFAULT_GUIDANCE, default_digits_model_path
from ctrldiff.guidance import with_guidance
from ctrldiff.models import load_model
from ctrldiff.models import unet as _unet  # noqa: F401  (registers "unet")
from ctrldiff.models.unet import num_parameters
from ctrldiff.noise import process_from_config
from ctrldiff.solvers import SOLVERS, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_digits_model_path()))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    process = process_from_config(model.metadata["process"])
    guided = with_guidance(model, args.guidance)
    cond = torch.arange(args.n) % model.num_classes
    shape = (args.n, model.in_channels, model.resolution, model.resolution)
    print(f"model {args.model} ({num_parameters(model):,} parameters), n={args.n}, steps={args.steps}, "
          f"guidance={args.guidance}, torch threads={torch.get_num_threads()}")
    print(f"{'solver':<10} {'model calls':>11} {'median s':>9} {'min s':>7}")
    for name in SOLVERS:
        calls = args.steps * (2 if name == "heun" else 1)
        with torch.no_grad():
            sample(guided, process, shape, 5, name, cond=cond)  # warm-up
            times = []
            for r in range(args.repeats):
                gen = torch.Generator().manual_seed(r)
                t0 = time.perf_counter()
                sample(guided, process, shape, args.steps, name, cond=cond, generator=gen)
                times.append(time.perf_counter() - t0)
        print(f"{name:<10} {calls:>11} {statistics.median(times):>9.2f} {min(times):>7.2f}")


if __name__ == "__main__":
    main()
